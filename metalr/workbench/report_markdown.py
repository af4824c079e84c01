"""The Markdown tables of ``metalr report``: setup, lr tables, best lrs, ranks, legends.

Builds ``report.md``'s body from the aggregated rows of :mod:`metalr.workbench.report_stats`
(the plots it links to are drawn by :mod:`metalr.workbench.report_plots`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from metalr.meta.results import markdown_table
from metalr.workbench.report_stats import _ranks, aggregate, best_rows


def _fmt(mean: float, ci: float, n_div: int = 0, n: int = 0) -> str:
    if n_div:
        return f"diverged ({n_div}/{n})"
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.4f}" if not math.isfinite(ci) else f"{mean:.4f} ± {ci:.4f}"


def _lr_label(lr: float | None) -> str:
    return "lr-free" if lr is None else f"{lr:g}"


def _seeds_text(seeds: list[Any]) -> str:
    return f"n = {len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})"


def _setup(records: list[dict[str, Any]], tasks: list[str]) -> str:
    """A table of each task's size (examples, batch, parameters), steps and seeds."""
    table = []
    for task in tasks:
        rs = [r for r in records if r["task"] == task and r.get("status") != "not installed"]
        info = next((r["task_info"] for r in rs if r.get("task_info")), None)
        sizes = sorted({str(r.get("size", "?")) for r in rs})
        steps = sorted({r["steps"] for r in rs if r.get("steps") is not None})
        seeds = sorted({r["seed"] for r in rs})
        if info:
            split = f"{info['train']} / {info['val']} / {info['test']}"
            batch = "full" if info["batch_size"] is None else str(info["batch_size"])
            params = "—" if info.get("params") is None else f"{info['params']:,}"
        else:  # records written before task_info was recorded
            split = batch = params = "—"
        table.append([task, ", ".join(sizes), params, split, batch,
                      ", ".join(map(str, steps)), _seeds_text(seeds)])  # fmt: skip
    header = ["task", "size", "model parameters", "train / val / test examples", "batch",
              "steps per run", "seeds"]  # fmt: skip
    table_text = markdown_table(header, table, align="llrrrrl")
    return "### Setup\n\n" + table_text + "\n\n" + SETUP_LEGEND


SETUP_LEGEND = (
    "*size: the task's preset (`smoke` or `full`, metalr/workbench/tasks.py); batch: examples per "
    "training step (`full`: the whole training split); each run trains for that many steps from "
    "one initial lr with one seed (the seed sets the initialisation and the batch order; the "
    "splits are fixed, except for tasks that draw their data per seed).*\n"
)


LR_TABLE_LEGEND = (
    "*Columns: the initial learning rate (`lr-free`: an optimizer that sets its own). Cells: the "
    "final validation loss (after the last step; lower is better), mean ± half-width of its 95% "
    "confidence interval (Student t) over {n}; `(seeds a–b)`: an interval wider than the mean "
    "(the seeds disagree), with the lowest and highest seed's loss; `(n=k)`: a cell with a "
    "different number of seeds; `diverged (k/n)`: k of its n seeds diverged (a non-finite loss, "
    "or one above the "
    "study's divergence factor × the first step's), which counts as an infinite loss.*\n"
)
BEST_TABLE_LEGEND = (
    "*best lr: the initial lr (of those tried) with the lowest mean final validation loss; val "
    "loss: that mean ± 95% CI half-width; final mean eff. lr: the effective learning rate at the "
    "last step, averaged over the parameters (weighted by size) and the seeds — the initial lr "
    "for a fixed-rate optimizer, wherever the hypergradient moved it for a metalr one; lrs within "
    "10% of best: of the initial lrs tried, how many end with a mean final validation loss at "
    "most 1.1 × this optimizer's own best (more = less sensitive to the initial lr).*\n"
)
RANK_LEGEND = (
    "*Per task, the rank of each optimizer's best-lr mean final validation loss (1 = lowest); "
    "`=` marks a tie: the optimizers of a tie group share the mean of their positions. Going down "
    "the means, a tie group starts at the best optimizer not yet grouped and takes every "
    "following one whose 95% interval overlaps the starter's, i.e. whose difference these seeds "
    "do not resolve. Mean rank: over the tasks.*\n"
)
PLOTS = (  # file suffix, link text, what it shows
    ("sensitivity", "LR sensitivity",
     ("final validation loss vs initial lr, mean ± 95% CI; a point above 2× the untrained loss "
      "is drawn at that cap, its value beside it")),
    ("loss_curves", "loss curves",
     "validation loss vs step at each optimizer's best lr, mean ± 95% CI band"),
    ("lr_trajectories", "effective-lr trajectories",
     "mean effective lr vs step, one line per initial lr"),
    ("lr_per_layer", "per-layer effective lr",
     "metalr optimizers: each layer's effective lr vs step at the best initial lr (first seed)"),
)  # fmt: skip


def _plot_links(task: str, plot_files: list[Path]) -> str:
    names = {p.name for p in plot_files}
    links = [f"- [{title}]({task}_{key}.png): {what}" for key, title, what in PLOTS
             if f"{task}_{key}.png" in names]  # fmt: skip
    return f"Plots of {task}:\n\n" + "\n".join(links) + "\n" if links else ""


def markdown(records: list[dict[str, Any]], plot_files: list[Path] | None = None) -> str:
    """The report's tables (and, given ``plot_files``, links to the plots) as Markdown."""
    rows = aggregate(records)
    best = best_rows(rows)
    tasks = sorted({r["task"] for r in rows})
    opts = list(
        dict.fromkeys(r["optimizer"] for r in records if r.get("status") != "not installed")
    )
    seeds = sorted({r["seed"] for r in records if r.get("status") != "not installed"})
    counts = [r["seeds"] for r in rows]
    n = max(set(counts), key=counts.count) if counts else 0  # the usual number of seeds per cell
    n_text = f"n = {n} seed{'s' if n != 1 else ''}" + (
        f" ({', '.join(map(str, seeds))})" if len(seeds) == n else ""
    )
    parts = [f"Final validation loss, mean ± 95% CI over {n_text} per cell (Student t).\n"]
    if tasks:
        parts.append(_setup(records, tasks))

    def cell_text(r: dict[str, Any]) -> str:
        text = _fmt(r["val_loss_mean"], r["val_loss_ci95"], r["diverged"], r["seeds"])
        if not r["diverged"] and r["val_loss_ci95"] > r["val_loss_mean"]:  # the seeds disagree
            text += f" (seeds {r['val_loss_min']:.3g}–{r['val_loss_max']:.3g})"
        return text if r["seeds"] == n or r["diverged"] else f"{text} (n={r['seeds']})"

    for task in tasks:
        parts.append(f"### {task}: final validation loss vs initial lr\n")
        lrs = sorted(
            {r["lr"] for r in rows if r["task"] == task}, key=lambda v: -1 if v is None else v
        )
        cell = {(r["optimizer"], r["lr"]): r for r in rows if r["task"] == task}
        table = []
        for o in opts:  # one row per optimizer (studies have more optimizers than lrs)
            if not any((o, lr) in cell for lr in lrs):
                continue
            table.append([o, *[cell_text(cell[(o, lr)]) if (o, lr) in cell else "" for lr in lrs]])
        parts.append(markdown_table(["optimizer", *[_lr_label(lr) for lr in lrs]], table) + "\n")
        parts.append(LR_TABLE_LEGEND.format(n=n_text))
        parts.append(f"### {task}: each optimizer at its best initial lr\n")
        table = []
        for o in opts:
            b = best.get((task, o))
            if b is None:
                continue
            if b["lr"] is not None:
                lr = _lr_label(b["lr"])
            elif b["lr_used"] is not None:  # a searched or lr-free optimizer: the rate it used
                lr = f"lr-free ({b['lr_used']:.3g})"
            else:  # rates from a meta-learned prior
                lr = "from the prior"
            eff = "—" if b["final_mean_lr"] is None else f"{b['final_mean_lr']:.3g}"
            table.append([o, lr, cell_text(b), eff, f"{b['robust']}/{b['lrs_tried']}"])
        parts.append(markdown_table(["optimizer", "best lr", "val loss", "final mean eff. lr",
                                     "lrs within 10% of best"], table) + "\n")  # fmt: skip
        parts.append(BEST_TABLE_LEGEND)
        if plot_files:
            parts.append(_plot_links(task, plot_files))
    rk = _ranks(best)
    if rk:
        parts.append("### Rank summary (each optimizer's best-lr loss per task; 1 = best)\n")
        mean_rank = {o: sum(r for r, _ in rk[o].values()) / len(rk[o]) for o in rk}
        table = []
        for o in sorted(rk, key=lambda o: (mean_rank[o], o)):
            cells = []
            for t in tasks:
                r, tie = rk[o].get(t, (math.nan, False))
                cells.append(f"{r:g}{'=' if tie else ''}")
            table.append([o, *cells, f"{mean_rank[o]:.2f}"])
        parts.append(markdown_table(["optimizer", *tasks, "mean rank"], table) + "\n")
        parts.append(RANK_LEGEND)
    missing = sorted({r["optimizer"] for r in records if r.get("status") == "not installed"})
    if missing:
        parts.append("Not installed (skipped): " + ", ".join(missing) + "\n")
    return "\n".join(parts)
