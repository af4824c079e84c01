"""What SGD-HD's faces share: the state a step reads and writes, and the last direction.

``d_{t-1}`` is the momentum buffer before its update for plain momentum (no extra state); plain
SGD and Nesterov keep it in one buffer, ``prev_direction`` (:func:`stores_prev_direction`). The
update rule itself is :mod:`metalr.functional.sgd_rule`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class SGDHDState(NamedTuple):
    """Tensors an SGD-HD step reads and produces (one entry per parameter; buffers may be None)."""

    params: list[Tensor]
    momentum_buffers: list[Tensor | None]
    prev_directions: list[Tensor | None]
    rates: list[Tensor]


def no_momentum(momentum: float | Tensor) -> bool:
    """Whether ``momentum`` is 0. A 0-d tensor momentum (the compiled ``fused=True`` step's,
    so that a scheduler cycling it does not recompile) is never 0: the dispatch passes only a
    non-zero one as a tensor."""
    return not isinstance(momentum, Tensor) and momentum == 0


def stores_prev_direction(momentum: float | Tensor, nesterov: bool) -> bool:
    """Whether d_{t-1} needs its own buffer (it is the momentum buffer for plain momentum)."""
    return no_momentum(momentum) or nesterov


def previous_directions(
    params: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    prev_directions: Sequence[Tensor | None],
    momentum: float,
    nesterov: bool,
) -> list[Tensor]:
    source = prev_directions if stores_prev_direction(momentum, nesterov) else momentum_buffers
    return [torch.zeros_like(p) if d is None else d for p, d in zip(params, source)]


def like(value: float | Tensor, t: Tensor) -> float | Tensor:
    """``value`` in ``t``'s dtype if it is a tensor (a Python float as it is)."""
    return value.to(t.dtype) if isinstance(value, Tensor) else value
