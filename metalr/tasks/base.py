"""The task protocol every few-shot source implements (ours, learn2learn's, a user's).

A task sampler returns batches of tasks as stacked tensors, so a meta-learner can ``vmap`` over
the leading (task) dimension::

    batch = sampler.sample(25, generator)      # TaskBatch
    batch.support_x.shape                      # [25, K_support, *x_shape]
    batch.query_y.shape                        # [25, K_query, *y_shape]

``loss_name`` says how to score a prediction: ``"mse"`` (regression) or ``"cross_entropy"``
(classification with integer labels in ``[0, n_way)``).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor


class TaskBatch(NamedTuple):
    """A batch of few-shot tasks; every field has the task index as its first dimension."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def task(self, i: int) -> TaskBatch:
        """The ``i``-th task with a leading dimension of 1."""
        return TaskBatch(*(t[i : i + 1] for t in self))

    def to(self, device: torch.device | str) -> TaskBatch:
        """The same batch with every tensor moved to ``device``."""
        return TaskBatch(*(t.to(device) for t in self))


@runtime_checkable
class TaskSampler(Protocol):
    """Anything with ``loss_name`` and ``sample(batch_size, generator) -> TaskBatch``."""

    loss_name: str

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """Draw ``batch_size`` tasks using only ``generator`` for randomness."""
        ...


def check_task_batch(batch: TaskBatch) -> None:
    """Raise ``ValueError`` naming the field when a batch is malformed (empty, mismatched)."""
    names = ("support_x", "support_y", "query_x", "query_y")
    for name, t in zip(names, batch):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")  # noqa: TRY004
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape [tasks, examples, ...], got {tuple(t.shape)}")
    n = batch.support_x.shape[0]
    if n == 0:
        raise ValueError("task batch is empty (support_x has 0 tasks)")
    for name, t in zip(names, batch):
        if t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} tasks but support_x has {n}")
    if batch.support_x.shape[1] == 0:
        raise ValueError("support set is empty (support_x has 0 examples per task)")
    if batch.query_x.shape[1] == 0:
        raise ValueError("query set is empty (query_x has 0 examples per task)")
    for x, y, kind in (
        (batch.support_x, batch.support_y, "support"),
        (batch.query_x, batch.query_y, "query"),
    ):
        if x.shape[1] != y.shape[1]:
            raise ValueError(
                f"{kind}_x has {x.shape[1]} examples per task but {kind}_y has {y.shape[1]}"
            )
