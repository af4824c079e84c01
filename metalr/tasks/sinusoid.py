"""MAML's sinusoid regression (Finn, Abbeel & Levine, 2017, section 5.1).

Each task is ``y = A * sin(x - phi)`` with amplitude ``A ~ U[0.1, 5.0]``, phase ``phi ~ U[0, pi]``
and inputs ``x ~ U[-5, 5]``. The support set has ``K`` points; during meta-training MAML scores
the adapted model on ``K`` further points of the same task (``k_query=None`` means ``k_query=K``),
and evaluates on 600 tasks with 100 query points each (:meth:`SinusoidTasks.fixed_test_set`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from metalr.tasks.base import TaskBatch

__all__ = ["SinusoidParams", "SinusoidTasks"]


class SinusoidParams(NamedTuple):
    """The per-task parameters of a sampled sinusoid batch (each of shape ``[tasks]``)."""

    amplitude: Tensor
    phase: Tensor


def _check_range(name: str, value: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(
            f"{name} must be a finite (low, high) pair with low <= high, got {value!r}"
        )
    return lo, hi


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class SinusoidTasks:
    """Sample batches of sinusoid regression tasks, exactly as in MAML.

    Args:
        k_shot: support points per task (MAML uses 5 or 10).
        k_query: query points per task; ``None`` (default) uses ``k_shot``, as MAML's
            meta-training does. Evaluation uses 100 (see :meth:`fixed_test_set`).
        amplitude: range of the uniform amplitude ``A``.
        phase: range of the uniform phase ``phi`` (radians).
        x_range: range of the uniform inputs ``x``.
        dtype: floating dtype of the returned tensors.

    ``sample(n, generator)`` returns a :class:`~metalr.tasks.TaskBatch` whose four tensors have
    shape ``[n, K, 1]`` (support) and ``[n, k_query, 1]`` (query); it draws only from
    ``generator``, so equal seeds give identical batches.
    """

    loss_name = "mse"
    #: a fixed set (``metalr.meta.runner.fixed_tasks``) is drawn in one call: tiny tensors
    draw_block = None

    def __init__(
        self,
        k_shot: int,
        k_query: int | None = None,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.k_shot = _check_count("k_shot", k_shot)
        self.k_query = self.k_shot if k_query is None else _check_count("k_query", k_query)
        self.amplitude = _check_range("amplitude", amplitude)
        self.phase = _check_range("phase", phase)
        self.x_range = _check_range("x_range", x_range)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.dtype = dtype

    def __repr__(self) -> str:
        return (
            f"SinusoidTasks(k_shot={self.k_shot}, k_query={self.k_query}, "
            f"amplitude={self.amplitude}, phase={self.phase}, x_range={self.x_range})"
        )

    def _uniform(self, shape: tuple[int, ...], bounds: tuple[float, float], generator) -> Tensor:
        lo, hi = bounds
        return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=self.dtype)

    def _sample(
        self, batch_size: int, generator: torch.Generator | None, k_query: int
    ) -> tuple[TaskBatch, SinusoidParams]:
        batch_size = _check_count("batch_size", batch_size)
        amplitude = self._uniform((batch_size,), self.amplitude, generator)
        phase = self._uniform((batch_size,), self.phase, generator)
        x = self._uniform((batch_size, self.k_shot + k_query, 1), self.x_range, generator)
        y = amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
        k = self.k_shot
        batch = TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
        return TaskBatch(*(t.contiguous() for t in batch)), SinusoidParams(amplitude, phase)

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        return_params: bool = False,
    ) -> TaskBatch | tuple[TaskBatch, SinusoidParams]:
        """Draw ``batch_size`` tasks; with ``return_params=True`` also return their ``A`` and ``phi``.

        The draws are, in order: amplitudes ``[n]``, phases ``[n]``, then inputs ``[n, K+Q, 1]``
        (the first ``K`` of each task are the support set).
        """
        batch, params = self._sample(batch_size, generator, self.k_query)
        return (batch, params) if return_params else batch

    def fixed_test_set(
        self,
        num_tasks: int = 600,
        k_query: int = 100,
        seed: int = 0,
        *,
        return_params: bool = False,
    ) -> TaskBatch | tuple[TaskBatch, SinusoidParams]:
        """MAML's evaluation set: ``num_tasks`` tasks with ``k_shot`` support and ``k_query`` query
        points, drawn from a fresh generator seeded with ``seed`` (the same tensors every call)."""
        generator = torch.Generator().manual_seed(int(seed))
        batch, params = self._sample(num_tasks, generator, _check_count("k_query", k_query))
        return (batch, params) if return_params else batch
