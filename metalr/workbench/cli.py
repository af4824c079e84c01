"""``metalr ablate`` / ``report`` / ``find-lr`` (dispatched from :mod:`metalr.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(command: str, argv: list[str]) -> int:
    return {"ablate": ablate_main, "report": report_main, "find-lr": find_lr_main}[command](argv)


def ablate_main(argv: list[str]) -> int:
    from metalr.cli import _parse

    parser = argparse.ArgumentParser(
        prog="metalr ablate",
        description="Run an ablation grid (tasks × optimizers × lrs × seeds) and report it.",
    )
    parser.add_argument("--config", help="YAML study config (default: the embedded default study)")
    parser.add_argument("--no-report", action="store_true", help="skip the tables and plots")
    args, overrides = _parse(parser, argv)
    from metalr.cli import _config_errors
    from metalr.workbench.config import default_study, load_study
    from metalr.workbench.report import report
    from metalr.workbench.runner import run_study

    try:
        if args.config:
            cfg = load_study(args.config, overrides, args.smoke)
        else:
            cfg = default_study(overrides, args.smoke)
        records = run_study(cfg, quiet=args.quiet, config_file=args.config)
    except (*_config_errors(), ImportError) as exc:  # a bad config, a YAML error, a folder
        print(f"metalr ablate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmetalr ablate: interrupted; finished runs are recorded: rerun the same command "
              "to continue", file=sys.stderr)  # fmt: skip
        return 130
    # the progress output already ended with "n cached, k run"; --quiet prints only this line
    print(records.summary(cfg.name) if args.quiet else f"{cfg.name}: records in {cfg.out_dir}",
          file=sys.stderr)  # fmt: skip
    if not args.no_report:
        try:
            _print_report(*report(cfg.out_dir))
        except ValueError as exc:  # records the report refuses (e.g. mixed step budgets)
            print(f"metalr ablate: error: {exc}", file=sys.stderr)
            return 2
    return 0


def report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="metalr report", description="Tables and plots of an ablation results folder."
    )
    parser.add_argument("results", help="results folder (or its records.jsonl)")
    parser.add_argument("--out", help="output folder (default: the results folder)")
    args = parser.parse_args(argv)
    from metalr.workbench.report import report

    try:
        text, files = report(args.results, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"metalr report: error: {exc}", file=sys.stderr)
        return 2
    _print_report(text, files)
    return 0


def _print_report(text: str, files: list[Path]) -> None:
    """The report's markdown on stdout; the files written, on stderr."""
    print(text)
    print(f"wrote {', '.join(str(f) for f in files)}", file=sys.stderr)


def _find_lr_kinds() -> tuple[str, ...]:
    """Kinds ``metalr find-lr --optimizer`` accepts: the workbench's kinds whose lr the range
    test can sweep (``range_test_adam`` / ``tuned_adam`` would only be plain Adam again; metalr's
    own kinds adapt their rates on top of the swept ``lr`` — a seek ramp even starts below it —
    so the curve would be read against a rate the optimizer does not apply)."""
    from metalr.workbench.optimizers import KINDS, METALR, SEARCHED

    return tuple(k for k in KINDS if k not in SEARCHED and k not in METALR and k != "hyperlr")


def find_lr_parser() -> argparse.ArgumentParser:
    """The ``metalr find-lr`` argument parser (every option documented, with its default).

    Example::

        >>> find_lr_parser().parse_args(["--optimizer", "sgd_hd"]).optimizer
        'sgd_hd'
    """
    from metalr.workbench.tasks import TASKS

    kinds = _find_lr_kinds()
    parser = argparse.ArgumentParser(
        prog="metalr find-lr",
        description="LR range test (Smith 2017): train a fresh model while the learning rate "
        "grows exponentially from --start-lr to --end-lr, plot the loss against the rate and "
        "suggest a rate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--task", default="digits_mlp", choices=TASKS, metavar="TASK",
                        help=f"workbench task, one of: {', '.join(TASKS)}")  # fmt: skip
    parser.add_argument("--size", default="smoke", choices=("smoke", "full"),
                        help="task size (smoke: small and fast)")  # fmt: skip
    parser.add_argument("--optimizer", default="adam", choices=kinds, metavar="KIND",
                        help=f"optimizer kind, one of: {', '.join(kinds)} (not metalr's own: "
                        "their rates adapt on top of the swept lr)")  # fmt: skip
    parser.add_argument("--start-lr", type=float, default=1e-7, help="first learning rate")
    parser.add_argument("--end-lr", type=float, default=10.0,
                        help="last learning rate (the test stops earlier if the loss diverges)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=100,
                        help="training steps, spaced evenly in log lr")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="model and batch seed")
    parser.add_argument("--method", default="min/10", choices=("min/10", "steepest"),
                        help="min/10: a decade below the rate of the lowest (smoothed) loss; "
                        "steepest: where the loss falls fastest")  # fmt: skip
    parser.add_argument("--out", default="range_test.png", help="plot file (PNG)")
    return parser


def find_lr_main(argv: list[str]) -> int:
    import torch

    from metalr.workbench.find_lr import find_lr
    from metalr.workbench.optimizers import build_optimizer, check_spec
    from metalr.workbench.tasks import make_task

    parser = find_lr_parser()
    args = parser.parse_args(argv)
    if not 0.0 < args.start_lr < args.end_lr:
        parser.error(f"arguments --start-lr/--end-lr: need 0 < --start-lr < --end-lr, got "
                     f"{args.start_lr:g} and {args.end_lr:g}")  # fmt: skip
    if args.steps < 2:
        parser.error(f"argument --steps: need an integer >= 2, got {args.steps}")
    torch.set_num_threads(1)
    try:
        spec = check_spec("optimizer", {"kind": args.optimizer})
    except ValueError as exc:  # its message names the config path optimizers.optimizer...
        parser.error(f"argument --optimizer: {args.optimizer!r} cannot be built: {exc}")
    try:
        task = make_task(args.task, args.size)
        res = find_lr(lambda: task.model(args.seed), lambda p: build_optimizer(spec, p, 1e-3),
                      lambda m, b: task.loss(m(b[0]), b[1]), task.batches(args.seed),
                      start_lr=args.start_lr, end_lr=args.end_lr, num_steps=args.steps,
                      method=args.method)  # fmt: skip
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"metalr find-lr: error: {exc}", file=sys.stderr)
        return 2
    res.plot(args.out, title=f"LR range test: {args.optimizer} on {args.task}")
    info = res.to_dict()
    print(f"suggested lr {info['suggested_lr']:.3g} ({info['method']}; min-loss lr "
          f"{info['min_loss_lr']:.3g}, lowest raw loss at {info['raw_min_loss_lr']:.3g}, "
          f"steepest {info['steepest_lr']:.3g}, stopped at "
          f"{info['diverged_at'] or args.end_lr:.3g}) -> {Path(args.out)}")  # fmt: skip
    return 0
