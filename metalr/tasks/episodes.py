"""Few-shot episode assembly shared by the glyph and Omniglot task sources.

Argument checks, per-task class choice, and turning class-major examples into a shuffled
:class:`~metalr.tasks.base.TaskBatch`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metalr.tasks.base import TaskBatch


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _choose_classes(num_classes: int, batch_size: int, n_way: int, generator) -> Tensor:
    """``[batch_size, n_way]`` distinct class ids per task (uniform, without replacement)."""
    if n_way > num_classes:
        raise ValueError(f"n_way={n_way} but the split has only {num_classes} classes")
    keys = torch.rand(batch_size, num_classes, generator=generator)
    return keys.argsort(dim=1)[:, :n_way]


def _episode(instances: Tensor, k_shot: int, generator) -> TaskBatch:
    """Turn ``[tasks, n_way, k_shot + k_query, *x]`` class-major examples into a shuffled batch.

    Class ``j`` of each task gets label ``j``; support and query are shuffled independently.
    """
    b, n, _m = instances.shape[:3]
    x_shape = instances.shape[3:]
    out = []
    for part in (instances[:, :, :k_shot], instances[:, :, k_shot:]):
        per = part.shape[2]
        x = part.reshape(b, n * per, *x_shape)
        y = torch.arange(n).repeat_interleave(per).expand(b, n * per)
        perm = torch.rand(b, n * per, generator=generator).argsort(dim=1)
        x = x[torch.arange(b)[:, None], perm]
        y = y.gather(1, perm)
        out += [x.contiguous(), y.contiguous()]
    return TaskBatch(out[0], out[1], out[2], out[3])
