"""Smoke versions of issue 10's scripts: the controller fit and its checks (the probes:
``test_issue10_probes.py``)."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))


def test_fit_controller_smoke_writes_trials_reference_and_best(tmp_path):
    pytest.importorskip("optuna")
    import fit_controller

    fit_controller.main(["--smoke", "--out", str(tmp_path)])
    trials = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 2
    assert trials[0]["constants"]["init_scale"] == fit_controller.START["init_scale"]  # enqueued
    # every task × (two grid ends + 100× its best Adam rate)
    assert len(trials[0]["cells"]) == 3 * len(fit_controller.SUITE)
    reference = json.loads((tmp_path / "reference.json").read_text())
    assert set(reference) == set(fit_controller.SUITE)
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["objective"] == min(t["objective"] for t in trials)
    # resuming with the same count runs nothing more
    fit_controller.main(["--smoke", "--out", str(tmp_path)])
    assert len((tmp_path / "trials.jsonl").read_text().splitlines()) == 2


def test_fit_controller_round6_searches_only_the_two_speed_ramp(tmp_path):
    """``--base``: every constant fixed at a best.json's, only ramp_fast and slow_zone searched;
    its first trial is the base itself (two-speed ramp off), and ``--workers 2`` gives the
    serial run's values."""
    pytest.importorskip("optuna")
    import fit_controller

    fit_controller.main(["--smoke", "--out", str(tmp_path / "base")])
    base = json.loads((tmp_path / "base" / "best.json").read_text())
    base_path = tmp_path / "base" / "best.json"
    out = tmp_path / "round6"
    fit_controller.main(["--smoke", "--workers", "2", "--base", str(base_path), "--out", str(out)])
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 2
    first = trials[0]["constants"]
    assert {k: v for k, v in first.items() if k not in fit_controller.RAMP_SPACE} == base[
        "constants"
    ]
    assert first["ramp_fast"] == base["constants"]["ramp_max"] and first["slow_zone"] == 1.0
    assert trials[0]["objective"] == pytest.approx(base["objective"], rel=1e-12)
    assert all(
        {k: v for k, v in t["constants"].items() if k not in fit_controller.RAMP_SPACE}
        == base["constants"]
        for t in trials
    )
    best = json.loads((out / "best.json").read_text())
    assert set(best["constants"]) == set(base["constants"]) | set(fit_controller.RAMP_SPACE)


def test_fit_controller_sgd_round_with_cnn_searches_the_settle_space(tmp_path):
    """``--optimizer sgd --with-cnn --space settle``: SGDHD (momentum 0.9) against an SGD
    reference, the CNN in the suite, only the settle constants searched from the base."""
    pytest.importorskip("optuna")
    import fit_controller

    fit_controller.main(["--smoke", "--out", str(tmp_path / "base")])
    base_path = tmp_path / "base" / "best.json"
    base = json.loads(base_path.read_text())["constants"]
    out = tmp_path / "sgd"
    fit_controller.main(["--smoke", "--optimizer", "sgd", "--with-cnn", "--space", "settle",
                         "--base", str(base_path), "--out", str(out)])  # fmt: skip
    reference = json.loads((out / "reference.json").read_text())
    assert set(reference) == set(fit_controller.SUITE) | {"animal_cnn"}
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 2 and len(trials[0]["cells"]) == 3 * len(reference)
    assert trials[0]["constants"] == base  # the base first: nothing moved
    fixed = set(base) - set(fit_controller.SETTLE_SPACE)
    assert all(t["constants"][k] == base[k] for t in trials for k in fixed)
    assert trials[1]["constants"] != base


def test_fit_controller_gate_space_starts_from_the_base_with_the_gate_nearly_off(tmp_path):
    """``--space gate``: the gradient norm's gate searched from a base that lacks it; the first
    trial is the base with the gate at its weakest (``vanish`` at the space's floor, no fall, no
    hold), the constants outside the space stay the base's."""
    pytest.importorskip("optuna")
    import fit_controller

    fit_controller.main(["--smoke", "--out", str(tmp_path / "base")])
    base_path = tmp_path / "base" / "best.json"
    base = json.loads(base_path.read_text())["constants"]
    out = tmp_path / "gate"
    fit_controller.main(["--smoke", "--space", "gate", "--base", str(base_path), "--out", str(out)])
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    first = trials[0]["constants"]
    assert first["vanish"] == fit_controller.GATE_SPACE["vanish"][0]
    assert first["vanish_fall"] == 0.0 and first["noise_hold"] == 0.0
    assert first["evidence"] == base["evidence"]
    fixed = set(base) - set(fit_controller.GATE_SPACE)
    assert all(t["constants"][k] == base[k] for t in trials for k in fixed)
    assert trials[1]["constants"]["vanish"] != first["vanish"]


def test_check_controller_sgd_smoke(tmp_path, capsys):
    import check_controller

    within = check_controller.main(
        ["--smoke", "--optimizer", "sgd", "--cache", str(tmp_path), "--workers", "1"]
    )
    assert f"sgd on {within}/30 cells" in capsys.readouterr().out
    assert (tmp_path / "check_sgd_reference_smoke_seeds_3.json").is_file()


def test_check_controller_smoke(tmp_path, capsys):
    import check_controller
    import compare_checks

    out = tmp_path / "defaults.json"
    args = ["--smoke", "--cache", str(tmp_path), "--workers", "1", "--out", str(out)]
    within = check_controller.main(args)
    text = capsys.readouterr().out
    assert f"on {within}/30 cells" in text
    assert all(name in text for name in check_controller.TASKS)
    assert (tmp_path / "check_adam_reference_smoke_seeds_3.json").is_file()
    run = json.loads(out.read_text())
    assert run["seeds"] == [3] and len(run["losses"]) == 30
    assert all(len(v) == 1 for v in run["losses"].values())
    assert compare_checks.within(run) == within
    # the same run against itself: no difference, every cell tied
    report = compare_checks.report(run, run)
    assert "mean log-ratio B/A: +0.0000" in report and "B lower in 0/30" in report
    # --spec merges into the checked optimizer's spec (here: the previous default rule)
    spec = {"rule": "normalized"}
    out_val = tmp_path / "val.json"
    check_controller.main([*args[:-1], str(out_val), "--spec", json.dumps(spec)])
    watched = json.loads(out_val.read_text())
    assert watched["spec"] == spec and run["spec"] is None
    assert watched["reference"] == run["reference"]  # the reference is plain Adam's, cached
    assert watched["losses"] != run["losses"]


def test_check_controller_tasks_add_a_development_task(tmp_path, capsys):
    """--tasks: study 1's six by default, a subset, or a development task at its own config's
    budget; a task missing from the seeds' cached reference is added to it; held-out tasks are
    refused."""
    import check_controller

    budgets = check_controller.task_budgets("study1,kjv_transformer")
    assert list(budgets)[:6] == list(check_controller.TASKS) and budgets["kjv_transformer"] == 400
    with pytest.raises(ValueError, match="--tasks: unknown task 'pysrc_transformer'"):
        check_controller.task_budgets("pysrc_transformer")
    args = ["--smoke", "--cache", str(tmp_path), "--workers", "1", "--seeds", "4"]
    within = check_controller.main([*args, "--tasks", "digits_logreg"])
    assert f"on {within}/5 cells" in capsys.readouterr().out
    cache = tmp_path / "check_adam_reference_smoke_seeds_4.json"
    first = json.loads(cache.read_text())
    assert set(first) == {"digits_logreg"}
    out = tmp_path / "run.json"
    within = check_controller.main([*args, "--tasks", "digits_logreg,kjv_transformer",
                                    "--out", str(out)])  # fmt: skip
    assert f"on {within}/10 cells" in capsys.readouterr().out
    merged = json.loads(cache.read_text())
    assert set(merged) == {"digits_logreg", "kjv_transformer"}
    assert merged["digits_logreg"] == first["digits_logreg"]  # kept, not rerun
    assert set(json.loads(out.read_text())["losses"]) == {
        f"{t}|{lr:g}" for t in ("digits_logreg", "kjv_transformer") for lr in check_controller.LRS
    }


def test_check_controller_scores_test_losses(tmp_path, capsys):
    """--metric test: the reference is Adam's test loss at the rate its validation loss chose
    (both caches written by the one reference grid), the run keeps both losses, and
    compare_checks pairs the test losses."""
    import check_controller
    import compare_checks

    out = tmp_path / "run.json"
    args = ["--smoke", "--cache", str(tmp_path), "--workers", "1", "--out", str(out)]
    within = check_controller.main([*args, "--metric", "test"])
    assert f"final test within 10% of best-of-grid adam on {within}/30" in capsys.readouterr().out
    val_ref = json.loads((tmp_path / "check_adam_reference_smoke_seeds_3.json").read_text())
    test_ref = json.loads((tmp_path / "check_adam_reference_smoke_seeds_3_test.json").read_text())
    run = json.loads(out.read_text())
    assert run["reference"] == val_ref and run["test_reference"] == test_ref
    assert set(run["test_losses"]) == set(run["losses"]) and run["test_losses"] != run["losses"]
    # the test reference: Adam's test loss at the validation-chosen rate, not its lowest test loss
    grid = check_controller._grid({"kind": "adam"}, [3], 1, True)
    for task in check_controller.TASKS:
        chosen = min(check_controller.LRS, key=lambda lr: grid[(task, lr)][0][0])
        assert test_ref[task] == grid[(task, chosen)][0][1]
        assert val_ref[task] == grid[(task, chosen)][0][0]
    scored = compare_checks.on_test(run)
    assert compare_checks.within(scored) == within
    assert compare_checks.main([str(out), str(out), "--metric", "test"]) == 0
    assert "B lower in 0/30" in capsys.readouterr().out
    old = {k: v for k, v in run.items() if k not in ("test_losses", "test_reference")}
    with pytest.raises(ValueError, match="--metric test needs"):
        compare_checks.on_test(old)


def _check_run(losses, seeds=(0, 1, 2), ref=1.0):
    return {"optimizer": "adam", "constants": "x", "seeds": list(seeds), "smoke": False,
            "reference": {"t": ref, "u": ref},
            "losses": {f"{t}|{lr:g}": list(v) for (t, lr), v in losses.items()}}  # fmt: skip


def test_compare_checks_pairs_seeds_and_bootstraps_over_them():
    import compare_checks

    a = _check_run({("t", 1e-3): [1.0, 1.0, 1.0], ("u", 1e-3): [2.0, 2.0, 2.0]})
    b = _check_run({("t", 1e-3): [0.5, 1.0, 2.0], ("u", 1e-3): [1.0, 1.0, 1.0]})
    d = compare_checks.paired(a, b)
    assert d["t|0.001"] == pytest.approx([math.log(0.5), 0.0, math.log(2.0)])
    mean, lo, hi = compare_checks.seed_bootstrap(d, draws=500)
    assert mean == pytest.approx(
        statistics.fmean([math.log(0.5), 0, math.log(2), *[math.log(0.5)] * 3])
    )
    assert lo <= mean <= hi and lo < hi
    assert compare_checks.within(a) == 1 and compare_checks.within(b) == 1  # t: 1.0 and 1.17
    # a diverged run against a finite one counts as 100x; both diverged: no difference
    assert compare_checks.log_ratio(1.0, math.inf) == pytest.approx(math.log(100))
    assert compare_checks.log_ratio(math.inf, 1.0) == pytest.approx(-math.log(100))
    assert compare_checks.log_ratio(math.inf, math.nan) == 0.0
    with pytest.raises(ValueError, match="seeds"):
        compare_checks.paired(a, _check_run({("t", 1e-3): [1.0]}, seeds=(0,)))


def test_the_scripts_read_study_1s_budgets_from_its_config():
    """The fresh-seed checks, the finding-the-rate study, the many-seed references and the cost
    benchmark run study 1's cells at the budgets the workbench reads from study 1's config."""
    import check_controller
    import horizon_heldout
    import reference_noise
    from study_budgets import CONFIG, study_steps

    from metalr.workbench.config import load_study

    study = load_study(CONFIG)
    assert set(check_controller.TASKS) | set(horizon_heldout.TASKS) == set(study.tasks)
    for task in study.tasks:
        assert study_steps(task) == study.steps_of(task) == reference_noise.STEPS[task]
    assert check_controller.TASKS["fewshot_sinusoid"] == 100
    assert (
        check_controller.TASKS["animal_cnn"] == 500 and check_controller.TASKS["digits_mlp"] == 1000
    )
    assert horizon_heldout.TASKS["pysrc_transformer"] == 400


def test_sgd_candidate_check_counts_cells_and_pairs_the_two_arms(tmp_path, capsys):
    """Each cell is the seed mean ÷ best-of-grid SGD's seed mean; the pairing is
    log(candidate / defaults) per (task, lr0, seed), a diverged run counting as 1,000×."""
    import sgd_candidate_check as check
    from reference_noise import LRS, key

    seeds = (7, 8)
    for i, task in enumerate(check.TASKS):
        losses = {}
        for s in seeds:
            for j, lr in enumerate(LRS):
                losses[key("sgd", lr, s)] = 1.0 + j  # best fixed rate: 1e-5, mean 1.0
                losses[key("sgd_hd", lr, s)] = 1.2  # outside 10% everywhere
                losses[key("candidate", lr, s)] = 1.2 * math.exp(-0.1)  # 1.086: within
        if i == 0:  # one diverged candidate run on the first task
            losses[key("candidate", LRS[0], 7)] = math.inf
        (tmp_path / f"{task}.json").write_text(json.dumps(losses))
    out = check.report(tmp_path, "7,8")
    assert out["sgd_hd"] == 0 and out["candidate"] == 44  # the diverged cell's mean is inf
    first = (math.log(1e3) + 9 * -0.1) / 10
    assert out["worst_task"] == pytest.approx(first)
    assert out["pooled"] == pytest.approx((first * 10 + 8 * 10 * -0.1) / 90)
    printed = capsys.readouterr().out
    assert "candidate 44" in printed
    check.main(tmp_path, "7,8", tmp_path / "unused_spec.json", argv=["--report"])  # no runs
    assert capsys.readouterr().out == printed
    check.cli([str(tmp_path), "--seeds", "7,8", "--report"])  # the command line: same report
    assert capsys.readouterr().out == printed
    with pytest.raises(SystemExit):  # the seeds are not optional: a check names them
        check.cli([str(tmp_path), "--report"])
