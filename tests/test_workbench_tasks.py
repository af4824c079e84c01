"""Workbench tasks (each smoke size trains in seconds and beats its untrained loss) and baselines
(every optimizer of configs/ablate_baselines.yaml constructs and steps)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from metalr.workbench import load_study, make_task
from metalr.workbench import tasks as T
from metalr.workbench.optimizers import PEERS, peer_available
from metalr.workbench.runner import expand, run_cell, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", T.TASKS)
def test_smoke_task_beats_untrained_loss(name):
    if name == "mnist1d_mlp":
        pytest.importorskip("mnist1d")
    task = make_task(name, "smoke", fallback_text=name == "charlm_gru")
    out = train(task, {"kind": "adam"}, 1e-2, seed=0, steps=30, log_every=10, divergence=1e4,
                device="cpu")  # fmt: skip
    assert out["status"] == "ok"
    assert out["final_val_loss"] < 0.9 * out["initial_val_loss"]
    assert math.isfinite(out["final_test_loss"])


def test_same_seed_same_run_other_seed_differs():
    task = make_task("digits_mlp", "smoke")
    a, b, c = (train(task, {"kind": "sgd"}, 0.1, s, 5, 5, 1e4, "cpu") for s in (0, 0, 1))
    assert a["final_val_loss"] == b["final_val_loss"] != c["final_val_loss"]


def test_missing_text_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("METALR_CACHE", str(tmp_path))
    monkeypatch.setattr(T.shutil, "which", lambda _: None)
    with pytest.raises(FileNotFoundError, match="apt-get install -y bible-kjv"):
        make_task("charlm_gru", "smoke")


def test_unknown_task_or_size():
    with pytest.raises(ValueError, match="Unknown task"):
        make_task("cifar10")
    with pytest.raises(ValueError, match="Invalid task size"):
        make_task("digits_mlp", "huge")


BASELINES = load_study(ROOT / "configs" / "ablate_baselines.yaml", smoke=True)


@pytest.mark.parametrize("name", list(BASELINES.optimizers))
def test_every_baseline_constructs_and_steps(name):
    cfg = BASELINES
    cells = [c for c in expand(cfg) if c["optimizer"] == name and c["task"] == "digits_logreg"]
    cell = {**cells[0], "steps": 4, "log_every": 2, "range_test_steps": 10}
    record = run_cell(cell)
    kind = cell["spec"]["kind"]
    if kind in PEERS and not peer_available(kind):
        assert record["status"] == "not installed" and "pip install" in record["extra"]["install"]
        return
    assert record["status"] == "ok" and record["steps_done"] == 4
    assert record["final_val_loss"] < record["initial_val_loss"]
    assert record["lr_used"] is not None and record["final_lr"]["mean"] >= 0
