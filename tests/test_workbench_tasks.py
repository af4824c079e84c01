"""Workbench tasks (each smoke size trains in seconds and beats its untrained loss) and baselines
(every optimizer of configs/ablate_baselines.yaml constructs and steps)."""

from __future__ import annotations

import gzip
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from metalr.workbench import load_study, make_task
from metalr.workbench import tasks as T
from metalr.workbench.optimizers import PEERS, peer_available
from metalr.workbench.runner import expand, run_cell, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", T.TASKS)
def test_smoke_task_beats_untrained_loss(name):
    if name in ("mnist1d_mlp", "animal_cnn", "animal_transfer"):
        pytest.importorskip("mnist1d" if name == "mnist1d_mlp" else "animal_mnist")
    task = make_task(
        name, "smoke", fallback_text=name in ("charlm_gru", "text_transfer", "kjv_transformer")
    )
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


def test_animal_mnist_is_real_images_split_by_class_balance():
    if T.importlib.util.find_spec("animal_mnist") is None:
        pytest.skip("animal-mnist not installed")
    x, y = T._animal_mnist()
    assert x.shape == (10_000, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))
    task = make_task("animal_cnn", "smoke")
    assert [len(s[0]) for s in task.splits()] == [1200, 400, 400]
    assert task.train[0].shape[1:] == (1, 28, 28)
    assert abs(float(task.train[0].mean())) < 1e-4 and abs(float(task.train[0].std()) - 1) < 1e-4
    assert len(torch.unique(task.train[1])) == 10  # shuffled before the subset (files are sorted)


def test_animal_mnist_missing_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("METALR_CACHE", str(tmp_path))
    monkeypatch.setattr(T.importlib.util, "find_spec", lambda name: None)
    T._animal_mnist.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install --no-deps animal-mnist==0.4"):
            make_task("animal_cnn", "smoke")
    finally:
        T._animal_mnist.cache_clear()


def test_animal_mnist_pickles_may_hold_arrays_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(Evil(), f)
    with gzip.open(path, "rb") as f, pytest.raises(pickle.UnpicklingError, match="os|posix"):
        T._ArrayUnpickler(f).load()


def test_fewshot_sinusoid_draws_one_sinusoid_per_seed():
    task = make_task("fewshot_sinusoid", "smoke")
    (a_tr, a_val, a_te), again, other = task.splits(0), task.splits(0), task.splits(1)
    assert [len(s[0]) for s in (a_tr, a_val, a_te)] == [10, 100, 100]
    assert all(torch.equal(u[i], v[i]) for u, v in zip((a_tr, a_val, a_te), again) for i in (0, 1))
    assert not torch.equal(a_tr[1], other[0][1]) and not torch.equal(a_val[1], other[1][1])
    assert torch.equal(task.batches(1)()[0], other[0][0])  # training batches come from the seed's
    model = task.model(0)
    with torch.no_grad():
        expected = float(torch.nn.functional.mse_loss(model(other[1][0]), other[1][1]))
    assert task.evaluate(model, "val", seed=1) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="pass seed"):
        task.evaluate(model, "val")
    # the same initial weights score differently on two seeds' sinusoids: runs differ by seed
    assert task.evaluate(model, "test", 0) != task.evaluate(model, "test", 1)
    with pytest.raises(ValueError, match="Invalid split"):
        task.evaluate(model, "holdout", 0)


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
