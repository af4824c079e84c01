"""A second-stage check of fitted seek constants on seeds no fit or study has used.

``experiments/fit_controller.py`` fits on one seed (0) of four tasks; study 1 reports seeds 0–2.
Before a fitted constant set becomes the default, this script runs it on study 1's six tasks ×
five initial rates with other seeds (default: 3) and scores each cell's final validation loss
against best-of-grid Adam on the *same* seeds (the same five rates), printing the count within
10% and the per-cell ratios. Held-out tasks are not run (they stay out of every selection);
``--tasks`` may add a development task (:mod:`metalr.workbench.dev_tasks`, at the budget of its
own config, ``configs/dev_transformer.yaml``).

    python experiments/check_controller.py                                  # today's defaults
    python experiments/check_controller.py --constants experiments/results/fit_controller/round6/best.json
    python experiments/check_controller.py --optimizer sgd [--constants ...]   # SGDHD vs SGD
    python experiments/check_controller.py --seeds 25,26,27 --out a.json        # per-seed losses
    python experiments/check_controller.py --tasks study1,kjv_transformer      # + a development task

``--out`` keeps every seed's loss, so that two constant sets run on the same seeds can be compared
cell by cell and seed by seed (``experiments/compare_checks.py``) instead of by their counts, which
move by ±6 of 30 cells between seed sets at fixed constants.

``--optimizer sgd`` checks SGDHD (momentum 0.9) against best-of-grid SGD (momentum 0.9) instead.

~5 minutes per constant set on 2 cores (the Adam reference is cached next to the output).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fit_controller, one_run_goals
from one_run_goals import WITHIN
from study_budgets import budgets

from metalr.workbench.config import load_study

ROOT = Path(__file__).resolve().parents[1]
#: Study 1's six tasks with their step budgets.
TASKS = budgets(("animal_cnn", "charlm_gru", "digits_logreg", "digits_mlp", "fewshot_sinusoid",
                 "mnist1d_mlp"))  # fmt: skip
LRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: Development tasks ``--tasks`` may add, with the budget of their own study's config.
DEV_CONFIGS = {"kjv_transformer": ROOT / "configs/dev_transformer.yaml"}


def task_budgets(names: str) -> dict[str, int]:
    """``--tasks``: comma-separated names, ``study1`` for study 1's six; each with its budget.

    Raises ``ValueError`` for a task that is neither one of study 1's six nor a development task
    (held-out tasks stay out of every check)."""
    out: dict[str, int] = {}
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name == "study1":
            out.update(TASKS)
        elif name in TASKS:
            out[name] = TASKS[name]
        elif name in DEV_CONFIGS:
            out[name] = load_study(DEV_CONFIGS[name]).steps_of(name)
        else:
            raise ValueError(f"--tasks: unknown task {name!r}; expected 'study1', one of study 1's "
                             f"six ({', '.join(TASKS)}) or a development task "
                             f"({', '.join(DEV_CONFIGS)})")  # fmt: skip
    return out


def _run(job: tuple[str, dict[str, Any], float, int, str, int]) -> tuple[float, float]:
    """One cell's final validation and test losses (infinite if the run diverged), one thread."""
    import torch
    from fit_controller import run

    torch.set_num_threads(1)
    name, spec, lr, seed, size, steps = job
    r = run(name, spec, lr, steps, size, seed)
    if r["status"] != "ok":
        return math.inf, math.inf
    return r["final_val_loss"], r["final_test_loss"]


def _grid(
    spec: dict[str, Any], seeds: list[int], workers: int, smoke: bool, tasks: dict[str, int] = TASKS
) -> dict:
    """Final (validation, test) losses per (task, lr0) of ``tasks`` (name → budget): one pair per
    seed, in the order of ``seeds``."""
    size = "smoke" if smoke else "full"
    jobs = [(t, spec, lr, s, size, 20 if smoke else n) for t, n in tasks.items() for lr in LRS
            for s in seeds]  # fmt: skip
    with ProcessPoolExecutor(workers) as pool:
        losses = list(pool.map(_run, jobs))
    out: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for (t, _, lr, *_), f in zip(jobs, losses):
        out.setdefault((t, lr), []).append(f)
    return out


def _means(grid: dict, metric: int = 0) -> dict:
    """Mean over seeds per cell of the validation (``metric`` 0) or test (1) loss."""
    return {k: statistics.mean(pair[metric] for pair in v) for k, v in grid.items()}


def reference_losses(grid: dict) -> tuple[dict[str, float], dict[str, float]]:
    """Best-of-grid per task: the lowest mean final validation loss over the rates, and the mean
    test loss at the rate that validation loss chose (the test reference)."""
    val, test = _means(grid, 0), _means(grid, 1)
    tasks = dict.fromkeys(t for t, _ in grid)
    chosen = {t: min(LRS, key=lambda lr: val[(t, lr)]) for t in tasks}
    return ({t: val[(t, chosen[t])] for t in tasks}, {t: test[(t, chosen[t])] for t in tasks})


def count_within(ratios: Iterable[float]) -> int:
    """Cells whose ratio to the reference is within study 1's margin (10%)."""
    return sum(r <= 1 + WITHIN for r in ratios)


def write_losses(
    path: Path, per_seed: dict, refs: tuple[dict | None, dict | None], seeds: list[int], args: Any
) -> None:
    """The run's per-seed validation and test losses as JSON, with the references known (best-of-
    grid validation loss; test loss at that rate); ``experiments/compare_checks.py`` pairs two."""
    path.write_text(json.dumps({
        "optimizer": args.optimizer, "constants": args.constants or "defaults", "seeds": seeds,
        "spec": json.loads(args.spec) if args.spec else None,
        "smoke": args.smoke, "reference": refs[0], "test_reference": refs[1],
        "losses": {f"{t}|{lr:g}": [pair[0] for pair in v] for (t, lr), v in per_seed.items()},
        "test_losses": {f"{t}|{lr:g}": [pair[1] for pair in v] for (t, lr), v in per_seed.items()},
    }, indent=1))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--constants", default=None, help="a best.json of fit_controller.py")
    parser.add_argument("--seeds", default="3", help="comma-separated seeds (default 3)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", default=str(ROOT / "experiments/results/fit_controller"))
    parser.add_argument("--smoke", action="store_true", help="smoke-size tasks, 20 steps")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                        help="AdamHD vs Adam (default) or SGDHD vs SGD, momentum 0.9")  # fmt: skip
    parser.add_argument("--out", default=None,
                        help="also write the per-seed losses to this JSON file")  # fmt: skip
    parser.add_argument("--spec", default=None,
                        help="JSON merged into the checked optimizer's spec, e.g. "
                             "'{\"validation_data\": {\"every\": 20}}' (not the reference's)")  # fmt: skip
    parser.add_argument("--metric", choices=("val", "test"), default="val",
                        help="score final validation loss (default) or test loss; the test "
                             "reference is Adam's test loss at the rate validation chose")  # fmt: skip
    parser.add_argument("--tasks", default="study1",
                        help="comma-separated tasks: 'study1' (study 1's six, the default), any "
                             "of them, or a development task (kjv_transformer)")  # fmt: skip
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = task_budgets(args.tasks)
    from fit_controller import OPTIMIZERS, seek_spec

    torch_spec, spec = OPTIMIZERS[args.optimizer]
    if args.constants:  # keys a best.json lacks are trial 11's, as in the fit that wrote it
        spec = seek_spec(json.loads(Path(args.constants).read_text())["constants"], args.optimizer)
    if args.spec:
        spec = {**spec, **json.loads(args.spec)}
    tag = "smoke_" if args.smoke else ""
    name = f"check_{args.optimizer}_reference_{tag}seeds_{'_'.join(map(str, seeds))}.json"
    cache = Path(args.cache) / name  # validation: as before; test: beside it, "_test" added
    test_cache = cache.with_name(cache.stem + "_test.json")
    wanted = cache if args.metric == "val" else test_cache
    cached = json.loads(wanted.read_text()) if wanted.is_file() else {}
    missing = {t: n for t, n in tasks.items() if t not in cached}
    if missing:  # Adam's grid for the tasks the seeds' reference lacks (all, the first time)
        grid = _grid(torch_spec, seeds, args.workers, args.smoke, missing)
        for path, new in zip((cache, test_cache), reference_losses(grid)):
            old = json.loads(path.read_text()) if path.is_file() else {}
            path.write_text(json.dumps({**old, **new}, indent=1))
    ref = json.loads(wanted.read_text())
    per_seed = _grid(spec, seeds, args.workers, args.smoke, tasks)
    if args.out:
        refs = tuple(
            json.loads(c.read_text()) if c.is_file() else None for c in (cache, test_cache)
        )
        write_losses(Path(args.out), per_seed, refs, seeds, args)
    metric = 0 if args.metric == "val" else 1
    ratios = {k: v / ref[k[0]] for k, v in _means(per_seed, metric).items()}
    within = count_within(ratios.values())
    print(f"{args.constants or 'defaults'}, seeds {seeds}: final {args.metric} within 10% of best-of-grid "
          f"{args.optimizer} on {within}/{len(ratios)} cells; worst {max(ratios.values()):.2f}")  # fmt: skip
    print("| task | " + " | ".join(f"lr0 {lr:g}" for lr in LRS) + " |")
    print("|---|" + "---:|" * len(LRS))
    for t in tasks:
        print(f"| {t} | " + " | ".join(f"{ratios[(t, lr)]:.2f}" for lr in LRS) + " |")
    return within


if __name__ == "__main__":
    main()
