"""The check of ``protocol.md``: few-shot, seeds 306-365, Adam's five rates and the option A / B.

python experiments/results/fit_controller/val_track_span/check.py          # runs (resumes)
python experiments/results/fit_controller/val_track_span/check.py --report
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
from compare_checks import bootstrap_interval

OUT = HERE / "check.json"
SEEDS = list(range(306, 366))
LRS = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
#: The recommended option as it stood when these runs were made, before the short-run tracking
#: this check adopted (``track_steps`` 0): B emulates that tracking through ``hypergrad_lr``.
OPTION = {"validation_data": {"every": 20},
          "validation": {"ray_steps": "budget", "track_steps": 0}}  # fmt: skip
ROWS = {
    "adam": {"kind": "adam"},
    "A": {"kind": "adam_hd", **OPTION},
    "B": {"kind": "adam_hd", "hypergrad_lr": 0.16172, **OPTION},
}


def _run(job: tuple[str, float, int]) -> tuple[float, float]:
    import torch
    from fit_controller import run

    torch.set_num_threads(1)
    row, lr, seed = job
    r = run("fewshot_sinusoid", ROWS[row], lr, 100, "full", seed)
    if r["status"] != "ok":
        return math.inf, math.inf
    return r["final_val_loss"], r["final_test_loss"]


def run_all() -> dict:
    done = json.loads(OUT.read_text()) if OUT.is_file() else {}
    jobs = [(r, lr, s) for r in ROWS for lr in LRS for s in SEEDS if f"{r}|{lr:g}|{s}" not in done]
    with ProcessPoolExecutor(2) as pool:
        for (r, lr, s), (val, test) in zip(jobs, pool.map(_run, jobs, chunksize=10)):
            done[f"{r}|{lr:g}|{s}"] = {"val": val, "test": test}
    OUT.write_text(json.dumps(done, indent=0, sort_keys=True))
    return done


def mean(d: dict, row: str, lr: float, seeds, metric: str) -> float:
    return statistics.mean(d[f"{row}|{lr:g}|{s}"][metric] for s in seeds)


def pooled(logs: dict[int, list[float]], seeds) -> float:
    """The mean of the per-run log-ratios over ``seeds`` (whole seeds, with their five lr0)."""
    return statistics.mean(x for s in seeds for x in logs[s])


def report(d: dict) -> None:
    rng = random.Random(0)
    for metric in ("val", "test"):
        pairs = [(lr, s) for lr in LRS for s in SEEDS]
        logs: dict[int, list[float]] = {s: [math.log(d[f"B|{lr:g}|{s}"][metric] / d[f"A|{lr:g}|{s}"][metric])
                    for lr in LRS] for s in SEEDS}  # fmt: skip
        point = pooled(logs, SEEDS)
        lo, hi = bootstrap_interval(SEEDS, lambda ss, lg=logs: pooled(lg, ss), rng)
        best = min(mean(d, "adam", lr, SEEDS, metric) for lr in LRS)
        ratios = {r: [mean(d, r, lr, SEEDS, metric) / best for lr in LRS] for r in ("A", "B")}
        print(
            f"{metric}: paired mean log-ratio B/A {point:+.4f} (95% {lo:+.4f} to {hi:+.4f}) over {len(pairs)} runs"
        )
        for r, v in ratios.items():
            print(f"  {r}: 60-seed mean / best fixed Adam rate: " + " ".join(f"{x:.2f}" for x in v))
    draws = random.Random(1)
    hits = {"A": [0] * 5, "B": [0] * 5}
    n = 20000
    for _ in range(n):
        ch = draws.sample(SEEDS, 3)
        ref = min(mean(d, "adam", lr, ch, "val") for lr in LRS)
        for r, row_hits in hits.items():
            for i, lr in enumerate(LRS):
                row_hits[i] += mean(d, r, lr, ch, "val") <= 1.1 * ref
    for r, h in hits.items():
        print(f"  {r}: P(cell within 10%) on 3-seed draws " + " ".join(f"{x / n:.2f}" for x in h)
              + f"; expected cells {sum(h) / n:.2f} of 5")  # fmt: skip


if __name__ == "__main__":
    report(json.loads(OUT.read_text()) if "--report" in sys.argv else run_all())
