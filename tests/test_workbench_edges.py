"""The workbench at its edges (found by a review): narrowing a study's tasks, mixed budgets,
records of several commits, Student t past 30 degrees of freedom, config errors on the CLI."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from metalr.cli import main
from metalr.workbench import resolve_study
from metalr.workbench.report_stats import aggregate, mean_ci, t975
from metalr.workbench.runner import expand

ROOT = Path(__file__).resolve().parents[1]
RAW = {"tasks": ["digits_mlp", "digits_logreg"], "lrs": [0.1], "seeds": [0], "steps": 40,
       "task_steps": {"digits_logreg": 7}, "optimizers": {"adam": {"kind": "adam"}}}  # fmt: skip


def test_narrowing_the_tasks_drops_the_budgets_of_the_others():
    """tasks=[...] over a config with task_steps for other tasks runs (it was refused)."""
    cfg = resolve_study(RAW, ["tasks=[digits_mlp]"])
    assert cfg.task_steps == {} and {c["steps"] for c in expand(cfg)} == {40}
    kept = resolve_study(RAW, ["tasks=[digits_logreg]"])
    assert {c["steps"] for c in expand(kept)} == {7}
    with pytest.raises(ValueError, match="Invalid key of task_steps: 'digits_logreg'"):
        resolve_study(RAW, ["tasks=[digits_mlp]", "task_steps.digits_logreg=5"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("lrs=[.inf]", r"Invalid value for lrs: \[inf\] \(expected positive, finite rates\)"),
        ("optimizers.adam.lrs=[.inf]", r"optimizers.adam.lrs: \[inf\] \(expected positive, finite"),
    ],
)
def test_rates_must_be_finite(override, match):
    with pytest.raises(ValueError, match=match):
        resolve_study(RAW, [override])


def test_a_specs_own_rates_read_like_the_top_level_ones():
    """YAML 1.1 reads 1e-3 (no dot) as a string; a spec's lrs take it as the top level does."""
    cfg = resolve_study(RAW, ["optimizers.adam.lrs=[1e-3, 1e-2]"])
    assert cfg.optimizers["adam"]["lrs"] == [1e-3, 1e-2]


def test_a_smoke_run_with_a_new_name_gets_its_own_folder():
    cfg = resolve_study({**RAW, "smoke": {"steps": 3}}, ["name=foo"], smoke=True)
    assert Path(cfg.out_dir) == Path("runs/ablate/foo_smoke")


def _record(task, lr, seed, steps, loss=1.0):
    return {"id": f"{task}-{lr}-{seed}-{steps}", "task": task, "size": "smoke", "optimizer": "adam",
            "lr": lr, "seed": seed, "steps": steps, "status": "ok", "final_val_loss": loss}  # fmt: skip


def test_one_optimizers_rates_at_two_budgets_are_refused_by_the_report():
    """Rates run at different budgets would be compared as one grid (only a cell was checked);
    optimizers may differ (a spec's epochs set its steps)."""
    records = [_record("toy", 0.1, 0, 300), _record("toy", 0.001, 0, 30)]
    with pytest.raises(ValueError, match="records of toy / adam come from runs of different"):
        aggregate(records)
    other = {**_record("toy", 0.1, 0, 30), "optimizer": "sgd"}  # its own budget (epochs)
    assert len(aggregate([_record("toy", 0.1, 0, 300), other])) == 2


def test_the_report_header_names_every_commit_its_records_come_from(tmp_path):
    from metalr.workbench.report import _header

    (tmp_path / "study.json").write_text(json.dumps({"name": "s", "provenance": {
        "git_commit": "c" * 40, "git_dirty": False, "command": "metalr ablate"}}))  # fmt: skip
    one = [{"provenance": {"git_commit": "a" * 40, "git_dirty": True}}]
    assert f"git {'a' * 40} (uncommitted changes)" in _header(tmp_path, one)
    two = one + [{"provenance": {"git_commit": "b" * 40, "git_dirty": False}}]
    assert "**records from 2 commits** (aaaaaaaaaa, bbbbbbbbbb)" in _header(tmp_path, two)


@pytest.mark.parametrize(
    ("df", "exact"),  # scipy.stats.t.ppf(0.975, df)
    [(1, 12.706), (30, 2.042), (31, 2.039513), (40, 2.021075), (60, 2.000298), (120, 1.979930)],
)
def test_student_t_past_the_table(df, exact):
    assert t975(df) == pytest.approx(exact, abs=2e-5 if df > 30 else 1e-9)
    values = [float(i % 7) for i in range(df + 1)]
    mean, half = mean_ci(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / df)
    assert half == pytest.approx(t975(df) * sd / math.sqrt(df + 1))


def test_config_errors_are_reported_not_raised(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [digits_mlp\n")
    assert main(["ablate", "--config", str(bad)]) == 2
    assert "metalr ablate: error:" in capsys.readouterr().err
    assert main(["ablate", "--config", str(tmp_path)]) == 2  # a folder
    assert "metalr ablate: error:" in capsys.readouterr().err


def test_the_report_command_reports_mixed_budgets_as_an_error(tmp_path, capsys):
    with open(tmp_path / "records.jsonl", "w") as f:
        f.writelines(
            json.dumps(r) + "\n" for r in (_record("toy", 0.1, 0, 5), _record("toy", 0.1, 1, 6))
        )
    assert main(["report", str(tmp_path)]) == 2
    assert "different sizes or step budgets" in capsys.readouterr().err


def test_the_studies_headline_code_skips_a_torn_last_line(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import ablate_studies

    text = "".join(json.dumps(_record("toy", lr, 0, 5)) + "\n" for lr in (0.1, 0.01))
    (tmp_path / "records.jsonl").write_text(text[:-40])  # the last record cut short
    assert [r["lr"] for r in ablate_studies.records(tmp_path)] == [0.1]


def test_curve_trim_keeps_committed_curves(tmp_path, monkeypatch, capsys):
    """Over the size limit the studies script drops only the curve files git does not track:
    a rerun's new curves go, the curves an earlier commit holds stay."""
    import subprocess

    sys.path.insert(0, str(ROOT / "experiments"))
    import ablate_studies

    curves = tmp_path / "ablate_study6" / "curves"
    curves.mkdir(parents=True)
    (curves / "old.json").write_text("[1]")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "curves"], check=True)
    (curves / "new.json").write_text("[2]")
    monkeypatch.setattr(ablate_studies, "RESULTS", tmp_path)
    monkeypatch.setattr(ablate_studies, "CURVES_LIMIT", 4)
    ablate_studies.trim_curves([6])
    assert sorted(p.name for p in curves.iterdir()) == ["old.json"]
    assert "removed 1 uncommitted curve files" in capsys.readouterr().out
    monkeypatch.setattr(ablate_studies, "CURVES_LIMIT", 1024)  # under the limit: nothing goes
    (curves / "new.json").write_text("[2]")
    ablate_studies.trim_curves([6])
    assert sorted(p.name for p in curves.iterdir()) == ["new.json", "old.json"]


def test_option_dicts_in_a_config_read_yaml_numbers():
    """YAML 1.1 reads 1e-2 (no dot) as a string: option dicts take it as a number, as before
    option values were checked for kind."""
    import yaml

    spec = yaml.safe_load("{kind: adam_hd, validation: {train_weight: 0, hypergrad_lr: 1e-2},"
                          " seek: {evidence: 1e-3}}")  # fmt: skip
    assert spec["validation"]["hypergrad_lr"] == "1e-2"
    cfg = resolve_study({**RAW, "optimizers": {"a": spec}})
    assert cfg.optimizers["a"]["kind"] == "adam_hd"
    import torch

    from metalr.workbench.optimizers import build_optimizer

    opt = build_optimizer(cfg.optimizers["a"], [torch.nn.Parameter(torch.zeros(2))], 1e-3)
    assert opt.param_groups[0]["validation"]["hypergrad_lr"] == 0.01
    assert opt.param_groups[0]["seek"]["evidence"] == 0.001


def test_the_report_command_refuses_records_of_another_tool(tmp_path, capsys):
    (tmp_path / "records.jsonl").write_text(json.dumps({"task": "toy", "factor": 1e-4}) + "\n")
    assert main(["report", str(tmp_path)]) == 2
    assert "not metalr ablate's (one lacks ['lr', 'optimizer', 'seed'])" in capsys.readouterr().err
