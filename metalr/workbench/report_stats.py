"""The numbers behind ``metalr report``: seed aggregation, best lrs and rank ties.

Seeds are aggregated per (task, optimizer, initial lr) into a mean and 95% confidence interval
(Student t); a diverged run counts as an infinite loss. :func:`best_rows` picks each optimizer's
best lr, and :func:`ranks` / :func:`tied` rank the optimizers per task, tying overlapping intervals.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

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
    return mean, t975(n - 1) * sd / math.sqrt(n)


def t975(df: int) -> float:
    """Student t's 97.5% quantile with ``df`` degrees of freedom: the table to 30, then the
    Cornish-Fisher expansion around the normal quantile (error below 1e-5 from 30 on)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def _loss(r: dict[str, Any]) -> float:
    v = r.get("final_val_loss")
    return math.inf if v is None or r.get("status") == "diverged" else float(v)


def latest_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest record of each (task, optimizer, lr, seed): a rerun with a changed config (or
    under changed library defaults) appends, and the newest wins; a "not installed" record never
    shadows a run."""
    latest: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if r.get("status") != "not installed":
            latest[(r["task"], r["optimizer"], r["lr"], r["seed"])] = r
    return list(latest.values())


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, optimizer, lr): seeds, mean ± CI of the final validation loss, ..."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    grid_budgets: dict[tuple, set] = defaultdict(set)
    for r in latest_records(records):
        task, opt, lr = r["task"], r["optimizer"], r["lr"]
        groups[(task, opt, lr)].append(r)
        grid_budgets[(task, opt)].add((r.get("size"), r.get("steps")))
    # one optimizer's rates (and so each cell's seeds) at one budget; optimizers may differ (a
    # spec's epochs set its own steps)
    for (task, opt), budgets in grid_budgets.items():
        if len(budgets) > 1:
            raise ValueError(
                f"records of {task} / {opt} come from runs of different sizes or step budgets "
                f"{sorted(budgets, key=str)}: the report would compare its rates as one grid; "
                "give each budget its own out folder"
            )
    rows = []
    for (task, opt, lr), rs in groups.items():  # (one budget per cell: checked above)
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
