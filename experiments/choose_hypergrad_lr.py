"""Choose the default ``hypergrad_lr`` of the normalized rule (``DEFAULT_NORMALIZED_HYPERGRAD_LR``).

The normalized rule updates ``log m`` by ``hypergrad_lr × cos(g_t, d_{t-1})``, so ``hypergrad_lr``
(β) bounds how fast the rate can move: at most a factor ``e^β`` per step. This script sweeps β for
:class:`metalr.AdamHD` and :class:`metalr.SGDHD` (momentum 0.9), tensor granularity, over

* tasks: logistic regression and an MLP on sklearn digits, and one teacher-student regression
  problem fitted by a ReLU MLP at two widths (13k and 1.08M parameters: transfer across size);
* initial learning rates ``lr0`` spanning 1e-5 .. 1e-1;
* step budgets: 200, 400 and 800 steps on the small tasks (read off one 800-step run: the lr is
  constant, so the first n steps of a longer run are an n-step run), 200 on the 1M model;
* seeds (a seed fixes the initialization and the minibatch order, shared by every optimizer).

Metric: the final validation loss after the step budget, divided by the best fixed-lr
``torch.optim.Adam`` (resp. ``SGD(momentum=0.9)``) over the same lr grid on the same task and
budget ("best-of-grid": what a full lr sweep would reach; seeds averaged first). A (task, budget,
lr0) cell is *robust* when this ratio is ≤ 1 + ``within`` (1.1). The default is the β whose
*worst* robust fraction over the budgets (both optimizers, all tasks) is largest, ties broken by
the lower median ratio over all cells.

The additive rule at the paper's β (1e-7 Adam-HD, 1e-3 SGD-HD) runs on the same grid to show how
one fixed additive β behaves on the small and on the large model.

Usage::

    python experiments/choose_hypergrad_lr.py            # full study (see the config header)
    python experiments/choose_hypergrad_lr.py --smoke    # < 20 s end-to-end check (temp dir)

Writes ``experiments/results/choose_hypergrad_lr.csv`` (one row per run and budget) and ``.md``
(tables, the chosen value, command, hardware and wall time).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn import functional as F

import metalr
from metalr.optim._base import HypergradOptimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the report module
from _choose_hypergrad_lr_report import (
    ADDITIVE_LR_BOUNDS,
    FAMILIES,
    analyse,
    write_markdown,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "choose_hypergrad_lr.yaml"
RESULTS = ROOT / "experiments" / "results"


# --------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    name: str
    budgets: dict[str, int]  # budget name -> step count; one run is evaluated at each
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    build: Callable[[], nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch_size: int
    seeds: list[int]

    @property
    def steps(self) -> int:
        return max(self.budgets.values())


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def digits_data() -> tuple[torch.Tensor, ...]:
    """sklearn digits, a stratified 75/25 split, features standardized on the training set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1.0  # +1: constant pixels stay 0, no blow-up

    def f32(a: Any) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32)

    return (
        f32((x_tr - mean) / std),
        torch.tensor(y_tr),
        f32((x_va - mean) / std),
        torch.tensor(y_va),
    )


def regression_data(cfg: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """y = tanh-teacher(x) scaled to unit variance, plus Gaussian noise; fixed by ``data_seed``."""
    g = torch.Generator().manual_seed(cfg["data_seed"])
    d, w = cfg["input_dim"], cfg["teacher_width"]
    n = cfg["n_train"] + cfg["n_val"]
    x = torch.randn(n, d, generator=g)
    w1 = torch.randn(d, w, generator=g) / math.sqrt(d)
    w2 = torch.randn(w, 1, generator=g) / math.sqrt(w)
    y = torch.tanh(2 * x @ w1) @ w2
    y = (y - y.mean()) / y.std()
    y = y + cfg["noise_std"] * torch.randn(n, 1, generator=g)
    k = cfg["n_train"]
    return x[:k], y[:k], x[k:], y[k:]


def make_tasks(cfg: dict[str, Any], smoke: bool) -> list[Task]:
    """The tasks of the config, each with its step budgets."""
    tasks = []
    digits = reg = None
    budgets = cfg["smoke"]["budgets"] if smoke else cfg["budgets"]
    for name, spec in cfg["tasks"].items():
        if spec["kind"] == "digits":
            digits = digits or digits_data()
            data, loss = digits, F.cross_entropy
            sizes = [64, *spec["hidden"], 10]
        elif spec["kind"] == "regression":
            reg = reg or regression_data(cfg["regression"])
            data, loss = reg, F.mse_loss
            width = spec["width"]
            if smoke:
                width = min(width, cfg["smoke"]["large_width"])
            sizes = [cfg["regression"]["input_dim"], width, width, 1]
        else:
            raise ValueError(f"unknown task kind {spec['kind']!r}")
        steps = {b: int(budgets[b]) for b in spec["budgets"]}
        tasks.append(Task(
            name, steps, *data, build=lambda s=sizes: mlp(s), loss=loss,
            batch_size=cfg["batch_size"], seeds=list(cfg["seeds"]),
        ))  # fmt: skip
    return tasks


# ---------------------------------------------------------------------------------- optimizers
@dataclass(frozen=True)
class Method:
    family: str  # "adam" | "sgd"
    rule: str  # "fixed" | "normalized" | "additive"
    hypergrad_lr: float  # 0 for fixed

    def make(self, params: Any, lr: float, momentum: float) -> torch.optim.Optimizer:
        if self.rule == "fixed":
            if self.family == "adam":
                return torch.optim.Adam(params, lr=lr)
            return torch.optim.SGD(params, lr=lr, momentum=momentum)
        kw = {"hypergrad_lr": self.hypergrad_lr, "rule": self.rule, "granularity": "tensor"}
        if self.rule == "additive":
            kw["lr_bounds"] = ADDITIVE_LR_BOUNDS
        if self.family == "adam":
            return metalr.AdamHD(params, lr=lr, **kw)
        return metalr.SGDHD(params, lr=lr, momentum=momentum, **kw)


def methods(cfg: dict[str, Any], betas: list[float]) -> list[Method]:
    out = []
    for fam in FAMILIES:
        out.append(Method(fam, "fixed", 0.0))
        out.extend(Method(fam, "normalized", b) for b in betas)
        out.append(Method(fam, "additive", float(cfg["additive_hypergrad_lr"][fam])))
    return out


def effective_lr_stats(opt: torch.optim.Optimizer, lr: float) -> tuple[float, float, float]:
    """Geometric mean, min and max of the effective rates (one per parameter tensor)."""
    if not isinstance(opt, HypergradOptimizer):
        return lr, lr, lr
    rates = torch.stack([r.double().reshape(()) for r in opt.effective_lrs().values()])
    if not torch.isfinite(rates).all():
        geo = math.nan
    elif (rates <= 0).any():  # the additive rule can drive a rate to its lower bound 0
        geo = 0.0
    else:
        geo = rates.log().mean().exp().item()
    return geo, rates.min().item(), rates.max().item()


@torch.no_grad()
def val_loss(task: Task, model: nn.Module) -> float:
    return task.loss(model(task.x_val), task.y_val).item()


def run(task: Task, method: Method, lr: float, seed: int, cfg: dict[str, Any]) -> list[dict]:
    """Train one model for the longest budget; return one CSV row per budget.

    Constant lr, no schedule: the state after ``n`` steps of a longer run is the state a run of
    ``n`` steps would end in, so one run serves every budget.
    """
    torch.manual_seed(seed)
    model = task.build()
    n_params = sum(p.numel() for p in model.parameters())
    opt = method.make(model.parameters(), lr, cfg["sgd_momentum"])
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randint(0, task.x_train.shape[0], (task.steps, task.batch_size), generator=g)
    initial = val_loss(task, model)
    limit = cfg["divergence_factor"] * initial
    at = {steps: budget for budget, steps in task.budgets.items()}
    rows: list[dict[str, Any]] = []
    recent: list[float] = []
    diverged = False
    t0 = time.perf_counter()

    def record(budget: str, steps: int, steps_run: int) -> None:
        final = math.inf if diverged else val_loss(task, model)
        bad = diverged or not math.isfinite(final) or final > limit
        geo, lo, hi = effective_lr_stats(opt, lr)
        rows.append({
            "task": task.name, "budget": budget, "steps": steps, "steps_run": steps_run, "n_params": n_params,
            "family": method.family, "rule": method.rule, "hypergrad_lr": method.hypergrad_lr, "lr0": lr,
            "seed": seed, "initial_val_loss": initial, "final_val_loss": math.inf if bad else final,
            "final_train_loss": math.inf if bad else statistics.fmean(recent), "diverged": int(bad),
            "eff_lr": geo, "eff_lr_min": lo, "eff_lr_max": hi, "wall_s": time.perf_counter() - t0,
        })  # fmt: skip

    for step in range(task.steps):
        xb, yb = task.x_train[idx[step]], task.y_train[idx[step]]
        loss = task.loss(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        recent = [*recent[-19:], value]
        if not math.isfinite(value) or value > limit:  # no way back: every later budget diverged
            diverged = True
            for budget, steps in task.budgets.items():
                if steps > step:
                    record(budget, steps, step + 1)
            break
        if step + 1 in at:
            record(at[step + 1], step + 1, step + 1)
    return rows


COLUMNS = [
    "task", "budget", "steps", "steps_run", "n_params", "family", "rule", "hypergrad_lr", "lr0",
    "seed", "initial_val_loss", "final_val_loss", "final_train_loss", "diverged",
    "eff_lr", "eff_lr_min", "eff_lr_max", "wall_s",
]  # fmt: skip


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--smoke", action="store_true", help="tiny grid, < 20 s, temp output dir")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: results/)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = yaml.safe_load(args.config.read_text())
    betas = [float(b) for b in (cfg["smoke"] if args.smoke else cfg)["hypergrad_lrs"]]
    if args.smoke:
        cfg = {**cfg, "lrs": cfg["smoke"]["lrs"], "seeds": cfg["smoke"]["seeds"]}
    out = args.out or (Path(tempfile.mkdtemp(prefix="choose_hlr_")) if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    tasks = make_tasks(cfg, args.smoke)
    grid = [(t, m, float(lr), s) for t in tasks for s in t.seeds for lr in cfg["lrs"]
            for m in methods(cfg, betas)]  # fmt: skip
    rows = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i, (task, method, lr, seed) in enumerate(grid):
        rows.extend(run(task, method, lr, seed, cfg))
        if not args.quiet and (i + 1) % 100 == 0:
            print(f"[{i + 1}/{len(grid)}] {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    with open(out / "choose_hypergrad_lr.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()})
    a = analyse(rows, cfg, betas)
    command = "python experiments/choose_hypergrad_lr.py" + (" --smoke" if args.smoke else "")
    write_markdown(
        out / "choose_hypergrad_lr.md", a, rows, cfg, betas, command, wall, cpu, len(grid)
    )
    print(f"chosen hypergrad_lr = {a.chosen:g}; {len(grid)} runs in {wall:.1f}s; wrote {out}")
    for beta in betas:
        parts = [f"{bud} {a.table[bud, 'both', beta]['robust']:.0%}" for bud in a.budgets]
        print(f"  β={beta:<6g} robust: {', '.join(parts)}; "
              f"median ratio {a.table['all', 'both', beta]['median']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
