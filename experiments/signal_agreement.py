"""Do the validation data agree with the steps as the training data do? A per-step probe.

The training signal of every HD rule is ``c_t = cos(g_t, d_{t-1})`` (the minibatch gradient after a
step against that step's direction; positive: the step was too short). Issue 11's validation
signal is the same cosine with the gradient of a validation batch. If a task's rate is too high
for *generalisation* while the training data still reward it, the validation cosine should fall
below the training one as the rate climbs. This script measures both on one workbench run::

    c_train = cos(g_t, d_{t-1}),     c_val = cos(∇L_val(θ_t), d_{t-1})

with ``d_{t-1} = θ_{t-1} − θ_t`` (the step, any optimizer), ``∇L_val`` on a fixed batch of the
validation split (512 examples, or the split), and — so that the two compare at the same
gradient noise — the training cosine also on a fixed training batch of that size, all smoothed by an average with decay 0.8, and
prints them with the mean effective rate every ``--every`` steps::

    python experiments/signal_agreement.py --task digits_mlp --seed 100 --steps 150
    python experiments/signal_agreement.py --task fewshot_sinusoid --seed 100 --steps 100

(2026-12-05, AdamHD from lr0 1e-3, seed 100, ``experiments/results/signal_agreement/``; the ratio
is c_val ÷ the big-batch c_train: during the ramp it is 0.91-0.97 on digits_mlp and
digits_logreg and 1.00-1.04 on animal_cnn; after the turn, while the rate climbs on
digits_logreg (2.5e-2 → 6.7e-2, best fixed rate 1e-2) it falls to 0.2-0.3 — the training data
still ask for longer steps, the validation data hardly do — and on digits_mlp to about 0 by step
60; on animal_cnn it stays near 1 until both cosines are noise. On the few-shot task it is
0.1-0.2 from the first steps: its query points never agreed with the support set's steps as the
support set does.)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

import metalr.workbench.optimizers as O
from metalr.workbench.runner import train
from metalr.workbench.tasks import make_task

DECAY = 0.8
VAL_BATCH = 512


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def _batch_gradient(task: Any, model: torch.nn.Module, params: list[torch.Tensor],
                    x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The flat gradient of the task's loss on ``(x, y)`` (``.grad`` is overwritten)."""
    for p in params:
        p.grad = None
    task.loss(model(x), y).backward()
    return _flat([p.grad for p in params])


def probe(
    task_name: str,
    spec: dict[str, Any],
    lr: float,
    seed: int,
    steps: int,
    size: str = "full",
    batch: int = VAL_BATCH,
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """One run of ``spec``; per step from the second: raw and smoothed training and validation
    cosines with the last step, and the mean effective rate; and the run's result (the probe
    leaves the training itself unchanged)."""
    task = make_task(task_name, size, fallback_text=size == "smoke")
    rows: list[dict[str, float]] = []
    build = O.build_for_model

    def instrumented(spec: dict[str, Any], model: torch.nn.Module, lr: Any, task: Any = None):
        opt = build(spec, model, lr, task)
        params = [p for g in opt.param_groups for p in g["params"]]
        splits = task.splits(seed)
        xt, yt = (t[:batch] for t in splits[0])  # a training batch of the validation's size
        xv, yv = (t[:batch] for t in splits[1])
        inner, last = opt.step, {"theta": None, "calls": 0}

        def step(*args: Any, **kwargs: Any) -> Any:
            theta = [p.detach().clone() for p in params]
            last["calls"] += 1  # this call takes step number last["calls"]
            if last["theta"] is not None:
                d = _flat([a - b for a, b in zip(last["theta"], theta)])
                g = _flat([p.grad for p in params])
                grads = [p.grad for p in params]
                buffers = [b.clone() for b in model.buffers()]  # e.g. batch-norm statistics
                g_val, g_big = (_batch_gradient(task, model, params, x, y)
                                for x, y in ((xv, yv), (xt, yt)))  # fmt: skip
                for p, saved in zip(params, grads):
                    p.grad = saved
                with torch.no_grad():
                    for b, saved in zip(model.buffers(), buffers):
                        b.copy_(saved)
                if d.norm() > 0:
                    prev = rows[-1] if rows else {"train": 0.0, "val": 0.0, "big": 0.0}
                    c_t, c_v, c_b = _cosine(g, d), _cosine(g_val, d), _cosine(g_big, d)
                    rows.append({
                        "step": last["calls"], "c_train": c_t, "c_val": c_v, "c_big": c_b,
                        "train": DECAY * prev["train"] + (1 - DECAY) * c_t,
                        "val": DECAY * prev["val"] + (1 - DECAY) * c_v,
                        "big": DECAY * prev["big"] + (1 - DECAY) * c_b,
                        "lr": O.lr_summary(opt)["mean"],
                    })  # fmt: skip
            last["theta"] = theta
            return inner(*args, **kwargs)

        opt.step = step
        return opt

    O.build_for_model = instrumented
    try:
        result = train(task, spec, lr, seed, steps, log_every=steps, divergence=1e3, device="cpu")
    finally:
        O.build_for_model = build
    return rows, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="digits_mlp")
    parser.add_argument("--spec", default='{"kind": "adam_hd"}', help="a workbench spec (JSON)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--size", default="full", choices=["smoke", "full"])
    parser.add_argument("--batch", type=int, default=VAL_BATCH,
                        help="examples of the fixed training and validation batches")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, _ = probe(args.task, json.loads(args.spec), args.lr, args.seed, args.steps, args.size,
                    args.batch)  # fmt: skip
    print(f"{args.task}, {args.spec}, lr0 {args.lr:g}, seed {args.seed} (averages, decay {DECAY})")
    print("| step | c_train (minibatch) | c_train (big batch) | c_val | c_val / c_train (big) "
          "| mean effective rate |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["step"] % args.every == 0:
            ratio = r["val"] / r["big"] if abs(r["big"]) > 1e-3 else float("nan")
            print(f"| {r['step']} | {r['train']:+.3f} | {r['big']:+.3f} | {r['val']:+.3f} | "
                  f"{ratio:+.2f} | {r['lr']:.2e} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
