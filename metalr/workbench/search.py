"""Learning-rate search of the ``tuned_adam`` baseline: which trial lrs it trains at.

``search: grid`` (log-spaced over ``lr_range``), ``random`` (log-uniform, seeded per grid seed)
or ``bayes`` (Optuna's TPE sampler, seeded; ``pip install optuna``). Every trial is a full
training run scored on the validation split; the budget (``trials``) is recorded, so "tuned
Adam" is known to cost ``trials + 1`` runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

SEARCHES = ("grid", "random", "bayes")
OPTUNA_INSTALL = 'pip install "torch==2.13.0" optuna'


def search_lrs(spec: dict[str, Any], seed: int,
               score: Callable[[float], float]) -> tuple[list[float], list[float]]:  # fmt: skip
    """Train at each trial lr (``score(lr)`` = its final validation loss); returns the trial lrs
    and their scores, in the order tried."""
    lo, hi = spec.get("lr_range", [1e-5, 1.0])
    n = spec.get("trials", 8)
    search = spec.get("search", "grid")
    if search == "bayes":
        return _bayes(lo, hi, n, seed, score)
    if search == "grid":
        lrs = [lo * (hi / lo) ** (i / max(1, n - 1)) for i in range(n)]
    else:
        g = torch.Generator().manual_seed(1_000 + seed)
        lrs = [lo * (hi / lo) ** float(u) for u in torch.rand(n, generator=g, dtype=torch.float64)]
    return lrs, [score(lr) for lr in lrs]


def search_lr_decay(spec: dict[str, Any], seed: int, score: Callable[[float, float], float]
                    ) -> tuple[list[tuple[float, float]], list[float]]:  # fmt: skip
    """Search (lr, layer decay γ) jointly with the budget of :func:`search_lrs` (``trials``).

    ``random``: the same lrs :func:`search_lrs` draws for this seed, each paired with
    γ ~ U[``layer_decay_range``] from its own generator (so tuned Adam and tuned layer-wise Adam
    try identical rates); ``bayes``: Optuna's TPE over both."""
    lo, hi = spec.get("lr_range", [1e-5, 1.0])
    g_lo, g_hi = spec["layer_decay_range"]
    n = spec.get("trials", 8)
    if spec.get("search", "grid") == "bayes":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="minimize",
                                    sampler=optuna.samplers.TPESampler(seed=1_000 + seed))  # fmt: skip
        trials: list[tuple[float, float]] = []
        scores: list[float] = []

        def objective(trial: Any) -> float:
            pair = (trial.suggest_float("lr", lo, hi, log=True),
                    trial.suggest_float("layer_decay", g_lo, g_hi))  # fmt: skip
            value = score(*pair)
            trials.append(pair)
            scores.append(value)
            return value if math.isfinite(value) else 1e30

        study.optimize(objective, n_trials=n)
        return trials, scores
    g = torch.Generator().manual_seed(1_000 + seed)
    lrs = [lo * (hi / lo) ** float(u) for u in torch.rand(n, generator=g, dtype=torch.float64)]
    g = torch.Generator().manual_seed(2_000 + seed)
    gammas = [g_lo + (g_hi - g_lo) * float(u)
              for u in torch.rand(n, generator=g, dtype=torch.float64)]  # fmt: skip
    trials = list(zip(lrs, gammas))
    return trials, [score(*t) for t in trials]


def optuna_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("optuna") is not None


def _bayes(lo: float, hi: float, n: int, seed: int,
           score: Callable[[float], float]) -> tuple[list[float], list[float]]:  # fmt: skip
    if not optuna_available():
        raise ImportError(f"search: bayes needs Optuna: {OPTUNA_INSTALL}")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=1_000 + seed)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    lrs, scores = [], []

    def objective(trial: Any) -> float:
        lr = trial.suggest_float("lr", lo, hi, log=True)
        value = score(lr)
        lrs.append(lr)
        scores.append(value)
        return value if math.isfinite(value) else 1e30  # a diverged trial: worst, not failed

    study.optimize(objective, n_trials=n)
    return lrs, scores
