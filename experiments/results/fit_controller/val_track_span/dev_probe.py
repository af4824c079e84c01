"""The development probe of ``protocol.md``: the recommended option on the few-shot task with
another ``hypergrad_lr``, lr0 1e-5 … 1e-1, seeds 100-159 (the many-seed runs' seeds), scored
against the Adam rows of ``reference_noise/recommended_restart/fewshot_sinusoid.json``.

    python experiments/results/fit_controller/val_track_span/dev_probe.py 0.16
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/

ADAM = HERE.parents[1] / "reference_noise/recommended_restart/fewshot_sinusoid.json"
LRS = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
SEEDS = list(range(100, 160))
#: The recommended option as it stood when these runs were made, before the short-run tracking
#: this check adopted (``track_steps`` 0): B emulates that tracking through ``hypergrad_lr``.
OPTION = {"validation_data": {"every": 20},
          "validation": {"ray_steps": "budget", "track_steps": 0}}  # fmt: skip


def _run(job: tuple[dict, float, int]) -> float:
    import torch
    from fit_controller import run

    torch.set_num_threads(1)
    spec, lr, seed = job
    r = run("fewshot_sinusoid", spec, lr, 100, "full", seed)
    return r["final_val_loss"] if r["status"] == "ok" else float("inf")


def main(beta: float) -> None:
    spec = {"kind": "adam_hd", "hypergrad_lr": beta, **OPTION}
    adam = json.loads(ADAM.read_text())
    jobs = [(spec, lr, s) for lr in LRS for s in SEEDS]
    with ProcessPoolExecutor(2) as pool:
        mine = {(lr, s): v for (_, lr, s), v in zip(jobs, pool.map(_run, jobs, chunksize=10))}

    def adam_mean(lr: float, seeds: list[int]) -> float:
        return statistics.mean(adam[f"adam|{lr:g}|{s}"] for s in seeds)

    best = min(adam_mean(lr, SEEDS) for lr in LRS)
    rng, draws, hits = random.Random(0), 4000, [0] * len(LRS)
    for _ in range(draws):
        chosen = rng.sample(SEEDS, 3)
        ref = min(adam_mean(lr, chosen) for lr in LRS)
        for i, lr in enumerate(LRS):
            hits[i] += statistics.mean(mine[(lr, s)] for s in chosen) <= 1.1 * ref
    ratios = [statistics.mean(mine[(lr, s)] for s in SEEDS) / best for lr in LRS]
    print(f"beta {beta}: 60-seed ratio " + " ".join(f"{x:.2f}" for x in ratios)
          + " | P(pass) " + " ".join(f"{h / draws:.2f}" for h in hits)
          + f" | mean {sum(hits) / draws:.2f}")  # fmt: skip


if __name__ == "__main__":
    main(float(sys.argv[1]))
