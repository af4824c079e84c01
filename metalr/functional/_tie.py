"""The tie of the ``"seek"`` rule at tensor granularity: the rates of one param group stay
within a factor ``tie`` of their size-weighted geometric mean::

    ℓ̄ = Σ_i (n_i / Σ n) log m_i,        log m_i ← clamp(log m_i, ℓ̄ − log tie, ℓ̄ + log tie)

(``n_i``: elements of tensor ``i``), so that no tensor's rate drifts decades away from the rest.
:func:`tie_vector` works on the stacked rates of one dtype and device, :func:`tie_list` on 0-d
log-rates that may differ in dtype or device; both sum the centre in the same order.
"""

from __future__ import annotations

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
    """:func:`tie_list` on stacked 0-d log-rates ``[n]`` (one dtype and device): one clamp of the
    vector. The centre is summed in :func:`tie_list`'s order (tensor by tensor, Python weights:
    no host-to-device copy), so eager steps give its values bit for bit and the studies'
    records reproduce; traced (:mod:`metalr.functional._compiled`) the sum is part of one loop."""
    if math.isinf(tie):
        return log_rates
    total = sum(sizes)
    centre = sum(log_rates[i] * (n / total) for i, n in enumerate(sizes))
    width = math.log(tie)
    return torch.clamp(log_rates, min=centre - width, max=centre + width)
