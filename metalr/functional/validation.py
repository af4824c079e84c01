r"""Rates that follow a held-out loss: the validation hypergradient (pure functions).

The training hypergradient ``-⟨g_t, d_{t-1}⟩`` asks "would a larger last step have lowered the
*training* loss?"; on a task that overfits it keeps saying yes while the validation loss turns
up. The same question asked of a held-out loss (real-time hyperparameter optimisation:
Franceschi et al. 2017; MARTHE, Donini et al. 2020) is::

    ∂L_val(θ_t) / ∂α_t = -⟨∇L_val(θ_t), d_t⟩,        d_t = the direction of the last step

(to first order; ``α_t`` is the rate of the step that led to ``θ_t``). It needs no memory beyond
what the optimizer already keeps: ``d_t`` is the Adam direction ``m̂_t/(√v̂_t+ε)`` recomputed
from the moments, SGD's momentum buffer (or its stored last direction), HyperLR's buffer.

Once a param group has observed a validation loss (``optimizer.observe_validation``), its rates
follow this signal at every observation (every ``k`` training steps, the caller's choice), and
the training signal's tracking keeps the weight ``train_weight`` (default 1: both move the
rates, the training one every step, the validation one at each observation; 0: the validation
signal replaces the training one):

* ``rule="seek"``: phase 1 (the ramp that finds the scale) and the turn still run on the
  training signal at every step; the tracking phase reads the validation cosine
  ``c^val = cos(∇L_val, d_t)`` (per element its sign) through its own running averages::

      μ ← b1 μ + (1 - b1) c^val,   ν ← b2 ν + (1 - b2) (c^val)²             (bias-corrected)
      log m ← min(log m + β_val · (μ̂/√ν̂ − evidence), ceiling)

  so a validation loss that rises along the steps (``c^val < 0``) pulls the rates down, one that
  still falls along them lets them climb (up to the ceiling the turn set); between observations
  settled rates hold still. At tensor granularity rates are tied as in the training phase.
* ``rule="normalized"``: ``log m ← log m + β_val · c^val``; ``rule="additive"``:
  ``α ← α + β_val ⟨∇L_val, d_t⟩`` — each the rule's own update with the validation gradient,
  applied at the observations only. The additive β has the units of the rate (it is not
  scale-free), so its ``β_val`` defaults to the group's own ``hypergrad_lr``, not to
  :data:`VALIDATION_DEFAULTS`. These rules read ``hypergrad_lr``, ``climb`` and
  ``train_weight`` only, and refuse the seek rule's keys (:data:`SEEK_ONLY_VALIDATION_KEYS`)
  with a ``ValueError`` rather than ignore them.
* ``climb`` (in [0, 1]; the seek rule's default 0, the other rules' 1) scales the moves *up*
  of the validation update (the seek rule's ``β_val (μ̂/√ν̂ − evidence)`` where positive; the
  other rules' rises of ``log m`` or ``α``);
  moves down are kept whole. 1: the signal raises and lowers the rates alike; 0: it only holds
  them back, the training signal alone raises them — a brake that watches the validation loss
  and otherwise leaves the training signal's tracking as it is.
* ``gap`` (in [0, 1], seek rule only) subtracts ``gap`` times the training signal's own
  ``μ̂/√ν̂`` (the controller's running averages) from the validation one before the
  evidence threshold::

      log m ← min(log m + β_val · (μ̂_val/√ν̂_val − gap · μ̂_train/√ν̂_train − evidence), ceiling)

  so at ``gap`` 1 the signal is how much *less* the validation data agree with the steps than
  the training data do (a generalisation gap) rather than whether one step raised the
  validation loss, which at the edge of stability it does as often as it raises the training
  loss.

* ``noise_hold`` (in [0, 10], seek rule only; default 0) is the seek rule's ``noise_hold`` (the
  gradient gate's hold: while the group's gradient norm is near its peak, a noisy training
  signal slows its anneal instead of driving it, never adding a climb) while the group follows
  the validation signal, if larger than the seek set's own (AdamHD's set holds with 2 since
  2026-12-07, so there the option's value matters only above 2): with the validation signal as the
  brake, the training signal's anneal need not stop a model that is still learning::

      track ← min(track + noise_hold · evidence · G_t/H_t, 0)   where track < 0

* ``hold`` (``P`` training steps, ≥ 0, seek rule only; default 40; 0: off), ``loss_decay`` (δ,
  default 0.5), ``plateau_cut`` (``c`` in (0, 1], default 0.5) and ``cut_after`` (steps, default
  80) read the validation *loss* itself, not its gradient. The training signal anneals a rate whenever successive steps disagree, which on a
  model still improving on held-out data stops it early (an autoencoder's rate falls from
  2e-3 to 1e-8 in 900 steps while fixed-rate Adam keeps improving). With the hold, the loss's
  running average ``A ← δ A + (1 − δ) v`` and its best ``B`` decide, at each observation, before
  the validation move::

      while A reached a new best within the last P training steps:
          log m ← max(log m, ℓ)            (ℓ: the rate's level after the previous observation)
      after max(P, cut_after) steps without one:
          log m ← log m + log c
      in between: nothing (the training signal alone moves the rates)

  so a model that still improves on the validation data keeps its rate (the anneal since the
  last observation is undone, as a fixed rate would keep it), and one that has stopped falls
  by ``c`` at each observation (``ReduceLROnPlateau`` inside the rule). Only settled rates are
  held (the ramp and the turn are the training signal's); per element, the tensor's rates move
  by the one factor that brings their largest back. The patience counts training steps (the
  controller's count), not observations, so it means the same at any observation frequency
  (40 steps: two observations at the recommended every 20). Under DDP the loss is averaged over
  the ranks with the gradient. (Functions: :mod:`metalr.functional._validation_state`.)

* ``rewind`` (``r`` in [0, 1], seek rule with the hold only; default 0: off) also moves the
  *parameters* (ReduceLROnPlateau that reloads the best checkpoint, as "newbob" schedules do):
  the optimizer keeps a snapshot ``S`` of each parameter at the observation where the loss's
  running average made its best, and when the cut fires the parameters go back towards it at
  the end of the next training step (in place of that step's move; under
  ZeroRedundancyOptimizer every rank rewinds its own share before ZeRO broadcasts it)::

      S ← θ                      (A reached a new best at this observation)
      θ ← θ + r (S − θ)          (cutting: no new best for max(cut_after, hold) steps)

  so on a model that has begun to overfit the lower rate starts again from the best point
  instead of from the overfitted one. It costs one copy of the parameters
  (``optimizer.state[p]['hd_best_params']``, saved in ``state_dict()``, as is a rewind still
  due). Not a default: on fresh seeds it left study 1's six tasks where they were (14/30 cells
  within 10% against 15/30, paired mean log-ratio +0.004;
  ``experiments/results/fit_controller/val_rewind/protocol.md``): a snapshot chosen on a noisy
  running average can be a lucky draw (the CNN lost 4%), and on the tasks that overfit the
  best point on the way is already worse than tuned Adam's end. (Functions:
  :class:`~metalr.functional._validation_state.Rewind`,
  :func:`~metalr.functional._validation_state.kept_snapshots`,
  :func:`~metalr.functional._validation_state.restored`.)

* ``ray_steps`` (``T``, the run's step budget; seek rule only; default 0: off) switches on the
  *ray ceiling* (:mod:`metalr.functional._ray`): at each observation the cosine between the
  validation gradient and the travel ``θ_t − θ_0`` — positive when less travel along the path so
  far would have given a lower validation loss — and, at most once, early in the run (before
  ``ray_before`` · T) once it has read above ``ray_tau`` at ``ray_persist`` observations in a row,
  a ceiling on the rates at ``f = clamp(t / (ray_target · T), ray_floor, 1)`` times their value
  then, with the parameters sent back to the last observation that read no overshoot::

      c_t = cos(∇L_val(θ_t), θ_t − θ_0);   acting at step t:  ceiling ← log m + log f,  θ ← S

  It costs two copies of the parameters (``θ_0`` and ``S``) and needs the validation gradient
  (an observation of the loss alone leaves it as it is); it cannot be combined with ``rewind``.
  ``ray_clock`` 1 reads, in place of ``t``, the steps at the present rate the travel so far is
  worth (``t_eff``; a ramp from a tiny rate has travelled less than its steps say), and
  ``ray_gate`` γ < 1 lets it act only where the training gradient norm's running average has
  fallen below γ × its peak (both off by default; :mod:`metalr.functional._ray`).

* ``track_steps`` (``S``; seek rule only; default 400, read only where ``ray_steps`` gives the
  run's length ``T``): a run shorter than ``S`` steps tracks faster, so that its rates can move
  as far over the run as an ``S``-step run's can::

      β_eff = β · max(1, S / T)           (the group's training β; ``hypergrad_lr`` 0 stays 0)

  With AdamHD's β 0.0404 that is at least 16 e-folds over any run. It moves only runs shorter
  than 400 steps: of study 1's grid, the 100-step few-shot task (β × 4). Adopted by the rule
  written before its check on unused seeds 306–365 (few-shot, 60 seeds × five lr0; paired mean
  log-ratio of the final validation loss −0.146, 95% interval −0.265 to −0.020; expected
  cells within 10% of best-of-grid Adam on random 3-seed grids 1.22 → 1.75 of 5); its tail is
  heavier (of 300 paired runs 46 more than 2× better, 18 more than 2× worse, so its 60-seed
  arithmetic means rose: ``experiments/results/fit_controller/val_track_span/protocol.md``).
  0 turns it off; a checkpoint saved before the key resumes with it off.

* **The loss alone** (``observe_validation(loss, hypergradient=False)``; seek rule with the hold):
  a validation *pass* — the loss of the whole validation set, measured on the same examples each
  time — feeds the hold and the rewind above, and no validation gradient is taken: the
  signal's statistics ``μ, ν, count`` stay as they are and the rates move only as the hold
  moves them (what an observation with the gradient does at ``hypergrad_lr`` 0). A loss
  without sampling noise needs no running average: ``loss_decay`` 0 lets the hold read each
  pass as it is. (:func:`loss_only_flags`; measured, not the recommendation:
  ``experiments/results/fit_controller/val_pass/protocol.md``.)

A validation loss or gradient that is not finite is skipped: nothing changes. The statistics
(the signal's ``μ, ν, count``; the loss's ``A, B``, the step of ``B``, count; the level ``ℓ``) are one small vector per parameter tensor (``VALIDATION_SIZE`` entries), in
``optimizer.state[p]['hd_validation']``; their presence is what switches a group to the
validation signal, so a resumed run stays in the mode it was in.

The constants (:data:`VALIDATION_DEFAULTS`, overridable with ``validation={...}`` on every
optimizer) were chosen on the training suite of ``experiments/fit_controller.py`` at one
observation every 10 steps (``experiments/choose_validation.py``); the recommended frequency
is every 20 (:data:`RECOMMENDED_EVERY`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metalr.functional._common import full_value, resolve_constants
from metalr.functional._distributed import ShardReducer
from metalr.functional._hypergrad import clamp_rates, rates_in_use, update_rates
from metalr.functional._ray import RAY_DEFAULTS, check_ray_options
from metalr.functional._signals import all_finite, inner_products, seek_signals
from metalr.functional._validation_state import (  # noqa: F401 (re-exported)
    BEST_STEP,
    LEVEL,
    LOSS_AVG,
    LOSS_BEST,
    LOSS_COUNT,
    VAL_COUNT,
    VAL_MEAN,
    VAL_SQ,
    VALIDATION_SIZE,
    Rewind,
    completed_validation_stats,
    initial_validation_stats,
)
from metalr.functional._validation_update import seek_validation_update

#: The recommended frequency: one validation batch (of the training batch size) every 20
#: optimizer steps. Adopted 2026-12-04 by a rule fixed before study 9's run at 20 (at least as
#: many cells within 10% of best-of-grid Adam as at 10, on study 1's tasks and on the held-out
#: ones): 23/30 and 6/15 against 22/30 and 6/15, at half the validation cost
#: (``experiments/results/bench_validation_cost_every20.md``). The constants below were chosen
#: at every 10.
RECOMMENDED_EVERY = 20

#: β_val per observation, the running averages' decays, the evidence threshold and the weight
#: the training signal keeps in phase 2 once a group follows the validation signal (0: none).
#: Chosen by ``experiments/choose_validation.py`` with the seek rule's defaults of the day: the
#: grid's best setting under which the rates fall in a constructed overfitting case (its
#: ``falls_when_overfitting``, the behaviour ``tests/test_validation_behaviour.py`` requires). With
#: round 7's seek constants (the defaults 2026-12-03 to 12-04): β_val 0.3, evidence 0.2 and the training signal
#: kept at full weight (objective 0.577 on its 8 cells, where the seek rule without the
#: validation signal scores 0.591; every setting that replaces the training signal scores
#: 0.645-0.804; the grid's overall best, 0.568, lets the rates rise in the constructed case;
#: ``experiments/results/choose_validation/round7``). With trial 11's: β_val 0.3, evidence 0.2,
#: train_weight 0 (0.726 against 0.770). Re-chosen with round 9's (since 2026-12-04;
#: ``.../round9``): the same setting, objective 0.650 — now *above* the 0.633 of no signal, and
#: study 9 found it costing cells (17/30 against 23/30 without it). Round 11 (with round 11's
#: seek constants, the floor; ``.../round11``, ``--brake``) added ``climb`` 0, the signal as a
#: brake: chosen β_val 1.0, evidence −0.2, ``climb`` 0 (objective 0.572 against 0.573 without
#: the signal and 0.634 for round 9's setting; the grid's overall best, 0.558, lets the rates
#: rise in the constructed case). It lowers a rate only while the validation cosine's
#: signal-to-noise ratio stays below −0.2 (steps that consistently raise the validation loss).
#: Round 12 (``.../round12``, ``--gap``: animal_cnn added to the suite after study 9 showed the
#: brake costing it) chose β_val 0.3 with the same evidence and ``climb`` (0.544; ``gap`` 1 lost
#: in every pairing, 0.617-0.833, though it helped digits_mlp) — and every setting scored above
#: the 0.523 of no signal on that suite. The hold (``hold`` 40 steps, ``loss_decay`` 0.5,
#: ``plateau_cut`` 0.5; 2026-12-05; two observations at every 20) was chosen on a development
#: grid of study 1's six tasks (seeds 100-102) and adopted by the rule written before its check
#: on fresh seeds 46-51 (``experiments/results/fit_controller/val_hold/protocol.md``): 15/30
#: cells within 10% of best-of-grid Adam against 10/30 without it, paired mean log-ratio -0.015
#: (-0.024 to -0.005),
#: animal_cnn -0.171, digits_mlp +0.083. Then 60 seeds of the few-shot task showed the cut
#: costing it (1.01 -> 1.09x at lr0 1e-3); ``cut_after`` 80 (the cut waits 80 steps without a new
#: best) replaced the cut at 40 by the same rule on the same seeds: 15/30 cells against 15/30,
#: paired mean log-ratio -0.014 (-0.021 to -0.009), no task above +0.015. Checkpoints from before
#: the hold resume without it.
VALIDATION_DEFAULTS: dict[str, float] = {
    "hypergrad_lr": 0.3,
    "signal_decay": 0.7,
    "signal_sq_decay": 0.95,
    "evidence": -0.2,
    "train_weight": 1.0,
    "climb": 0.0,
    "gap": 0.0,
    "noise_hold": 0.0,
    "hold": 40.0,
    "loss_decay": 0.5,
    "plateau_cut": 0.5,
    "cut_after": 80.0,
    "rewind": 0.0,
    "track_steps": 400.0,
    **RAY_DEFAULTS,  # the ray ceiling's (off: ray_steps 0)
}

#: What the other rules take where the caller does not say: their own update with the
#: validation gradient, up and down (round 11's brake was chosen for the seek rule only; these
#: are the values those rules had before it; the additive rule's β is the group's own).
PLAIN_RULE_VALIDATION_DEFAULTS: dict[str, float] = {"hypergrad_lr": 0.3, "climb": 1.0}

#: The keys only the seek rule reads (its running averages, the evidence threshold, the gap, the
#: gradient gate's hold and the loss hold); the other rules read ``hypergrad_lr``, ``climb`` and
#: ``train_weight``, and refuse these when given (a setting that would be silently ignored).
SEEK_ONLY_VALIDATION_KEYS: frozenset[str] = frozenset({
    "signal_decay", "signal_sq_decay", "evidence", "gap", "noise_hold", "hold", "loss_decay",
    "plateau_cut", "cut_after", "rewind", "track_steps", "ray_steps", "ray_tau", "ray_persist",
    "ray_before", "ray_target", "ray_floor", "ray_clock", "ray_gate",
})  # fmt: skip

_BOUNDS: dict[str, tuple[float, float, bool]] = {  # name: (low, high, low is exclusive)
    "hypergrad_lr": (0.0, math.inf, False),
    "signal_decay": (0.0, 1.0, False),
    "signal_sq_decay": (0.0, 1.0, False),
    "evidence": (-1.0, 1.0, False),
    "train_weight": (0.0, 1.0, False),
    "climb": (0.0, 1.0, False),
    "gap": (0.0, 1.0, False),
    "noise_hold": (0.0, 10.0, False),
    "hold": (0.0, 1e9, False),
    "loss_decay": (0.0, 1.0, False),
    "plateau_cut": (0.0, 1.0, True),
    "cut_after": (0.0, 1e9, False),
    "rewind": (0.0, 1.0, False),
    "track_steps": (0.0, 1e12, False),
    "ray_steps": (0.0, 1e12, False),
    "ray_tau": (-1.0, 1.0, False),
    "ray_persist": (1.0, 1e9, False),
    "ray_before": (0.0, 1.0, False),
    "ray_target": (0.0, 1e3, True),
    "ray_floor": (0.0, 1.0, True),
    "ray_clock": (0.0, 1.0, False),
    "ray_gate": (0.0, 1.0, True),
}


def resolve_validation(options: Mapping[str, float] | None) -> dict[str, float]:
    """:data:`VALIDATION_DEFAULTS` overridden by ``options``; ``ValueError`` names a bad key."""
    resolved = resolve_constants("validation", VALIDATION_DEFAULTS, _BOUNDS, options, finite=True)
    if resolved["rewind"] > 0 and resolved["hold"] <= 0:
        raise ValueError(
            f"Invalid value for validation['rewind']: {resolved['rewind']} needs the hold "
            f"(validation['hold'] > 0, got {resolved['hold']}): the rewind goes back when the "
            "hold's cut fires"
        )
    check_ray_options(resolved)
    return resolved


def tracking_scale(options: Mapping[str, float]) -> float:
    """The factor on a seek group's tracking ``β`` in a run of known length (``track_steps``
    ``S`` and the budget ``ray_steps`` ``T`` both > 0; else 1): ``max(1, S / T)``, so that a run
    shorter than ``S`` steps can move a rate as far as an ``S``-step run can. A key absent from
    a checkpoint's options (saved before it) reads 0: off."""
    budget = options.get("ray_steps", 0.0)
    span = options.get("track_steps", 0.0)
    if budget <= 0 or span <= 0:
        return 1.0
    return max(1.0, span / budget)


class ValidationUpdate(NamedTuple):
    """New multipliers, the observation's all-finite flag and the new statistics (already gated
    by the flag: a skipped observation returns the old ones)."""

    rates: list[Tensor]
    finite: Tensor
    stats: list[Tensor]
    rewind: Rewind | None = None


def validation_adapt_rates(
    rates: Sequence[Tensor],
    stats: Sequence[Tensor],
    val_grads: Sequence[Tensor] | None,
    directions: Sequence[Tensor],
    *,
    lr: float | Tensor,
    rule: str,
    granularity: str,
    lr_bounds: tuple[float, float],
    options: Mapping[str, float],
    controllers: Sequence[Tensor] | None = None,
    seek: Mapping[str, Any] | None = None,
    grads_finite: Tensor | None = None,
    shards: ShardReducer | None = None,
    loss: Tensor | None = None,
) -> ValidationUpdate:
    """The rates after one validation observation (pure; equations in the module docstring).

    ``val_grads``: ``∇L_val(θ_t)`` per parameter; ``directions``: the last step's ``d_t``.
    ``controllers``/``seek``: the seek rule's (read for the phase and the ceiling, unchanged).
    ``grads_finite``: and-ed into the flag (e.g. whether the validation loss itself is finite).
    ``loss``: the validation loss (0-d; the seek rule's hold reads it; None: the loss statistics
    stay as they are and nothing is held).
    ``val_grads`` None: an observation of the ``loss`` alone (seek rule with the hold; see
    :func:`loss_only_flags`): the hold and the rewind act, the validation signal does not.
    """
    if rule == "seek":
        if controllers is None or seek is None:
            raise ValueError("rule='seek' needs controllers and seek constants")
        if val_grads is None:
            signals = None
            finite, active = loss_only_flags(loss, directions, grads_finite, shards)
        else:
            signals, _, finite, active, _ = seek_signals(
                val_grads, directions, granularity, grads_finite=grads_finite, shards=shards
            )
        starts = rates_in_use(rates, lr, lr_bounds)  # the rates in use: what the rule moves
        new_rates, new_stats, rewind = seek_validation_update(
            starts, controllers, stats, signals, active, [d.numel() for d in directions],
            options=options, seek=seek, granularity=granularity, loss=loss,
        )  # fmt: skip
        new_rates = [
            clamp_rates(n, lr, lr_bounds, previous=r, start=s)
            for n, r, s in zip(new_rates, rates, starts)
        ]
        return ValidationUpdate(new_rates, finite, new_stats, rewind)
    if val_grads is None:
        raise ValueError(
            f"Invalid observation for rule={rule!r}: the loss alone (no validation gradient) "
            "moves rates only through the seek rule's hold"
        )
    dots, g_norms, d_norms = inner_products(
        val_grads, directions, granularity, rule == "normalized"
    )
    finite = all_finite(dots if granularity != "element" else val_grads)
    if grads_finite is not None:
        finite = finite & grads_finite.to(finite.device)
    if shards is not None:
        finite = shards.all(finite)
    # as for seek: no last direction yet (before the first step) is no observation
    finite = finite & _any_moved(directions, finite.device, shards)
    moved = update_rates(
        rates, dots, g_norms, d_norms, lr=lr, hypergrad_lr=options["hypergrad_lr"], rule=rule,
        granularity=granularity, lr_bounds=lr_bounds, shards=shards,
    )  # fmt: skip
    climb = options.get("climb", 1.0)
    if climb != 1.0:
        moved = [_scale_rises(n, r, climb, rule) for n, r in zip(moved, rates)]
    new_rates = [torch.where(finite.to(r.device), n, r) for n, r in zip(moved, rates)]
    new_stats = [torch.where(finite.to(s.device), s + _count_one(s), s) for s in stats]
    return ValidationUpdate(new_rates, finite, new_stats)


def loss_only_flags(
    loss: Tensor | None,
    directions: Sequence[Tensor],
    grads_finite: Tensor | None = None,
    shards: ShardReducer | None = None,
) -> tuple[Tensor, Tensor]:
    """``(finite, active)`` of an observation of the loss alone: the loss is finite (and
    ``grads_finite``), over the ranks with ``shards``; active when also some parameter has a
    last direction (as :func:`~metalr.functional._signals.seek_signals` flags it: before the
    first step there is nothing to hold)."""
    if loss is None:
        raise ValueError("an observation of the loss alone needs the loss")
    device = directions[0].device if directions else loss.device
    finite = torch.isfinite(loss.detach()).to(device).reshape(())
    if grads_finite is not None:
        finite = finite & grads_finite.to(device)
    if shards is not None:
        finite = shards.all(finite)
    return finite, finite & _any_moved(directions, device, shards)


def _any_moved(directions: Sequence[Tensor], device: Any, shards: ShardReducer | None) -> Tensor:
    """Whether some direction is nonzero (over the ranks with ``shards``)."""
    moved = torch.stack([full_value((d != 0).any()).to(device) for d in directions]).any()
    if shards is not None:
        moved = shards.all(~moved).logical_not()
    return moved


def _scale_rises(new: Tensor, old: Tensor, climb: float, rule: str) -> Tensor:
    """A rise of the rate scaled by ``climb`` (normalized: its log-move; additive: its move)."""
    if rule == "normalized":
        scaled = old * torch.pow(new / old.clamp_min(torch.finfo(old.dtype).tiny), climb)
    else:
        scaled = old + climb * (new - old)
    return torch.where(new > old, scaled, new)


def _count_one(stats: Tensor) -> Tensor:
    one = torch.zeros_like(stats)
    one[VAL_COUNT] = 1
    return one
