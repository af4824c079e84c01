"""The tie of the ``"seek"`` rule at tensor granularity: the rates of one param group stay
within a factor ``tie`` of their size-weighted geometric mean::

    ℓ̄ = Σ_i (n_i / Σ n) log m_i,        log m_i ← clamp(log m_i, ℓ̄ − log tie, ℓ̄ + log tie)

(``n_i``: elements of tensor ``i``), so that no tensor's rate drifts decades away from the rest.
:func:`tie_vector` works on the stacked rates of one dtype and device (one weighted sum, one
clamp); :func:`tie_list` on 0-d log-rates that may differ in dtype or device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["tie_list", "tie_vector"]


def tie_list(log_rates: list[Tensor], sizes: Sequence[int], tie: float) -> list[Tensor]:
    """Clamp 0-d log-rates into ``[ℓ̄ - log tie, ℓ̄ + log tie]``, ``ℓ̄`` their size-weighted mean."""
    if math.isinf(tie):
        return log_rates
    stacked = torch.stack(log_rates)
    total = sum(sizes)  # Python weights: no host-to-device copy inside the step
    centre = sum(x * (n / total) for x, n in zip(log_rates, sizes))
    width = math.log(tie)
    return list(torch.clamp(stacked, min=centre - width, max=centre + width).unbind(0))


def tie_vector(log_rates: Tensor, sizes: Sequence[int], tie: float) -> Tensor:
    """:func:`tie_list` on stacked 0-d log-rates ``[n]`` (one dtype and device): a weighted sum and
    one clamp instead of an op per tensor."""
    if math.isinf(tie):
        return log_rates
    centre = (log_rates * _size_weights(tuple(sizes), log_rates.dtype, log_rates.device)).sum()
    width = math.log(tie)
    return torch.clamp(log_rates, min=centre - width, max=centre + width)


def _size_weights(sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``n_i / Σ n`` as a tensor: built once per (sizes, dtype, device) and kept, so that a
    step does no host-to-device copy (a constant of the graph where traced)."""
    if torch.compiler.is_compiling():
        return torch.tensor([n / sum(sizes) for n in sizes], dtype=dtype, device=device)
    return _cached_size_weights(sizes, dtype, device)


@functools.lru_cache(maxsize=64)
def _cached_size_weights(
    sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    total = sum(sizes)
    return torch.tensor([n / total for n in sizes], dtype=dtype, device=device)
