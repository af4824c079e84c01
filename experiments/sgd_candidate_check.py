"""Check an SGD-HD candidate against SGD-HD's defaults on unused seeds (the procedure of
``results/fit_controller/sgd_shared/protocol.md``, reused by later rounds' checks).

For each of nine tasks (study 1's six and the three held-out), ``reference_noise.py --optimizer
sgd`` runs SGD(momentum 0.9) at the grid's five rates, SGD-HD at its defaults and the candidate
spec from each lr0 on the given seeds, at study 1's budgets; each task's runs go to
``<folder>/<task>.json`` (``row|lr|seed`` → final validation loss; runs already there are not
rerun). The report scores them as study 1 does on these seeds — each cell's seed mean ÷
best-of-grid SGD(m)'s seed mean, within 10% counts — and pairs candidate and defaults per
(task, lr0, seed): ``log(candidate / defaults)``, a diverged run counting as 1,000× the other
arm's loss, with a 95% seed-bootstrap interval of the pooled mean.

A check folder holds its ``candidate_spec.json``; the command names the folder and the seeds::

    python experiments/sgd_candidate_check.py <folder> --seeds 381-384            # runs (resumes)
    python experiments/sgd_candidate_check.py <folder> --seeds 381-384 --report

(The first two checks, ``sgd_shared`` and ``sgd_evidence``, each have a ``check.py`` that calls
:func:`main` with their seeds; their protocols quote those commands.)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import reference_noise as rn
from compare_checks import bootstrap_interval, log_ratio

TASKS = ("fewshot_sinusoid", "digits_logreg", "diabetes_mlp", "digits_mlp", "mnist1d_mlp",
         "animal_autoencoder", "pysrc_transformer", "charlm_gru", "animal_cnn")  # fmt: skip
#: A diverged run (an infinite loss) counts as 1,000× the other arm's loss in the pairing.
DIVERGED = math.log(1e3)


def run_all(folder: Path, seeds: str, spec: Path) -> None:
    """Every task's runs into ``folder`` (``seeds`` as ``reference_noise --seeds`` reads them)."""
    for task in TASKS:
        rn.main(["--task", task, "--seeds", seeds, "--optimizer", "sgd",
                 "--spec", spec.read_text(), "--out", str(folder / task)])  # fmt: skip


def report(folder: Path, seeds_text: str) -> dict[str, float]:
    """Print the table and the summary line; return the counts and the pooled mean."""
    seeds = rn.parse_seeds(seeds_text)
    rng = random.Random(0)
    counts = {"sgd_hd": 0, "candidate": 0}
    logs: dict[int, list[float]] = {s: [] for s in seeds}
    task_means: dict[str, float] = {}
    print("| task | SGD-HD defaults (lr0 1e-5 … 1e-1) | candidate | paired mean log-ratio |")
    print("|---|---|---|---:|")
    for task in TASKS:
        losses = json.loads((folder / f"{task}.json").read_text())
        ref = min(rn.mean_of(losses, "sgd", lr, seeds) for lr in rn.LRS)
        row = {}
        for name in counts:
            ratios = [rn.mean_of(losses, name, lr, seeds) / ref for lr in rn.LRS]
            counts[name] += sum(r <= 1.1 for r in ratios)
            row[name] = " ".join(f"{r:.2f}" for r in ratios)
        task_logs = []
        for s in seeds:
            for lr in rn.LRS:
                a = losses[rn.key("sgd_hd", lr, s)]
                b = losses[rn.key("candidate", lr, s)]
                value = log_ratio(a, b, cap=DIVERGED)
                logs[s].append(value)
                task_logs.append(value)
        task_means[task] = statistics.mean(task_logs)
        print(f"| {task} | {row['sgd_hd']} | {row['candidate']} | {task_means[task]:+.3f} |")

    def pooled(ss: list[int]) -> float:
        return statistics.mean(x for s in ss for x in logs[s])

    lo, hi = bootstrap_interval(seeds, pooled, rng)
    print(f"\ncells within 10% (of 45): defaults {counts['sgd_hd']}, candidate "
          f"{counts['candidate']}; paired mean log-ratio {pooled(seeds):+.4f} "
          f"(95% seed bootstrap {lo:+.4f} to {hi:+.4f})")  # fmt: skip
    return {**counts, "pooled": pooled(seeds), "worst_task": max(task_means.values())}


def main(folder: Path, seeds: str, spec: Path, argv: Sequence[str] | None = None) -> None:
    """A check folder's command line: ``--report`` prints the report, else the runs (resumed)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--report" in argv:
        report(folder, seeds)
    else:
        run_all(folder, seeds, spec)


def cli(argv: Sequence[str] | None = None) -> None:
    """``sgd_candidate_check.py FOLDER --seeds A-B [--report]``: the folder's
    ``candidate_spec.json`` checked on those seeds (runs resumed), or its report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="check folder (holds candidate_spec.json)")
    parser.add_argument("--seeds", required=True, help="e.g. 381-384 (reference_noise --seeds)")
    parser.add_argument("--report", action="store_true", help="print the report, run nothing")
    args = parser.parse_args(argv)
    folder = args.folder.resolve()
    if args.report:
        report(folder, args.seeds)
    else:
        run_all(folder, args.seeds, folder / "candidate_spec.json")


if __name__ == "__main__":
    cli()
