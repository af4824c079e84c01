"""Smoke test of the whole-training-step benchmark (experiments/bench_train_step.py): one timed
round, every optimizer's row, the ratio column's reference, and the written table and CSV.
No timing assertions."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))


def test_one_round_prints_and_writes_every_row(tmp_path, capsys):
    import bench_train_step

    assert bench_train_step.main(["--repeats", "1", "--warmup", "0",
                                  "--output", str(tmp_path / "train_step")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"ratio vs {bench_train_step.REFERENCE}" in out
    rows = list(csv.DictReader((tmp_path / "train_step.csv").open()))
    names = [r["optimizer"] for r in rows]
    assert bench_train_step.REFERENCE in names and len(names) == len(set(names)) >= 3
    ref = next(r for r in rows if r["optimizer"] == bench_train_step.REFERENCE)
    assert float(ref["ratio"]) == 1.0
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert (tmp_path / "train_step.md").read_text() in out
