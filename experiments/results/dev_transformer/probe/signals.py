"""Probes behind ../result.md (development seeds; nothing here changes a default).

    python experiments/results/dev_transformer/probe/signals.py trace kjv_transformer 1e-3 390
    python experiments/results/dev_transformer/probe/signals.py trace kjv_transformer 1e-2 390 '{"kind": "adam"}'
    python experiments/results/dev_transformer/probe/signals.py turn digits_mlp 1e-3 100

``trace``: every 20 steps of one run at its budget (``check_controller.task_budgets``), the mean
training loss, the mean cosine of the gradient with the last parameter change
``cos(g_t, Δθ_{t-1})`` (positive: the last step went too far, the greedy hypergradient says
"lower"), the mean gradient norm, the effective rate and, for AdamHD, the size-weighted tracking
signal ``μ̂/√ν̂`` and the gradient gate's ``G/H``. ``turn``: the first 80 steps of one AdamHD
run, printing each change between ramping (R) and settled (T) with the fast group-cosine average
F and its peak P, the rate, the gradient norm and its ratio to 5 steps before and to its maximum.
"""

import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "experiments"))
from check_controller import task_budgets
from find_rate_study import effective_rate

from metalr.functional._controller import (
    COUNT,
    FAST,
    GRAD,
    GRAD_PEAK,
    MEAN,
    PEAK,
    RAMP,
    SQ,
)  # fmt: skip
from metalr.functional._seek_constants import SEEK_DEFAULTS
from metalr.workbench.optimizers import build_for_model
from metalr.workbench.tasks import make_task


def _rate(opt, lr0):
    return effective_rate(opt) if hasattr(opt, "effective_lrs") else lr0


def _tracking(opt):
    """Size-weighted μ̂/√ν̂ of the tensors' tracking signals and the gate's G/H (AdamHD)."""
    b1, b2 = SEEK_DEFAULTS["signal_decay"], SEEK_DEFAULTS["signal_sq_decay"]
    snr, size, level = 0.0, 0, math.nan
    for group in opt.param_groups:
        for p in group["params"]:
            c = opt.state[p].get("hd_controller")
            if c is None or float(c[COUNT]) <= 0:
                continue
            n = float(c[COUNT])
            mu, nu = float(c[MEAN]) / (1 - b1**n), float(c[SQ]) / (1 - b2**n)
            snr += p.numel() * mu / (math.sqrt(max(nu, 0.0)) + 1e-8)
            size += p.numel()
            level = float(c[GRAD]) / max(float(c[GRAD_PEAK]), 1e-30)
    return (snr / size if size else math.nan), level


#: Discounts μ of the trails ``Z_t = μ Z_{t-1} + Δθ_t`` whose cosine with the gradient a trace
#: also records (``cos(g_t, Z_{t-1})``; the seek rule's ``horizon`` option reads such a trail).
TRAIL_DISCOUNTS = (0.9, 0.99)


def _tensor_cosine(model, g, last):
    """The size-weighted mean over parameter tensors of each tensor's ``cos(g, Δθ_{t-1})`` (what
    the seek rule's tracking reads per tensor, before its normalisation)."""
    if last is None:
        return math.nan
    total, size, start = 0.0, 0, 0
    for p in model.parameters():
        n = p.numel()
        gp, dp = g[start : start + n], last[start : start + n]
        total += n * float(gp @ dp / (gp.norm() * dp.norm() + 1e-30))
        size, start = size + n, start + n
    return total / size


def run_probe(mode, task_name, lr0, seed, spec, size="full", steps=None):
    """Yield ``trace`` rows (a dict every 20 steps, the last one with the final validation loss)
    or ``turn`` lines of one run (``steps``: the task's budget, 80 for ``turn``, unless given)."""
    torch.set_num_threads(1)
    task = make_task(task_name, size)
    if steps is None:
        steps = 80 if mode == "turn" else task_budgets(task_name)[task_name]
    model = task.model(seed)
    opt = build_for_model(spec, model, lr0, task)
    nxt = task.batches(seed)
    last, window, norms, ramping = None, [], [], None
    trails = dict.fromkeys(TRAIL_DISCOUNTS)  # μ -> Σ_k μ^k Δθ_{t-1-k}
    for t in range(1, steps + 1):
        x, y = nxt()
        loss = task.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        cos = float(g @ last / (g.norm() * last.norm() + 1e-30)) if last is not None else math.nan
        trail_cos = [
            float(g @ z / (g.norm() * z.norm() + 1e-30)) if z is not None else math.nan
            for z in trails.values()
        ]
        norms.append(float(g.norm()))
        window.append((loss.item(), cos, norms[-1], *trail_cos, _tensor_cosine(model, g, last)))
        opt.step()
        last = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
        for mu, z in trails.items():
            trails[mu] = last.clone() if z is None else z.mul_(mu).add_(last)
        if mode == "trace" and t % 20 == 0:
            mean = [
                sum(v[i] for v in window if not math.isnan(v[i])) / len(window)
                for i in range(len(window[0]))
            ]
            snr, level = _tracking(opt)
            row = {"step": t, "rate": _rate(opt, lr0), "loss": mean[0], "cos": mean[1],
                   "grad": mean[2], "snr": snr, "level": level,
                   "trail_cos": dict(zip(TRAIL_DISCOUNTS, mean[3:-1], strict=True)),
                   "tensor_cos": mean[-1]}  # fmt: skip
            if t + 20 > steps:
                row["val"] = task.evaluate(model, "val", seed)
            yield row
            window = []
        if mode == "turn":
            c = next(opt.state[p]["hd_controller"] for p in model.parameters())
            now = float(c[RAMP]) > 0
            if now != ramping:
                yield (f"{task_name} t{t} {'R' if now else 'T'} F {float(c[FAST]):.2f} "
                       f"P {float(c[PEAK]):.2f} rate {_rate(opt, lr0):.1e} |g| {norms[-1]:.2f} "
                       f"÷5 steps before {norms[-1] / norms[max(0, t - 6)]:.2f} "
                       f"÷max {norms[-1] / max(norms):.2f}")  # fmt: skip
            ramping = now


def main(mode, task_name, lr0, seed, spec):
    for row in run_probe(mode, task_name, lr0, seed, spec):
        if isinstance(row, str):
            print(row)
        else:
            print(f"{row['step']:4d} rate {row['rate']:.2e} loss {row['loss']:.3f} "
                  f"cos(g,dθ) {row['cos']:+.3f} |g| {row['grad']:.3f} snr {row['snr']:+.3f} "
                  f"G/H {row['level']:.2f}")  # fmt: skip


if __name__ == "__main__":
    mode, task_name, lr0, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    spec = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {"kind": "adam_hd"}
    main(mode, task_name, lr0, seed, spec)
