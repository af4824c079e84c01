"""The β sweep that chose the normalized rule's default (``experiments/choose_hypergrad_lr.py``):
its smoke run end to end, and its selection rule on rows built by hand."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))


def _row(family, rule, beta, lr0, loss, task="t", budget="short", seed=0):
    return {"family": family, "rule": rule, "hypergrad_lr": beta, "task": task, "budget": budget,
            "lr0": lr0, "seed": seed, "final_val_loss": loss, "final_train_loss": loss}  # fmt: skip


def test_the_sweep_chooses_the_beta_with_the_largest_worst_budget_robust_fraction():
    from _choose_hypergrad_lr_report import analyse

    rows = []
    for fam in ("adam", "sgd"):
        for budget in ("short", "long"):
            rows += [_row(fam, "fixed", 0.0, 1e-3, 1.0, budget=budget),
                     _row(fam, "fixed", 0.0, 1e-2, 2.0, budget=budget)]  # fmt: skip
            # β 0.1: within 10% of the best fixed rate (1.0) at both lr0 on the short budget only
            short = budget == "short"
            rows += [_row(fam, "normalized", 0.1, lr, 1.05 if short else 1.5, budget=budget)
                     for lr in (1e-3, 1e-2)]  # fmt: skip
            # β 0.02: within 10% at one lr0 of each budget (worst robust fraction 50% > 0%)
            rows += [_row(fam, "normalized", 0.02, 1e-3, 1.08, budget=budget),
                     _row(fam, "normalized", 0.02, 1e-2, math.inf, budget=budget)]  # fmt: skip
    a = analyse(rows, {"within": 0.1}, [0.02, 0.1])
    assert a.best["adam", "t", "short"] == (1.0, 1e-3)
    assert a.table["short", "both", 0.1]["robust"] == 1.0
    assert a.table["long", "both", 0.1]["robust"] == 0.0
    assert a.table["long", "both", 0.02]["robust"] == 0.5
    assert a.table["all", "both", 0.02]["diverged"] == 4
    assert a.chosen == 0.02


def test_the_smoke_sweep_writes_one_row_per_run_and_budget_and_a_report(tmp_path, capsys):
    import choose_hypergrad_lr

    assert choose_hypergrad_lr.main(["--smoke", "--quiet", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "choose_hypergrad_lr.csv") as fh:
        rows = list(csv.DictReader(fh))
    budgets = {(r["task"], r["budget"]) for r in rows}
    assert ("digits_logreg", "long") in budgets and ("regression_large", "short") in budgets
    # every (task, budget) has the fixed grid, both normalized βs and the additive rule, per family
    per_cell = {}
    for r in rows:
        per_cell.setdefault((r["task"], r["budget"]), set()).add((r["family"], r["rule"],
                                                                   r["hypergrad_lr"], r["lr0"]))  # fmt: skip
    assert all(len(v) == 2 * 2 * (1 + 2 + 1) for v in per_cell.values())
    assert all(int(r["steps_run"]) <= int(r["steps"]) for r in rows)
    chosen = capsys.readouterr().out.split("chosen hypergrad_lr = ")[1].split(";")[0]
    assert float(chosen) in (0.02, 0.1)
    report = (tmp_path / "choose_hypergrad_lr.md").read_text()
    assert f"chosen: hypergrad_lr = {chosen}" in report
