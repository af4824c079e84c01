"""Rate updates from the per-tensor sums a fused kernel accumulates in its pass.

A kernel (C++ on the CPU, :mod:`metalr.functional._cpu_kernels`; Triton on CUDA,
:mod:`metalr.functional._triton_kernels`) reads ``g_t`` and recomputes ``d_{t-1}`` in one pass and
returns, per tensor, ``Σ Re(g·d)``, ``Σ g²`` and ``Σ d²``. :func:`adapt_rates_from_sums` turns
those into the new multipliers with the same rule functions the eager path calls
(:mod:`metalr.functional._hypergrad`, :mod:`metalr.functional._controller`); for the ``"seek"``
rule on stacked ``[n]`` vectors, traced into one ``torch.compile`` graph
(:mod:`metalr.functional._compiled`), so the bookkeeping after the pass is one kernel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metalr.functional._common import safe_sqrt
from metalr.functional._compiled import compiled
from metalr.functional._controller import seek_update_stacked
from metalr.functional._flat_state import rows_of
from metalr.functional._hypergrad import RateUpdate, bounded, clamp_rates, update_rates
from metalr.functional._rate_moves import beta_vector
from metalr.functional._signals import group_signal_from_norms, tensor_cosines


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
    if grads_finite is not None:
        grads_finite = grads_finite.to(ref.device)
    if rule == "seek":
        if controllers is None or seek is None:
            raise ValueError("rule='seek' needs controllers and seek constants")
        if isinstance(hypergrad_lr, (Tensor, list, tuple)) or hypergrad_lr != 0:
            new_vec, new_ctrl, finite = seek_vectors_from_sums(
                torch.stack(list(rates)), torch.stack(list(controllers)), sums, grads_finite,
                sizes, lr=lr, hypergrad_lr=hypergrad_lr, granularity=granularity,
                lr_bounds=lr_bounds, seek=seek,
            )  # fmt: skip
            return RateUpdate(list(new_vec.unbind(0)), finite, list(new_ctrl.unbind(0)))
        # β = 0: nothing moves (the rates stay, the controllers are kept)
        finite = _finite(sums, grads_finite)
        same = update_rates(
            rates, list(sums[:, 0].unbind(0)), list(safe_sqrt(sums[:, 1]).unbind(0)),
            list(safe_sqrt(sums[:, 2]).unbind(0)), lr=lr, hypergrad_lr=0.0,
            rule="normalized", granularity=granularity, lr_bounds=lr_bounds,
        )  # fmt: skip
        return RateUpdate(same, finite, list(controllers))
    finite = _finite(sums, grads_finite)
    dots = list(sums[:, 0].unbind(0))
    g_norms = list(safe_sqrt(sums[:, 1]).unbind(0))
    d_norms = list(safe_sqrt(sums[:, 2]).unbind(0))
    with_norms = rule == "normalized"
    new_rates = update_rates(
        rates, dots, g_norms if with_norms else None, d_norms if with_norms else None, lr=lr,
        hypergrad_lr=hypergrad_lr, rule=rule, granularity=granularity, lr_bounds=lr_bounds,
    )  # fmt: skip
    return RateUpdate(new_rates, finite, [])


def _finite(sums: Tensor, grads_finite: Tensor | None) -> Tensor:
    """The step's flag: every sum finite (and every gradient, where the optimizer checked)."""
    finite = torch.isfinite(sums).all()
    return finite if grads_finite is None else finite & grads_finite


def seek_vectors_from_sums(
    rate_vec: Tensor,
    ctrl: Tensor,
    sums: Tensor,
    grads_finite: Tensor | None,
    sizes: Sequence[int],
    *,
    lr: float | Tensor,
    hypergrad_lr: float | Tensor | Sequence[Tensor],
    granularity: str,
    lr_bounds: tuple[float, float],
    seek: Mapping[str, Any],
) -> tuple[Tensor, Tensor, Tensor]:
    """The seek rule on stacked state: rates ``[n]`` and controllers ``[n, K]`` from a kernel's
    ``[n, 3]`` sums; returns the new ``(rates, controllers, flag)``. Where the step is skipped
    (flag false) the old controllers come back, and the old rates where ``lr_bounds`` clamp
    (callers gate the rates on the flag). The same operations as :func:`seek_signals_from_products`
    + :func:`seek_update`, without a stack and an unbind per tensor (a fused step's bookkeeping
    is one compiled graph on ``[n]`` vectors)."""
    sums = sums.to(device=rate_vec.device, dtype=rate_vec.dtype)
    if grads_finite is not None:
        grads_finite = grads_finite.to(rate_vec.device)
    start = clamp_rates(rate_vec, lr, lr_bounds)  # the rates in use: what the rule moves
    new_vec, new_ctrl, finite = seek_from_sums_stacked(
        start, ctrl, sums, grads_finite, beta_vector(hypergrad_lr, rate_vec),
        sizes=tuple(sizes), seek=seek, granularity=granularity,
    )  # fmt: skip
    if bounded(lr_bounds):  # (a skipped step keeps the stored rates)
        held = clamp_rates(new_vec, lr, lr_bounds, previous=rate_vec, start=start)
        new_vec = torch.where(finite, held, rate_vec)
    return new_vec, new_ctrl, finite


def seek_rows(
    rates: Sequence[Tensor],
    controllers: Sequence[Tensor] | None,
    rule: str,
    hypergrad_lr: Any,
    device: torch.device,
) -> tuple[Tensor, Tensor] | None:
    """The seek rule's state as two buffers on ``device`` (rates ``[n]``, controllers
    ``[n, K]``; see :mod:`metalr.functional._flat_state`), or None: another rule, β = 0 or
    per-rate β, or state that cannot share a buffer there (the list path then stacks, moves
    and unbinds)."""
    if rule != "seek" or not controllers or isinstance(hypergrad_lr, (Tensor, list, tuple)):
        return None
    if hypergrad_lr == 0:
        return None
    rate_buf, ctrl_buf = rows_of(rates), rows_of(controllers)
    if rate_buf is None or ctrl_buf is None or not rate_buf.device == ctrl_buf.device == device:
        return None
    return rate_buf, ctrl_buf


def commit_rows(rows: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor, Tensor]) -> None:
    """Write a step's new rates (kept where the flag is false) and controllers (already
    gated by :func:`seek_vectors_from_sums`) into their buffers."""
    (rate_buf, ctrl_buf), (new_vec, new_ctrl, finite) = rows, new
    rate_buf.copy_(torch.where(finite, new_vec, rate_buf))
    ctrl_buf.copy_(new_ctrl)


@compiled
def seek_from_sums_stacked(
    rate_vec: Tensor,
    ctrl: Tensor,
    sums: Tensor,
    grads_finite: Tensor | None,
    hypergrad_lr: float | Tensor,
    *,
    sizes: tuple[int, ...],
    seek: Mapping[str, Any],
    granularity: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """New stacked rates ``[n]`` (before the clamp to ``lr_bounds``), controllers ``[n, K]`` and
    the step's flag from a kernel's ``[n, 3]`` sums: the flag (every sum finite, and
    ``grads_finite``), the group cosine (:func:`group_signal_from_norms`), each tensor's cosine,
    then :func:`seek_update_stacked`; where the step is skipped, the old values. Pure tensor ops,
    traced into one graph by :func:`metalr.functional._compiled.compiled`."""
    finite = _finite(sums, grads_finite)
    sum_vec, g_vec, d_vec = sums[:, 0], safe_sqrt(sums[:, 1]), safe_sqrt(sums[:, 2])
    group_signal, active, grad_norm = group_signal_from_norms(sum_vec, g_vec, d_vec, finite, None)
    if granularity == "group":
        signal_vec = group_signal.expand(rate_vec.shape[0])
    else:
        signal_vec = tensor_cosines(sum_vec, g_vec, d_vec)
    new_vec, new_ctrl = seek_update_stacked(
        rate_vec, ctrl, signal_vec.to(ctrl.dtype), group_signal, active, sizes,
        hypergrad_lr=hypergrad_lr, seek=seek, granularity=granularity, grad_norm=grad_norm,
    )  # fmt: skip
    return new_vec, new_ctrl, finite
