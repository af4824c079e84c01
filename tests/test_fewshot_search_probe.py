"""The few-shot search probe (experiments/fewshot_search_probe.py) on one seed, a short budget."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))


@pytest.fixture
def probe_module(monkeypatch):
    import fewshot_search_probe as probe

    monkeypatch.setattr(probe, "STEPS", 30)
    monkeypatch.setattr(probe, "ADAM_RATES", (1e-5, 1e-3, 1e-1))
    monkeypatch.setattr(probe, "LR0S", (1e-5, 1e-1))
    monkeypatch.setattr(probe, "VARIANTS", {"defaults": probe.VARIANTS["defaults"]})
    monkeypatch.setattr(probe, "RANGE_TESTS", ((1.5, 0.1, 0.3),))
    return probe


def test_the_signals_and_the_ratios_are_measured_against_the_best_grid_rate(probe_module):
    result = probe_module.probe([100], workers=1)
    adam = result["adam"]
    # the reference is the best final validation loss over study 1's rates (here two of them)
    assert result["reference"] == min(adam[1e-5]["val"], adam[1e-1]["val"])
    # at a tiny rate successive steps agree (the greedy and the trail cosine near 0.5); at 1e-1
    # the full-batch steps already disagree on average
    assert adam[1e-5]["greedy"] > 0.4 and adam[1e-5]["trail"] > 0.4
    assert adam[1e-1]["greedy"] < adam[1e-5]["greedy"] - 0.3
    # one ratio per initial rate, each a finite loss over the reference
    for rows in (result["adam_hd"], result["range_test"]):
        for ratios in rows.values():
            assert len(ratios) == 2 and all(math.isfinite(r) and r > 0 for r in ratios)
    # AdamHD from 1e-5 cannot have reached the best rate's loss in 30 steps
    assert result["adam_hd"]["defaults"][0] > 1.5


def test_the_report_writes_every_table(probe_module, tmp_path):
    out = tmp_path / "probe.md"
    assert probe_module.main(["--seeds", "100", "--workers", "1", "--out", str(out)]) == 0
    text = out.read_text()
    for heading in ("## 1. Adam at fixed rates", "## 2. AdamHD", "## 3. A loss-driven range test"):
        assert heading in text
    assert "| defaults |" in text and "| 1.5, 0.1, 0.3 |" in text
