"""``metalr`` command line.

* ``metalr [demo]``: the embedded default job (Adam vs AdamHD on sklearn digits).
* ``metalr bench-step``: step-time benchmark of the optimizers.
* ``metalr meta-train --config FILE [--run-dir DIR] [--resume] [--quiet] [key=value ...]``:
  meta-learn rates from a YAML run config (``metalr.meta.run_config``; overrides are
  ``section.key=value`` or ``--section.key=value``, type-checked; ``--smoke`` or ``smoke=true``
  applies the config's smoke section).
* ``metalr few-shot-eval --checkpoint PATH | --prior PATH --config FILE [key=value ...]``:
  score a run (or an exported prior in the drop-in optimizers) on its fixed test tasks.
* ``metalr ablate [--config FILE] [--smoke] [--no-report] [key=value ...]``: run an ablation grid
  (``metalr.workbench``; no config: the embedded default study), then its report.
* ``metalr report RESULTS [--out DIR]``: tables and plots of an ablation results folder.
* ``metalr find-lr [--task T] [--optimizer KIND] [--out PNG]``: LR range test on a workbench task.
* ``metalr --help`` / ``metalr help [COMMAND]``: the commands, or one command's options;
  ``metalr --version``: the installed version.

Example::

    $ metalr --version
    metalr 0.1.0
    $ metalr help find-lr          # same as: metalr find-lr --help
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

#: Every subcommand with its one-line description (what ``metalr --help`` lists).
DESCRIPTIONS = {
    "demo": "Adam vs AdamHD on sklearn digits, ~15 s (the default when no command is given)",
    "bench-step": "time optimizer.step() of metalr's optimizers against torch.optim",
    "meta-train": "meta-learn learning rates from a YAML run config (checkpoints, resume)",
    "few-shot-eval": "score a meta-training run, or an exported prior, on its fixed test tasks",
    "ablate": "run an ablation grid (tasks x optimizers x lrs x seeds), then its report",
    "report": "tables and plots of an ablation results folder",
    "find-lr": "LR range test (Smith 2017) on a workbench task: a suggested learning rate",
    "help": "show this help, or a command's options: metalr help COMMAND",
}
COMMANDS = tuple(c for c in DESCRIPTIONS if c != "help")


def usage() -> str:
    """The top-level help: every subcommand with one line each.

    Example::

        >>> "find-lr" in usage()
        True
    """
    from metalr import __version__

    width = max(len(c) for c in DESCRIPTIONS) + 2
    lines = [
        "usage: metalr [-h] [-V] [COMMAND] [options]",
        "",
        f"metalr {__version__}: learning rates that adapt by hypergradient descent, meta-learned",
        "rate priors, and an ablation workbench.",
        "",
        "commands:",
        *(f"  {c:<{width}}{d}" for c, d in DESCRIPTIONS.items()),
        "",
        "options:",
        f"  {'-h, --help':<{width}}show this help and exit",
        f"  {'-V, --version':<{width}}print metalr's version and exit",
        "",
        "Run 'metalr COMMAND --help' (or 'metalr help COMMAND') for a command's options.",
    ]
    return "\n".join(lines) + "\n"


def _version() -> str:
    from metalr import __version__

    return f"metalr {__version__}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``metalr`` command; returns the exit status.

    Example::

        >>> main(["--version"])  # doctest: +SKIP
        metalr 0.1.0
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage(), end="")
        return 0
    if argv[:1] in (["-V"], ["--version"]):
        print(_version())
        return 0
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "demo"
    if command == "help":
        if not argv or argv[0] in ("-h", "--help"):  # `metalr help --help`: the same usage
            print(usage(), end="")
            return 0
        if argv[0] not in COMMANDS:
            return _unknown(argv[0])
        command, argv = argv[0], ["--help"]
    if command == "demo":
        from metalr.demo import main as demo

        return demo(argv)
    if command == "bench-step":
        from metalr.bench import main as bench

        return bench(argv)
    if command == "meta-train":
        return meta_train_main(argv)
    if command == "few-shot-eval":
        return few_shot_eval_main(argv)
    if command in ("ablate", "report", "find-lr"):
        from metalr.workbench import cli as workbench_cli

        return workbench_cli.main(command, argv)
    return _unknown(command)


def _unknown(command: str) -> int:
    import difflib

    expected = ", ".join(DESCRIPTIONS)
    close = difflib.get_close_matches(command, DESCRIPTIONS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    print(
        f"metalr: unknown command {command!r}{hint}; expected one of {expected}. "
        "Run 'metalr --help' for what each does.",
        file=sys.stderr,
    )
    return 2


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list]:
    """Known options, plus every ``key=value`` / ``--key=value`` as an override."""
    parser.add_argument(
        "overrides", nargs="*",
        help="key=value or section.key=value, type-checked (e.g. seeds=[0,1] tasks=[digits_mlp] "
        "steps=100 out=runs/x; meta-train: meta.inner_steps=2); the config's keys are the valid ones",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="apply the config's smoke section")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    args, rest = parser.parse_known_args(argv)
    overrides = [*args.overrides, *rest]
    bad = [a for a in overrides if "=" not in a]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are key=value)")
    if args.threads < 1:
        parser.error(f"argument --threads: invalid value {args.threads} (expected an integer >= 1)")
    import torch

    torch.set_num_threads(args.threads)
    return args, overrides


def _config_errors() -> tuple[type[Exception], ...]:
    """What reading a config or checkpoint can raise for a bad file: reported, exit 2 (a YAML
    syntax error included when PyYAML is installed)."""
    try:
        import yaml
    except ImportError:
        return (ValueError, OSError)
    return (ValueError, OSError, yaml.YAMLError)


def _summary(res: dict[str, Any], path: Path | str) -> str:
    t = res["test"]
    key = "accuracy" if "accuracy" in t else "query_loss"
    return (
        f"{res['name']}: test {key} {t[key]:.4f} ± {t[key + '_ci95']:.4f} (95% CI, "
        f"{int(t['num_tasks'])} tasks, {t['k_shot']}-shot) in {res['wall_time_s']:.1f} s -> {path}"
    )


def meta_train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="metalr meta-train", description="Meta-learn learning rates from a YAML run config."
    )
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--run-dir", help="output folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    args, overrides = _parse(parser, argv)
    from metalr.meta.run_config import load_config, parse_override
    from metalr.meta.runner import meta_train

    run_dir: Path | None = None
    try:
        cfg = load_config(args.config, overrides, args.smoke)
        smoke = args.smoke or any(parse_override(o) == (["smoke"], True) for o in overrides)
        run_dir = Path(args.run_dir or Path("runs") / f"{cfg.name}{'-smoke' if smoke else ''}")
        res = meta_train(
            cfg, run_dir, resume=args.resume, quiet=args.quiet, config_file=args.config
        )
    except _config_errors() as exc:
        print(f"metalr meta-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\nmetalr meta-train: interrupted; the last checkpoint is in {run_dir}: run the same "
            "command with --resume to continue",
            file=sys.stderr,
        )
        return 130
    if not args.quiet:
        print(_summary(res, run_dir / "results.json"), file=sys.stderr)
    return 0


def few_shot_eval_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="metalr few-shot-eval",
        description="Adapt to fixed test tasks' support sets; report query metrics with 95% CIs.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run's checkpoint.pt (its meta-learner)")
    source.add_argument("--prior", help="an exported prior, adapted with SGDHD/AdamHD")
    parser.add_argument(
        "--config", help="YAML config (default: the checkpoint's; a prior needs it)"
    )
    parser.add_argument("--out", help="JSON output (default: beside the checkpoint or prior)")
    args, overrides = _parse(parser, argv)
    from metalr.meta.evaluation import few_shot_eval

    default = "few_shot_eval.json" if args.checkpoint else "prior_eval.json"
    out = args.out or Path(args.checkpoint or args.prior).parent / default
    if Path(out).is_dir():
        parser.error(f"argument --out: {out} is a folder; give the JSON file's path")
    try:
        res = few_shot_eval(
            args.checkpoint, prior=args.prior, config_file=args.config, overrides=overrides,
            smoke=args.smoke, out=out,
        )  # fmt: skip
    except _config_errors() as exc:
        print(f"metalr few-shot-eval: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(_summary(res, out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
