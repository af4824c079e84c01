"""The PNG plots of ``metalr report``: lr sensitivity, loss curves, lr trajectories, per layer.

Reads each run's curves from ``<results>/curves/<id>.json`` and draws one figure of each kind per
task with matplotlib (imported only when plotting).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from metalr.workbench.report_markdown import _lr_label
from metalr.workbench.report_stats import aggregate, best_rows, mean_ci


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
        thin_log_ticks(fig)
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


WIDE = 4.0  # decades: a log axis spanning more shows its major ticks only


def thin_log_ticks(fig: Any) -> None:
    """Drop the minor ticks of every log axis of ``fig`` that spans more than ``WIDE`` decades.

    Over many decades they are a grey band rather than a scale, and laying them out is most of
    a figure's cost (a panel grid of lr trajectories over 7 decades: 1.8 s → 0.7 s to save)."""
    from matplotlib.ticker import NullLocator

    for ax in fig.axes:
        for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = sorted(limits)
            if axis.get_scale() == "log" and lo > 0 and math.log10(hi / lo) > WIDE:
                axis.set_minor_locator(NullLocator())


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
