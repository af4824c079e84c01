"""Issue 11, goal 2: the wall-time cost of ``observe_validation`` at the recommended frequency.

Paired and interleaved (the cores are shared): for each task and repeat, one training run of
AdamHD at defaults without the option and one with it (a validation batch of the training batch
size every 10 steps as in study 9, or every ``--every`` steps), in alternating order; the ratio
of each pair's times, and the median over repeats. Also the same for Adam + ReduceLROnPlateau
(a validation forward pass only) against plain Adam, for scale.

    python experiments/bench_validation_cost.py             # ~3 min on one core
    python experiments/bench_validation_cost.py --repeats 1 --tasks digits_logreg --smoke
    python experiments/bench_validation_cost.py --every 20 --rewind   # the rewind's own cost
    python experiments/bench_validation_cost.py --every 20 --pass     # a whole pass, loss alone
    python experiments/bench_validation_cost.py --every 20 --ray      # the ray ceiling's cost
    python experiments/bench_validation_cost.py --every 20 --recommended  # option + ray ÷ AdamHD

Prints a table and writes ``experiments/results/bench_validation_cost.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from study_budgets import study_steps

from metalr.workbench.runner import train
from metalr.workbench.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]


#: The tasks timed without ``--tasks``.
DEFAULT_TASKS = "digits_mlp,mnist1d_mlp,animal_cnn,pysrc_transformer"

#: Steps between validation batches without ``--every`` (study 9's first frequency).
DEFAULT_EVERY = 10


def every_flag(every: int) -> str:
    """The command-line flag that selects ``every`` ('' for the default)."""
    return "" if every == DEFAULT_EVERY else f" --every {every}"


def results_path(
    every: int,
    results: Path = ROOT / "experiments/results",
    rewind: bool = False,
    whole_pass: bool = False,
    ray: bool = False,
    recommended: bool = False,
) -> Path:
    """The file in ``results`` that holds the table of a stream every ``every`` steps (the
    default's: the original file; ``rewind``: the rewind's own table; ``whole_pass``: a pass
    over the whole validation split observed alone; ``ray``: the ray ceiling's)."""
    name = ("" if every == DEFAULT_EVERY else f"_every{every}") + ("_rewind" if rewind else "")
    name += ("_pass" if whole_pass else "") + ("_ray" if ray else "")
    name += "_recommended" if recommended else ""
    return results / f"bench_validation_cost{name}.md"


#: The validation pass observed alone (``observe_validation(loss, hypergradient=False)``), with
#: an exact loss's settings: no running average, the rewind to the best pass.
PASS_OPTIONS = {"loss_decay": 0.0, "rewind": 1.0}


def pass_pairs(every: int) -> dict[str, tuple[dict, dict]]:
    """(without, with) a pass over the whole validation split every ``every`` steps, observed
    alone by AdamHD; for scale, the same pass feeding Adam's early stopping."""
    stream = {"every": every, "batch": "all", "gradient": False}
    return {
        "AdamHD + validation pass (loss alone, rewind) ÷ AdamHD": (
            {"kind": "adam_hd"},
            {"kind": "adam_hd", "validation_data": stream, "validation": PASS_OPTIONS}),
        "Adam + early stopping on the pass ÷ Adam": (
            {"kind": "adam"},
            {"kind": "adam", "validation_data": {**stream, "check": 1},
             "early_stopping": {"patience": 10**6}}),
    }  # fmt: skip


#: The ray ceiling alone (the third check's option): ``ray_steps`` the run's budget, on the step
#: clock without the gate (the rule that check passed; the defaults since check 8 differ).
RAY_ALONE = {"ray_steps": "budget", "hypergrad_lr": 0.0, "hold": 0, "ray_clock": 0, "ray_gate": 1}


def recommended_pairs(every: int) -> dict[str, tuple[dict, dict]]:
    """(without, with) the recommended option since check 8: a minibatch every ``every`` steps
    with the ray ceiling at its defaults (the clock, the gate), against AdamHD without
    validation — issue 11's goal 2 in one paired measurement."""
    return {
        "AdamHD + observe_validation with the ray (defaults) ÷ AdamHD": (
            {"kind": "adam_hd"},
            {"kind": "adam_hd", "validation_data": {"every": every},
             "validation": {"ray_steps": "budget"}}),
    }  # fmt: skip


def ray_pairs(every: int) -> dict[str, tuple[dict, dict]]:
    """(without, with) the ray ceiling: alone, on the whole validation split's gradient every
    ``every`` steps, against AdamHD without validation; and added to the recommended option (a
    minibatch every ``every`` steps) against the option without it."""
    observing = {"kind": "adam_hd", "validation_data": {"every": every}}
    return {
        "AdamHD + the ray alone (a pass's gradient) ÷ AdamHD": (
            {"kind": "adam_hd"},
            {"kind": "adam_hd", "validation_data": {"every": every, "batch": "all"},
             "validation": RAY_ALONE}),
        "AdamHD + observe_validation with the ray (defaults) ÷ without it": (
            observing, {**observing, "validation": {"ray_steps": "budget"}}),
    }  # fmt: skip


def pairs(every: int, rewind: bool = False) -> dict[str, tuple[dict, dict]]:
    """(without, with) the validation stream of one batch every ``every`` steps; ``rewind``:
    (the option, the option with ``validation={"rewind": 1}``) instead."""
    stream = {"every": every}
    if rewind:
        observing = {"kind": "adam_hd", "validation_data": stream}
        return {
            "AdamHD + observe_validation, rewind 1 ÷ without it": (
                observing, {**observing, "validation": {"rewind": 1.0}}),
        }  # fmt: skip
    return {
        "AdamHD + observe_validation ÷ AdamHD": (
            {"kind": "adam_hd"}, {"kind": "adam_hd", "validation_data": stream}),
        "Adam + ReduceLROnPlateau ÷ Adam": (
            {"kind": "adam"}, {"kind": "adam", "validation_data": stream, "plateau": {}}),
    }  # fmt: skip


def timed(task, spec, steps: int) -> float:
    tic = time.perf_counter()
    train(task, spec, 1e-3, 0, steps, log_every=steps, divergence=1e9, device="cpu")
    return time.perf_counter() - tic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="smoke-size tasks, 20 steps")
    parser.add_argument("--every", type=int, default=DEFAULT_EVERY,
                        help="steps between validation batches")  # fmt: skip
    parser.add_argument("--rewind", action="store_true",
                        help="time the rewind (validation={'rewind': 1}) against the option "
                             "without it instead")  # fmt: skip
    parser.add_argument("--pass", dest="whole_pass", action="store_true",
                        help="time a pass over the whole validation split, its loss observed "
                             "alone (hypergradient=False) with the rewind, instead")  # fmt: skip
    parser.add_argument("--ray", action="store_true",
                        help="time the ray ceiling (validation={'ray_steps': T}) instead")  # fmt: skip
    parser.add_argument("--recommended", action="store_true",
                        help="time the recommended option (a minibatch every N steps with the "
                             "ray at its defaults) against AdamHD instead")  # fmt: skip
    parser.add_argument("--out", default=None,
                        help="default experiments/results/bench_validation_cost.md (every 10) "
                             "or bench_validation_cost_every{N}.md")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size = "smoke" if args.smoke else "full"
    rows = []
    for name in args.tasks.split(","):
        task = make_task(name, size, fallback_text=args.smoke)
        steps = 20 if args.smoke else study_steps(name)
        timed(task, {"kind": "adam_hd"}, min(steps, 20))  # warm-up (caches, allocator)
        chosen = pass_pairs(args.every) if args.whole_pass else pairs(args.every, args.rewind)
        if args.ray:
            chosen = ray_pairs(args.every)
        if args.recommended:
            chosen = recommended_pairs(args.every)
        for label, (base, option) in chosen.items():
            ratios = []
            for r in range(args.repeats):
                order = (base, option) if r % 2 == 0 else (option, base)
                times = {id(s): timed(task, s, steps) for s in order}
                ratios.append(times[id(option)] / times[id(base)])
            rows.append((name, label, statistics.median(ratios), min(ratios), max(ratios)))
    lines = ["| task | ratio | median | min | max |", "|---|---|---|---|---|"]
    lines += [f"| {t} | {lab} | **{m:.3f}×** | {lo:.3f} | {hi:.3f} |" for t, lab, m, lo, hi in rows]
    what = "the rewind" if args.rewind else "the validation stream"
    batch = "a batch of the training batch size"
    if args.whole_pass:
        what, batch = "a validation pass observed alone", "the whole validation split, no_grad"
    flags = every_flag(args.every) + (" --rewind" if args.rewind else "")
    flags += " --pass" if args.whole_pass else ""
    if args.ray:
        what = "the ray ceiling"
        batch = "alone: the whole split's gradient; with the option: its batch"
        flags += " --ray"
    if args.recommended:
        what = "the recommended option (the ray at its defaults)"
        flags += " --recommended"
    flags += f" --tasks {args.tasks}" if args.tasks != DEFAULT_TASKS else ""
    text = (f"# Cost of {what} (every {args.every} steps, {batch})\n\n"
            f"`python experiments/bench_validation_cost.py --repeats "
            f"{args.repeats}{flags}` (1 thread, {size} tasks, paired and interleaved)\n\n"
            + "\n".join(lines) + "\n")  # fmt: skip
    print(text)
    if not args.smoke:
        path = results_path(args.every, rewind=args.rewind, whole_pass=args.whole_pass,
                            ray=args.ray, recommended=args.recommended)  # fmt: skip
        Path(args.out or path).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
