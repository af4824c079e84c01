r"""The ``"seek"`` rule: a controller that finds the learning-rate scale, then tracks it.

The ``"normalized"`` rule moves ``log m`` by ``β · cos(g_t, d_{t-1})``. Under minibatch noise the
cosine is small even when the rate is decades too low, so it climbs far below ``β`` per step, and
from a rate that is too large the first steps do damage before any signal arrives. ``"seek"``
keeps the same hypergradient (Baydin et al. 2018: ``∂L(θ_t)/∂α_{t-1} = -⟨g_t, d_{t-1}⟩``) but
reads it in two phases, like an online learning-rate range test (Smith 2017) that the
hypergradient itself stops:

**Phase 1, ramp.** Every multiplier starts at ``m_0 = max(init_scale, init_floor / lr)`` (below
the user's ``lr``, which is a hint, not a sentence; with ``init_floor > 0`` the effective rate
starts at ``init_floor`` at least, so a hint decades too small costs no ramp steps below it) and
grows geometrically, with a log-step that accelerates while the signal says "too small"
(Rprop's growth)::

    log m ← log m + ρ_t,        ρ_{t+1} = min(ρ_t · ramp_growth, ramp_max),   ρ_1 = ramp_rate

(with the fitted defaults, ``ramp_rate`` 0.311 and ``ramp_growth`` 1.12, the first step climbs
×1.37; the two speeds below then hold it at ×1.32 a step far from the edge, a decade in about
eight steps, and ×1.11 near it)

Optionally the ramp has two speeds: while ``F_t > slow_zone · P_t`` (far from the edge, defined
below) the step may grow to ``ramp_fast`` instead of ``ramp_max``::

    ρ_{t+1} = min(ρ_t · ramp_growth, ramp_fast if F_t > slow_zone · P_t else ramp_max)

(``slow_zone = 1`` is one speed, the ramp of the first fit; round 7 of
``experiments/fit_controller.py`` fitted ``ramp_fast`` 0.274 while ``F_t > 0.924 P_t``).

With ``far_decay > 0`` the far test reads its own, slower average of the group cosine and that
average's peak instead (``F`` decays fast so that the turn is seen early, and the running peak of a
fast, noisy average is a noise maximum: ``F`` then seldom stays within ``slow_zone`` of it and the
ramp runs at its slow speed far from the edge)::

    S_t = far_decay · S_{t-1} + (1 - far_decay) · C_t,    Q_t = max_{s≤t} S_s,    far: S_t > slow_zone · Q_t

(defaults, round 9 of the fit: ``far_decay`` 0.132, ``ramp_fast`` 0.278 while ``S_t > 0.893 Q_t``,
else ``ramp_max`` 0.100. The fit kept the average fast: slower ones, 0.5-0.9, found the rate from
1e-4× in 34-69 steps instead of 52-130 but cost the tasks that overfit and the few-shot task more
than that saved.)

The ramp watches the *group* cosine ``C_t = Σ⟨g, d⟩ / (‖g‖ ‖d‖)`` (all tensors of the param group
together) through a fast average ``F_t = f F_{t-1} + (1 - f) C_t`` (``f = turn_decay``) and its peak
``P_t = max_{s≤t} F_s``. When ``F_t ≤ turn_threshold · P_t`` (successive steps agree less and
less: the rate approaches the edge of stability; ``turn_threshold ≤ 0`` waits until they
disagree) the ramp ends and every multiplier is cut::

    log m ← log m − turn_lag · ρ_t + log(turn_cut),    ceiling ← log m + log(headroom)

(the average sees the turn a few steps late: ``turn_lag`` ramp steps are rolled back first).

Optionally a turn can be taken back (AdaLRS-style: a decision the signal contradicts is undone).
Within ``resume_window`` steps of the first turn, a settled tensor whose fast average is back
above ``resume_level · P`` (the dip was minibatch noise, as on a CNN whose loss has not moved yet
at a tiny rate) ramps again from ``ramp_rate`` with no ceiling, until the next turn::

    if 0 < s_t ≤ resume_window and F_t ≥ resume_level · P_t:   ρ ← ramp_rate,  ceiling ← +∞

(``s_t``: steps since the first turn, 0 before it; AdamHD's defaults: within 45 steps, back
above 0.80 of the peak; SGD-HD's ``resume_window = 0``: never).

**Phase 2, track.** Each rate follows its own signal ``c_t`` (the tensor's cosine; the group's
for ``granularity="group"``; the sign of ``g·d`` per element), normalised by its running scale
(Adam on the log-rate, as in gdtuo's stacked optimizers and MetaOptimize), so a consistent signal
moves it at ``β`` per step and noise barely moves it::

    μ_t = b1 μ_{t-1} + (1 - b1) c_t,    ν_t = b2 ν_{t-1} + (1 - b2) c_t²     (bias-corrected)
    log m ← min(log m + β · (μ̂_t / (√ν̂_t + 1e-8) − evidence),  ceiling)

``μ̂/√ν̂`` lies in [-1, 1]: it is the signal-to-noise ratio of the cosine. A rate climbs only
while successive steps agree by more than ``evidence``, and falls at up to ``β · evidence`` per
step when the signal is noise (the annealing a fixed rate lacks).

Optionally the group's gradient norm gates the tracking step (off with ``vanish`` and
``noise_hold`` at 0). ``G_t`` is a running average of ``‖g_t‖`` (decay ``vanish_decay``) and
``H_t`` its peak; ``noise_hold`` hands the evidence back while the gradient is near its peak (a
model still learning holds its rate on a noisy signal instead of annealing it; the hold slows a
fall, at most to a standstill, and never adds a climb), and ``vanish`` removes the climbs once
the gradient has collapsed (an interpolated training loss, where a consistent signal asks for a
rate the validation loss does not want)::

    track ← μ̂_t/√ν̂_t − evidence
    track ← min(track + noise_hold · evidence · G_t/H_t, 0)   where track < 0
    track ← min(track, 0) − vanish_fall · evidence            where G_t < vanish · H_t

(``vanish_fall`` > 0: a collapsed gradient also anneals the rate, as noise would.) The tracking
step of per-element rates is their sign, which neither term reads. AdamHD's defaults gate with
``vanish`` 0.01 and hold with ``noise_hold`` 2 (since 2026-12-07: while ``G_t ≥ H_t/2`` the
evidence is handed back whole and a rate falls only on a signal that says "too large"); SGD-HD's
set has neither.

Optionally (``horizon = μ > 0``; off by default) the tracking signal compares the gradient with
a discounted trail of the steps taken instead of the last one, ``c_t = cos(g_t, Z_{t-1})`` with
``Z_t = μ Z_{t-1} + η m d_t`` (MARTHE's discounted forward-mode hypergradient with the identity
for the step's Jacobian: oscillating steps cancel in ``Z``, steady progress adds up; see
:mod:`metalr.functional._trail`). The ramp and the turn still read the last step's group cosine.

At tensor granularity the rates of one group are then tied within a factor ``tie`` of their
size-weighted geometric mean (a tensor's rate cannot drift decades away from the rest).

State: one small vector per parameter tensor (``CONTROLLER_SIZE`` entries: ramp step, fast
average, μ, ν, ceiling, count, peak, steps since the first turn, the far test's average and its
peak, the gradient norm's average and its peak), in ``optimizer.state[p]['hd_controller']``.
Per-element rates add no state beyond the rate buffer. A step whose gradients are not finite,
or that has no previous direction yet (``‖d_{t-1}‖ = 0``, the first step), leaves rates and
controller untouched.

The constants (:data:`SEEK_DEFAULTS`) were fitted by Bayesian search over full-length training
runs of a training suite of tasks × initial rates (``experiments/fit_controller.py``; the
held-out tasks of :mod:`metalr.workbench.heldout_tasks` were never used). ``β`` is the group's
``hypergrad_lr``. SGD-HD has its own set (:data:`SGD_SEEK_DEFAULTS`, fitted the same way against
SGD with momentum 0.9; HyperLR wrapping ``torch.optim.SGD`` uses it too); AdamHD, AdamWHD and
HyperLR wrapping anything else use :data:`SEEK_DEFAULTS`.

How the decided moves reach the rates (the ceiling, the tie, the skip) is
:mod:`metalr.functional._rate_moves`. Everything here is pure (``torch.where``, no Python
branches on tensor values, no host sync).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metalr.functional._common import safe_sqrt
from metalr.functional._rate_moves import (
    MoveOptions,
    RateMove,
    beta_vector,
    log_level,
    move_rates,
    tensor_signal,
    vector_moves,
)
from metalr.functional._seek_constants import (
    DEFAULT_SEEK_HYPERGRAD_LR,
    DEFAULT_SGD_SEEK_HYPERGRAD_LR,
    FAMILIES,
    SEEK_DEFAULTS,
    SGD_SEEK_DEFAULTS,
    resolve_seek,
)  # re-exported: the rule's fitted constants

#: Entries of a controller vector.
RAMP, FAST, MEAN, SQ, CEILING, COUNT, PEAK, SINCE, SLOW, SLOW_PEAK, GRAD, GRAD_PEAK = range(12)
CONTROLLER_SIZE = 12

__all__ = [
    "CONTROLLER_SIZE",
    "DEFAULT_SEEK_HYPERGRAD_LR",
    "DEFAULT_SGD_SEEK_HYPERGRAD_LR",
    "FAMILIES",
    "SEEK_DEFAULTS",
    "SGD_SEEK_DEFAULTS",
    "initial_controller",
    "resolve_seek",
    "seek_update",
    "seek_update_stacked",
    "settled_controller",
]


def initial_controller(param: Tensor, dtype: torch.dtype, seek: Mapping[str, float]) -> Tensor:
    """A fresh controller vector for ``param``: ramping at ``ramp_rate``, no ceiling yet."""
    c = torch.zeros(CONTROLLER_SIZE, dtype=dtype, device=param.device)
    c[RAMP] = seek["ramp_rate"]
    c[CEILING] = math.inf
    return c


def settled_controller(rate: Tensor, seek: Mapping[str, float]) -> Tensor:
    """A controller that starts in the tracking phase at ``rate`` (e.g. a meta-learned prior's):
    no ramp, ceiling ``headroom`` × the rate (its largest element, per element)."""
    c = torch.zeros(CONTROLLER_SIZE, dtype=rate.dtype, device=rate.device)
    level = rate.amax() if rate.dim() > 0 else rate
    c[CEILING] = torch.log(level) + math.log(seek["headroom"])
    return c


def seek_update(
    rates: Sequence[Tensor],
    controllers: Sequence[Tensor],
    signals: Sequence[Tensor],
    group_signal: Tensor,
    active: Tensor,
    sizes: Sequence[int],
    *,
    hypergrad_lr: float | Tensor | Sequence[Tensor],
    seek: Mapping[str, Any],
    granularity: str,
    grad_norm: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """New multipliers and controller vectors of one param group (pure).

    ``signals[i]``: rate ``i``'s signal ``c_t`` (a 0-d cosine; per element, the sign of ``g·d``);
    ``group_signal``: the group cosine ``C_t`` (0-d); ``active``: 0-d bool, false to leave
    everything as it is (no previous direction yet, or a skipped step); ``sizes[i]``: elements of
    tensor ``i`` (weights of the tie's mean). ``seek["track"]`` (optional, default 1): the weight
    of the training signal in phase 2, lowered once the rates also follow the validation signal
    (:func:`seek_validation_update`; 0: settled rates move only at validation observations).
    The ramp and the turn always run on the training signal. ``grad_norm``: the group's
    gradient norm ``‖g_t‖`` (0-d), read by the gradient gate (``vanish``, ``noise_hold``); None
    leaves the gate's averages as they are (and the gate off this step).
    """
    if not rates:
        return [], []
    ctrl = torch.stack([c.to(controllers[0].dtype) for c in controllers])  # [n, K]
    dtype = ctrl.dtype
    sig = torch.stack(
        [tensor_signal(s, granularity).to(device=ctrl.device, dtype=dtype) for s in signals]
    )
    log_levels = torch.stack([log_level(r, granularity).to(dtype) for r in rates])
    step = _controller_step(ctrl, sig, group_signal, log_levels, seek, grad_norm)
    act = active.to(ctrl.device)
    options = MoveOptions(sizes, hypergrad_lr, float(seek.get("track", 1.0)), seek, granularity)
    new_rates = move_rates(rates, signals, step.rate_move(act), options)
    new_ctrl = torch.where(act, step.controllers, ctrl)
    return new_rates, [c.to(o.dtype) for c, o in zip(new_ctrl.unbind(0), controllers)]


def seek_update_stacked(
    rates: Tensor,
    controllers: Tensor,
    signals: Tensor,
    group_signal: Tensor,
    active: Tensor,
    sizes: Sequence[int],
    *,
    hypergrad_lr: float | Tensor | Sequence[Tensor],
    seek: Mapping[str, Any],
    granularity: str,
    grad_norm: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`seek_update` for one rate per tensor, stacked: ``rates`` and ``signals`` are
    ``[n]``, ``controllers`` ``[n, CONTROLLER_SIZE]`` (all of one dtype and device); returns the
    new ``(rates, controllers)`` stacked the same way. The same operations as the list form,
    without a stack and an unbind per tensor (a fused step's bookkeeping). ``hypergrad_lr``: a
    number, a tensor, or one ``β`` per rate."""
    if granularity == "element":
        raise ValueError("seek_update_stacked takes group/tensor granularity, not 'element'")
    step = _controller_step(controllers, signals, group_signal, torch.log(rates), seek, grad_norm)
    act = active.to(controllers.device)
    beta = beta_vector(hypergrad_lr, rates)
    options = MoveOptions(sizes, beta, float(seek.get("track", 1.0)), seek, granularity)
    new_rates = vector_moves(rates, step.rate_move(act), options)
    return new_rates, torch.where(act, step.controllers, controllers)


class _ControllerStep(NamedTuple):
    """One step of the controllers (before the skip): their new values, which tensors were
    ramping, the ramp's (or the turn's) log-move, the tracking signal and the new ceilings."""

    controllers: Tensor
    ramping: Tensor
    ramp_move: Tensor
    track: Tensor
    ceiling: Tensor

    def rate_move(self, act: Tensor) -> RateMove:
        """The rates' part of the step, with ``act`` (whether the step is active)."""
        return RateMove(self.ramping, self.ramp_move, self.track, self.ceiling, act)


def _controller_step(
    ctrl: Tensor,
    signals: Tensor,
    group_signal: Tensor,
    log_levels: Tensor,
    seek: Mapping[str, Any],
    grad_norm: Tensor | None = None,
) -> _ControllerStep:
    """The ramp, the turn and the signal's running averages for stacked controllers ``[n, K]``,
    given each tensor's signal ``[n]``, the group cosine, each tensor's log-level ``[n]``
    (the level a turn sets the ceiling from) and the group's gradient norm (0-d, or None)."""
    dtype = ctrl.dtype
    g_sig = group_signal.to(device=ctrl.device, dtype=dtype)
    ramp, fast, peak = ctrl[:, RAMP], ctrl[:, FAST], ctrl[:, PEAK]
    mean, sq, ceiling, count = ctrl[:, MEAN], ctrl[:, SQ], ctrl[:, CEILING], ctrl[:, COUNT]

    new_fast = seek["turn_decay"] * fast + (1 - seek["turn_decay"]) * g_sig
    ramping = ramp > 0
    new_peak = torch.where(ramping, torch.maximum(peak, new_fast), peak)
    turn = ramping & (new_fast <= seek["turn_threshold"] * new_peak)
    keep_ramping = ramping & ~turn
    # steps since the first turn (0 before it); within resume_window of it, a settled tensor
    # whose fast average is back above resume_level x the peak takes the turn for noise: ramp again
    since = ctrl[:, SINCE]
    new_since = torch.where((since > 0) | turn, since + 1, since)
    resuming = seek["resume_window"] > 0  # the re-opened ramp is on (no extra ops when off)
    resume = (
        ~ramping & (since > 0) & (since <= seek["resume_window"])
        & (new_fast >= seek["resume_level"] * peak)
    ) if resuming else None  # fmt: skip

    new_mean, new_sq, new_count, track = _normalised_signal(mean, sq, count, signals, seek)
    grad_avg, grad_peak = ctrl[:, GRAD], ctrl[:, GRAD_PEAK]
    gated = seek["vanish"] > 0 or seek["noise_hold"] > 0
    if gated and grad_norm is not None:  # the gradient norm's gate is on
        grad_avg, grad_peak, track = _gradient_gate(grad_avg, grad_peak, grad_norm, track, seek)

    # log-space moves per tensor (the ramp, or the turn's roll-back and cut)
    log_cut = math.log(seek["turn_cut"])
    # the turn is seen late (the average lags): roll back turn_lag ramp steps, then cut
    rollback = log_cut - seek["turn_lag"] * ramp
    cut_move = torch.where(turn, rollback, torch.zeros_like(ramp))
    ramp_move = torch.where(keep_ramping, ramp, cut_move)
    grown = ramp * seek["ramp_growth"]
    slow, slow_peak = ctrl[:, SLOW], ctrl[:, SLOW_PEAK]
    if seek["slow_zone"] < 1 and seek["ramp_fast"] > seek["ramp_max"]:  # the two-speed ramp is on
        # far from the edge (F above slow_zone · P) the step may grow to ramp_fast; near it, ramp_max
        if seek["far_decay"] > 0:  # the test on a slower average S and its peak Q instead
            slow = seek["far_decay"] * slow + (1 - seek["far_decay"]) * g_sig
            slow_peak = torch.where(ramping, torch.maximum(slow_peak, slow), slow_peak)
            far = slow > seek["slow_zone"] * slow_peak
        else:
            far = new_fast > seek["slow_zone"] * new_peak
        fast_cap = torch.clamp(grown, max=seek["ramp_fast"])
        grown = torch.where(far, fast_cap, torch.clamp(grown, max=seek["ramp_max"]))
    else:
        grown = torch.clamp(grown, max=seek["ramp_max"])
    restart = seek["ramp_rate"] * resume.to(dtype) if resume is not None else 0.0
    new_ramp = torch.where(keep_ramping, grown, restart)
    new_ceiling = torch.where(
        turn, log_levels.to(dtype) + rollback + math.log(seek["headroom"]), ceiling
    )
    if resume is not None:
        new_ceiling = torch.where(resume, math.inf, new_ceiling)
    new_ctrl = torch.stack(
        [new_ramp, new_fast, new_mean, new_sq, new_ceiling, new_count, new_peak, new_since,
         slow, slow_peak, grad_avg, grad_peak], dim=1,
    )  # fmt: skip
    return _ControllerStep(new_ctrl, ramping, ramp_move, track, new_ceiling)


def _gradient_gate(
    grad_avg: Tensor, grad_peak: Tensor, grad_norm: Tensor, track: Tensor, seek: Mapping[str, Any]
) -> tuple[Tensor, Tensor, Tensor]:
    """What the group's gradient norm does to the tracking step: its running average ``G`` and
    peak ``H``, and the step with (``noise_hold``) the evidence handed back in proportion to
    ``G/H`` — while the gradient is still near its peak (the model is still learning) a noisy
    signal holds the rate instead of annealing it; the hold slows a fall, at most to a
    standstill, and leaves a climb as it is — and (``vanish``) its climbs removed once ``G`` has
    fallen below ``vanish`` × ``H`` (the training loss is interpolated: a consistent signal there
    asks for a rate the validation loss does not want)::

        G_t = vanish_decay · G_{t-1} + (1 − vanish_decay) · ‖g_t‖,    H_t = max_{s≤t} G_s
        track ← min(track + noise_hold · evidence · G_t / H_t, 0)   where track < 0
        track ← min(track, 0) − vanish_fall · evidence               where G_t < vanish · H_t
    """
    decay = seek["vanish_decay"]
    g = grad_norm.to(device=grad_avg.device, dtype=grad_avg.dtype)
    new_avg = decay * grad_avg + (1 - decay) * g
    new_peak = torch.maximum(grad_peak, new_avg)
    level = torch.where(new_peak > 0, new_avg / new_peak.clamp_min(1e-30), torch.ones_like(new_avg))
    if seek["noise_hold"] > 0:  # slows a fall, never turns it into a climb
        held = (track + seek["noise_hold"] * seek["evidence"] * level).clamp_max(0)
        track = torch.where(track < 0, held, track)
    if seek["vanish"] > 0:
        collapsed = track.clamp_max(0) - seek["vanish_fall"] * seek["evidence"]
        track = torch.where(level < seek["vanish"], collapsed, track)
    return new_avg, new_peak, track


def _normalised_signal(
    mean: Tensor,
    sq: Tensor,
    count: Tensor,
    sig: Tensor,
    constants: Mapping[str, Any],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of the running averages of the per-tensor signal and the tracking step they give:
    ``(μ, ν, count, μ̂/√ν̂ − evidence)`` (``constants``: ``signal_decay``, ``signal_sq_decay``,
    ``evidence``; the seek rule's for the training signal, the validation ones for that), from
    the per-tensor signals ``sig`` ``[n]`` (per element: their mean, :func:`tensor_signal`)."""
    b1, b2 = constants["signal_decay"], constants["signal_sq_decay"]
    new_count = count + 1
    new_mean = b1 * mean + (1 - b1) * sig
    new_sq = b2 * sq + (1 - b2) * sig * sig
    # the per-tensor normalised signal (in [-1, 1]) less the evidence it must exceed to climb
    snr = _bias_corrected_snr(new_mean, new_sq, new_count, b1, b2)
    return new_mean, new_sq, new_count, snr - constants["evidence"]


def _bias_corrected_snr(mean: Tensor, sq: Tensor, count: Tensor, b1: float, b2: float) -> Tensor:
    """``μ̂/(√ν̂ + 1e-8)`` of running averages with decays ``b1``, ``b2`` after ``count ≥ 1``
    updates (Adam's bias correction)."""
    m_hat = mean / (1 - torch.pow(torch.full_like(count, b1), count))
    v_hat = sq / (1 - torch.pow(torch.full_like(count, b2), count))
    return m_hat / (safe_sqrt(v_hat) + 1e-8)  # ν̂ = 0 before any signal: no 0·inf in backward
