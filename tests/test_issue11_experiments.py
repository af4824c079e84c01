"""Smoke versions of issue 11's scripts: choosing the validation constants, the cost benchmark,
and study 9's headline from a few records."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("METALR_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_choose_validation_smoke_writes_the_grid_and_resumes(tmp_path, capsys):
    import choose_validation

    choose_validation.main(["--smoke", "--out", str(tmp_path)])
    rows = [json.loads(x) for x in (tmp_path / "grid.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(len(r["cells"]) == 2 * len(choose_validation.SUITE) for r in rows)
    best = json.loads((tmp_path / "best.json").read_text())
    eligible = [r for r in rows if r["falls_when_overfitting"]] or rows
    assert best["objective"] == min(r["objective"] for r in eligible)
    assert best["overall_best"]["objective"] == min(r["objective"] for r in rows)
    assert math.isfinite(best["objective_without_signal"]) and best["objective_without_signal"] >= 0
    choose_validation.main(["--smoke", "--out", str(tmp_path)])  # resumes: nothing rerun
    assert len((tmp_path / "grid.jsonl").read_text().splitlines()) == 2


def test_the_overfitting_check_tells_the_validation_signal_from_the_training_one():
    import choose_validation

    assert choose_validation.falls_when_overfitting({"train_weight": 0.0})
    # the training signal at full weight outweighs a weak validation one: the rate rises
    assert not choose_validation.falls_when_overfitting({"train_weight": 1.0, "hypergrad_lr": 0.03})


def test_cost_benchmark_prints_a_paired_table(capsys):
    import bench_validation_cost

    assert (
        bench_validation_cost.main(
            ["--smoke", "--repeats", "2", "--tasks", "digits_logreg", "--every", "5"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "every 5 steps" in out and "--every 5" in out and "--tasks digits_logreg`" in out
    for label, (base, option) in bench_validation_cost.pairs(5).items():
        assert f"| digits_logreg | {label} |" in out
        assert option["validation_data"] == {"every": 5} and "validation_data" not in base
    assert bench_validation_cost.main(["--smoke", "--repeats", "1", "--tasks", "digits_logreg",
                                       "--every", "5", "--rewind"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    ((label, (base, option)),) = bench_validation_cost.pairs(5, rewind=True).items()
    assert "Cost of the rewind" in out and f"| digits_logreg | {label} |" in out
    assert option == {**base, "validation": {"rewind": 1.0}} and "--every 5 --rewind" in out
    assert bench_validation_cost.main(["--smoke", "--repeats", "1", "--tasks", "digits_logreg",
                                       "--every", "5", "--pass"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "Cost of a validation pass observed alone" in out and "--every 5 --pass" in out
    for label, (base, option) in bench_validation_cost.pass_pairs(5).items():
        assert f"| digits_logreg | {label} |" in out
        assert option["validation_data"]["batch"] == "all" and "validation_data" not in base
    ((_, (_, hd)), (_, (_, es))) = bench_validation_cost.pass_pairs(5).items()
    assert hd["validation_data"]["gradient"] is False and hd["validation"]["rewind"] == 1.0
    assert es["validation_data"]["check"] == 1  # early stopping reads every pass
    path = bench_validation_cost.results_path(20, whole_pass=True)
    assert path.name == "bench_validation_cost_every20_pass.md"
    assert bench_validation_cost.main(["--smoke", "--repeats", "1", "--tasks", "digits_logreg",
                                       "--every", "5", "--ray"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "Cost of the ray ceiling" in out and "--every 5 --ray" in out
    (alone, (plain, ray)), (added, (option, with_ray)) = bench_validation_cost.ray_pairs(5).items()
    assert f"| digits_logreg | {alone} |" in out and f"| digits_logreg | {added} |" in out
    assert "validation" not in plain and ray["validation"]["ray_steps"] == "budget"
    assert with_ray == {**option, "validation": {"ray_steps": "budget"}}
    assert (
        bench_validation_cost.results_path(20, ray=True).name
        == "bench_validation_cost_every20_ray.md"
    )
    assert ray["validation"]["ray_clock"] == 0 and ray["validation"]["ray_gate"] == 1
    assert bench_validation_cost.main(["--smoke", "--repeats", "1", "--tasks", "digits_logreg",
                                       "--every", "5", "--recommended"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    ((label, (plain, option)),) = bench_validation_cost.recommended_pairs(5).items()
    assert "Cost of the recommended option" in out and "--every 5 --recommended" in out
    assert f"| digits_logreg | {label} |" in out and plain == {"kind": "adam_hd"}
    assert option["validation_data"] == {"every": 5}
    assert option["validation"] == {"ray_steps": "budget"}  # the ray at its defaults
    assert (
        bench_validation_cost.results_path(20, recommended=True).name
        == "bench_validation_cost_every20_recommended.md"
    )


def test_study9_headline_compares_against_best_of_grid_adam(tmp_path, monkeypatch):
    import validation_study as V

    def rec(task, opt, lr, val, test, wall=1.0):
        return {"task": task, "optimizer": opt, "lr": lr, "seed": 0, "status": "ok",
                "final_val_loss": val, "final_test_loss": test, "wall_time_s": wall}  # fmt: skip

    rows = [rec("digits_mlp", "adam", 1e-3, 1.0, 2.0), rec("digits_mlp", "adam", 1e-2, 1.5, 1.0),
            rec("digits_mlp", "adam_hd", 1e-3, 1.2, 2.4, 1.0),
            rec("digits_mlp", "adam_hd_val", 1e-3, 1.05, 2.1, 1.08),
            rec("diabetes_mlp", "adam", 1e-3, 1.0, 1.0),
            rec("diabetes_mlp", "adam_hd_val", 1e-3, 0.9, 1.2, 1.1)]  # fmt: skip
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(V, "OUT", tmp_path)
    text = V.headline(None)
    study1 = text.split("## Held-out")[0]
    # digits_mlp: the reference is Adam at 1e-3 (best val 1.0), its test loss 2.0
    assert "| AdamHD + observe_validation | 1/1 = 100% | 1/1 = 100% | 1.05× | 0 |" in study1
    assert "| AdamHD (option off) | 0/1 = 0% | 0/1 = 0% | 1.20× | 0 |" in study1
    held = text.split("## Held-out")[1].split("## Tuned")[0]
    assert "| AdamHD + observe_validation | 1/1 = 100% | 0/1 = 0% | 0.90× | 0 |" in held
    assert "Not measured yet" in text  # no cost table in this folder's parent


def test_rekey_records_carries_only_the_cells_the_new_key_leaves_unchanged(tmp_path):
    """After ``track_steps`` joined the validation defaults every validation cell got a new id;
    the records of cells it does not change (no ray, or the key written out as 0) move to their
    new ids, the 10-step ray cell (β × 40 now) is left to rerun."""
    import rekey_records as rk

    from metalr.workbench.config import StudyConfig
    from metalr.workbench.runner import expand

    watch = {"kind": "adam_hd", "validation_data": {"every": 5}}
    cfg = StudyConfig(
        tasks=["digits_mlp"], steps=10, lrs=[1e-3], seeds=[0], out=str(tmp_path),
        optimizers={"adam": {"kind": "adam"}, "val": watch,
                    "ray": {**watch, "validation": {"ray_steps": "budget"}},
                    "pinned": {**watch, "validation": {"ray_steps": "budget", "track_steps": 0}}},
    )  # fmt: skip
    with rk._settings_without("track_steps"):
        old = expand(rk._old_config(cfg, "track_steps"))
    new = {c["optimizer"]: c["id"] for c in expand(cfg)}
    assert {c["optimizer"]: c["id"] == new[c["optimizer"]] for c in old} == {
        "adam": True, "val": False, "ray": False, "pinned": False}  # fmt: skip
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"id": c["id"], "optimizer": c["optimizer"],
                                        "final_val_loss": i}) + "\n"
                            for i, c in enumerate(old)))  # fmt: skip
    assert rk.rekey(cfg, "track_steps", path) == (2, 1)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    carried = {r["optimizer"]: r for r in rows if "rekeyed_from" in r}
    assert set(carried) == {"val", "pinned"}
    for name, r in carried.items():
        assert r["id"] == new[name]
        assert r["final_val_loss"] == next(i for i, c in enumerate(old) if c["optimizer"] == name)
    assert carried["pinned"]["spec"]["validation"]["track_steps"] == 0
    assert rk.rekey(cfg, "track_steps", path) == (0, 1)  # idempotent; the ray cell still waits
    with pytest.raises(ValueError, match="key"):
        rk.rekey(cfg, "ray_tau", path)
