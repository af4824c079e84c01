"""The ``foreach`` (multi-tensor) face of the SGD-HD step: :func:`metalr.functional.sgd_hd`'s
default path, the same math as :func:`metalr.functional.sgd_hd_step` in fewer kernel launches
(checked equal in float64 by the tests), and momentum SGD through torch's fused kernel."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metalr.functional._common import (
    as_real_list,
    broadcast_rate,
    commit_update,
    from_real,
    host_readable,
    mutable_view,
    torch_fused_kernel_applies,
)
from metalr.functional._distributed import ShardReducer
from metalr.functional._hypergrad import RateUpdate, adapt_rates, rates_in_use
from metalr.functional._sgd_common import (
    SGDHDState,
    like,
    previous_directions,
    stores_prev_direction,
)


def _multi_tensor_sgd_hd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    prev_directions: list[Tensor | None],
    rates: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    hypergrad_lr: float | Tensor | Sequence[Tensor],
    rule: str,
    granularity: str,
    lr_bounds: tuple[float, float],
    maximize: bool = False,
    grads_finite: Tensor | None = None,
    shards: ShardReducer | None = None,
    controllers: Sequence[Tensor] | None = None,
    seek: Mapping[str, Any] | None = None,
    lagged: bool = False,
    trails: Sequence[Tensor] | None = None,
) -> SGDHDState | None:
    """In-place ``foreach`` twin of :func:`sgd_hd_step`.

    Returns the (possibly newly created) buffers so the caller can store them in its state, or
    None, having changed nothing, for a lagged step it leaves to the pure step (off the host, or
    with a non-finite gradient: the per-element skip).
    """
    if not params:
        return SGDHDState([], [], [], [])
    if lagged and not host_readable(rates[0]):
        return None
    grads = torch._foreach_neg(grads) if maximize else list(grads)
    prev = previous_directions(params, momentum_buffers, prev_directions, momentum, nesterov)
    update = adapt_rates(
        rates, grads, prev, lr=lr, hypergrad_lr=hypergrad_lr, rule=rule,
        granularity=granularity, lr_bounds=lr_bounds, grads_finite=grads_finite, shards=shards,
        controllers=controllers, seek=seek, trails=trails,
    )  # fmt: skip
    finite = update.finite
    del prev
    p_r = as_real_list(params)
    host = host_readable(rates[0])  # CPU eager: read the flag, run the finite step with scalars
    if host and not bool(finite):
        if lagged:
            return None
        return SGDHDState(list(params), list(momentum_buffers), list(prev_directions), list(rates))
    if momentum != 0 and not nesterov and torch_fused_kernel_applies("_fused_sgd_", params, rates):
        return _fused_kernel_update(
            params, grads, momentum_buffers, rates, controllers, update, host,
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            lagged=lagged, lr_bounds=lr_bounds,
        )  # fmt: skip
    if host:
        if not lagged:
            commit_update(rates, controllers, update, known_finite=True)
        keep: float | Tensor = 1.0
        d_r = as_real_list(grads)
        if weight_decay != 0:
            d_r = torch._foreach_add(d_r, p_r, alpha=weight_decay)
    else:
        commit_update(rates, controllers, update, known_finite=False)
        keep = finite.to(torch.float64)
        d_r = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in as_real_list(grads)]
        if weight_decay != 0:
            torch._foreach_add_(d_r, p_r, alpha=weight_decay)
    bufs = list(momentum_buffers)
    if momentum != 0:
        for i, buf in enumerate(bufs):
            if buf is None:  # first step: b_1 = g_1, as torch.optim.SGD (zero if skipped)
                bufs[i] = from_real(d_r[i] * like(keep, d_r[i]), params[i])
                continue
            b = mutable_view(as_real_list([buf])[0])
            # b ← b (1 - keep + keep μ) + keep (1 - τ) d: unchanged when the step is skipped.
            b.mul_(like(1 - keep + keep * momentum, b))
            b.add_(d_r[i] * like(keep * (1 - dampening), b))
        b_r = as_real_list(bufs)
        if nesterov:
            d_r = torch._foreach_add(d_r, b_r, alpha=momentum)
        else:
            d_r = b_r
    dirs = list(prev_directions)
    if stores_prev_direction(momentum, nesterov):
        for i, d in enumerate(d_r):
            if dirs[i] is None:
                dirs[i] = torch.zeros_like(params[i])
            old = mutable_view(as_real_list([dirs[i]])[0])
            old.copy_(d if host else torch.where(finite, d, old))
    neg_step = [
        (broadcast_rate(r, p) * like(-lr * keep, r)).to(d.dtype)
        for r, p, d in zip(rates_in_use(rates, lr, lr_bounds), params, d_r)
    ]
    torch._foreach_addcmul_(p_r, d_r, neg_step)
    if lagged:  # the new multipliers take effect from the next step (finite: host checked)
        commit_update(rates, controllers, update, known_finite=True)
    return SGDHDState(list(params), bufs, dirs, list(rates))


def _fused_kernel_update(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    rates: list[Tensor],
    controllers: Sequence[Tensor] | None,
    update: RateUpdate,
    host: bool,
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    lagged: bool = False,
    lr_bounds: tuple[float, float] = (0.0, math.inf),
) -> SGDHDState:
    """Momentum SGD through ``torch._fused_sgd_``, one call per tensor with ``lr · m`` as a
    tensor lr and ``found_inf`` doing the skip on the device (the previous direction is the
    momentum buffer, so nothing else is stored)."""
    finite = update.finite
    if host:  # finite for sure (the caller returned otherwise)
        if not lagged:
            commit_update(rates, controllers, update, known_finite=True)
        found_inf = None
    else:
        commit_update(rates, controllers, update, known_finite=False)
        found_inf = (~finite).to(torch.float32)
    bufs = list(momentum_buffers)
    for i, (p, g, rate) in enumerate(zip(params, grads, rates_in_use(rates, lr, lr_bounds))):
        first = bufs[i] is None
        if first:
            bufs[i] = torch.zeros_like(p) if found_inf is not None else torch.empty_like(p)
        torch._fused_sgd_(
            [p], [g], [bufs[i]], weight_decay=weight_decay, momentum=momentum,
            lr=(rate * lr).to(device=p.device, dtype=p.dtype), dampening=dampening, nesterov=False,
            maximize=False, is_first_step=first, grad_scale=None,
            found_inf=found_inf.to(p.device) if found_inf is not None else None,
        )  # fmt: skip
    if lagged:  # host only: finite
        commit_update(rates, controllers, update, known_finite=True)
    return SGDHDState(list(params), bufs, [None] * len(params), list(rates))
