"""Validation loss at matched training loss, early in training: can a signal see the rate's cost?

Issue 10's obstacle on the tasks that overfit (study 11): a rate a few times above the best
fixed one ends worse although it trains as well. This probe asks whether that shows *early*, as
it would have to for a controller to act on it: Adam at several fixed rates, the validation
loss at the first logged step where the (minibatch) training loss falls below each level.

    python experiments/matched_loss_probe.py                      # digits_mlp, 300 steps
    python experiments/matched_loss_probe.py --task digits_logreg --lrs 1e-3,1e-2,3e-2

Prints one row per (rate, seed): ``step:validation`` at each training-loss level, and the final
validation loss after ``--final-steps`` steps (the study's budget), and writes them as Markdown
(``--out``). Measured 2026-12-05 (digits_mlp, seeds 0-1; ``experiments/results/
matched_loss_probe/digits_mlp.md``): at training loss ≤ 0.1 the validation loss is 0.17-0.18 at
lr 3e-4, 0.16-0.17 at 1e-3, 0.15-0.16 at 3e-3 and 0.21-0.24 at 1e-2 (reached by step 20-25), so
1e-2 is visibly worse early but 3e-3 is not, though after 1000 steps it ends at 0.118-0.140
against 0.093-0.100 at 1e-3 and 0.083-0.089 at 3e-4.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from metalr.workbench.runner import train
from metalr.workbench.tasks import make_task

DEFAULT_LEVELS = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)


def first_below(
    curves: dict[str, list], levels: tuple[float, ...]
) -> list[tuple[int, float] | None]:
    """For each level, (step, validation loss) at the first logged step whose training loss is
    at most the level (None if none is)."""
    out: list[tuple[int, float] | None] = []
    for level in levels:
        hit = None
        for step, tr, val in zip(curves["step"], curves["train_loss"], curves["val_loss"]):
            if tr is not None and math.isfinite(tr) and tr <= level:
                hit = (int(step), float(val))
                break
        out.append(hit)
    return out


def probe(task_name: str, lr: float, seed: int, steps: int, final_steps: int, size: str,
          levels: tuple[float, ...]) -> dict[str, Any]:  # fmt: skip
    """One Adam run logged every 5 steps for ``steps`` steps (the matched-loss points), and the
    final validation loss of a run of ``final_steps`` steps."""
    task = make_task(task_name, size, fallback_text=size == "smoke")
    early = train(task, {"kind": "adam"}, lr, seed, steps, log_every=5, divergence=1e3,
                  device="cpu")  # fmt: skip
    final = early if final_steps == steps else train(
        make_task(task_name, size, fallback_text=size == "smoke"), {"kind": "adam"}, lr, seed,
        final_steps, log_every=max(1, final_steps // 20), divergence=1e3, device="cpu",
    )  # fmt: skip
    return {"lr": lr, "seed": seed, "points": first_below(early["curves"], levels),
            "final": float(final["final_val_loss"])}  # fmt: skip


def table(task_name: str, rows: list[dict[str, Any]], levels: tuple[float, ...]) -> str:
    head = " | ".join(f"train ≤ {lv:g}" for lv in levels)
    lines = [f"## {task_name}: validation loss at matched training loss (step:val)", "",
             f"| lr | seed | {head} | final val |", "|---|---|" + "---|" * len(levels) + "---|"]  # fmt: skip
    for r in rows:
        cells = " | ".join("—" if p is None else f"{p[0]}:{p[1]:.3f}" for p in r["points"])
        lines.append(f"| {r['lr']:g} | {r['seed']} | {cells} | {r['final']:.4f} |")
    return "\n".join(lines) + "\n"


def print_and_write(text: str, out: Path | None) -> str:
    """Print a probe's Markdown table and, with ``out``, write it there (its folder made)."""
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="digits_mlp")
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument(
        "--steps", type=int, default=300, help="steps of the early, finely logged run"
    )
    parser.add_argument("--final-steps", type=int, default=1000, help="the study's budget")
    parser.add_argument("--size", default="full", choices=["full", "smoke"])
    parser.add_argument("--levels", default=",".join(f"{v:g}" for v in DEFAULT_LEVELS))
    parser.add_argument("--out", type=Path, default=None, help="write the table here (Markdown)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    levels = tuple(float(v) for v in args.levels.split(","))
    rows = [
        probe(args.task, float(lr), int(seed), args.steps, args.final_steps, args.size, levels)
        for lr in args.lrs.split(",") for seed in args.seeds.split(",")
    ]  # fmt: skip
    text = table(args.task, rows, levels)
    return print_and_write(text, args.out)


if __name__ == "__main__":
    main()
