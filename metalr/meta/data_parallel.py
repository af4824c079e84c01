"""Data-parallel meta-training: each rank draws its own tasks, meta-gradients are averaged.

With ``MetaLearner(..., process_group=group)`` and the same initial meta-parameters on every
rank, a meta-step over ``B`` tasks per rank equals a single-process meta-step over the ``R·B``
tasks of all ranks (the meta-loss is a mean over tasks, so its gradient is the mean of the ranks'
gradients). Every rank also agrees on skipping a non-finite step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class DataParallel:
    """All-reduce helpers over ``process_group`` for :class:`metalr.MetaLearner`."""

    def __init__(self, process_group: Any) -> None:
        self.process_group = process_group

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def all(self, flag: bool) -> bool:
        """True only if ``flag`` is true on every rank."""
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.process_group)
        return bool(t.item())

    def mean(self, value: Tensor) -> Tensor:
        """``value`` averaged over ranks (a new tensor)."""
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.process_group)
        return out / self.world_size

    def average_grads(self, params: Iterable[Tensor]) -> None:
        """Average ``.grad`` over ranks in place, as one flat all-reduce (missing grads are 0)."""
        params = list(params)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).clone()
            offset += n
