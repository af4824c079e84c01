"""Reductions across the ranks that shard a param group (ZeroRedundancyOptimizer and friends).

Under optimizer-state sharding each rank steps only its own parameters, so any quantity the
rules reduce over a whole param group — the group-granularity inner product and the norms of
the normalized rule — must be summed over ranks, and every rank must agree on whether the step
is skipped. Without this, ranks adapt different rates and drift apart.

Per-tensor and per-element quantities need nothing under ZeRO (each tensor lives on one rank).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class ShardReducer:
    """All-reduces over ``process_group`` (``None`` = the default group).

    Example::

        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=metalr.AdamHD,
                                             lr=1e-3, granularity="group",
                                             shard_group=torch.distributed.group.WORLD)
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group

    def sum(self, values: Tensor) -> Tensor:
        """``values`` summed over ranks (a new tensor; the input is not modified). The reduction
        runs in float64 on every rank, whatever the rate dtype: a rank that holds no parameter
        of the group (:meth:`participate`) cannot know it, and the collectives' sizes must
        match. Two ranks' float32 partial sums add exactly in float64, so the result, cast
        back, is the float32 reduction's."""
        out = values.detach().clone() if not values.requires_grad else values.clone()
        wide = out.to(torch.float64)
        dist.all_reduce(wide, op=dist.ReduceOp.SUM, group=self.process_group)
        return wide.to(values.dtype)

    def maximum(self, values: Tensor) -> Tensor:
        """``values`` maxed over ranks, elementwise (a new tensor, in float64 on every rank as
        :meth:`sum` does, then cast back)."""
        wide = values.detach().to(torch.float64).clone()
        dist.all_reduce(wide, op=dist.ReduceOp.MAX, group=self.process_group)
        return wide.to(values.dtype)

    def all(self, flag: Tensor) -> Tensor:
        """True on every rank only if ``flag`` is true on every rank (elementwise, for a flag
        of any shape; one collective)."""
        as_int = flag.to(torch.int32).reshape(-1).clone()
        dist.all_reduce(as_int, op=dist.ReduceOp.MIN, group=self.process_group)
        return (as_int > 0).reshape(flag.shape)

    @property
    def device(self) -> torch.device:
        """Where this group's collectives run (CUDA for NCCL, else the CPU)."""
        return _collective_device(self.process_group)

    def participate(
        self, granularity: str, rule: str, hypergrad_lr: Any = None, restart_match: bool = False
    ) -> None:
        """Join the collectives of a step in which this rank holds no parameter of the group:
        the same sequence the ranks with parameters run (the seek rule at a numeric
        ``hypergrad_lr`` of 0 runs the normalized rule's; ``restart_match``: the group's
        ``seek`` restarts Adam's moments with the match, which pools the directions' sizes
        at group granularity, :func:`metalr.functional._moment_restart.match_factors`)."""
        pooled_match = rule == "seek" and restart_match and granularity == "group"
        if (
            rule == "seek"
            and not isinstance(hypergrad_lr, (Tensor, list, tuple))
            and (hypergrad_lr == 0)
        ):
            rule = "normalized"  # what adapt_rates falls back to: nothing moves
        device = _collective_device(self.process_group)
        self.all(torch.ones((), dtype=torch.bool, device=device))
        if rule == "seek":  # the group cosine of the seek rule is summed at every granularity
            self.sum(torch.zeros(3, dtype=torch.float64, device=device))
        elif granularity == "group":
            n = 3 if rule == "normalized" else 1
            self.sum(torch.zeros(n, dtype=torch.float64, device=device))
        if pooled_match:  # the sizes of the turned tensors' directions: none here
            self.sum(torch.zeros(2, dtype=torch.float64, device=device))

    def participate_validation(
        self, granularity: str, rule: str, loss_only: bool = False, ray: bool = False
    ) -> None:
        """Join the collectives of an observation (``observe_validation``) of a group of which
        this rank holds no trainable parameter: the sequence of
        :func:`metalr.functional.validation.validation_adapt_rates` on the other ranks
        (``loss_only``: of an observation of the loss alone, ``loss_only_flags``), then with
        ``ray`` the ray ceiling's (its cosine's sums, the group's step; a rank holding none
        sends zeros)."""
        device = self.device
        self.all(torch.ones((), dtype=torch.bool, device=device))  # the gradients are finite
        if loss_only:  # this rank took no step: "none moved" holds here
            self.all(torch.ones((), dtype=torch.bool, device=device))
            return  # (the ray reads no loss alone)
        if rule == "seek":  # the group cosine of the ramp's signal
            self.sum(torch.zeros(3, dtype=torch.float64, device=device))
        else:
            self.all(torch.ones((), dtype=torch.bool, device=device))  # no step anywhere yet
            if granularity == "group":
                n = 3 if rule == "normalized" else 1
                self.sum(torch.zeros(n, dtype=torch.float64, device=device))
        if ray:  # ValidationObserving._ray_ceiling's: the sums, then (step, level, fall), maxed
            self.sum(torch.zeros(3, dtype=torch.float64, device=device))
            self.maximum(torch.tensor([0.0, -math.inf, 0.0], dtype=torch.float64, device=device))


def _collective_device(process_group: dist.ProcessGroup | None) -> torch.device:
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_over_ranks(grads: list[Tensor], process_group: Any) -> None:
    """Average ``grads`` in place over the ranks of ``process_group``: ``"auto"`` the default
    group when ``torch.distributed`` is initialized (else nothing), ``None`` nothing, or a group
    (``observe_validation``'s gradients, the spike guard's loss)."""
    if process_group is None or not grads:
        return
    if not (dist.is_available() and dist.is_initialized()):
        if process_group == "auto":
            return
        raise ValueError("process_group given but torch.distributed is not initialized")
    group = None if process_group == "auto" else process_group
    world = dist.get_world_size(group)
    if world == 1:
        return
    for g in grads:  # one collective per tensor: any dtype, complex included
        dist.all_reduce(g, group=group)
        g.div_(world)
