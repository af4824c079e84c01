"""Analysis and Markdown report of ``experiments/choose_hypergrad_lr.py`` (the β sweep).

:func:`analyse` turns the sweep's rows into seed-mean ratios to best-of-grid Adam / SGD and the
chosen β; :func:`write_markdown` writes the tables, the choice and the size-transfer section.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metalr.functional._hypergrad import DEFAULT_NORMALIZED_HYPERGRAD_LR

FAMILIES = ("adam", "sgd")
#: ``lr_bounds`` of the additive runs. The documented default (0, inf) keeps every effective rate
#: >= 0, but between commits 825752c and d452695 ``clamp_rates`` skipped a lower bound of exactly 0,
#: so an additive multiplier could turn negative (the step then climbs the loss). The smallest
#: positive float32 pins the documented behaviour on any library version; with the fix it changes
#: nothing (checked: identical runs).
ADDITIVE_LR_BOUNDS = (float(torch.finfo(torch.float32).tiny), math.inf)
FAMILY_TITLE = {"adam": "Adam / Adam-HD", "sgd": "SGD(momentum=0.9) / SGD-HD"}


@dataclass
class Analysis:
    cells: list[tuple[str, str]]  # (task, budget) in run order
    budgets: list[str]
    lrs: list[float]
    mean: dict[tuple, float]  # (family, rule, β, task, budget, lr0) -> seed-mean val loss
    best: dict[tuple, tuple[float, float]]  # (family, task, budget) -> (loss, lr)
    ratio: dict[tuple, float]
    table: dict[tuple, dict[str, float]]  # (budget | "all", family | "both", β) -> summary
    chosen: float


def analyse(rows: list[dict[str, Any]], cfg: dict[str, Any], betas: list[float]) -> Analysis:
    """Seed-mean loss per cell, best-of-grid per (family, task, budget), ratios, the choice."""
    losses: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        key = (r["family"], r["rule"], float(r["hypergrad_lr"]), r["task"], r["budget"],
               float(r["lr0"]))  # fmt: skip
        losses[key].append(float(r["final_val_loss"]))
    mean = {k: statistics.fmean(v) if all(map(math.isfinite, v)) else math.inf
            for k, v in losses.items()}  # fmt: skip
    cells = list(dict.fromkeys((r["task"], r["budget"]) for r in rows))
    budgets = list(dict.fromkeys(b for _, b in cells))
    lrs = sorted({float(r["lr0"]) for r in rows})
    best = {}
    for fam in FAMILIES:
        for t, b in cells:
            lr = min(lrs, key=lambda x: mean[fam, "fixed", 0.0, t, b, x])
            best[fam, t, b] = (mean[fam, "fixed", 0.0, t, b, lr], lr)
    ratio = {k: v / best[k[0], k[3], k[4]][0] for k, v in mean.items()}

    def summary(budget: str, fam: str, beta: float) -> dict[str, float]:
        vals = [ratio[f, "normalized", beta, t, b, lr]
                for f in (FAMILIES if fam == "both" else (fam,))
                for t, b in cells if budget in ("all", b) for lr in lrs]  # fmt: skip
        return {
            "robust": sum(v <= 1 + cfg["within"] for v in vals) / len(vals),
            "median": statistics.median(vals),
            "diverged": sum(not math.isfinite(v) for v in vals),
            "cells": len(vals),
        }

    table = {(bud, fam, beta): summary(bud, fam, beta)
             for bud in ["all", *budgets] for fam in ["both", *FAMILIES] for beta in betas}  # fmt: skip
    chosen = max(betas, key=lambda beta: (
        min(table[bud, "both", beta]["robust"] for bud in budgets),
        -table["all", "both", beta]["median"],
    ))  # fmt: skip
    return Analysis(cells, budgets, lrs, mean, best, ratio, table, chosen)


def baseline_summary(a: Analysis, cfg: dict[str, Any], fam: str, rule: str, budget: str) -> str:
    beta = 0.0 if rule == "fixed" else float(cfg["additive_hypergrad_lr"][fam])
    vals = [a.ratio[fam, rule, beta, t, b, lr] for t, b in a.cells if b == budget for lr in a.lrs
            if (fam, rule, beta, t, b, lr) in a.ratio]  # fmt: skip
    if not vals:
        return "–"
    robust = sum(v <= 1 + cfg["within"] for v in vals) / len(vals)
    return f"{robust:.0%} / {statistics.median(vals):.2f}"


def _loadavg() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def fmt_ratio(v: float) -> str:
    if not math.isfinite(v):
        return "div."
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def seed_values(rows: list[dict[str, Any]], key: str, **match: Any) -> list[float]:
    out = []
    for r in rows:
        if all((float(r[k]) == v if isinstance(v, float) else r[k] == v) for k, v in match.items()):
            out.append(float(r[key]))
    return out


def fmt_lr(values: list[float]) -> str:
    if not values or not all(math.isfinite(v) for v in values):
        return "–"
    if min(values) <= 0:
        return "0"
    return f"{statistics.geometric_mean(values):.2g}"


def write_markdown(path: Path, a: Analysis, rows: list[dict[str, Any]], cfg: dict[str, Any],
                   betas: list[float], command: str, wall: float, cpu: float,
                   n_runs: int) -> None:  # fmt: skip
    within = cfg["within"]
    info = {(r["task"], r["budget"]): (int(r["n_params"]), int(r["steps"])) for r in rows}
    seeds = sorted({int(r["seed"]) for r in rows})
    lines = [
        "# Choosing the default `hypergrad_lr` of the normalized rule",
        "",
        f"- command: `{command}` (grid: `configs/choose_hypergrad_lr.yaml`)",
        (
            f"- hardware: 2-core CPU ({platform.machine()}), `torch.set_num_threads(1)`, "
            f"torch {torch.__version__}, Python {platform.python_version()}"
        ),
        (
            f"- wall time: {wall / 60:.1f} min, CPU time {cpu / 60:.1f} min, load average "
            f"{_loadavg()} at the end ({n_runs} training runs, each evaluated at every "
            "budget of its task)"
        ),
        (
            f"- library default when run: `DEFAULT_NORMALIZED_HYPERGRAD_LR = "
            f"{DEFAULT_NORMALIZED_HYPERGRAD_LR}`"
        ),
        f"- **chosen: hypergrad_lr = {a.chosen:g}**",
        (
            f"- additive runs use `lr_bounds=({ADDITIVE_LR_BOUNDS[0]:.3g}, inf)`: the documented "
            "non-negative rates (see `ADDITIVE_LR_BOUNDS` in the script)"
        ),
        "",
        (
            "Minibatch 64; metric: final validation loss after the step budget; seeds "
            f"{seeds} (a seed fixes the initialization and the batch order, shared by every "
            "optimizer). Best-of-grid = the best seed-mean loss of the fixed-lr optimizer over lr ∈ "
            f"{{{', '.join(f'{lr:g}' for lr in a.lrs)}}}, the same grid as the initial lrs lr0 of the "
            f"HD runs. Ratio = HD loss / best-of-grid; a (task, budget, lr0) cell is robust if the ratio "
            f"≤ {1 + within:g}. `div.` = a seed diverged (loss > {cfg['divergence_factor']:g}× initial "
            "or non-finite)."
        ),
        "",
        "| task | params | budget | steps | best fixed Adam: loss (lr) | best fixed SGD m=0.9: loss (lr) |",
        "|---|---:|---|---:|---|---|",
    ]
    for t, b in a.cells:
        n, steps = info[t, b]
        best = [f"{a.best[f, t, b][0]:.4f} ({a.best[f, t, b][1]:g})" for f in FAMILIES]
        lines.append(f"| {t} | {n:,} | {b} | {steps} | {best[0]} | {best[1]} |")
    lines += [
        "",
        "## Robust fraction (and median ratio) of the normalized rule per hypergrad_lr",
        "",
        (
            "Selection: the largest *worst-over-budgets* robust fraction (both optimizers), ties broken "
            "by the lower median ratio over all cells."
        ),
        "",
    ]
    head = ["hypergrad_lr"]
    for bud in a.budgets:
        head += [f"{bud}: both ({a.table[bud, 'both', betas[0]]['cells']} cells)", f"{bud}: Adam-HD",
                 f"{bud}: SGD-HD"]  # fmt: skip
    head += ["worst budget", "median ratio (all)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for beta in betas:
        cells = [f"{beta:g}" + (" **(chosen)**" if beta == a.chosen else "")]
        for bud in a.budgets:
            for fam in ("both", *FAMILIES):
                s = a.table[bud, fam, beta]
                cells.append(f"{s['robust']:.0%} ({s['median']:.2f})")
        worst = min(a.table[bud, "both", beta]["robust"] for bud in a.budgets)
        cells += [f"{worst:.0%}", f"{a.table['all', 'both', beta]['median']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for rule, label in (("fixed", "fixed lr = lr0"), ("additive", "additive, paper β")):
        cells = [label]
        for bud in a.budgets:
            cells += ["", *(baseline_summary(a, cfg, fam, rule, bud) for fam in FAMILIES)]
        lines.append("| " + " | ".join(cells + ["", ""]) + " |")
    best_per_budget = {bud: max(betas, key=lambda beta: a.table[bud, "both", beta]["robust"])
                       for bud in a.budgets}  # fmt: skip
    mean_robust = {beta: statistics.fmean(a.table[bud, "both", beta]["robust"] for bud in a.budgets)
                   for beta in betas}  # fmt: skip
    by_mean = max(betas, key=lambda beta: mean_robust[beta])
    runner_up = max((b for b in betas if b != a.chosen), key=lambda beta: (
        min(a.table[bud, "both", beta]["robust"] for bud in a.budgets),
        -a.table["all", "both", beta]["median"],
    ))  # fmt: skip
    worst = {beta: min(a.table[bud, "both", beta]["robust"] for bud in a.budgets)
             for beta in (a.chosen, runner_up)}  # fmt: skip
    lines += [
        "",
        "Sensitivity of the choice: the best β of each budget alone is "
        + ", ".join(
            f"{beta:g} at {bud} ({a.table[bud, 'both', beta]['robust']:.0%})"
            for bud, beta in best_per_budget.items()
        )
        + f"; the runner-up under the selection rule is {runner_up:g} (worst budget "
        f"{worst[runner_up]:.0%} vs {worst[a.chosen]:.0%}); ranked by the *mean* robust fraction "
        f"over budgets instead of the worst, {by_mean:g} would win ("
        + ", ".join(f"{beta:g}: {mean_robust[beta]:.0%}" for beta in betas)
        + ").",
        "",
        "### Training vs validation loss",
        "",
        (
            "Median over (task, lr0) cells and both optimizers of the seed-mean final *training* loss "
            "(mean of the last 20 minibatches) and *validation* loss, each divided by that of the "
            "best-of-grid fixed lr. A training ratio below 1 with a validation ratio above 1 means the "
            "rule trained faster than the tuned fixed lr and overfitted."
        ),
        "",
        "| hypergrad_lr | " + " | ".join(f"{bud}: train | {bud}: val" for bud in a.budgets) + " |",
        "|---:|" + "---:|---:|" * len(a.budgets),
    ]
    for beta in betas:
        cells = []
        for bud in a.budgets:
            tr, va = train_val_medians(a, rows, beta, bud)
            cells += [f"{tr:.2f}", f"{va:.2f}"]
        lines.append(f"| {beta:g} | " + " | ".join(cells) + " |")
    lines.append("")
    for bud in a.budgets:
        lines += [f"## Per cell, {bud} budget: ratio to best-of-grid", ""]
        for fam in FAMILIES:
            add_beta = float(cfg["additive_hypergrad_lr"][fam])
            has_add = any(k[:3] == (fam, "additive", add_beta) and k[4] == bud for k in a.ratio)
            head = ["fixed", *(f"β={beta:g}" for beta in betas)]
            head += [f"additive {add_beta:g}"] if has_add else []
            lines += [
                f"### {FAMILY_TITLE[fam]}",
                "",
                "| task | lr0 | " + " | ".join(head) + f" | eff. lr at end (β={a.chosen:g}) |",
                "|---|---:|" + "---:|" * (len(head) + 1),
            ]
            for t, b in a.cells:
                if b != bud:
                    continue
                for lr in a.lrs:
                    keys = [(fam, "fixed", 0.0), *((fam, "normalized", beta) for beta in betas)]
                    keys += [(fam, "additive", add_beta)] if has_add else []
                    vals = [a.ratio[(*k, t, b, lr)] for k in keys]
                    eff = seed_values(rows, "eff_lr", family=fam, rule="normalized", task=t,
                                      budget=b, hypergrad_lr=a.chosen, lr0=lr)  # fmt: skip
                    shown = [
                        f"**{fmt_ratio(v)}**" if v <= 1 + within else fmt_ratio(v) for v in vals
                    ]
                    lines.append(f"| {t} | {lr:g} | " + " | ".join(shown) + f" | {fmt_lr(eff)} |")
            lines.append("")
    lines += transfer_section(a, rows, cfg)
    path.write_text("\n".join(lines) + "\n")


def train_val_medians(a: Analysis, rows: list[dict[str, Any]], beta: float,
                      budget: str) -> tuple[float, float]:  # fmt: skip
    """Median train- and val-loss ratios of β to the best fixed lr, over cells of a budget."""
    trains, vals = [], []
    for fam in FAMILIES:
        for t, b in a.cells:
            if b != budget:
                continue
            ref = seed_values(rows, "final_train_loss", family=fam, rule="fixed", task=t, budget=b,
                              lr0=a.best[fam, t, b][1])  # fmt: skip
            for lr in a.lrs:
                hd = seed_values(rows, "final_train_loss", family=fam, rule="normalized", task=t,
                                 budget=b, hypergrad_lr=beta, lr0=lr)  # fmt: skip
                ok = all(map(math.isfinite, hd + ref))
                trains.append(statistics.fmean(hd) / statistics.fmean(ref) if ok else math.inf)
                vals.append(a.ratio[fam, "normalized", beta, t, b, lr])
    return statistics.median(trains), statistics.median(vals)


def transfer_section(a: Analysis, rows: list[dict[str, Any]], cfg: dict[str, Any]) -> list[str]:
    pair = [
        (t, "short") for t in ("regression_small", "regression_large") if (t, "short") in a.cells
    ]
    if len(pair) < 2:
        return []
    size = {r["task"]: int(r["n_params"]) for r in rows}
    lines = [
        (
            f"## Transfer across model size (short budget; the same regression problem, "
            f"{size[pair[0][0]]:,} vs {size[pair[1][0]]:,} parameters)"
        ),
        "",
        (
            "Ratio to best-of-grid, and the effective lr at the end (geometric mean over tensors and "
            "seeds) and its largest value over tensors (max over seeds)."
        ),
        "",
        "| method | lr0 | small: ratio | small: eff. lr (max) | large: ratio | large: eff. lr (max) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for fam in FAMILIES:
        add_beta = float(cfg["additive_hypergrad_lr"][fam])
        name = "AdamHD" if fam == "adam" else "SGDHD"
        for rule, beta in (("normalized", a.chosen), ("additive", add_beta)):
            for lr in a.lrs:
                cells = []
                for t, b in pair:
                    match = {
                        "family": fam,
                        "rule": rule,
                        "task": t,
                        "budget": b,
                        "hypergrad_lr": beta,
                        "lr0": lr,
                    }
                    eff = seed_values(rows, "eff_lr", **match)
                    top = seed_values(rows, "eff_lr_max", **match)
                    div = any(seed_values(rows, "diverged", **match))
                    cells += [fmt_ratio(a.ratio[fam, rule, beta, t, b, lr]),
                              "–" if div else f"{fmt_lr(eff)} ({max(top):.2g})"]  # fmt: skip
                lines.append(f"| {name} {rule} β={beta:g} | {lr:g} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines
