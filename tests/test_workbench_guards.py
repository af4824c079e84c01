"""Guards of the workbench against results that would be wrong without an error: a smoke run's
records joining the full study's means, a seed run twice, search keys a kind never reads, a
search range that fails only when its cell runs."""

from __future__ import annotations

import pytest
import torch

from metalr.workbench import resolve_study, run_study
from metalr.workbench.report_stats import aggregate
from metalr.workbench.runner import read_records

BASE = {"name": "guards", "tasks": ["digits_logreg"], "size": "smoke", "log_every": 5,
        "lrs": [0.1], "seeds": [0, 1], "optimizers": {"adam": {"kind": "adam"}},
        "smoke": {"steps": 2, "seeds": [0]}}  # fmt: skip


def test_a_smoke_run_writes_beside_the_study_not_into_it(tmp_path):
    """Without its own ``out``, a smoke run writes to ``<out>_smoke``: the full study's folder
    keeps only its own records, and its report is unchanged by the smoke run."""
    torch.set_num_threads(1)
    out = tmp_path / "study"
    full = resolve_study({**BASE, "steps": 20, "out": str(out)})
    run_study(full, quiet=True)
    before = aggregate(read_records(out))
    smoke = resolve_study({**BASE, "steps": 20, "out": str(out)}, smoke=True)
    assert smoke.out_dir == tmp_path / "study_smoke"
    run_study(smoke, quiet=True)
    assert aggregate(read_records(out)) == before
    assert [r["steps"] for r in read_records(tmp_path / "study_smoke")] == [2]
    # an explicit out (an override, or the smoke section's own) is kept
    assert resolve_study({**BASE, "out": str(out)}, [f"out={tmp_path / 'x'}"], smoke=True).out_dir \
        == tmp_path / "x"  # fmt: skip
    section = {**BASE, "smoke": {"steps": 2, "out": str(tmp_path / "y")}}
    assert resolve_study(section, smoke=True).out_dir == tmp_path / "y"
    assert (
        resolve_study({**BASE, "out": str(out)}, ["smoke=true"]).out_dir == tmp_path / "study_smoke"
    )


def test_aggregate_refuses_seeds_of_different_budgets_in_one_mean():
    """Records of one (task, optimizer, lr) cell from runs of different step budgets (a smoke
    run written into the study's folder by hand) would average 2-step and 20-step losses."""

    def rec(seed, steps, loss):
        return {"id": f"{seed}-{steps}", "task": "t", "optimizer": "adam", "lr": 0.1,
                "seed": seed, "size": "smoke", "steps": steps, "status": "ok",
                "final_val_loss": loss}  # fmt: skip

    assert aggregate([rec(0, 20, 0.1), rec(1, 20, 0.2)])[0]["seeds"] == 2
    with pytest.raises(ValueError, match="different sizes or step budgets"):
        aggregate([rec(0, 20, 0.1), rec(1, 20, 0.2), rec(0, 2, 2.0)])


@pytest.mark.parametrize("key", ["seeds", "lrs", "tasks"])
def test_repeated_seeds_lrs_or_tasks_are_refused(key):
    doubled = {"seeds": [0, 0], "lrs": [0.1, 0.1], "tasks": ["digits_logreg"] * 2}[key]
    with pytest.raises(ValueError, match=f"Invalid value for {key}.*repeated"):
        resolve_study({**BASE, key: doubled})


@pytest.mark.parametrize(
    ("spec", "match"),
    [({"kind": "adam", "search": "random", "trials": 16}, "search, trials only apply"),
     ({"kind": "sgd_hd", "trial_steps": 5}, "trial_steps only apply"),
     ({"kind": "range_test_adam", "range_test": {"method": "steepest"}}, "range_test"),
     ({"kind": "tuned_adam", "lrs": [1e-3]}, "lrs: kind 'tuned_adam' does not train"),
     ({"kind": "tuned_adam", "lr_range": [0, 1]}, r"lr_range: \[0, 1\]"),
     ({"kind": "tuned_adam", "lr_range": [1e-5]}, "lr_range"),
     ({"kind": "tuned_adam", "lr_range": [1e-1, 1e-5]}, "lr_range"),
     ({"kind": "adam", "lrs": [1e-3, 1e-3]}, "lrs.*repeated")],
)  # fmt: skip
def test_spec_keys_a_kind_never_reads_are_refused_when_the_config_loads(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_study({**BASE, "optimizers": {"o": spec}})


def test_valid_search_specs_still_load():
    cfg = resolve_study({**BASE, "optimizers": {
        "t": {"kind": "tuned_adam", "search": "random", "trials": 4, "lr_range": [1e-5, 1e-1],
              "trial_steps": 3},
        "a": {"kind": "adam", "lrs": [1e-3, 1e-2]}}})  # fmt: skip
    assert set(cfg.optimizers) == {"t", "a"}
