"""How the seek rule's decisions move the rates (:mod:`metalr.functional._controller` decides).

Given, per rate, whether it still ramps, the ramp's (or the turn's) log-move, the tracking
signal and the ceiling (:class:`RateMove`), the new rates are::

    log m ← min(log m + ramp_move + [settled] · tracking · β · track,  ceiling)

(per element: ``β`` times the element's sign instead of the tensor's tracking signal), then, at
tensor granularity, tied within ``tie`` of their size-weighted geometric mean
(:mod:`metalr.functional._tie`), and kept where the step is not active. One rate per tensor of
one dtype and device runs as one stacked vector (:func:`vector_moves`); anything else rate by
rate, with the same operations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metalr.functional._common import full_value
from metalr.functional._tie import tie_list, tie_vector


class RateMove(NamedTuple):
    """What the controllers decided for this step, one entry per rate (stacked ``[n]``): which
    rates still ramp, the ramp's (or the turn's) log-move, the tracking signal, the new ceilings,
    and whether the step is active (a skipped step keeps every rate)."""

    ramping: Tensor
    ramp_move: Tensor
    track: Tensor
    ceiling: Tensor
    act: Tensor


class MoveOptions(NamedTuple):
    """How the rates move: tensor sizes (the tie's weights), ``β`` (a number, a tensor, or one per
    rate), the weight of the tracking step (0: settled rates hold), the constants, granularity."""

    sizes: Sequence[int]
    hypergrad_lr: float | Tensor | Sequence[Tensor]
    tracking: float
    seek: Mapping[str, Any]
    granularity: str


def move_rates(
    rates: Sequence[Tensor], signals: Sequence[Tensor], move: RateMove, options: MoveOptions
) -> list[Tensor]:
    """New rates: ``log m + ramp_move`` (+ ``tracking · β · track`` where settled; per element
    ``β`` times its sign), capped at the ceiling, tied, kept where the step is not active."""
    if _scalar_rates(rates, options.granularity):  # one rate per tensor: one vector's math
        return _scalar_moves(rates, move, options)
    return _per_rate_moves(rates, signals, move, options)


def _scalar_rates(rates: Sequence[Tensor], granularity: str) -> bool:
    """Whether every rate is 0-d, of one dtype and device (group/tensor granularity)."""
    first = rates[0]
    return granularity != "element" and all(
        r.dim() == 0 and r.dtype == first.dtype and r.device == first.device for r in rates
    )


def _scalar_moves(rates: Sequence[Tensor], move: RateMove, options: MoveOptions) -> list[Tensor]:
    """:func:`_per_rate_moves` for 0-d rates, as a handful of ops on one stacked vector
    (element for element the same operations, so the same values)."""
    rate_vec = torch.stack(list(rates))
    beta = beta_vector(options.hypergrad_lr, rate_vec)
    return list(vector_moves(rate_vec, move, options._replace(hypergrad_lr=beta)).unbind(0))


def beta_vector(hypergrad_lr: float | Tensor | Sequence[Tensor], like: Tensor) -> float | Tensor:
    """``hypergrad_lr`` as :func:`vector_moves` takes it: one ``β`` per rate stacked into a
    vector of ``like``'s dtype and device; a number or a tensor as it is."""
    if isinstance(hypergrad_lr, (list, tuple)):
        return torch.stack(
            [torch.as_tensor(b, dtype=like.dtype, device=like.device) for b in hypergrad_lr]
        )
    return hypergrad_lr


def vector_moves(rate_vec: Tensor, move: RateMove, options: MoveOptions) -> Tensor:
    """New stacked 0-d rates ``[n]``: :func:`move_rates` on one vector (``hypergrad_lr`` a
    number, a 0-d tensor or one ``β`` per rate ``[n]``)."""
    dtype = rate_vec.dtype
    if options.tracking == 0:
        step = torch.zeros_like(rate_vec)
    else:
        step = options.tracking * options.hypergrad_lr * move.track.to(dtype)
    log_move = move.ramp_move.to(dtype) + torch.where(~move.ramping, step, torch.zeros_like(step))
    log_new = torch.minimum(torch.log(rate_vec) + log_move, move.ceiling.to(dtype))
    if options.granularity == "tensor" and len(options.sizes) > 1:
        log_new = tie_vector(log_new, options.sizes, options.seek["tie"])
    return torch.where(move.act, torch.exp(log_new), rate_vec)


def _per_rate_moves(
    rates: Sequence[Tensor], signals: Sequence[Tensor], move: RateMove, options: MoveOptions
) -> list[Tensor]:
    """New rates, one at a time (per-element rates, or rates of mixed dtypes/devices): the ramp's
    or the turn's move, the tracking step of settled rates, the ceiling, the tie, the skip."""
    hypergrad_lr, tracking, granularity = (
        options.hypergrad_lr,
        options.tracking,
        options.granularity,
    )
    per_tensor_beta = isinstance(hypergrad_lr, (list, tuple))
    moved_logs = []
    for i, rate in enumerate(rates):
        beta = hypergrad_lr[i] if per_tensor_beta else hypergrad_lr
        if tracking == 0:  # only the validation signal moves settled rates (observe_validation)
            step = torch.zeros((), dtype=rate.dtype, device=rate.device)
        elif granularity == "element":
            step = tracking * beta * signals[i].to(rate.dtype)
        else:
            step = tracking * beta * move.track[i].to(rate.dtype)
        settled = ~move.ramping[i]
        log_move = move.ramp_move[i].to(rate.dtype) + torch.where(
            settled, step, torch.zeros_like(step)
        )
        log_new = torch.minimum(torch.log(rate) + log_move, move.ceiling[i].to(rate.dtype))
        moved_logs.append(log_new)
    if granularity == "tensor" and len(rates) > 1:
        moved_logs = tie_list(moved_logs, options.sizes, options.seek["tie"])
    return [
        torch.where(move.act, torch.exp(log_new), rate) for rate, log_new in zip(rates, moved_logs)
    ]


def tensor_signal(signal: Tensor, granularity: str) -> Tensor:
    """The 0-d signal a tensor's running averages follow (elements: their mean sign, over every
    rank for a sharded tensor)."""
    return full_value(signal.mean()) if granularity == "element" and signal.dim() > 0 else signal


def log_level(rate: Tensor, granularity: str) -> Tensor:
    """The log-rate a tensor's ceiling is measured from (elements: their largest)."""
    if granularity == "element" and rate.dim() > 0:
        return torch.log(full_value(rate.amax()))
    return torch.log(rate)
