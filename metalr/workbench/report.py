"""``metalr report <results>``: tables and plots of an ablation study's records.

Seeds are aggregated per (task, optimizer, initial lr): mean and 95% confidence interval
(Student-t half-width ``t_{0.975,n-1} · s / √n``). A diverged run counts as an infinite loss, so a
cell with any diverged seed reads "diverged (k/n)". Writes into the results folder (or ``out``):

* ``report.md``: the setup (per task: size, examples per split, batch, parameters, steps, seeds);
  per task, final validation loss vs initial lr per optimizer; each optimizer at its best lr (with
  its final mean effective lr and how many lrs land within 10% of that best); links to the plots;
  a rank summary across tasks, with ties where 95% intervals overlap; the optimizers that were not
  installed. A legend under each table says what its columns measure;
* ``summary.csv``: one row per aggregated cell;
* ``<task>_sensitivity.png`` (final validation loss vs initial lr; a value above 2× the untrained
  loss is drawn at that cap and written beside it), ``<task>_loss_curves.png`` (validation loss
  vs step at each optimizer's best lr, mean ± CI band) and ``<task>_lr_trajectories.png`` (mean
  effective lr vs step, one line per initial lr) and ``<task>_lr_per_layer.png`` (metalr
  optimizers: each layer's effective lr vs step at the best initial lr; identical curves are
  drawn once and labelled "k identical").
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from metalr.meta.results import markdown_table, write_csv
from metalr.workbench.runner import read_records

# t_{0.975, df} for df = 1..30; beyond, the normal 1.96
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip
WITHIN = 0.10


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95% CI half-width (Student t); NaN half-width for one value."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2 or not math.isfinite(mean):
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * sd / math.sqrt(n)


def _fmt(mean: float, ci: float, n_div: int = 0, n: int = 0) -> str:
    if n_div:
        return f"diverged ({n_div}/{n})"
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.4f}" if not math.isfinite(ci) else f"{mean:.4f} ± {ci:.4f}"


def _loss(r: dict[str, Any]) -> float:
    v = r.get("final_val_loss")
    return math.inf if v is None or r.get("status") == "diverged" else float(v)


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, optimizer, lr): seeds, mean ± CI of the final validation loss, ..."""
    latest: dict[tuple, dict[str, Any]] = {}
    for r in records:  # a rerun with a changed config appends; the newest record wins
        if r.get("status") != "not installed":
            latest[(r["task"], r["optimizer"], r["lr"], r["seed"])] = r
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for (task, opt, lr, _), r in latest.items():
        groups[(task, opt, lr)].append(r)
    rows = []
    for (task, opt, lr), rs in groups.items():
        losses = [_loss(r) for r in rs]
        n_div = sum(not math.isfinite(v) for v in losses)
        mean, ci = mean_ci(losses)
        lr_means = [
            r["final_lr"]["mean"]
            for r in rs
            if r.get("final_lr") and r["final_lr"].get("mean") is not None
        ]
        used = [r["lr_used"] for r in rs if r.get("lr_used") is not None]
        init = [r["initial_val_loss"] for r in rs if r.get("initial_val_loss") is not None]
        rows.append({"task": task, "optimizer": opt, "lr": lr, "seeds": len(rs),
                     "diverged": n_div, "val_loss_mean": mean, "val_loss_ci95": ci,
                     "final_mean_lr": sum(lr_means) / len(lr_means) if lr_means else None,
                     "lr_used": sum(used) / len(used) if used else None,
                     "initial_val_loss": sum(init) / len(init) if init else None,
                     "val_loss_min": min(losses), "val_loss_max": max(losses),
                     "ids": [r["id"] for r in sorted(rs, key=lambda r: r["seed"])]})  # fmt: skip
    rows.sort(key=lambda r: (r["task"], r["optimizer"], -1.0 if r["lr"] is None else r["lr"]))
    return rows


def best_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (task, optimizer): its best lr's row, plus the count of lrs within 10% of it."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["task"], r["optimizer"])
        if key not in best or r["val_loss_mean"] < best[key]["val_loss_mean"]:
            best[key] = r
    for key, b in best.items():
        cands = [r for r in rows if (r["task"], r["optimizer"]) == key]
        b = best[key] = dict(b)
        b["robust"] = sum(r["val_loss_mean"] <= (1 + WITHIN) * b["val_loss_mean"] for r in cands)
        b["lrs_tried"] = len(cands)
    return best


def _interval(b: dict[str, Any]) -> tuple[float, float]:
    """A row's 95% interval (a point when it has no half-width: one seed, or diverged)."""
    m, ci = b["val_loss_mean"], b["val_loss_ci95"]
    ci = ci if math.isfinite(ci) else 0.0
    return m - ci, m + ci


def ranks(best: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Rank (1 = best) of each optimizer's best loss, per task; tied optimizers share the mean of
    their positions. Ties: in order of the mean, each tie group starts at the best optimizer not
    yet grouped and takes every following one whose 95% interval overlaps the starter's (equal
    means always tie). :func:`tied` says which ranks are ties."""
    return {o: {t: r for t, (r, _) in v.items()} for o, v in _ranks(best).items()}


def tied(best: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, bool]]:
    """Per optimizer and task: whether its rank is shared (see :func:`ranks`)."""
    return {o: {t: tie for t, (_, tie) in v.items()} for o, v in _ranks(best).items()}


def _ranks(best: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, tuple[float, bool]]]:
    out: dict[str, dict[str, tuple[float, bool]]] = defaultdict(dict)
    for task in sorted({t for t, _ in best}):
        items = sorted(((b["val_loss_mean"], opt) for (t, opt), b in best.items() if t == task),
                       key=lambda item: (item[0], item[1]))  # fmt: skip
        i = 0
        while i < len(items):
            lo, hi = _interval(best[(task, items[i][1])])
            j = i + 1
            while j < len(items):
                m = items[j][0]
                a, b = _interval(best[(task, items[j][1])])
                if not (m == items[i][0] or (a <= hi and b >= lo)):
                    break
                j += 1
            rank = (i + 1 + j) / 2  # the mean of positions i+1 .. j
            for _, opt in items[i:j]:
                out[opt][task] = (rank, j - i > 1)
            i = j
    return out


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


def _curves(results: Path, ids: list[str]) -> list[dict[str, list]]:
    out = []
    for i in ids:
        p = results / "curves" / f"{i}.json"
        if p.is_file():
            out.append(json.loads(p.read_text()))
    return out


def _band(curves: list[dict[str, list]], key: str) -> tuple[list, list, list]:
    n = min(len(c["step"]) for c in curves)
    steps = curves[0]["step"][:n]
    mean, lo, hi = [], [], []
    for i in range(n):
        vals = [c[key][i] for c in curves]
        vals = [math.inf if v is None else v for v in vals]
        m, ci = mean_ci(vals)
        ci = 0.0 if not math.isfinite(ci) else ci
        mean.append(m), lo.append(m - ci), hi.append(m + ci)
    return steps, mean, (lo, hi)  # type: ignore[return-value]


CAP = 2.0  # the sensitivity plot draws losses above CAP × the untrained loss at that cap
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


def plots(records: list[dict[str, Any]], results: Path, out: Path) -> list[Path]:
    """Write each task's PNGs into ``out`` (curves read from ``results``); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = aggregate(records)
    best = best_rows(rows)
    written = []

    def save(fig: Any, name: str) -> None:
        written.append(out / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    for task in sorted({r["task"] for r in rows}):
        trows = [r for r in rows if r["task"] == task]
        save(sensitivity_figure(plt, task, trows), f"{task}_sensitivity.png")
        save(loss_curves_figure(plt, task, trows, best, results), f"{task}_loss_curves.png")
        save(trajectories_figure(plt, task, trows, results), f"{task}_lr_trajectories.png")
        fig = layer_figure(plt, task, trows, best, results)
        if fig is not None:
            save(fig, f"{task}_lr_per_layer.png")
    return written


def _colors(trows: list[dict[str, Any]]) -> dict[str, str]:
    opts = list(dict.fromkeys(r["optimizer"] for r in trows))
    return {o: f"C{i % 10}" for i, o in enumerate(opts)}


def sensitivity_figure(plt: Any, task: str, trows: list[dict[str, Any]]) -> Any:
    """Final validation loss vs initial lr per optimizer (mean ± 95% CI). A mean above ``CAP`` ×
    the untrained loss is drawn at the cap (▲) and a diverged cell at the cap (✕), each with its
    value written above it."""
    colors = _colors(trows)
    init = [r["initial_val_loss"] for r in trows if r["initial_val_loss"] is not None]
    top = CAP * max(init) if init else 10.0
    fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
    stacked: dict[float, int] = defaultdict(int)  # annotations already at an lr: stack upwards
    for o, color in colors.items():
        rs = [r for r in trows if r["optimizer"] == o]
        if rs[0]["lr"] is None:
            ax.axhline(min(rs[0]["val_loss_mean"], top), color=color, ls="--",
                       label=f"{o} (lr-free)")  # fmt: skip
            continue
        xs = [r["lr"] for r in rs]
        ys = [min(r["val_loss_mean"], top) for r in rs]
        ci = [0 if not math.isfinite(r["val_loss_ci95"]) or y >= top else r["val_loss_ci95"]
              for r, y in zip(rs, ys)]  # fmt: skip
        err = [
            [min(c, 0.9 * y) for c, y in zip(ci, ys)],
            [min(c, top - y) for c, y in zip(ci, ys)],
        ]
        ax.errorbar(xs, ys, yerr=err, marker="o", color=color, label=o, capsize=3)
        for r, y in zip(rs, ys):
            if y < top:
                continue
            diverged = r["diverged"] > 0
            ax.scatter([r["lr"]], [top], marker="x" if diverged else "^", color=color, s=70,
                       zorder=3)  # fmt: skip
            text = (f"diverged {r['diverged']}/{r['seeds']}" if diverged
                    else f"{r['val_loss_mean']:.3g}")  # fmt: skip
            ax.annotate(text, (r["lr"], top), xytext=(0, 7 + 10 * stacked[r["lr"]]),
                        textcoords="offset points", ha="center", fontsize=8,
                        color=color)  # fmt: skip
            stacked[r["lr"]] += 1
    ax.axhline(top, color="0.6", lw=0.8, ls=":")
    ax.margins(x=0.08)  # room for the labels of the first and last lr
    ax.set(xscale="log", yscale="log", xlabel="initial lr", ylabel="final validation loss",
           title=f"{task}: LR sensitivity (mean ± 95% CI)")  # fmt: skip
    lows = []  # the lowest point of each error bar (drawn at most 0.9 × the mean below it)
    for r in trows:
        y = min(r["val_loss_mean"], top)
        ci = r["val_loss_ci95"] if math.isfinite(r["val_loss_ci95"]) and y < top else 0.0
        if math.isfinite(y) and y > 0:
            lows.append(y - min(ci, 0.9 * y))
    # room above the cap for the stacked value labels (log axis: a factor per label)
    ax.set_ylim(
        min(lows, default=top / 10) * 0.8, top * 1.6 ** (1 + max(stacked.values(), default=0))
    )
    ax.text(0.01, 0.99, f"dotted: cap = {CAP:g}× untrained loss; ▲ above it (value), ✕ diverged",
            transform=ax.transAxes, va="top", fontsize=7, color="0.35")  # fmt: skip
    fig.legend(loc="outside right upper", fontsize=9)
    return fig


def loss_curves_figure(plt: Any, task: str, trows: list[dict[str, Any]],
                       best: dict[tuple[str, str], dict[str, Any]], results: Path) -> Any:  # fmt: skip
    """Validation loss vs step at each optimizer's best lr (mean ± 95% CI band)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
    for o, color in _colors(trows).items():
        b = best.get((task, o))
        cs = _curves(results, b["ids"]) if b else []
        if not cs or b["diverged"]:
            continue
        steps, mean, (lo, hi) = _band(cs, "val_loss")
        ax.plot(steps, mean, color=color, label=f"{o} (lr {_lr_label(b['lr'])})")
        # log axis: a lower bound at or below zero (wide t intervals, few seeds) is cut
        ax.fill_between(steps, [max(v, 0.5 * m) for v, m in zip(lo, mean)], hi,
                        color=color, alpha=0.2)  # fmt: skip
    ax.set(yscale="log", xlabel="step", ylabel="validation loss",
           title=f"{task}: best lr per optimizer (mean ± 95% CI)")  # fmt: skip
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside right upper", fontsize=9)
    return fig


def trajectories_figure(plt: Any, task: str, trows: list[dict[str, Any]], results: Path) -> Any:
    """Mean effective lr vs step, one panel per optimizer and one line per initial lr (one
    colour per lr across the panels; one legend, outside the panels)."""
    opts = list(dict.fromkeys(r["optimizer"] for r in trows))
    lrs = sorted({r["lr"] for r in trows}, key=lambda v: -1 if v is None else v)
    color = {lr: plt.cm.viridis(i / max(1, len(lrs) - 1)) for i, lr in enumerate(lrs)}
    fig, axes = _panel_grid(plt, len(opts), 4, (3.2, 3.0), "mean effective lr")
    handles: dict[str, Any] = {}
    for ax, o in zip(axes.flat, opts):
        for r in (r for r in trows if r["optimizer"] == o):
            cs = [c for c in _curves(results, r["ids"]) if c["step"]]
            if not cs:
                continue
            steps, mean, _ = _band(cs, "lr_mean")
            (line,) = ax.plot(steps, mean, color=color[r["lr"]], label=_lr_label(r["lr"]))
            handles.setdefault(_lr_label(r["lr"]), line)
            if r["diverged"]:  # the band stops where the first seed diverged
                ax.plot(steps[-1:], mean[-1:], marker="x", color=color[r["lr"]], ms=8)
        ax.set(yscale="log", xlabel="step", title=o)
    if handles:
        order = [k for k in map(_lr_label, lrs) if k in handles]
        fig.legend([handles[k] for k in order], order, loc="outside right upper",
                   title="initial lr", fontsize=9, title_fontsize=9)  # fmt: skip
    return fig


def _panel_grid(plt: Any, n: int, max_cols: int, panel_size: tuple[float, float],
                ylabel: str) -> tuple[Any, Any]:  # fmt: skip
    """A figure of ``n`` panels (at most ``max_cols`` a row, sharing the y axis, the unused ones
    hidden), ``ylabel`` on the first panel of each row; returns the figure and the axes array."""
    ncols = min(max_cols, n)
    nrows = math.ceil(n / ncols)
    w, h = panel_size
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols + 1.2, h * nrows), squeeze=False,
                             sharey=True, layout="constrained")  # fmt: skip
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(ylabel)
    return fig, axes


def identical_groups(layers: dict[str, list[float]], rtol: float = 1e-6) -> list[list[str]]:
    """The layer names grouped by identical rate curves (equal within ``rtol`` at every step),
    in their first appearance's order."""
    groups: list[list[str]] = []
    for name, rates in layers.items():
        for g in groups:
            ref = layers[g[0]]
            if len(ref) == len(rates) and all(
                math.isclose(a, b, rel_tol=rtol, abs_tol=0.0) for a, b in zip(ref, rates)
            ):
                g.append(name)
                break
        else:
            groups.append([name])
    return groups


NEAR = 0.05  # per-layer curves closer than this fraction of the log axis' span are said to overlap


def layer_spread(layers: dict[str, list[float]]) -> float:
    """The largest relative spread (max / min − 1) of the layers' rates at any step."""
    spread = 0.0
    for values in zip(*layers.values()):
        lo, hi = min(values), max(values)
        spread = max(spread, hi / lo - 1 if lo > 0 else math.inf)
    return spread


def layers_overlap(layers: dict[str, list[float]]) -> bool:
    """Whether the layers' curves would be drawn on top of each other on a log axis: at every
    step they are closer than ``NEAR`` of the decades the curves span."""
    values = [v for rates in layers.values() for v in rates]
    if len(layers) < 2 or not values or min(values) <= 0:
        return False
    span = math.log10(max(values) / min(values))
    return span > 0 and math.log10(1 + layer_spread(layers)) < NEAR * span


def layer_figure(plt: Any, task: str, trows: list[dict[str, Any]],
                 best: dict[tuple[str, str], dict[str, Any]], results: Path) -> Any:  # fmt: skip
    """Effective lr of every layer vs step for each metalr optimizer at its best initial lr
    (its first seed's run), one panel per optimizer; None when no run recorded layers. Layers
    with identical curves are drawn once and labelled "a = b (k identical)"; the lines differ in
    colour, style and marker, so lines that nearly coincide stay visible."""
    panels = []
    for o in dict.fromkeys(r["optimizer"] for r in trows):
        b = best.get((task, o))
        cs = [c for c in _curves(results, b["ids"]) if c.get("lr_layers")] if b else []
        if cs:
            panels.append((o, b, cs[0]))
    if not panels:
        return None
    fig, axes = _panel_grid(plt, len(panels), 3, (4.2, 4.0), "effective lr per layer")
    for ax, (o, b, c) in zip(axes.flat, panels):
        layers = c["lr_layers"]
        groups = identical_groups(layers)
        for i, group in enumerate(groups):
            rates = layers[group[0]]
            label = group[0] if len(group) == 1 else (
                f"{' = '.join(group)} ({len(group)} identical)" if len(group) <= 3
                else f"{group[0]} … {group[-1]} ({len(group)} identical)")  # fmt: skip
            ax.plot(c["step"][: len(rates)], rates, label=label, color=plt.cm.tab10(i % 10),
                    ls=LINESTYLES[i % len(LINESTYLES)], marker=MARKERS[i % len(MARKERS)],
                    markevery=max(1, len(rates) // 6), ms=4, lw=1.4)  # fmt: skip
        if len(groups) > 1 and layers_overlap(layers):
            which = "both layers" if len(layers) == 2 else f"all {len(layers)} layers"
            apart = f"{100 * layer_spread(layers):.2g}%"
            ax.text(0.02, 0.98, f"{which} at most {apart} apart:\nthe lines overlap",
                    transform=ax.transAxes, va="top", fontsize=8)  # fmt: skip
        lr = "prior" if b["lr"] is None else _lr_label(b["lr"])
        ax.set(yscale="log", xlabel="step", title=f"{o} (lr0 {lr})")
        if len(groups) <= 12:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=8,
                      ncol=2, frameon=False)  # fmt: skip
        else:
            ax.text(0.02, 0.98, f"{len(layers)} layers", transform=ax.transAxes, va="top",
                    fontsize=8)  # fmt: skip
    return fig


def _header(folder: Path, records: list[dict[str, Any]]) -> str:
    """Where the numbers came from (``study.json``), and the summed run time."""
    study = folder / "study.json"
    if not study.is_file():
        return ""
    info = json.loads(study.read_text())
    prov = info.get("provenance", {})
    dirty = " (uncommitted changes)" if prov.get("git_dirty") else ""
    seconds = sum(r.get("wall_time_s") or 0.0 for r in records)
    return (
        f"Study `{info.get('name')}`: `{prov.get('command')}`; git {prov.get('git_commit')}{dirty}; "
        f"torch {prov.get('torch_version')}, metalr {prov.get('metalr_version')}; "
        f"{prov.get('platform')}; {len(records)} runs, {seconds:.1f} s of run time in total.\n\n"
    )


def report(results: str | Path, out: str | Path | None = None) -> tuple[str, list[Path]]:
    """Write ``report.md``, ``summary.csv`` and the PNGs; returns the markdown and file paths."""
    results = Path(results)
    folder = results if results.is_dir() else results.parent
    records = read_records(results)
    if not records:
        raise FileNotFoundError(
            f"no records in {results} (expected records.jsonl from metalr ablate)"
        )
    out = Path(out) if out is not None else folder
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots(records, folder, out)
    text = _header(folder, records) + markdown(records, pngs)
    (out / "report.md").write_text(text)
    rows = [{k: v for k, v in r.items() if k != "ids"} for r in aggregate(records)]
    write_csv(rows, out / "summary.csv")
    return text, [out / "report.md", out / "summary.csv", *pngs]
