"""The check of ``protocol.md``: SGD(m) at the grid's five rates, SGD-HD at its defaults and the
candidate (AdamHD's constants and β), nine tasks × lr0 1e-5 … 1e-1 × seeds 366-369.

    python experiments/results/fit_controller/sgd_shared/check.py            # runs (resumes)
    python experiments/results/fit_controller/sgd_shared/check.py --report

Each task's runs go to ``<task>.json`` here (``reference_noise.py``'s format: ``row|lr|seed`` →
final validation loss); ``--report`` scores them as study 1 does on these four seeds.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
import reference_noise as rn
from compare_checks import bootstrap_interval, log_ratio

SEEDS = "366-369"
TASKS = ("fewshot_sinusoid", "digits_logreg", "diabetes_mlp", "digits_mlp", "mnist1d_mlp",
         "animal_autoencoder", "pysrc_transformer", "charlm_gru", "animal_cnn")  # fmt: skip
SPEC = HERE / "candidate_spec.json"


def run_all() -> None:
    for task in TASKS:
        rn.main(["--task", task, "--seeds", SEEDS, "--optimizer", "sgd",
                 "--spec", SPEC.read_text(), "--out", str(HERE / task)])  # fmt: skip


#: A diverged run (an infinite loss) counts as 1,000× the other arm's loss in the pairing.
DIVERGED = math.log(1e3)


def report() -> None:
    seeds = rn.parse_seeds(SEEDS)
    rng = random.Random(0)
    counts = {"sgd_hd": 0, "candidate": 0}
    logs: dict[int, list[float]] = {s: [] for s in seeds}
    print("| task | SGD-HD defaults (lr0 1e-5 … 1e-1) | candidate | paired mean log-ratio |")
    print("|---|---|---|---:|")
    for task in TASKS:
        losses = json.loads((HERE / f"{task}.json").read_text())
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
        print(f"| {task} | {row['sgd_hd']} | {row['candidate']} | "
              f"{statistics.mean(task_logs):+.3f} |")  # fmt: skip

    def pooled(ss: list[int]) -> float:
        return statistics.mean(x for s in ss for x in logs[s])

    lo, hi = bootstrap_interval(seeds, pooled, rng)
    print(f"\ncells within 10% (of 45): defaults {counts['sgd_hd']}, candidate "
          f"{counts['candidate']}; paired mean log-ratio {pooled(seeds):+.4f} "
          f"(95% seed bootstrap {lo:+.4f} to {hi:+.4f})")  # fmt: skip


if __name__ == "__main__":
    report() if "--report" in sys.argv else run_all()
