"""tuned_adam's lr search: grid and random trial lrs, Optuna's TPE (seeded, finds a known optimum),
the budget recorded, and a clear error without Optuna."""

from __future__ import annotations

import math

import pytest

from metalr.workbench import optimizers as O
from metalr.workbench import resolve_study, run_study
from metalr.workbench import search as S


def _bowl(lr: float) -> float:
    """A validation loss whose best lr is 10^-2.5 (a smooth bowl in log-lr)."""
    return (math.log10(lr) + 2.5) ** 2


def test_grid_is_log_spaced_and_random_is_seeded_and_nested():
    lrs, scores = S.search_lrs({"search": "grid", "trials": 5, "lr_range": [1e-5, 1e-1]}, 0, _bowl)
    assert lrs == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    assert scores == pytest.approx([_bowl(x) for x in lrs])
    spec = {"search": "random", "trials": 4, "lr_range": [1e-5, 1e-1]}
    a, _ = S.search_lrs(spec, 3, _bowl)
    b, _ = S.search_lrs({**spec, "trials": 16}, 3, _bowl)
    c, _ = S.search_lrs(spec, 4, _bowl)
    assert a == b[:4] and a != c and all(1e-5 <= x <= 1e-1 for x in b)


def test_bayes_search_is_seeded_and_finds_the_optimum():
    pytest.importorskip("optuna")
    spec = {"search": "bayes", "trials": 25, "lr_range": [1e-6, 1.0]}
    lrs, scores = S.search_lrs(spec, 0, _bowl)
    again, _ = S.search_lrs(spec, 0, _bowl)
    assert lrs == again and len(lrs) == 25
    best = lrs[min(range(len(lrs)), key=scores.__getitem__)]
    assert abs(math.log10(best) + 2.5) < 0.25, best  # within a factor 1.8 of 10^-2.5
    # TPE beats the same budget of log-uniform random search on this bowl
    _, rand_scores = S.search_lrs({**spec, "search": "random"}, 0, _bowl)
    assert min(scores) < min(rand_scores)


def test_bayes_tuned_adam_records_its_budget(tmp_path):
    pytest.importorskip("optuna")
    cfg = resolve_study({"name": "t", "tasks": ["digits_logreg"], "steps": 5, "log_every": 5,
                         "lrs": [0.1], "seeds": [0], "out": str(tmp_path),
                         "optimizers": {"bayes": {"kind": "tuned_adam", "search": "bayes",
                                                  "trials": 3}}})  # fmt: skip
    (record,) = run_study(cfg, quiet=True)
    extra = record["extra"]
    assert extra["search"] == "bayes" and extra["trials"] == 3 and len(extra["trial_lrs"]) == 3
    best = min(range(3), key=extra["trial_val_losses"].__getitem__)
    assert record["lr_used"] == extra["trial_lrs"][best]


def test_bayes_without_optuna_names_the_install_command(monkeypatch):
    monkeypatch.setattr(O, "optuna_available", lambda: False)
    with pytest.raises(
        ValueError, match=r'search: bayes needs Optuna: pip install "torch==2.13.0" optuna'
    ):
        O.check_spec("t", {"kind": "tuned_adam", "search": "bayes"})
    with pytest.raises(ValueError, match="expected one of grid, random, bayes"):
        O.check_spec("t", {"kind": "tuned_adam", "search": "annealing"})
