"""The seek rule's tracking phase driven by a validation observation (pure): the face of
:func:`seek_validation_update` that ``observe_validation`` calls (through
:func:`metalr.functional.validation.validation_adapt_rates`), with the hold and the rewind of
:mod:`metalr.functional._validation_state`. The training face is
:mod:`metalr.functional._controller`, whose running averages this module shares.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metalr.functional._controller import (
    CEILING,
    COUNT,
    MEAN,
    RAMP,
    SQ,
    _bias_corrected_snr,
    _normalised_signal,
)
from metalr.functional._rate_moves import (
    MoveOptions,
    RateMove,
    log_level,
    move_rates,
    tensor_signal,
)
from metalr.functional._validation_state import (
    LEVEL,
    LOSS_AVG,
    Rewind,
    held_rates,
    loss_trend,
)


def _training_snr(ctrl: Tensor, seek: Mapping[str, Any]) -> Tensor:
    """The training signal's ``μ̂/√ν̂`` per tensor ``[n]`` from the stacked controllers (0 before
    its first step; the count is clamped there so that no branch divides by zero)."""
    count = ctrl[:, COUNT]
    snr = _bias_corrected_snr(ctrl[:, MEAN], ctrl[:, SQ], count.clamp_min(1),
                              seek["signal_decay"], seek["signal_sq_decay"])  # fmt: skip
    return torch.where(count > 0, snr, torch.zeros_like(count))


def _element_track(sign: Tensor, shift: float | Tensor, i: int, climb: float) -> Tensor:
    """An element's validation step before ``β_val``: its sign less the evidence (and the gap
    term of its tensor, ``shift[i]``), positive parts times ``climb``: the per-element form of
    ``μ̂/√ν̂ − evidence − gap · s^train`` (an element has no running averages of its own)."""
    offset = shift[i].to(sign.dtype) if isinstance(shift, Tensor) else shift
    step = sign - offset
    return torch.where(step > 0, climb * step, step) if climb != 1.0 else step


def seek_validation_update(
    rates: Sequence[Tensor],
    controllers: Sequence[Tensor],
    stats: Sequence[Tensor],
    signals: Sequence[Tensor] | None,
    active: Tensor,
    sizes: Sequence[int],
    *,
    options: Mapping[str, float],
    seek: Mapping[str, Any],
    granularity: str,
    loss: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor], Rewind | None]:
    """New multipliers and validation statistics after one validation observation (pure), and
    with ``options["rewind"]`` (and the hold) what the rewind does to the parameters.

    The tracking phase of the seek rule, driven by the validation signal ``c^val`` (the cosine
    between the validation gradient and the last direction; per element its sign) with its own
    running averages ``stats[i] = (μ, ν, count)`` (see :mod:`metalr.functional.validation`)::

        μ ← b1 μ + (1 - b1) c^val,   ν ← b2 ν + (1 - b2) (c^val)²            (bias-corrected)
        log m ← min(log m + β_val · (μ̂/√ν̂ − evidence), ceiling)         (settled rates only)

    Per element the step is the element's own sign shaped the same way (no running averages:
    ``log m_e ← min(log m_e + β_val · climb⁺(sign_e − evidence − gap · s^train), ceiling)``, with
    ``climb⁺`` scaling positive steps by ``climb``), so with the defaults (``climb`` 0) an
    observation only ever lowers a rate, at every granularity.

    Rates still ramping (phase 1 runs on the training signal) hold still; their statistics are
    updated. At tensor granularity the rates are tied as in :func:`seek_update`.

    With ``options["hold"] = P > 0`` and the validation ``loss`` given, the move starts from the
    rates the hold leaves (:func:`~metalr.functional._validation_state.held_rates`): while the
    loss's running average has reached a new best within the last ``P`` training steps (the
    controllers' count), a settled rate is brought back up to its level after the previous
    observation (the training signal's anneal since then is undone); once it has not for
    ``max(P, cut_after)`` steps, it is multiplied by ``plateau_cut`` at each observation.
    With ``options["rewind"] > 0`` the third entry says which tensors' parameters become the
    snapshot (a new best, ``keep``) and which go back to it (a settled rate cut, ``restore``;
    :func:`~metalr.functional._validation_state.kept_snapshots` and
    :func:`~metalr.functional._validation_state.restored` apply them); else it is None.

    ``signals`` None is an observation of the loss alone (``observe_validation(loss,
    hypergradient=False)``): the hold and the rewind act, the validation signal's statistics
    and move are skipped.
    """
    if not rates:
        return [], [], None
    st = torch.stack([s.to(stats[0].dtype) for s in stats])  # [n, VALIDATION_SIZE]
    act = active.to(st.device)
    ctrl = torch.stack([c.to(st.dtype) for c in controllers])
    settled = ctrl[:, RAMP] <= 0
    loss_stats = st[:, LOSS_AVG:LEVEL]
    hold = options.get("hold", 0.0) > 0  # absent from checkpoints before it: off
    rewind = None
    if loss is not None:
        trend = loss_trend(loss_stats, loss, ctrl[:, COUNT], options)
        loss_stats = trend.stats
        if hold:
            rates = held_rates(
                rates,
                st[:, LEVEL],
                settled & act,
                trend.holding,
                trend.cutting,
                options,
                granularity,
            )
            if options.get("rewind", 0.0) > 0:
                rewind = Rewind(trend.improved & act, trend.cutting & settled & act)
    if signals is None:  # the loss alone: the hold's rates, the signal's statistics unchanged
        new_rates, signal_stats = list(rates), st[:, :LOSS_AVG]
    else:
        new_rates, signal_stats = _validation_move(
            rates, ctrl, st, signals, act, settled, sizes, options, seek, granularity
        )
    levels = st[:, LEVEL]  # read by the hold only: kept as it is when the hold is off
    if hold:
        levels = torch.stack([log_level(r, granularity).to(st.dtype) for r in new_rates])
        levels = torch.where(settled, levels, torch.full_like(levels, -math.inf))
    fresh = torch.cat([signal_stats, loss_stats, levels[:, None]], dim=1)
    new_st = torch.where(act, fresh, st)
    return new_rates, [n.to(s.dtype) for n, s in zip(new_st.unbind(0), stats)], rewind


def _validation_move(
    rates: Sequence[Tensor],
    ctrl: Tensor,
    st: Tensor,
    signals: Sequence[Tensor],
    act: Tensor,
    settled: Tensor,
    sizes: Sequence[int],
    options: Mapping[str, float],
    seek: Mapping[str, Any],
    granularity: str,
) -> tuple[list[Tensor], Tensor]:
    """The validation signal's move of the (held) rates and its statistics ``[n, 3]`` (μ, ν,
    count) after one observation (see :func:`seek_validation_update`)."""
    sig = torch.stack(
        [tensor_signal(s, granularity).to(device=st.device, dtype=st.dtype) for s in signals]
    )
    new_mean, new_sq, new_count, track = _normalised_signal(
        st[:, 0], st[:, 1], st[:, 2], sig, options
    )
    gap = options.get("gap", 0.0)  # absent from checkpoints before it: 0, the signal alone
    if gap != 0.0:  # how much less the validation data agree with the steps than the training data
        track = track - gap * _training_snr(ctrl, seek)
    climb = options.get("climb", 1.0)  # absent from checkpoints before it: 1, every move kept
    if climb != 1.0:  # a validation signal that may only (or mostly) hold rates back
        track = torch.where(track > 0, climb * track, track)
    if granularity == "element":  # each element's sign is shaped as the tensor's track is
        shift = options["evidence"] + (gap * _training_snr(ctrl, seek) if gap != 0.0 else 0.0)
        signals = [_element_track(s, shift, i, climb) for i, s in enumerate(signals)]
    move = RateMove(~settled, torch.zeros_like(ctrl[:, RAMP]), track, ctrl[:, CEILING], act)
    move_options = MoveOptions(sizes, options["hypergrad_lr"], 1.0, seek, granularity)
    new_rates = move_rates(rates, signals, move, move_options)
    return new_rates, torch.stack([new_mean, new_sq, new_count], dim=1)
