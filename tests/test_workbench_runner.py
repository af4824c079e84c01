"""metalr ablate: grid expansion, records, resume after an interruption, the process pool, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metalr.cli import main
from metalr.workbench import read_records, resolve_study, run_study
from metalr.workbench import runner as R


def _study(tmp_path: Path, **extra) -> object:
    raw = {"name": "t", "tasks": ["digits_logreg"], "steps": 5, "log_every": 2,
           "lrs": [0.01, 0.1], "seeds": [0, 1],
           "optimizers": {"adam": {"kind": "adam"}, "sgd_hd": {"kind": "sgd_hd"}},
           "out": str(tmp_path / "res"), **extra}  # fmt: skip
    return resolve_study(raw)


def test_records_have_provenance_and_curves(tmp_path):
    cfg = _study(tmp_path, lrs=[0.1], seeds=[3])
    records = run_study(cfg, quiet=True)
    assert len(records) == 2
    r = records[0]
    assert r["seed"] == 3 and r["status"] == "ok" and r["steps_done"] == 5
    prov = r["provenance"]
    for key in ("study_config_sha256", "cell_sha256", "git_commit", "torch_version",
                "metalr_version", "device", "wall_time_s", "seed"):  # fmt: skip
        assert key in prov
    assert prov["cell"]["lr"] == 0.1 and prov["cell"]["spec"] == {"kind": "adam"}
    curves = json.loads((cfg.out_dir / r["curves"]).read_text())
    assert curves["step"] == [0, 2, 4, 5]
    assert len(curves["val_loss"]) == len(curves["lr_mean"]) == 4
    assert curves["val_loss"][0] == pytest.approx(r["initial_val_loss"])
    assert curves["val_loss"][-1] == pytest.approx(r["final_val_loss"])
    assert (
        json.loads((cfg.out_dir / "study.json").read_text())["provenance"]["config"]["steps"] == 5
    )


def test_resume_after_interruption_no_duplicates(tmp_path, monkeypatch):
    cfg = _study(tmp_path)
    real, calls = R.run_cell, []

    def interrupted(cell, device="cpu"):
        calls.append(cell["id"])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(cell, device)

    monkeypatch.setattr(R, "run_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, quiet=True)
    path = cfg.out_dir / "records.jsonl"
    first = path.read_text().splitlines()
    assert len(first) == 3
    # a crash mid-append leaves a torn line: it is cut before the next record
    with open(path, "a") as f:
        f.write('{"id": "torn", "task"')
    monkeypatch.setattr(R, "run_cell", real)
    records = run_study(cfg, quiet=True)
    lines = path.read_text().splitlines()
    assert lines[:3] == first  # finished cells untouched
    assert len(lines) == len(records) == 8 == len(R.expand(cfg))
    ids = [json.loads(line)["id"] for line in lines]
    assert len(set(ids)) == 8 and set(ids) == {c["id"] for c in R.expand(cfg)}
    # a third run has nothing left to do
    monkeypatch.setattr(R, "run_cell", lambda *a: pytest.fail("a finished cell was rerun"))
    assert len(run_study(cfg, quiet=True)) == 8
    assert path.read_text().splitlines() == lines


def test_changed_config_runs_new_cells_only(tmp_path):
    cfg = _study(tmp_path, lrs=[0.1], seeds=[0])
    run_study(cfg, quiet=True)
    more = _study(tmp_path, lrs=[0.1], seeds=[0, 1])
    records = run_study(more, quiet=True)
    assert len(records) == 4 and len(read_records(more.out_dir)) == 4


def test_process_pool_matches_sequential(tmp_path):
    seq = run_study(_study(tmp_path / "a", lrs=[0.1]), quiet=True)
    par = run_study(_study(tmp_path / "b", lrs=[0.1], workers=2), quiet=True)
    key = lambda r: r["id"]
    assert [r["id"] for r in sorted(seq, key=key)] == [r["id"] for r in sorted(par, key=key)]
    for a, b in zip(sorted(seq, key=key), sorted(par, key=key)):
        assert a["final_val_loss"] == pytest.approx(b["final_val_loss"], rel=1e-5)


def test_lr_free_optimizers_run_once_per_seed(tmp_path):
    cfg = _study(tmp_path, optimizers={"rt": {"kind": "range_test_adam"},
                                       "tuned": {"kind": "tuned_adam", "trials": 3,
                                                 "trial_steps": 2}},
                 range_test_steps=20)  # fmt: skip
    records = run_study(cfg, quiet=True)
    assert len(records) == 4 and all(r["lr"] is None for r in records)
    rt = next(r for r in records if r["optimizer"] == "rt")
    assert rt["lr_used"] == pytest.approx(rt["extra"]["range_test"]["suggested_lr"])
    tuned = next(r for r in records if r["optimizer"] == "tuned")
    assert tuned["extra"]["trials"] == 3 and tuned["extra"]["trial_steps_total"] == 6
    assert tuned["lr_used"] in tuned["extra"]["trial_lrs"]


def test_cli_default_study_smoke(tmp_path, capsys):
    out = tmp_path / "default"
    assert main(["ablate", "--smoke", "--quiet", f"out={out}", "tasks=[digits_logreg]"]) == 0
    text = capsys.readouterr().out
    assert "| optimizer | 0.001 | 0.1 |" in text and "adam_hd" in text and "Rank summary" in text
    assert len(read_records(out)) == 8
    assert (out / "digits_logreg_sensitivity.png").stat().st_size > 1000
    assert main(["ablate", "--smoke", "--quiet", f"out={out}", "stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err


def test_two_runners_on_one_folder_refused(tmp_path):
    import fcntl

    cfg = _study(tmp_path, lrs=[0.1], seeds=[0])
    cfg.out_dir.mkdir(parents=True)
    with open(cfg.out_dir / "records.jsonl", "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="another metalr ablate"):
            run_study(cfg, quiet=True)
    assert len(run_study(cfg, quiet=True)) == 2
