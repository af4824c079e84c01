"""Does gradient noise tell the tasks that want a rate below the edge from those that want the edge?

Issue 10's obstacle: on some tasks the best fixed Adam rate lies far below the largest rate that
trains stably (the edge, where the seek rule settles), on others near it, and no signal the
controller read in its first steps told them apart (study 11; ``matched_loss_probe.py``). The
gradient noise scale (McCandlish et al. 2018, "An empirical model of large-batch training") is
the textbook candidate: the best step of noisy SGD is the noiseless one ÷ (1 + B_noise / B),
and two independent minibatch gradients at nearly the same weights have the cosine

    cos(g_t, g_{t-1}) ≈ |G|² / (|G|² + tr Σ / B) = 1 / (1 + B_noise / B),

which an optimizer sees for free. So if noise were what sets the gap, ``edge / best`` would
track ``1 / cos``. Protocol (fixed before the run): per task and seed, Adam at a tenth of the
task's best fixed rate (study 1's grid, ``BEST``) for 80 steps, the mean of ``cos(g_t, g_{t-1})``
(all parameters flattened) over steps 21-80; and AdamHD at defaults from lr 1e-3, its mean
effective rate at step 100 (the edge it found) ÷ the best fixed rate.

    python experiments/noise_ratio_probe.py            # nine tasks x seeds 0-2, ~3 min on 2 cores

Measured 2026-12-05 (seeds 0-2; ``experiments/results/noise_ratio_probe/table.md``): it does
not. The cosine is 0.31-0.36 on mnist1d_mlp (edge 30-38x the best rate) and 0.36-0.40 on
animal_cnn (edge 1.3-2x); 0.76-0.77 on digits_logreg (edge 5.9-7x) and 0.90-0.99 on few-shot
(edge 0.9-1.6x).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from matched_loss_probe import print_and_write

from metalr.workbench.runner import train
from metalr.workbench.tasks import make_task

#: Best fixed Adam rate per task on study 1's grid 1e-5 ... 1e-1 (final validation loss, mean
#: over seeds 0-2; ``experiments/results/ablate_study1/summary.csv``).
BEST = {
    "digits_logreg": 1e-2, "digits_mlp": 1e-3, "mnist1d_mlp": 1e-4, "fewshot_sinusoid": 1e-2,
    "animal_cnn": 1e-3, "charlm_gru": 1e-2, "pysrc_transformer": 1e-2,
    "animal_autoencoder": 1e-3, "diabetes_mlp": 1e-4,
}  # fmt: skip
NOISE_STEPS = 80
SKIP = 20  # the cosine's mean starts after this many pairs (the first steps move fast)
EDGE_STEP = 100


def gradient_cosines(task_name: str, lr: float, seed: int, steps: int, size: str) -> list[float]:
    """``cos(g_t, g_{t-1})`` of successive minibatch gradients (all parameters) under Adam."""
    task = make_task(task_name, size, fallback_text=size == "smoke")
    model = task.model(seed, "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batches = task.batches(seed)
    previous, cosines = None, []
    for _ in range(steps):
        x, y = batches()
        opt.zero_grad()
        task.loss(model(x), y).backward()
        grads = [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
        g = torch.cat(grads).double()
        if previous is not None:
            denominator = float(g.norm() * previous.norm())
            cosines.append(float(g @ previous) / denominator if denominator > 0 else 0.0)
        previous = g
        opt.step()
    return cosines


def probe(task_name: str, seed: int, size: str, noise_steps: int, edge_step: int) -> dict[str, Any]:
    best = BEST[task_name]
    cosines = gradient_cosines(task_name, best / 10, seed, noise_steps, size)
    tail = cosines[SKIP:] or cosines
    task = make_task(task_name, size, fallback_text=size == "smoke")
    run = train(task, {"kind": "adam_hd"}, 1e-3, seed, edge_step, log_every=edge_step,
                divergence=1e3, device="cpu")  # fmt: skip
    edge = float(run["curves"]["lr_mean"][-1])
    return {"task": task_name, "seed": seed, "cosine": sum(tail) / len(tail),
            "edge": edge, "edge_over_best": edge / best}  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| task | best fixed Adam rate | seeds | cos(g_t, g_{t-1}) at best/10 | 1 / cos | "
        "AdamHD's rate at step 100 ÷ best |"
    )
    lines = [head, "|---|---:|---|---|---|---|"]
    for task_name in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task_name]
        cos = [r["cosine"] for r in mine]
        ratio = [r["edge_over_best"] for r in mine]
        inverse = [1 / c if c > 0 else math.inf for c in cos]
        lines.append(
            f"| {task_name} | {BEST[task_name]:g} | {','.join(str(r['seed']) for r in mine)} | "
            f"{min(cos):.2f}–{max(cos):.2f} | {min(inverse):.2g}–{max(inverse):.2g} | "
            f"{min(ratio):.2g}–{max(ratio):.2g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(BEST))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--size", default="full", choices=["full", "smoke"])
    parser.add_argument("--noise-steps", type=int, default=NOISE_STEPS)
    parser.add_argument("--edge-step", type=int, default=EDGE_STEP)
    parser.add_argument("--out", type=Path, default=None, help="write the table here (Markdown)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [
        probe(name, int(seed), args.size, args.noise_steps, args.edge_step)
        for name in args.tasks.split(",") for seed in args.seeds.split(",")
    ]  # fmt: skip
    text = table(rows)
    return print_and_write(text, args.out)


if __name__ == "__main__":
    main()
