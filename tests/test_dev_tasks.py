"""The development task (metalr.workbench.dev_tasks): the held-out transformer's model on text that
neither charlm_gru nor the held-out task reads, and its study's smoke version end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metalr.cli import main
from metalr.workbench import load_study, make_task, read_records
from metalr.workbench import tasks as T
from metalr.workbench.dev_tasks import DEV_SPECS
from metalr.workbench.heldout_tasks import CharTransformer
from metalr.workbench.runner import expand

ROOT = Path(__file__).resolve().parents[1]


def test_dev_task_reads_kjv_text_past_charlm_prefix(monkeypatch):
    text = "".join(chr(ord("a") + i % 26) for i in range(60_000)) + "".join(
        chr(ord("A") + i % 26) for i in range(60_000)
    )
    monkeypatch.setattr(T, "bible_text", lambda: text)
    spec = {**DEV_SPECS["kjv_transformer"]["smoke"], "offset": 60_000}
    monkeypatch.setitem(T.SPECS["kjv_transformer"], "smoke", spec)
    task = make_task("kjv_transformer", "smoke")
    x, y = task.train
    # vocabulary: the upper-case half only (the offset skips the lower-case prefix)
    assert int(x.max()) == 25 and x.shape[1] == spec["seq"]
    assert torch.equal(x[0, 1:], y[0, :-1])  # next-character targets
    assert isinstance(task.model(0), CharTransformer)
    n_train, n_val = len(x), len(task.val[0])
    assert n_val <= spec["eval_windows"] and 7 * n_val <= n_train <= 9 * n_val  # 80/10/10


def test_dev_task_text_starts_where_charlm_gru_stops():
    full = DEV_SPECS["kjv_transformer"]["full"]
    assert full["offset"] >= T.SPECS["charlm_gru"]["full"]["chars"]


def test_dev_task_missing_text_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("METALR_CACHE", str(tmp_path))
    monkeypatch.setattr(T.shutil, "which", lambda _: None)
    with pytest.raises(FileNotFoundError, match="apt-get install -y bible-kjv"):
        make_task("kjv_transformer", "smoke")


def test_dev_transformer_study_smoke_version_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("METALR_CACHE", str(tmp_path / "cache"))
    path = ROOT / "configs/dev_transformer.yaml"
    out = tmp_path / "results"
    cfg = load_study(path, [f"out={out}"], smoke=True)
    assert cfg.tasks == ["kjv_transformer"] and cfg.fallback_text
    assert main(["ablate", "--config", str(path), "--smoke", "--quiet", f"out={out}"]) == 0
    records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(c["id"] for c in expand(cfg))
    assert {r["status"] for r in records} == {"ok"}
    assert (out / "report.md").is_file()
