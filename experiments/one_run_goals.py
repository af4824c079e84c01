"""Headlines of issue 10's goals ("one run, any learning rate") from study 1 and study 6 records.

Study 1 (``configs/ablate_study1_lr_sensitivity.yaml``): AdamHD at defaults started at every lr0
of the grid against the best-of-grid Adam, on study 1's tasks and, reported apart, on the held-out
tasks that no fit ever saw:

* goal 1: final validation loss within 10% of best-of-grid Adam's on ≥ 80% of (task, lr0) cells,
  best (early-stopped) validation loss within 10% on ≥ 90%, worst cell ≤ 1.5×, no divergence;
* goal 3: a better mean rank (per task, final validation loss, mean over seeds) than the peers at
  their defaults: metalr and schedule-free AdamW at lr 1e-3, the lr-free ones at lr 1;
* goal 5: SGD-HD (momentum 0.9) within 10% of best-of-grid SGD (momentum 0.9) on ≥ 70%.

Study 6 (``configs/ablate_study6_seek_components.yaml``): the same goal test per variant of the
seek rule (one mechanism off at a time).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from metalr.workbench.heldout_tasks import HELDOUT_SPECS

HELDOUT = tuple(HELDOUT_SPECS)
WITHIN = 0.10
PEERS = ("adam_hd", "schedulefree_adamw", "prodigy", "dadapt_adam", "dog", "mechanic")
DEFAULT_LR = 1e-3  # the grid point for metalr and schedule-free "at defaults"


def _best(t: dict, task: str, opt: str) -> tuple[float, float | None]:
    cands = [(v, lr) for (ta, o, lr), v in t.items() if ta == task and o == opt]
    return min(cands, key=lambda c: c[0]) if cands else (math.nan, None)


def goal_cells(t: dict, early: dict, tasks: list[str], opt: str, ref: str = "adam") -> dict:
    """Per (task, lr0) cell of ``opt``: final and best ratios to best-of-grid ``ref``."""
    cells = []
    for task in tasks:
        ref_final, _ = _best(t, task, ref)
        ref_best, _ = _best(early, task, ref)
        for (ta, o, lr), v in sorted(t.items(), key=lambda kv: (kv[0][0], kv[0][2] or 0)):
            if ta != task or o != opt:
                continue
            cells.append({"task": task, "lr": lr, "final": v / ref_final,
                          "best": early[(ta, o, lr)] / ref_best})  # fmt: skip
    n = len(cells)
    finals = [c["final"] for c in cells]
    return {
        "cells": cells,
        "n": n,
        "final_hits": sum(f <= 1 + WITHIN for f in finals),
        "best_hits": sum(c["best"] <= 1 + WITHIN for c in cells),
        "worst": max(finals) if finals else math.nan,
        "diverged": sum(not math.isfinite(f) for f in finals),
    }


def _fmt_ratio(v: float) -> str:
    return "diverged" if not math.isfinite(v) else f"{v:.2f}"


def goal1_table(t: dict, early: dict, tasks: list[str], opts: dict[str, str]) -> str:
    header = ("| optimizer | final within 10% (goal ≥ 80%) | best within 10% (goal ≥ 90%) | "
              "worst final ratio (goal ≤ 1.5) | diverged |")  # fmt: skip
    rows = [header, "|---|---:|---:|---:|---:|"]
    for opt, label in opts.items():
        g = goal_cells(t, early, tasks, opt)
        if not g["n"]:
            continue
        rows.append(f"| {label} | {g['final_hits']}/{g['n']} = {g['final_hits'] / g['n']:.0%} | "
                    f"{g['best_hits']}/{g['n']} = {g['best_hits'] / g['n']:.0%} | "
                    f"{_fmt_ratio(g['worst'])} | {g['diverged']} |")  # fmt: skip
    return "\n".join(rows) + "\n"


def cell_table(t: dict, early: dict, tasks: list[str], opts: dict[str, str]) -> str:
    """Final ratio (best ratio) per task × lr0 for each optimizer (✗: final not within 10%)."""
    lrs = sorted({lr for (_, o, lr) in t if o in opts and lr is not None})
    head = "| task | optimizer | " + " | ".join(f"lr0 {lr:g}" for lr in lrs) + " |"
    rows = [head, "|---|---|" + "---:|" * len(lrs)]
    for task in tasks:
        for opt, label in opts.items():
            g = {c["lr"]: c for c in goal_cells(t, early, [task], opt)["cells"]}
            if not g:
                continue
            cells = []
            for lr in lrs:
                c = g.get(lr)
                if c is None:
                    cells.append("—")
                    continue
                mark = "" if c["final"] <= 1 + WITHIN else " ✗"
                cells.append(f"{_fmt_ratio(c['final'])} ({_fmt_ratio(c['best'])}){mark}")
            rows.append(f"| {task} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def peer_ranks(t: dict, tasks: list[str]) -> tuple[str, dict[str, float]]:
    """Mean rank over tasks of each peer at its defaults (1 = best final validation loss)."""
    ranks: dict[str, list[float]] = {p: [] for p in PEERS}
    rows = ["| task | " + " | ".join(PEERS) + " |", "|---|" + "---:|" * len(PEERS)]
    for task in tasks:
        vals = {}
        for p in PEERS:
            lr = DEFAULT_LR if (task, p, DEFAULT_LR) in t else None
            if (task, p, lr) in t:
                vals[p] = t[(task, p, lr)]
        if len(vals) < 2:
            continue
        order = sorted(vals, key=lambda p: vals[p])
        for p, value in vals.items():  # ties share the mean of their ranks
            same = [i + 1 for i, q in enumerate(order) if vals[q] == value]
            ranks[p].append(sum(same) / len(same))
        rows.append(f"| {task} | " + " | ".join(
            f"{vals[p]:.4f} ({ranks[p][-1]:g})" if p in vals else "—" for p in PEERS) + " |")  # fmt: skip
    means = {p: sum(r) / len(r) for p, r in ranks.items() if r}
    rows.append("| **mean rank** | " + " | ".join(
        f"**{means[p]:.2f}**" if p in means else "—" for p in PEERS) + " |")  # fmt: skip
    return "\n".join(rows) + "\n", means


def headline(table: Callable[[str], dict], seconds_note: str = "") -> str:
    """Study 1's issue-10 headline; ``table(key)`` gives (task, optimizer, lr) → mean loss."""
    t, early = table("final_val_loss"), table("best_val_loss")
    tasks = sorted({k[0] for k in t})
    fitted = [x for x in tasks if x not in HELDOUT]
    held = [x for x in tasks if x in HELDOUT]
    opts = {"adam_hd": "AdamHD (seek, defaults)", "adam_hd_normalized": "AdamHD (normalized)",
            "adam": "Adam (each lr0 ÷ best of grid)"}  # fmt: skip
    out = ["## Study 1: one run, any learning rate (issue 10)\n", seconds_note,
           ("Each cell: AdamHD started at lr0, final (and best) validation loss, mean over "
            "seeds, ÷ the best-of-grid Adam's on the same task.\n"),
           f"### Study 1's tasks ({', '.join(fitted)})\n", goal1_table(t, early, fitted, opts),
           f"\n### Held-out tasks, never used in a fit ({', '.join(held)})\n",
           goal1_table(t, early, held, opts),
           "\n### All tasks\n", goal1_table(t, early, tasks, opts)]  # fmt: skip
    sgd = goal_cells(t, early, tasks, "sgd_hd", ref="sgd")
    if sgd["n"]:
        out.append(f"\nGoal 5, SGD-HD (momentum 0.9, defaults) vs best-of-grid SGD (momentum 0.9): "
                   f"final within 10% on **{sgd['final_hits']}/{sgd['n']} = "
                   f"{sgd['final_hits'] / sgd['n']:.0%}** (goal ≥ 70%).\n")  # fmt: skip
    ranks, means = peer_ranks(t, tasks)
    out.append("\n### Goal 3: peers at their defaults (final validation loss, mean over seeds; "
               "rank in brackets)\n\nmetalr AdamHD and schedule-free AdamW at lr 1e-3; Prodigy, "
               "D-Adapt Adam, DoG and Mechanic at lr 1 (lr-free).\n\n" + ranks)  # fmt: skip
    if "adam_hd" in means:
        better = all(means["adam_hd"] < m for p, m in means.items() if p != "adam_hd")
        out.append(f"\nAdamHD's mean rank {means['adam_hd']:.2f} is "
                   f"{'the best' if better else 'not the best'} of the six.\n")  # fmt: skip
    out.append(
        "\n### Per cell: final ratio (best ratio), ✗ = final not within 10%\n\n"
        + cell_table(t, early, tasks, {"adam_hd": "seek", "adam_hd_normalized": "normalized"})
    )
    return "\n".join(out)


def headline6(table: Callable[[str], dict]) -> str:
    t, early = table("final_val_loss"), table("best_val_loss")
    tasks = sorted({k[0] for k in t})
    variants = {"adam_hd": "seek (defaults)",
                "no_match": "moment restart without the size match",
                "no_restart": "no moment restart (the default until 2026-12-07)",
                "no_hold": "no noise hold (the default until its check, 2026-12-07)",
                "no_ramp": "no ramp (start at lr0, track)",
                "no_cut": "no cut at the turn", "no_evidence": "no evidence threshold",
                "no_ceiling": "no ceiling", "no_tie": "no tie between tensors",
                "one_speed": "one-speed ramp (no fast phase)",
                "no_resume": "no re-opened ramp (a turn is final)",
                "far_on_fast": "far test on the turn's fast average (round 7's)",
                "no_floor": "no floor under the ramp's start (round 9's start)",
                "normalized": "normalized rule (previous default)"}  # fmt: skip
    return ("## Study 6: what each part of the seek rule contributes\n\n"
            f"Goal test of study 1 on {', '.join(tasks)} (all lr0, mean over seeds); each row "
            "switches one mechanism off today's defaults.\n\n"
            + goal1_table(t, early, tasks, variants))  # fmt: skip
