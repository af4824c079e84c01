"""``metalr report <results>``: tables and plots of an ablation study's records.

Seeds are aggregated per (task, optimizer, initial lr): mean and 95% confidence interval
(Student-t half-width ``t_{0.975,n-1} · s / √n``). A diverged run counts as an infinite loss, so a
cell with any diverged seed reads "diverged (k/n)". Writes into the results folder (or ``out``):

* ``report.md``: per task, final validation loss vs initial lr per optimizer; each optimizer at
  its best lr (with its final mean effective lr and how many lrs land within 10% of that best);
  a rank summary across tasks; the optimizers that were not installed;
* ``summary.csv``: one row per aggregated cell;
* ``<task>_sensitivity.png`` (final validation loss vs initial lr), ``<task>_loss_curves.png``
  (validation loss vs step at each optimizer's best lr, mean ± CI band) and
  ``<task>_lr_trajectories.png`` (mean effective lr vs step, one line per initial lr) and
  ``<task>_lr_per_layer.png`` (metalr optimizers: each layer's effective lr vs step at the best
  initial lr).
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


def ranks(best: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Rank (1 = best, ties share the mean rank) of each optimizer's best loss, per task."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for task in sorted({t for t, _ in best}):
        items = [(b["val_loss_mean"], opt) for (t, opt), b in best.items() if t == task]
        for loss, opt in items:
            below = sum(v < loss for v, _ in items)
            ties = sum(v == loss for v, _ in items)
            out[opt][task] = below + (ties + 1) / 2
    return out


def _lr_label(lr: float | None) -> str:
    return "lr-free" if lr is None else f"{lr:g}"


def markdown(records: list[dict[str, Any]]) -> str:
    rows = aggregate(records)
    best = best_rows(rows)
    tasks = sorted({r["task"] for r in rows})
    opts = list(
        dict.fromkeys(r["optimizer"] for r in records if r.get("status") != "not installed")
    )
    seeds = sorted({r["seed"] for r in records})
    parts = [f"Final validation loss, mean ± 95% CI over seeds {seeds} (Student t).\n"]
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
            line = [o]
            for lr in lrs:
                r = cell.get((o, lr))
                line.append(_fmt(r["val_loss_mean"], r["val_loss_ci95"], r["diverged"], r["seeds"])
                            if r else "")  # fmt: skip
            table.append(line)
        parts.append(markdown_table(["optimizer", *[_lr_label(lr) for lr in lrs]], table) + "\n")
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
            table.append([o, lr, _fmt(b["val_loss_mean"], b["val_loss_ci95"], b["diverged"],
                                      b["seeds"]), eff, f"{b['robust']}/{b['lrs_tried']}"])  # fmt: skip
        parts.append(markdown_table(["optimizer", "best lr", "val loss", "final mean eff. lr",
                                     "lrs within 10%"], table) + "\n")  # fmt: skip
    rk = ranks(best)
    if rk:
        parts.append(
            "### Rank summary (rank of each optimizer's best-lr loss per task; 1 = best)\n"
        )
        table = [[o, *[f"{rk[o].get(t, math.nan):g}" for t in tasks],
                  f"{sum(rk[o].values()) / len(rk[o]):.2f}"] for o in sorted(rk, key=lambda o: sum(rk[o].values()) / len(rk[o]))]  # fmt: skip
        parts.append(markdown_table(["optimizer", *tasks, "mean rank"], table) + "\n")
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


def plots(records: list[dict[str, Any]], results: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = aggregate(records)
    best = best_rows(rows)
    written = []
    for task in sorted({r["task"] for r in rows}):
        trows = [r for r in rows if r["task"] == task]
        opts = list(dict.fromkeys(r["optimizer"] for r in trows))
        colors = {o: f"C{i % 10}" for i, o in enumerate(opts)}
        # losses above twice the untrained loss (or diverged) are drawn at that cap, marked "x"
        init = [r["initial_val_loss"] for r in trows if r["initial_val_loss"] is not None]
        top = 2 * max(init) if init else 10.0
        fig, ax = plt.subplots(figsize=(6, 4))
        for o in opts:
            rs = [r for r in trows if r["optimizer"] == o]
            if rs[0]["lr"] is None:
                ax.axhline(rs[0]["val_loss_mean"], color=colors[o], ls="--", label=f"{o} (lr-free)")
                continue
            xs = [r["lr"] for r in rs]
            ys = [min(r["val_loss_mean"], top) for r in rs]
            ci = [0 if not math.isfinite(r["val_loss_ci95"]) or y >= top else r["val_loss_ci95"]
                  for r, y in zip(rs, ys)]  # fmt: skip
            err = [
                [min(c, 0.9 * y) for c, y in zip(ci, ys)],
                [min(c, top - y) for c, y in zip(ci, ys)],
            ]
            ax.errorbar(xs, ys, yerr=err, marker="o", color=colors[o], label=o, capsize=3)
            div = [(r["lr"], top) for r, y in zip(rs, ys) if y >= top]
            if div:
                ax.scatter(*zip(*div), marker="x", color=colors[o], s=60)
        ax.set(xscale="log", yscale="log", xlabel="initial lr", ylabel="final validation loss",
               title=f"{task}: LR sensitivity (x: diverged or > 2× untrained)")  # fmt: skip
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / f"{task}_sensitivity.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4))
        for o in opts:
            b = best.get((task, o))
            cs = _curves(results, b["ids"]) if b else []
            if not cs or b["diverged"]:
                continue
            steps, mean, (lo, hi) = _band(cs, "val_loss")
            ax.plot(steps, mean, color=colors[o], label=f"{o} (lr {_lr_label(b['lr'])})")
            # log axis: a lower bound at or below zero (wide t intervals, few seeds) is cut
            ax.fill_between(steps, [max(v, 0.5 * m) for v, m in zip(lo, mean)], hi,
                            color=colors[o], alpha=0.2)  # fmt: skip
        ax.set(
            yscale="log",
            xlabel="step",
            ylabel="validation loss",
            title=f"{task}: best lr per optimizer (mean ± 95% CI)",
        )
        ax.title.set_fontsize(10)  # fmt: skip
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / f"{task}_loss_curves.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        fig, axes = _panel_grid(plt, len(opts), 4, (3.2, 3.0), "mean effective lr")
        for ax, o in zip(axes.flat, opts):
            rs = [r for r in trows if r["optimizer"] == o]
            for i, r in enumerate(rs):
                cs = [c for c in _curves(results, r["ids"]) if c["step"]]
                if not cs:
                    continue
                steps, mean, _ = _band(cs, "lr_mean")
                ax.plot(steps, mean, color=plt.cm.viridis(i / max(1, len(rs) - 1)),
                        label=_lr_label(r["lr"]))  # fmt: skip
            ax.set(yscale="log", xlabel="step", title=o)
            ax.legend(fontsize=6, title="initial lr", title_fontsize=6)
        fig.tight_layout()
        written.append(out / f"{task}_lr_trajectories.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
        layered = _layer_plot(plt, results, task, opts, best, out / f"{task}_lr_per_layer.png")
        written += [layered] if layered else []
    return written


def _panel_grid(plt: Any, n: int, max_cols: int, panel_size: tuple[float, float],
                ylabel: str) -> tuple[Any, Any]:  # fmt: skip
    """A figure of ``n`` panels (at most ``max_cols`` a row, sharing the y axis, the unused ones
    hidden), ``ylabel`` on the first panel of each row; returns the figure and the axes array."""
    ncols = min(max_cols, n)
    nrows = math.ceil(n / ncols)
    w, h = panel_size
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False,
                             sharey=True)  # fmt: skip
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(ylabel)
    return fig, axes


def _layer_plot(plt: Any, results: Path, task: str, opts: list[str],
                best: dict[tuple[str, str], dict[str, Any]], path: Path) -> Path | None:  # fmt: skip
    """Effective lr of every layer vs step for each metalr optimizer at its best initial lr
    (its first seed's run), one panel per optimizer; None when no run recorded layers."""
    panels = []
    for o in opts:
        b = best.get((task, o))
        cs = [c for c in _curves(results, b["ids"]) if c.get("lr_layers")] if b else []
        if cs:
            panels.append((o, b, cs[0]))
    if not panels:
        return None
    fig, axes = _panel_grid(plt, len(panels), 3, (3.8, 3.2), "effective lr per layer")
    for ax, (o, b, c) in zip(axes.flat, panels):
        layers = c["lr_layers"]
        for i, (name, rates) in enumerate(layers.items()):
            ax.plot(c["step"][: len(rates)], rates, label=name,
                    color=plt.cm.tab20(i % 20))  # fmt: skip
        lr = "prior" if b["lr"] is None else _lr_label(b["lr"])
        ax.set(yscale="log", xlabel="step", title=f"{o} (lr0 {lr})")
        ax.title.set_fontsize(9)
        if len(layers) <= 12:
            ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    text = _header(folder, records) + markdown(records)
    (out / "report.md").write_text(text)
    rows = [{k: v for k, v in r.items() if k != "ids"} for r in aggregate(records)]
    write_csv(rows, out / "summary.csv")
    files = [out / "report.md", out / "summary.csv", *plots(records, folder, out)]
    return text, files
