"""How far a 3-seed "best-of-grid" cell can be trusted: one task, many seeds, every grid rate.

Study 1 scores a (task, lr0) cell by the 3-seed mean final validation loss of AdamHD ÷ the
lowest 3-seed mean of Adam over the grid's five fixed rates (best-of-grid), and counts it when
the ratio is ≤ 1.10. Both sides are noisy, and the reference is a minimum over five noisy means,
so it is biased low (the winner's curse). This script measures what that does on one task: it runs
the torch optimizer and its HD version at every grid rate on ``N`` seeds and reports

* the ``N``-seed mean final validation loss of every row with a 95% bootstrap interval (seeds
  resampled), and its ratio to the best fixed rate's ``N``-seed mean (the precise reference), with
  the interval of the paired ratio;
* for the ``N/3`` disjoint seed triples, how many put each row within 10% of *that triple's*
  best-of-grid (study 1's criterion on fresh seeds). A row that is the best fixed rate itself
  passing on only a share of triples marks the ceiling of the criterion on that task.

    python experiments/reference_noise.py --task fewshot_sinusoid --seeds 100-159
    python experiments/reference_noise.py --task fewshot_sinusoid --seeds 100-159 --optimizer sgd
    python experiments/reference_noise.py --task digits_mlp --seeds 100-129
    python experiments/reference_noise.py --task diabetes_mlp --seeds 100-111   # a held-out task

Results (JSON of every run's loss, and a Markdown table) go to
``experiments/results/reference_noise/<task>_<optimizer>``; runs already in the JSON are not
rerun. CPU, ``--workers`` processes × 1 thread; the few-shot task takes ~1 minute for 600 runs.
A folder of such runs, one ``<task>.json`` per task of the nine, is counted against the best
fixed Adam rate (each task's many-seed mean, ``COUNT_SEEDS``) without running anything::

    python experiments/reference_noise.py --count experiments/results/reference_noise/recommended_hold
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fit_controller, check_controller
from check_controller import LRS, TASKS
from compare_checks import bootstrap_interval
from one_run_goals import WITHIN
from study_budgets import budgets

ROOT = Path(__file__).resolve().parents[1]
#: Where each task's runs (``<task>_<optimizer>.json``) and table (``.md``) go by default.
RESULTS = ROOT / "experiments/results/reference_noise"
#: Study 1's budgets: its six tasks (``check_controller.TASKS``) and the three held-out ones.
STEPS = {**TASKS, **budgets(("pysrc_transformer", "animal_autoencoder", "diabetes_mlp"))}
OPTIMIZERS = {
    "adam": ({"kind": "adam"}, {"kind": "adam_hd"}),
    "sgd": ({"kind": "sgd", "momentum": 0.9}, {"kind": "sgd_hd", "momentum": 0.9}),
}


def _run(job: tuple[str, dict, float, int, int]) -> float:
    import torch
    from fit_controller import run

    torch.set_num_threads(1)
    task, spec, lr, seed, steps = job
    r = run(task, spec, lr, steps, "full", seed)
    return r["final_val_loss"] if r["status"] == "ok" else math.inf


def parse_seeds(text: str) -> list[int]:
    """``"100-159"`` or ``"1,2,3"`` (or a mix) as a list of seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return seeds


def key(name: str, lr: float, seed: int) -> str:
    return f"{name}|{lr:g}|{seed}"


def mean_of(losses: dict[str, float], name: str, lr: float, seeds: Sequence[int]) -> float:
    return statistics.mean(losses[key(name, lr, s)] for s in seeds)


def best_fixed_rate(losses: dict[str, float], name: str, seeds: Sequence[int]) -> tuple:
    """Row ``name``'s grid rate with the lowest mean over ``seeds``, and that mean."""
    best_lr = min(LRS, key=lambda lr: mean_of(losses, name, lr, seeds))
    return best_lr, mean_of(losses, name, best_lr, seeds)


#: The seeds of the many-seed measurements of the recommended option (``results/reference_noise/
#: recommended*/``): the tasks with noisier cells got more.
COUNT_SEEDS = {"fewshot_sinusoid": "100-159", "digits_logreg": "100-129", "digits_mlp": "100-129"}
STUDY1_TASKS = ("animal_cnn", "charlm_gru", "digits_logreg", "digits_mlp", "fewshot_sinusoid",
                "mnist1d_mlp")  # fmt: skip
HELD_OUT_TASKS = ("diabetes_mlp", "animal_autoencoder", "pysrc_transformer")


def task_losses(folders: Sequence[Path], task: str, suffix: str = "") -> dict[str, float]:
    """``<task><suffix>.json`` of the first of ``folders`` that has it (a later measurement that
    reran one task overlays the folder of the others)."""
    name = f"{task}{suffix}.json"
    for folder in folders:
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    raise FileNotFoundError(f"{name} in none of {[str(f) for f in folders]}")


def print_counts(
    folder: Path, rows: Sequence[str] = ("candidate", "adam_hd"), under: Sequence[Path] = ()
) -> dict[str, int]:
    """Per task in ``folder`` (``<task>.json`` of this script's runs; a task it lacks is read from
    the first of ``under`` that has it), each row's many-seed mean final validation loss ÷ the
    best fixed Adam rate's, per lr0, and how many are ≤ 1 + WITHIN; printed as Markdown table
    rows, and the totals (study 1's six tasks, held-out tasks) returned."""
    totals: dict[str, int] = {}
    for task in STUDY1_TASKS + HELD_OUT_TASKS:
        losses = task_losses([folder, *under], task)
        seeds = parse_seeds(COUNT_SEEDS.get(task, "100-111"))
        best, ref = best_fixed_rate(losses, "adam", seeds)
        line = f"| {task} ({len(seeds)} seeds) | {best:g} |"
        for name in rows:
            ratios = [mean_of(losses, name, lr, seeds) / ref for lr in LRS]
            hits = sum(r <= 1 + WITHIN for r in ratios)
            label = f"{name}, {'study 1' if task in STUDY1_TASKS else 'held out'}"
            totals[label] = totals.get(label, 0) + hits
            line += " " + ", ".join(f"{r:.2f}" for r in ratios) + f" ({hits}/5) |"
        print(line)
    for label, hits in totals.items():
        print(f"{label}: {hits}/{30 if 'study 1' in label else 15}")
    return totals


def report(losses: dict[str, float], rows: Sequence[str], seeds: list[int], task: str) -> str:
    """The Markdown table of the module docstring."""
    rng = random.Random(0)
    ref_name = rows[0]
    best_lr, ref = best_fixed_rate(losses, ref_name, seeds)
    triples = [seeds[i : i + 3] for i in range(0, len(seeds) - 2, 3)]
    refs = [min(mean_of(losses, ref_name, lr, t) for lr in LRS) for t in triples]
    lines = [
        (
            f"{task}: {len(seeds)} seeds ({seeds[0]}-{seeds[-1]}), {STEPS.get(task, '?')} steps; "
            f"best fixed rate of {ref_name}: {best_lr:g} (mean {ref:.4g}). Ratio: the row's "
            f"{len(seeds)}-seed mean ÷ that mean (95% paired bootstrap interval over seeds); "
            f"triples: of {len(triples)} disjoint 3-seed sets, how many put the row within "
            f"{WITHIN:.0%} of the set's own best-of-grid {ref_name} (study 1's criterion)."
        ),
        "",
        "| row | lr0 | mean final val (95% CI) | ratio to best fixed rate (95% CI) | triples within 10% |",
        "|---|---:|---|---|---:|",
    ]
    for name in rows:
        for lr in LRS:
            m = mean_of(losses, name, lr, seeds)
            lo, hi = bootstrap_interval(
                seeds, lambda s, n=name, r=lr: mean_of(losses, n, r, s), rng
            )
            rlo, rhi = bootstrap_interval(
                seeds,
                lambda s, n=name, r=lr: (
                    mean_of(losses, n, r, s) / mean_of(losses, ref_name, best_lr, s)
                ),
                rng,
            )
            hits = sum(
                mean_of(losses, name, lr, t) <= (1 + WITHIN) * r for t, r in zip(triples, refs)
            )
            lines.append(
                f"| {name} | {lr:g} | {m:.4g} ({lo:.4g}-{hi:.4g}) | {m / ref:.2f} "
                f"({rlo:.2f}-{rhi:.2f}) | {hits}/{len(triples)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="fewshot_sinusoid", choices=sorted(STEPS))
    parser.add_argument("--seeds", default="100-159", help="e.g. 100-159 or 1,2,3")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None, help="output stem (default under results/)")
    parser.add_argument("--spec", default=None,
                        help="JSON merged into the HD row's spec, e.g. '{\"seek\": {...}}' "
                             "(the row is then named 'candidate')")  # fmt: skip
    parser.add_argument("--count", default=None, metavar="FOLDER",
                        help="print the many-seed count of the runs in FOLDER (its <task>.json "
                             "files) instead of running anything")  # fmt: skip
    parser.add_argument(
        "--rows",
        default="candidate,adam_hd",
        help="with --count: the rows to count, comma-separated",
    )
    args = parser.parse_args(argv)
    if args.count is not None:
        folder = Path(args.count)
        if not folder.is_dir():
            raise ValueError(f"Invalid --count: {args.count!r}; expected a folder of runs")
        print_counts(folder, rows=tuple(args.rows.split(",")))
        return 0
    seeds = parse_seeds(args.seeds)
    if len(seeds) < 3:
        raise ValueError(f"Invalid --seeds: {args.seeds!r}; expected at least 3 seeds")
    stem = Path(args.out or RESULTS / f"{args.task}_{args.optimizer}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.with_suffix(".json")
    losses: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
    specs = list(OPTIMIZERS[args.optimizer])
    rows = [spec["kind"] for spec in specs]
    if args.spec:
        specs.append({**specs[1], **json.loads(args.spec)})
        rows.append("candidate")
    jobs = [
        (name, spec, lr, s)
        for name, spec in zip(rows, specs)
        for lr in LRS
        for s in seeds
        if key(name, lr, s) not in losses
    ]
    steps = STEPS[args.task]
    with ProcessPoolExecutor(args.workers) as pool:
        runs = [(args.task, spec, lr, s, steps) for _, spec, lr, s in jobs]
        for (name, _, lr, s), loss in zip(jobs, pool.map(_run, runs, chunksize=4)):
            losses[key(name, lr, s)] = loss
    path.write_text(json.dumps(losses, indent=0, sort_keys=True))
    table = report(losses, rows, seeds, args.task)
    command = "python experiments/reference_noise.py " + " ".join(argv or sys.argv[1:])
    stem.with_suffix(".md").write_text(f"`{command}`\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
