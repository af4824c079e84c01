"""The committed studies run end to end at their smoke size (what CI can afford): every grid cell
is recorded, and the report writes its tables and plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from metalr.cli import main
from metalr.workbench import load_study, read_records
from metalr.workbench.runner import expand

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted(
    (p.name for p in (ROOT / "configs").glob("ablate_study*.yaml")),
    key=lambda name: int(name.split("_")[1].removeprefix("study")),  # study10 after study9
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("METALR_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_the_four_studies_are_committed():
    # issue 4's studies 1-4, then follow-ups (study 5: the hypergradient warm-up)
    assert [s.split("_")[1] for s in STUDIES][:4] == ["study1", "study2", "study3", "study4"]


@pytest.mark.parametrize("config", STUDIES)
def test_study_smoke_version_runs_end_to_end(config, tmp_path, capsys):
    path = ROOT / "configs" / config
    out = tmp_path / "results"
    cfg = load_study(path, [f"out={out}"], smoke=True)
    assert cfg.size == "smoke" and cfg.steps <= 10 and cfg.fallback_text
    assert main(["ablate", "--config", str(path), "--smoke", "--quiet", f"out={out}"]) == 0
    records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(c["id"] for c in expand(cfg))
    statuses = {r["status"] for r in records}
    assert statuses <= {"ok", "diverged", "stopped early", "not installed"} and "ok" in statuses
    assert (out / "report.md").is_file() and (out / "summary.csv").is_file()
    assert list(out.glob("*.png")), "no plots written"
    text = capsys.readouterr().out
    for name in cfg.optimizers:
        assert name in text, f"{name} missing from the printed report"
