"""Smoke versions of issue 10's probes: finding the rate, the many-seed references, the noise and
signal probes, and the validation ray's controller (the fit and the checks:
``test_issue10_studies.py``)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))


def test_find_rate_study_smoke(tmp_path, capsys):
    import find_rate_study

    assert find_rate_study.main(["--smoke", "--out", str(tmp_path)]) == 0
    records = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert {r["factor"] for r in records} == {1e-4, 100.0}
    assert all(r["final_rate"] > 0 for r in records)
    assert "Finding the rate" in (tmp_path / "headline.md").read_text()


def test_steps_to_within_and_best_rates(tmp_path):
    import find_rate_study

    assert find_rate_study.steps_to_within([1e-6, 1e-4, 6e-3, 1e-2], 1e-2) == 3
    assert find_rate_study.steps_to_within([1e-6, 1e-5], 1e-2) is None
    path = tmp_path / "records.jsonl"
    rows = [{"task": "a", "optimizer": "adam", "lr": lr, "seed": s, "final_val_loss": v}
            for lr, v in ((1e-3, 0.5), (1e-2, 0.2), (1e-1, float("inf"))) for s in (0, 1)]  # fmt: skip
    rows.append({"task": "a", "optimizer": "adam_hd", "lr": 1e-1, "seed": 0, "final_val_loss": 0.1})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert find_rate_study.best_adam_rates(path) == {"a": 1e-2}


def test_reference_noise_report_counts_triples_against_their_own_best_of_grid():
    import reference_noise as rn

    assert rn.parse_seeds("3-5,9") == [3, 4, 5, 9]
    seeds = list(range(6))  # two triples
    lrs = rn.LRS
    losses = {}
    for s in seeds:
        for i, lr in enumerate(lrs):
            # adam: lr index 2 is best (1.0) on every seed, except that triple 2's index 3 wins
            base = 1.0 if i == 2 else 2.0
            if i == 3 and s >= 3:
                base = 0.8
            losses[rn.key("adam", lr, s)] = base
            # the HD row: 1.05 everywhere (within 10% of 1.0, not of 0.8); inf at the largest lr
            losses[rn.key("adam_hd", lr, s)] = math.inf if lr == lrs[-1] else 1.05
    table = rn.report(losses, ["adam", "adam_hd"], seeds, "t")
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table.splitlines()
            if line.startswith("| adam")}  # fmt: skip
    # over all six seeds the best fixed rate is index 2 (mean 1.0; index 3: 1.4)
    assert "best fixed rate of adam: 0.001 (mean 1)" in table
    # adam at 1e-3: within 10% of triple 1's best (1.0), not of triple 2's (0.8)
    assert rows[("adam", "0.001")].endswith("| 1/2 |")
    assert rows[("adam_hd", "0.001")].endswith("| 1/2 |")
    assert "| 1.05 (1.05-1.05) |" in rows[("adam_hd", "0.001")]
    assert "inf" in rows[("adam_hd", f"{lrs[-1]:g}")] and rows[("adam_hd", "0.1")].endswith("0/2 |")
    with pytest.raises(ValueError, match="--seeds"):
        rn.main(["--seeds", "1,2"])


def test_signal_agreement_probe_reads_cosines_without_changing_the_run():
    import signal_agreement as sa
    from fit_controller import run

    spec = {"kind": "adam_hd"}
    rows, result = sa.probe("digits_mlp", spec, 1e-3, 0, 12, size="smoke")
    plain = run("digits_mlp", spec, 1e-3, 12, "smoke", 0)
    assert result["final_val_loss"] == plain["final_val_loss"]  # the probe does not perturb it
    assert [r["step"] for r in rows] == list(range(2, 13))
    assert all(-1 <= r["c_train"] <= 1 and -1 <= r["c_val"] <= 1 for r in rows)
    first = rows[0]  # the averages start from 0 with weight 1 - DECAY
    assert first["train"] == pytest.approx((1 - sa.DECAY) * first["c_train"])
    # at a tiny rate successive full-batch-like steps agree: the ramp's first cosines are positive
    assert first["c_train"] > 0.1


def test_reference_noise_counts_cells_within_ten_percent_of_the_best_fixed_adam_rate(
    tmp_path, capsys
):
    """The many-seed count (``recommended*/count.py``): per task and lr0 the row's seed mean ÷ the
    best fixed Adam rate's seed mean, counted at ≤ 1.10, on study 1's six tasks and the held-out
    three apart; each task read with its own seeds."""
    import reference_noise as rn

    for task in rn.STUDY1_TASKS + rn.HELD_OUT_TASKS:
        seeds = rn.parse_seeds(rn.COUNT_SEEDS.get(task, "100-111"))
        losses = {}
        for lr in rn.LRS:
            for s in seeds:
                losses[rn.key("adam", lr, s)] = 1.0 if lr == 1e-2 else 2.0
                # 1.05x everywhere but lr0 1e-5 (1.2x); a seed's loss moves both rows alike
                losses[rn.key("candidate", lr, s)] = 1.2 if lr == 1e-5 else 1.05
                losses[rn.key("adam_hd", lr, s)] = 1.11
        (tmp_path / f"{task}.json").write_text(json.dumps(losses))
    totals = rn.print_counts(tmp_path)
    assert totals == {"candidate, study 1": 24, "adam_hd, study 1": 0,
                      "candidate, held out": 12, "adam_hd, held out": 0}  # fmt: skip
    out = capsys.readouterr().out
    assert "| fewshot_sinusoid (60 seeds) | 0.01 | 1.20, 1.05, 1.05, 1.05, 1.05 (4/5) |" in out
    assert "candidate, held out: 12/15" in out
    # a later measurement of one task overlays the folder of the others
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    few = json.loads((tmp_path / "fewshot_sinusoid.json").read_text())
    few.update({k: 1.0 for k in few if k.startswith("candidate|")})
    (overlay / "fewshot_sinusoid.json").write_text(json.dumps(few))
    totals = rn.print_counts(overlay, under=[tmp_path])
    assert totals["candidate, study 1"] == 25 and totals["candidate, held out"] == 12
    with pytest.raises(FileNotFoundError, match="digits_mlp"):
        rn.task_losses([overlay], "digits_mlp")
    # the command line prints the same count, for the rows it names
    capsys.readouterr()
    assert rn.main(["--count", str(tmp_path), "--rows", "adam_hd"]) == 0
    out = capsys.readouterr().out
    assert "adam_hd, study 1: 0/30" in out and "candidate" not in out
    assert "| fewshot_sinusoid (60 seeds) | 0.01 | 1.11, 1.11, 1.11, 1.11, 1.11 (0/5) |" in out
    with pytest.raises(ValueError, match="--count"):
        rn.main(["--count", str(tmp_path / "missing")])
    (tmp_path / "digits_mlp_sgd.json").write_text(json.dumps({"sgd|0.01|100": 0.5}))
    assert rn.task_losses([overlay, tmp_path], "digits_mlp", "_sgd") == {"sgd|0.01|100": 0.5}


def test_draw_odds_scores_each_three_seed_draw_as_study_1_does():
    """Without seed noise every draw gives the same count; with one bad seed of four, a 3-seed
    draw misses whenever it holds that seed (3 draws in 4), and the oracle at the best fixed
    rate passes a task's five cells together."""
    import draw_odds as do
    from reference_noise import LRS, key

    fixed = dict(zip(LRS, (5.0, 4.0, 1.0, 3.0, 6.0)))
    hd = dict(zip(LRS, (1.05, 1.2, 1.0, 1.11, 0.9)))  # within 10% of 1.0: 3 of 5
    steady = {key(r, lr, s): v[lr] for s in range(4) for r, v in (("sgd", fixed), ("hd", hd))
              for lr in LRS}  # fmt: skip
    odds = do.draw_odds({"a": steady, "b": steady}, ["hd"], "sgd", draws=50)
    assert set(odds["hd"].counts) == {6} and odds["hd"].cells == 10
    assert odds["ceiling"].at_least(10) == 1.0
    noisy = dict(steady)
    for lr in LRS:
        noisy[key("hd", lr, 3)] = 10.0  # seed 3 is bad: any draw with it has a mean ≥ 4
    noisy[key("sgd", LRS[0], 9)] = 1.0  # an incomplete seed is not drawn
    odds = do.draw_odds({"a": noisy}, ["hd"], "sgd", draws=4000)
    assert set(odds["hd"].counts) == {0, 3}
    assert odds["hd"].at_least(3) == pytest.approx(0.25, abs=0.03)
    assert odds["hd"].at_most(0) == pytest.approx(0.75, abs=0.03)
    assert odds["hd"].quantile(0.05) == 0 and odds["hd"].quantile(0.95) == 3
    assert do.complete_seeds(noisy, ["sgd", "hd"]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="complete seeds"):
        do.draw_odds({"a": noisy}, ["hd"], "sgd", draws=1, k=5)


def test_seek_many_seeds_ratio_is_the_variant_mean_over_the_best_fixed_rate_on_those_seeds():
    import random

    import seek_many_seeds as sm
    from reference_noise import LRS, key

    seeds = [0, 1, 2, 3]
    reference = {key("adam", lr, s): (1.0 + s if lr == LRS[2] else 3.0 + s) for lr in LRS
                 for s in seeds}  # fmt: skip
    runs = {s: 1.2 * (1.0 + s) for s in seeds}
    ratio, lo, hi = sm.ratios(reference, runs, seeds, random.Random(0))
    assert ratio == pytest.approx(1.2) and lo == pytest.approx(1.2) and hi == pytest.approx(1.2)
    text = sm.table({"v": {"t": (1.2, 1.1, 1.3)}, "w": {"t": (1.05, 1.0, 1.1)}}, 1e-3)
    assert "| v | 1.200 (1.10-1.30) | 1.200 | 0/1 |" in text
    assert "| w | 1.050 (1.00-1.10) | 1.050 | 1/1 |" in text
    with pytest.raises(ValueError, match="--lr"):
        sm.main(["--lr", "3e-3"])
    with pytest.raises(ValueError, match="--variant"):
        sm.main(
            ["--variant", "no-equals-sign", "--tasks", "digits_logreg", "--out", "/nonexistent"]
        )


def test_study11_headline_divides_each_schedule_by_the_fixed_rate_it_settles_at(tmp_path):
    """Study 11's table: a schedule started at 7r (or 3r) is compared with Adam fixed at r, the
    rate it settles at, not with Adam at its own starting rate; AdamHD has no ratio."""
    import ablate_studies

    def rec(opt, lr, seed, final, best=None):
        return {"task": "digits_mlp", "optimizer": opt, "lr": lr, "seed": seed, "status": "ok",
                "final_val_loss": final, "best_val_loss": best or final}  # fmt: skip

    recs = [rec("adam", 1e-3, 0, 0.10), rec("adam", 1e-3, 1, 0.12),
            rec("adam", 7e-3, 0, 9.0), rec("adam", 7e-3, 1, 9.0),  # a decoy at the start rate
            rec("adam_x7_for50", 7e-3, 0, 0.132, 0.1), rec("adam_x7_for50", 7e-3, 1, 0.11, 0.1),
            rec("adam_x3_for50", 3e-3, 0, 0.11), rec("adam_x3_for50", 3e-3, 1, 0.11),
            rec("adam_hd", 1e-3, 0, 0.2), rec("adam_hd", 1e-3, 1, 0.3)]  # fmt: skip
    (tmp_path / "records.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    rows = {
        tuple(c.strip() for c in line.strip("|").split("|")[1:3]): line.split("|")[1:-1]
        for line in ablate_studies.headline11(tmp_path).splitlines()
        if line.startswith("| digits_mlp")
    }
    assert rows[("0.001", "fixed r")][5].strip() == "1.00"
    assert rows[("0.001", "7r for 50 steps, then r")][5].strip() == "1.10"  # 0.121 / 0.11
    assert rows[("0.001", "7r for 50 steps, then r")][4].strip() == "0.1000"  # mean best
    assert rows[("0.001", "3r for 50 steps, then r")][5].strip() == "1.00"
    hd = rows[("lr0 0.001", "AdamHD (defaults)")]
    assert hd[3].strip().startswith("0.2500 ±") and hd[5].strip() == ""
    assert ("0.007", "fixed r") in rows  # Adam's own rows at every rate it ran


def test_matched_loss_probe_smoke(tmp_path):
    """The probe's table: one row per (rate, seed), each level's first logged step whose
    training loss is below it, and a final validation loss; a level no step reaches is '—'."""
    import matched_loss_probe as probe

    out = tmp_path / "probe.md"
    text = probe.main(["--size", "smoke", "--steps", "20", "--final-steps", "20", "--lrs",
                       "1e-3,1e-2", "--seeds", "0", "--levels", "3,1e-9", "--out", str(out)])  # fmt: skip
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| 0.0")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        step, val = cells[2].split(":")
        assert int(step) % 5 == 0 and 0 < float(val) < 10  # reached at a logged step
        assert cells[3] == "—"  # a training loss of 1e-9 is never reached in 20 steps
        assert 0 < float(cells[4]) < 10


def test_first_below_reads_the_first_step_under_each_level():
    import matched_loss_probe as probe

    curves = {"step": [0, 5, 10, 15], "train_loss": [None, 0.8, 0.4, 0.2],
              "val_loss": [2.0, 0.9, 0.5, 0.45]}  # fmt: skip
    assert probe.first_below(curves, (0.5, 0.3, 0.1)) == [(10, 0.5), (15, 0.45), None]


def test_noise_ratio_probe_smoke(tmp_path):
    """The noise-ratio probe's table: one row per task over its seeds, the successive-gradient
    cosine (a cosine: within [-1, 1]), its inverse, and AdamHD's rate ÷ the task's best rate."""
    import noise_ratio_probe as probe

    out = tmp_path / "noise.md"
    text = probe.main(["--size", "smoke", "--tasks", "digits_mlp,fewshot_sinusoid", "--seeds",
                       "0", "--noise-steps", "6", "--edge-step", "5", "--out", str(out)])  # fmt: skip
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith(("| digits", "| fewshot"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        low, high = (float(v) for v in cells[3].split("–"))
        assert -1 <= low <= high <= 1 and low == high  # one seed
        assert float(cells[5].split("–")[0]) > 0


def test_noise_ratio_probe_cosines_of_identical_batches_are_one():
    """With a learning rate of 0 every minibatch gradient of a full-batch task is the same:
    every successive cosine is 1 (the probe's reading of a noiseless task)."""
    import noise_ratio_probe as probe

    cosines = probe.gradient_cosines("fewshot_sinusoid", 0.0, 0, 5, "smoke")
    assert len(cosines) == 4
    assert all(c == pytest.approx(1.0, abs=1e-9) for c in cosines)


def test_noise_ratio_probe_table_gives_ranges_over_seeds():
    import noise_ratio_probe as probe

    rows = [{"task": "digits_mlp", "seed": s, "cosine": c, "edge": 1e-2, "edge_over_best": r}
            for s, c, r in ((0, 0.5, 8.0), (1, 0.25, 6.0))]  # fmt: skip
    line = probe.table(rows).splitlines()[-1]
    assert line == "| digits_mlp | 0.001 | 0,1 | 0.25–0.50 | 2–4 | 6–8 |"


def test_ray_cosine_is_the_derivative_along_the_ray_of_travel():
    """cos(∇L_val(θ), θ − θ_0) × |∇L_val| |θ − θ_0| = d/dα L_val(θ_0 + α(θ − θ_0)) at α = 1
    (central finite difference), and the probe reads the run's validation split."""
    import copy

    import ray_signal_probe as probe
    import torch

    from metalr.workbench.runner import _task

    task = _task("digits_logreg", "smoke", "cpu", True)
    model = task.model(0).double()
    anchor = probe._flat(list(model.parameters())).clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = task.splits(0)[1]
    x = x.double()

    def val_at(alpha: float) -> float:
        trial = copy.deepcopy(model)
        theta = anchor + alpha * (probe._flat(list(model.parameters())) - anchor)
        torch.nn.utils.vector_to_parameters(theta, trial.parameters())
        with torch.no_grad():
            return float(task.loss(trial(x), y))

    travel = probe._flat(list(model.parameters())) - anchor
    grads = torch.autograd.grad(task.loss(model(x), y), list(model.parameters()))
    g = probe._flat(list(grads))
    eps = 1e-5
    derivative = (val_at(1 + eps) - val_at(1 - eps)) / (2 * eps)
    assert float(g @ travel) == pytest.approx(derivative, rel=1e-6)
    # the probe's own cosine (its split is float32: the model there runs in float32)
    model32 = model.float()
    c = probe.ray_cosine(task, model32, 0, anchor.float())
    assert c == pytest.approx(derivative / float(g.norm() * travel.norm()), rel=1e-3)
    assert probe.ray_cosine(task, model32, 0, probe._flat(list(model32.parameters()))) == 0.0


def test_ray_signal_probe_smoke(tmp_path):
    """Both tables: the fixed-rate rows (a first positive step is a logged step or '—'; a mean
    cosine within [-1, 1]) and the controller rows; a window of 0 never acts, so the wrapped run
    equals AdamHD's own to the last digit."""
    import ray_signal_probe as probe

    common = ["--size", "smoke", "--steps", "20", "--every", "5", "--seeds", "0"]
    text = probe.main(["fixed", "--tasks", "digits_mlp", "--lrs", "1e-3,1e-1",
                       "--out", str(tmp_path / "f.md"), *common])  # fmt: skip
    rows = [r for r in text.splitlines() if r.startswith("| digits_mlp")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == "—" or int(cells[4]) % 5 == 0
        assert -1 <= float(cells[5]) <= 1
    text = probe.main(["controller", "--tasks", "digits_mlp", "--window", "0",
                       "--out", str(tmp_path / "c.md"), *common])  # fmt: skip
    row = next(r for r in text.splitlines() if r.startswith("| digits_mlp"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == cells[3]


def test_ray_controller_cuts_and_rewinds_only_on_a_positive_cosine_in_its_window(monkeypatch):
    """Observations at steps 5, 10, 15, 20 reading −, +, −, +: the rates are cut once inside a
    window of 0.6 (step 10 rewinds to step 5's weights), twice with the whole run."""
    import ray_signal_probe as probe
    import torch

    from metalr.workbench.runner import _task

    task = _task("digits_mlp", "smoke", "cpu", True)
    real = probe.ray_cosine
    for window, cuts in ((0.6, 1), (1.0, 2)):
        signs = iter([-0.5, 0.5, -0.5, 0.5])
        monkeypatch.setattr(probe, "ray_cosine", lambda *a, signs=signs: next(signs))
        r = probe.run(task, {"kind": "adam_hd"}, 1e-3, 0, 20, 5, {"cut": 0.25, "window": window})
        assert r["lrs"] == [pytest.approx(1e-3 * 0.25**cuts)] * len(r["lrs"])
    monkeypatch.setattr(probe, "ray_cosine", real)
    # a rewind at the last observation (step 10) leaves step 5's weights
    seen: list[int] = []

    def positive_second(*args):
        seen.append(1)
        return 0.5 if len(seen) == 2 else -0.5

    monkeypatch.setattr(probe, "ray_cosine", positive_second)
    rewound = probe.run(task, {"kind": "adam_hd"}, 1e-3, 0, 10, 5, {"cut": 1.0, "window": 1.0})
    monkeypatch.setattr(probe, "ray_cosine", lambda *a: -0.5)
    at_five = probe.run(task, {"kind": "adam_hd"}, 1e-3, 0, 5, 5, {"cut": 1.0, "window": 1.0})
    assert rewound["final_val"] == pytest.approx(at_five["final_val"], rel=1e-6)
    assert torch.isfinite(torch.tensor(rewound["final_val"]))


@pytest.mark.parametrize(("signs", "budget", "floor", "factor"), [
    ([-0.5, 0.5, 0.5, 0.5], 1.0, 0.1, 0.5),  # once, at step 10 of 20: 10 / 20
    ([0.5, 0.5, 0.5, 0.5], 1.0, 0.3, 0.3),  # at step 5: 5 / 20 = 0.25, floored at 0.3
    ([-0.5, 0.5, 0.5, 0.5], 0.4, 0.1, 1.0),  # the first positive (step 10) is past 0.4 × 20
    ([-0.5, 0.004, -0.5, -0.5], 1.0, 0.1, 1.0),  # below τ = 0.005
])  # fmt: skip
def test_ray_controller_budget_rule_acts_once(monkeypatch, signs, budget, floor, factor):
    import ray_signal_probe as probe

    from metalr.workbench.runner import _task

    task = _task("digits_mlp", "smoke", "cpu", True)
    it = iter(signs)
    monkeypatch.setattr(probe, "ray_cosine", lambda *a: next(it))
    rule = {"budget": budget, "tau": 0.005, "floor": floor}
    r = probe.run(task, {"kind": "adam_hd"}, 1e-3, 0, 20, 5, rule)
    assert r["lrs"] == [pytest.approx(1e-3 * factor)] * len(r["lrs"])


def test_ray_signal_summary_counts_cells_and_pairs_them(tmp_path):
    import json

    import ray_signal_probe as probe

    table = tmp_path / "t.md"
    table.write_text("| task | lr0 | AdamHD | rule | per seed | test | test |\n|---|---|---|---|---|\n"
                     "| a | 0.001 | 1.00 | 1.20 | x | 1.0 | 1.0 |\n"
                     "| a | 0.01 | 1.30 | 1.05 | x | 1.0 | 2.0 |\n"
                     "| b | 0.001 | 2.00 | 2.00 | x | 1.9 | 1.9 |\n")  # fmt: skip
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"a": 1.0, "b": 1.9}))
    text = probe.main(["summary", "--tables", str(table), "--reference", str(ref),
                       "--out", str(tmp_path / "s.md")])  # fmt: skip
    # within 10%: defaults a@1e-3 and b (2.0 / 1.9 = 1.053); the rule a@1e-2 and b
    assert "3 cells; within 10% of the reference: defaults 2, with the rule 2" in text
    mean = (math.log(1.2) + math.log(1.05 / 1.3)) / 3
    assert f"paired mean log-ratio {mean:+.3f}" in text
    assert "| b | +0.000 | 1.05 | 1.05 |" in text
    text = probe.main(["summary", "--tables", str(table), "--reference", str(ref), "--metric",
                       "test", "--out", str(tmp_path / "s.md")])  # fmt: skip
    assert "3 cells; within 10% of the reference: defaults 3, with the rule 2" in text
    assert f"paired mean log-ratio {math.log(2) / 3:+.3f}" in text


def test_ray_signal_summary_pairs_two_check_files(tmp_path):
    """``--checks``: the same statistic from two check_controller.py --out files (seed means)."""
    import json

    import ray_signal_probe as probe

    def check(losses, tests):
        return {"seeds": [1, 2], "reference": {"a": 1.0}, "test_reference": {"a": 2.0},
                "losses": losses, "test_losses": tests}  # fmt: skip

    base = check({"a|0.001": [1.0, 1.2], "a|0.01": [1.0, 1.0]},
                 {"a|0.001": [2.0, 2.0], "a|0.01": [3.0, 3.0]})  # fmt: skip
    rule = check({"a|0.001": [1.0, 1.0], "a|0.01": [1.1, 1.1]},
                 {"a|0.001": [2.0, 2.0], "a|0.01": [2.0, 2.4]})  # fmt: skip
    paths = [tmp_path / "base.json", tmp_path / "rule.json"]
    for path, run in zip(paths, (base, rule)):
        path.write_text(json.dumps(run))
    checks = ",".join(map(str, paths))
    text = probe.main(["summary", "--checks", checks, "--out", str(tmp_path / "s.md")])
    # base: 1.1 (within), 1.0 (within); rule: 1.0, 1.1 (both within, 1.1 <= 1.1)
    assert "2 cells; within 10% of the reference: defaults 2, with the rule 2" in text
    mean = (math.log(1.0 / 1.1) + math.log(1.1 / 1.0)) / 2
    assert f"paired mean log-ratio {mean:+.3f}" in text
    text = probe.main(["summary", "--checks", checks, "--metric", "test",
                       "--out", str(tmp_path / "s.md")])  # fmt: skip
    assert "within 10% of the reference: defaults 1, with the rule 2" in text
    assert f"paired mean log-ratio {math.log(2.2 / 3.0) / 2:+.3f}" in text
    # without --out: beside the check files, named by the metric (not the folder-wide summary)
    shared = probe.OUT / "summary.md"
    before = shared.read_text() if shared.is_file() else None
    again = probe.main(["summary", "--checks", checks, "--metric", "test"])
    assert (tmp_path / "summary_test.md").read_text() == again
    assert again.split("\n", 1)[1] == text.split("\n", 1)[1]  # the same table, another command
    assert (shared.read_text() if shared.is_file() else None) == before


def test_ray_controller_ceiling_holds_the_mean_rate_below_its_cut(monkeypatch):
    """With ``cap``, acting at step 5 of 20 (factor 5 / 20) sets a ceiling of 0.25 × the mean
    effective rate at step 5; AdamHD's ramp keeps climbing, the ceiling holds it."""
    import ray_signal_probe as probe

    from metalr.workbench.runner import _task

    task = _task("digits_mlp", "smoke", "cpu", True)
    monkeypatch.setattr(probe, "ray_cosine", lambda *a: 0.5)
    at_five = probe.run(task, {"kind": "adam_hd"}, 1e-3, 0, 5, 5)["rate"]
    free = probe.run(task, {"kind": "adam_hd"}, 1e-3, 0, 20, 5)["rate"]
    rule = {"budget": 1.0, "tau": 0.005, "floor": 0.1, "cap": True}
    capped = probe.run(task, {"kind": "adam_hd"}, 1e-3, 0, 20, 5, rule)["rate"]
    assert free > 0.25 * at_five  # the ramp would climb past the ceiling
    assert capped == pytest.approx(0.25 * at_five, rel=1e-6)


def test_ray_controller_persistence_waits_for_looks_in_a_row(monkeypatch):
    """``persist`` 2 with looks −, +, −, +, +, − every 5 steps of 30: acts at step 25 (factor
    25 / 30 at budget 1.0), not at step 10; with persist 1 at step 10 (10 / 30)."""
    import ray_signal_probe as probe

    from metalr.workbench.runner import _task

    task = _task("digits_mlp", "smoke", "cpu", True)
    for persist, factor in ((2, 25 / 30), (1, 10 / 30)):
        it = iter([-0.5, 0.5, -0.5, 0.5, 0.5, -0.5])
        monkeypatch.setattr(probe, "ray_cosine", lambda *a, it=it: next(it))
        rule = {"budget": 1.0, "tau": 0.005, "floor": 0.1, "persist": persist}
        r = probe.run(task, {"kind": "adam_hd"}, 1e-3, 0, 30, 5, rule)
        assert r["lrs"] == [pytest.approx(1e-3 * factor)] * len(r["lrs"])


def _signals():
    probe_dir = EXPERIMENTS / "results" / "dev_transformer" / "probe"
    if str(probe_dir) not in sys.path:
        sys.path.insert(0, str(probe_dir))
    import signals

    return signals


def test_signals_trace_reads_cosines_and_trails_without_changing_the_run():
    from fit_controller import run

    signals = _signals()
    spec = {"kind": "adam"}
    rows = list(signals.run_probe("trace", "digits_mlp", 1e-3, 0, spec, size="smoke", steps=40))
    plain = run("digits_mlp", spec, 1e-3, 40, "smoke", 0)
    assert [r["step"] for r in rows] == [20, 40]
    assert rows[-1]["val"] == pytest.approx(plain["final_val_loss"], rel=1e-6)
    assert "val" not in rows[0]
    for row in rows:
        assert -1 <= row["cos"] <= 1 and row["rate"] == 1e-3
        assert set(row["trail_cos"]) == set(signals.TRAIL_DISCOUNTS)
        assert all(-1 <= c <= 1 for c in row["trail_cos"].values())
        assert -1 <= row["tensor_cos"] <= 1
    # the sign convention: in the first steps at a small rate the gradient points against the
    # steps taken ("the rate is too small" is negative), for the last step and for the trails
    assert rows[0]["cos"] < -0.3 and rows[0]["tensor_cos"] < -0.3
    assert all(c < -0.3 for c in rows[0]["trail_cos"].values())


def test_greedy_sign_table_averages_each_seeds_second_half():
    import importlib.util

    path = EXPERIMENTS / "results" / "greedy_sign" / "probe.py"
    spec = importlib.util.spec_from_file_location("greedy_sign_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)

    def record(seed, cosines, val):
        rows = [
            {"cos": c, "tensor_cos": 2 * c, "trail_cos": {"0.9": c / 2, "0.99": -c}}
            for c in cosines
        ]
        rows[-1]["val"] = val
        return {"task": "digits_mlp", "factor": 1, "seed": seed, "rows": rows}

    table = probe.table([record(1201, [9.0, 9.0, 0.1, 0.3], 2.0),
                         record(1200, [9.0, 9.0, -0.2, -0.4], 1.0)])  # fmt: skip
    line = next(x for x in table.splitlines() if x.startswith("| digits_mlp"))
    # seeds in order, each the mean of its last two rows; the trails' seed means; the val mean
    assert line == (
        "| digits_mlp | 0.001 | -0.300 +0.200 | -0.050 | -0.100 | -0.025 | +0.050 | 1.5000 |"
    )


def test_signals_tensor_cosine_is_the_size_weighted_mean_of_each_tensors_cosine():
    signals = _signals()
    model = torch.nn.Linear(3, 1)  # a weight of 3 elements, a bias of 1
    g = torch.tensor([1.0, 0.0, 0.0, 2.0])
    last = torch.tensor([1.0, 1.0, 0.0, -1.0])
    # weight: cos([1, 0, 0], [1, 1, 0]) = 1/√2; bias: cos(2, −1) = −1; weights 3 and 1
    expected = (3 * 2**-0.5 - 1) / 4
    assert signals._tensor_cosine(model, g, last) == pytest.approx(expected)
    assert math.isnan(signals._tensor_cosine(model, g, None))
