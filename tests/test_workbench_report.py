"""metalr report on a hand-written results fixture: the tables hold the right numbers."""

from __future__ import annotations

import csv
import importlib
import json
import math

import pytest

from metalr.cli import main
from metalr.workbench import report, report_plots
from metalr.workbench.report import mean_ci

report_mod = importlib.import_module("metalr.workbench.report")  # `report` is its function

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
    assert "| a |  | 2.0000 ± 12.7060 (seeds 1–3) | 0.7000 ± 1.2706 (seeds 0.6–0.8) |" in text
    assert "| b |  | 0.5000 ± 0.0000 | diverged (1/2) |" in text
    assert "| free | 0.4000 ± 1.2706 (seeds 0.3–0.5) |  |  |" in text  # lr-free: its own column
    assert "| b | 0.1 | 0.5000 ± 0.0000 | 0.2 | 1/2 |" in text  # best lr, final mean lr
    assert "| a | 1 | 0.7000 ± 1.2706 (seeds 0.6–0.8) | 1 | 1/2 |" in text
    assert "| free | lr-free (0.05) | 0.4000 ± 1.2706 (seeds 0.3–0.5) |" in text
    # the three best-lr intervals overlap (0.4 ± 1.27, 0.5 ± 0, 0.7 ± 1.27): one tie group
    assert "| a | 2= | 2.00 |" in text and "| b | 2= | 2.00 |" in text and "| free | 2= |" in text
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


def _write(folder, records):
    (folder / "curves").mkdir(parents=True, exist_ok=True)
    with open(folder / "records.jsonl", "w") as f:
        for r in records:
            r = dict(r)
            (folder / r["curves"]).write_text(json.dumps(r.pop("curve")))
            f.write(json.dumps(r) + "\n")
    return folder


def test_report_states_setup_seeds_legends_and_links_plots(results):
    lines = (results / "records.jsonl").read_text().splitlines()
    with open(results / "records.jsonl", "w") as f:  # what the runner records with each run
        for line in lines:
            r = json.loads(line)
            r["task_info"] = {"train": 1078, "val": 359, "test": 360, "batch_size": None,
                              "params": 4810}  # fmt: skip
            f.write(json.dumps(r) + "\n")
    text, _ = report(results)
    assert "over n = 2 seeds (0, 1) per cell" in text
    assert "| toy | smoke | 4,810 | 1078 / 359 / 360 | full | 2 | n = 2 seeds (0, 1) |" in text
    # every table has a legend right under it that says what its columns measure
    assert "| lrs within 10% of best |" in text
    assert (
        "how many end with a mean final validation loss at most 1.1 × this optimizer's own" in text
    )
    assert "final mean eff. lr: the effective learning rate at the last step" in text
    assert "Cells: the final validation loss" in text and "`diverged (k/n)`" in text
    assert "`=` marks a tie" in text
    for key in ("sensitivity", "loss_curves", "lr_trajectories"):
        assert f"]({'toy_' + key}.png)" in text
        assert (results / f"toy_{key}.png").is_file()
    assert "toy_lr_per_layer.png" not in text  # no layer rates recorded: no plot, no link


def test_rank_ties_only_where_intervals_overlap(tmp_path):
    def rec(opt, seed, loss):
        return {**_record(opt, 0.1, seed, loss), "task": "t2"}

    records = [rec("a", s, v) for s, v in enumerate([1.0, 1.01, 0.99])]
    records += [rec("b", s, v) for s, v in enumerate([1.02, 1.03, 1.01])]  # overlaps a
    records += [rec("c", s, v) for s, v in enumerate([2.0, 2.01, 1.99])]  # clearly worse
    records += [rec("d", s, v) for s, v in enumerate([0.5, 0.51, 0.49])]  # clearly better
    text, _ = report(_write(tmp_path, records))
    assert "| d | 1 | 1.00 |" in text
    assert "| a | 2.5= | 2.50 |" in text and "| b | 2.5= | 2.50 |" in text
    assert "| c | 4 | 4.00 |" in text
    assert "over n = 3 seeds (0, 1, 2) per cell" in text
    # a cell with fewer seeds than the rest says so
    fewer = [r for r in records if (r["optimizer"], r["seed"]) != ("d", 2)]
    text, _ = report(_write(tmp_path / "fewer", fewer))
    assert "| d | 0.1 | 0.5050 ± 0.0635 (n=2) |" in text


def test_sensitivity_plot_writes_the_value_of_capped_points(results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report_mod.aggregate(report_mod.read_records(results))]
    rows.append(
        {
            **rows[0],
            "optimizer": "c",
            "lr": 0.1,
            "val_loss_mean": 41.29,
            "val_loss_ci95": 3.0,
            "diverged": 0,
        }
    )  # above the cap (2 × 2.0)
    fig = report_mod.sensitivity_figure(plt, "toy", rows)
    texts = [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)
    assert "41.3" in texts  # the capped mean, written at the cap
    assert "diverged 1/2" in texts  # b at lr 1: one of two seeds diverged
    assert any("cap = 2× untrained loss" in t for t in texts)
    assert fig.legends and fig.legends[0].get_texts()[0].get_fontsize() >= 9  # outside, legible


def test_lr_plots_legends_outside_and_identical_layers_labelled(results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve_file = results / "curves" / "b-0.1-0.json"  # b's best lr, first seed
    curve = json.loads(curve_file.read_text())
    curve["lr_layers"] = {"0.weight": [0.1, 0.2, 0.4], "0.bias": [0.1, 0.2, 0.4],
                          "2.weight": [0.1, 0.05, 0.02]}  # fmt: skip
    curve_file.write_text(json.dumps(curve))
    assert report_mod.identical_groups(curve["lr_layers"]) == [["0.weight", "0.bias"], ["2.weight"]]
    records = report_mod.read_records(results)
    rows = [r for r in report_mod.aggregate(records) if r["task"] == "toy"]
    best = report_mod.best_rows(rows)
    fig = report_mod.layer_figure(plt, "toy", rows, best, results)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    styles = [line.get_linestyle() for line in ax.get_lines()]
    plt.close(fig)
    assert labels == ["0.weight = 0.bias (2 identical)", "2.weight"]
    assert not ax.texts  # 0.4 vs 0.02 at the last step: far apart
    assert len(set(styles)) == 2  # lines differ in style, not only in colour
    fig = report_mod.trajectories_figure(plt, "toy", rows, results)
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    sizes = {t.get_fontsize() for t in fig.legends[0].get_texts()}
    axes_legends = [ax.get_legend() for ax in fig.axes]
    plt.close(fig)
    assert legend_texts == ["lr-free", "0.1", "1"] and min(sizes) >= 9  # one shared legend
    assert axes_legends == [None] * len(axes_legends)  # none over the lines
    _, files = report(results)
    assert results / "toy_lr_per_layer.png" in files
    assert "](toy_lr_per_layer.png)" in (results / "report.md").read_text()


def test_layer_plot_notes_curves_that_overlap(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = {"w": [0.1, 0.2, 0.4], "b": [0.1, 0.21, 0.41], "v": [0.1, 0.2, 0.39]}
    assert report_mod.layer_spread(layers) == pytest.approx(0.41 / 0.39 - 1)
    row = {"task": "t", "optimizer": "hd", "lr": 0.1, "ids": ["x"], "val_loss_mean": 1.0}
    (tmp_path / "curves").mkdir()
    curve = {"step": [0, 1, 2], "lr_layers": layers}
    (tmp_path / "curves" / "x.json").write_text(json.dumps(curve))
    fig = report_mod.layer_figure(plt, "t", [row], {("t", "hd"): row}, tmp_path)
    texts = [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)
    assert texts == ["all 3 layers at most 5.1% apart:\nthe lines overlap"]
    assert not report_mod.layers_overlap({"w": [0.1, 0.2, 0.4], "b": [0.1, 0.15, 0.2]})


def test_log_axes_over_many_decades_lose_their_minor_ticks_only():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullLocator

    fig, (wide, narrow, linear) = plt.subplots(1, 3)
    wide.plot([1, 2], [1e-9, 1e-1])  # 8 decades on y, 0.3 on x
    wide.set(xscale="log", yscale="log")
    narrow.plot([1, 2], [1e-3, 1e-1])  # 2 decades
    narrow.set_yscale("log")
    linear.plot([1, 2], [1e-9, 1e-1])
    linear_minor = linear.yaxis.get_minor_locator()
    report_plots.thin_log_ticks(fig)
    assert isinstance(wide.yaxis.get_minor_locator(), NullLocator)
    assert isinstance(wide.xaxis.get_minor_locator(), LogLocator)
    assert isinstance(narrow.yaxis.get_minor_locator(), LogLocator)
    assert linear.yaxis.get_minor_locator() is linear_minor  # a linear axis is left alone
    assert len(wide.yaxis.get_majorticklocs()) > 0
    plt.close(fig)
