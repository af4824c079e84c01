"""Rate updates from the per-tensor sums a fused kernel accumulates in its pass.

A kernel (C++ on the CPU, :mod:`metalr.functional._cpu_kernels`; Triton on CUDA,
:mod:`metalr.functional._triton_kernels`) reads ``g_t`` and recomputes ``d_{t-1}`` in one pass and
returns, per tensor, ``Σ Re(g·d)``, ``Σ g²`` and ``Σ d²``. :func:`adapt_rates_from_sums` turns
those into the new multipliers with the same rule functions the eager path calls
(:mod:`metalr.functional._hypergrad`, :mod:`metalr.functional._controller`); for the ``"seek"``
rule on stacked ``[n]`` vectors, so the bookkeeping after the pass is a fixed handful of ops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metalr.functional._common import safe_sqrt
from metalr.functional._controller import seek_update_stacked
from metalr.functional._hypergrad import (
    RateUpdate,
    clamp_rates,
    group_signal_from_norms,
    tensor_cosines,
    update_rates,
)


def adapt_rates_from_sums(
    rates: Sequence[Tensor],
    sums: Tensor,
    sizes: Sequence[int],
    *,
    lr: float | Tensor,
    hypergrad_lr: float | Tensor | Sequence[Tensor],
    rule: str,
    granularity: str,
    lr_bounds: tuple[float, float],
    grads_finite: Tensor | None = None,
    controllers: Sequence[Tensor] | None = None,
    seek: Mapping[str, Any] | None = None,
) -> RateUpdate:
    """:func:`adapt_rates` from the sums a fused kernel accumulated in its pass (group/tensor).

    ``sums`` is ``[n, 3]``: per tensor ``Σ Re(g·d)``, ``Σ g²`` and ``Σ d²`` with ``d = d_{t-1}``,
    in any float dtype. The flag is false when any sum is not finite (a NaN/inf gradient, or a
    ``Σ g²`` that overflows). The rule's math is the same functions :func:`adapt_rates` calls.
    """
    if granularity == "element":
        raise ValueError("adapt_rates_from_sums takes group/tensor granularity, not 'element'")
    ref = rates[0]
    sums = sums.to(device=ref.device, dtype=ref.dtype)
    finite = torch.isfinite(sums).all()
    if grads_finite is not None:
        finite = finite & grads_finite.to(finite.device)
    if rule == "seek":
        if controllers is None or seek is None:
            raise ValueError("rule='seek' needs controllers and seek constants")
        if not isinstance(hypergrad_lr, (Tensor, list, tuple)) and hypergrad_lr == 0:
            same = update_rates(
                rates, list(sums[:, 0].unbind(0)), list(safe_sqrt(sums[:, 1]).unbind(0)),
                list(safe_sqrt(sums[:, 2]).unbind(0)), lr=lr, hypergrad_lr=0.0,
                rule="normalized", granularity=granularity, lr_bounds=lr_bounds,
            )  # fmt: skip
            return RateUpdate(same, finite, list(controllers))
        return _seek_from_sums(
            rates, controllers, sums, finite, sizes, lr=lr, hypergrad_lr=hypergrad_lr,
            granularity=granularity, lr_bounds=lr_bounds, seek=seek,
        )  # fmt: skip
    dots = list(sums[:, 0].unbind(0))
    g_norms = list(safe_sqrt(sums[:, 1]).unbind(0))
    d_norms = list(safe_sqrt(sums[:, 2]).unbind(0))
    with_norms = rule == "normalized"
    new_rates = update_rates(
        rates, dots, g_norms if with_norms else None, d_norms if with_norms else None, lr=lr,
        hypergrad_lr=hypergrad_lr, rule=rule, granularity=granularity, lr_bounds=lr_bounds,
    )  # fmt: skip
    return RateUpdate(new_rates, finite, [])


def _seek_from_sums(
    rates: Sequence[Tensor],
    controllers: Sequence[Tensor],
    sums: Tensor,
    finite: Tensor,
    sizes: Sequence[int],
    *,
    lr: float | Tensor,
    hypergrad_lr: float | Tensor | Sequence[Tensor],
    granularity: str,
    lr_bounds: tuple[float, float],
    seek: Mapping[str, Any],
) -> RateUpdate:
    """The seek rule from a kernel's ``[n, 3]`` sums, on stacked vectors: the same operations as
    :func:`seek_signals_from_products` + :func:`seek_update`, without a stack and an unbind per
    tensor (a fused step's bookkeeping is a handful of ops on ``[n]`` vectors)."""
    sum_vec, g_vec, d_vec = sums[:, 0], safe_sqrt(sums[:, 1]), safe_sqrt(sums[:, 2])
    group_signal, active = group_signal_from_norms(sum_vec, g_vec, d_vec, finite, None)
    if granularity == "group":
        signal_vec = group_signal.expand(len(rates))
    else:
        signal_vec = tensor_cosines(sum_vec, g_vec, d_vec)
    ctrl = torch.stack(list(controllers))
    rate_vec, new_ctrl = seek_update_stacked(
        torch.stack(list(rates)), ctrl, signal_vec.to(ctrl.dtype), group_signal, active, sizes,
        hypergrad_lr=hypergrad_lr, seek=seek, granularity=granularity,
    )  # fmt: skip
    rate_vec = clamp_rates(rate_vec, lr, lr_bounds)
    return RateUpdate(list(rate_vec.unbind(0)), finite, list(new_ctrl.unbind(0)))
