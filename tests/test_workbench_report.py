"""metalr report on a hand-written results fixture: the tables hold the right numbers."""

from __future__ import annotations

import csv
import json
import math

import pytest

from metalr.cli import main
from metalr.workbench import report
from metalr.workbench.report import mean_ci

T2 = 12.706  # t_{0.975, 1}


def _record(opt, lr, seed, loss, *, status="ok", lr_curve=None):
    rid = f"{opt}-{lr}-{seed}"
    return {"id": rid, "task": "toy", "size": "smoke", "optimizer": opt, "lr": lr, "seed": seed,
            "steps": 2, "status": status, "lr_used": lr if lr is not None else 0.05,
            "initial_val_loss": 2.0, "final_val_loss": None if status == "diverged" else loss,
            "final_lr": {"min": 0.1, "mean": 0.2 if lr_curve else (lr or 0.05), "max": 0.3},
            "curves": f"curves/{rid}.json", "curve": {"step": [0, 1, 2], "train_loss": [None, 1.5, 1.2],
            "val_loss": [2.0, 1.5, loss], "lr_min": [lr or 0.05] * 3,
            "lr_mean": lr_curve or [lr or 0.05] * 3, "lr_max": [lr or 0.05] * 3}}  # fmt: skip


@pytest.fixture
def results(tmp_path):
    records = [
        _record("a", 0.1, 0, 1.0), _record("a", 0.1, 1, 3.0),
        _record("a", 1.0, 0, 0.6), _record("a", 1.0, 1, 0.8),
        _record("b", 0.1, 0, 0.5, lr_curve=[0.1, 0.15, 0.2]),
        _record("b", 0.1, 1, 0.5, lr_curve=[0.1, 0.15, 0.2]),
        _record("b", 1.0, 0, 0.7), _record("b", 1.0, 1, math.nan, status="diverged"),
        _record("free", None, 0, 0.3), _record("free", None, 1, 0.5),
        {"id": "p", "task": "toy", "optimizer": "prodigy", "lr": None, "seed": 0,
         "status": "not installed", "curves": None},
    ]  # fmt: skip
    (tmp_path / "curves").mkdir()
    with open(tmp_path / "records.jsonl", "w") as f:
        for r in records:
            curve = r.pop("curve", None)
            if curve:
                (tmp_path / r["curves"]).write_text(json.dumps(curve))
            f.write(json.dumps(r) + "\n")
    return tmp_path


def test_mean_ci():
    assert mean_ci([1.0, 3.0]) == pytest.approx((2.0, T2))
    m, h = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and h == pytest.approx(3.182 * math.sqrt(5 / 3) / 2)
    assert math.isnan(mean_ci([1.0])[1])


def test_report_tables_and_plots(results):
    text, files = report(results)
    assert "| optimizer | lr-free | 0.1 | 1 |" in text
    assert "| a |  | 2.0000 ± 12.7060 | 0.7000 ± 1.2706 |" in text
    assert "| b |  | 0.5000 ± 0.0000 | diverged (1/2) |" in text
    assert "| free | 0.4000 ± 1.2706 |  |  |" in text  # lr-free: its own column
    assert "| b | 0.1 | 0.5000 ± 0.0000 | 0.2 | 1/2 |" in text  # best lr, final mean lr
    assert "| a | 1 | 0.7000 ± 1.2706 | 1 | 1/2 |" in text
    assert "| free | lr-free (0.05) | 0.4000 ± 1.2706 |" in text
    assert (
        "| free | 1 | 1.00 |" in text and "| b | 2 | 2.00 |" in text and "| a | 3 | 3.00 |" in text
    )
    assert "Not installed (skipped): prodigy" in text
    assert (results / "report.md").read_text() == text
    for name in ("sensitivity", "loss_curves", "lr_trajectories"):
        png = results / f"toy_{name}.png"
        assert png in files and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    rows = list(csv.DictReader((results / "summary.csv").read_text().splitlines()))
    a01 = next(r for r in rows if r["optimizer"] == "a" and r["lr"] == "0.1")
    assert float(a01["val_loss_mean"]) == 2.0 and float(a01["val_loss_ci95"]) == pytest.approx(T2)
    b1 = next(r for r in rows if r["optimizer"] == "b" and r["lr"] == "1.0")
    assert b1["diverged"] == "1" and b1["val_loss_mean"] == ""  # inf → empty (strict CSV)


def test_report_cli(results, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert main(["report", str(results / "records.jsonl"), "--out", str(out)]) == 0
    assert "Rank summary" in capsys.readouterr().out
    assert (out / "toy_sensitivity.png").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_per_layer_lr_plot_only_when_layers_were_recorded(results):
    _, files = report(results)
    assert results / "toy_lr_per_layer.png" not in files
    curve_file = results / "curves" / "b-0.1-0.json"  # b's best lr, first seed
    curve = json.loads(curve_file.read_text())
    curve["lr_layers"] = {"0.weight": [0.1, 0.2, 0.4], "0.bias": [0.1, 0.05, 0.02]}
    curve_file.write_text(json.dumps(curve))
    _, files = report(results)
    png = results / "toy_lr_per_layer.png"
    assert png in files and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
