"""The loss-spike guard's plumbing for metalr's optimizers (the math:
:mod:`metalr.functional.spike_guard`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metalr.functional._common import commit_rates, scalar_lr
from metalr.functional._distributed import average_over_ranks
from metalr.functional._hypergrad import clamp_rates, rates_in_use
from metalr.functional._rate_moves import log_level
from metalr.functional._signals import rate_dtype
from metalr.functional._validation_state import LEVEL
from metalr.functional.spike_guard import (
    COUNT,
    MEAN,
    SPIKES,
    VAR,
    initial_spike_stats,
    padded_spike_stats,
    spike_cut,
    spike_guard_update,
)
from metalr.optim._state_keys import RATE_KEY, SPIKE_KEY, VALIDATION_KEY


class SpikeGuarded:
    """Mixin of :class:`metalr.optim._base.HypergradOptimizer`: the guard that a closure's loss
    drives (``spike_guard=`` of every metalr optimizer). It reads ``param_groups``, ``state``,
    ``_controller``, ``_shard_group``, ``_shard_reducer`` and ``_local_grads_finite`` of the
    optimizer it is mixed into."""

    param_groups: list[dict[str, Any]]
    state: Any

    def _guard_spike(self, loss: Any, grads_finite: Tensor | None = None) -> None:
        """The loss-spike guard (:mod:`metalr.functional.spike_guard`) at the start of a step, for
        the loss its closure returned, else the one :meth:`observe_loss` left for it: update each
        guarded group's statistics and, on a spike, cut its rates (and turn its ramping seek
        controllers) before the step's update. A step whose gradients are not all finite (one
        the rule skips, as ``GradScaler`` would) leaves the statistics and rates as they were.
        Nothing without a loss or a guarded group; no host read. Under ``torch.distributed`` with
        more than one rank the loss is averaged over the ranks first (the shard group's, else the
        default group), so every rank takes the same decision; with sharded state
        (``shard_group``) the gradients' finiteness is decided over the ranks too, and a rank
        that holds none of the guarded groups' parameters joins both collectives.
        ``grads_finite``: the step's flag over every gradient when it has one already
        (``_grads_finite``, several groups), so that it is not computed, or all-reduced, twice."""
        pending, self._pending_spike_loss = getattr(self, "_pending_spike_loss", None), None
        groups = self._guarded_groups()
        shards = self._shard_reducer()
        if not self._guard_collects(groups, shards) or (loss is None and pending is None):
            return
        device = self._spike_device(groups, shards)
        value = self._spike_loss(loss, device) if loss is not None else pending
        if grads_finite is None:
            grads_finite = self._local_grads_finite(device if shards is None else shards.device)
            if shards is not None:
                grads_finite = shards.all(grads_finite)
        finite = grads_finite.to(device)
        with torch.no_grad():
            for group in groups:
                self._guard_group(group, value, finite)

    def observe_loss(self, loss: Tensor | float) -> None:
        """Hand the loss of the step about to be taken to the spike guard (``spike_guard=``),
        for loops that do not step with a closure — a ``GradScaler`` loop, the transformers
        Trainer's — with the same effect as ``step(closure)`` returning it: call it after
        ``backward()`` and before ``step()``. The guard reads it when ``step()`` runs, so a step
        that ``GradScaler`` skips (inf/NaN gradients) leaves it unread, as the step leaves
        everything else. Nothing if no param group is guarded.

        Example:
            >>> scaler.scale(loss).backward()
            >>> optimizer.observe_loss(loss)
            >>> scaler.step(optimizer)
        """
        groups = self._guarded_groups()
        shards = self._shard_reducer()
        if self._guard_collects(groups, shards):
            device = self._spike_device(groups, shards)
            self._pending_spike_loss = self._spike_loss(loss, device)

    def _guarded_groups(self) -> list[dict[str, Any]]:
        """The param groups the spike guard watches (``spike_guard`` set, parameters held)."""
        return [g for g in self.param_groups if g.get("spike_guard") and g["params"]]

    def _guard_collects(self, groups: list[dict[str, Any]], shards: Any) -> bool:
        """Whether this rank reads the loss: it holds a guarded group's parameters, or (sharded
        state) some group is guarded at all, since a rank holding none of its parameters must
        still join the loss's all-reduce."""
        if shards is None:
            return bool(groups)
        return any(g.get("spike_guard") for g in self.param_groups)

    @staticmethod
    def _spike_device(groups: list[dict[str, Any]], shards: Any) -> torch.device:
        return groups[0]["params"][0].device if groups else shards.device

    def _spike_loss(self, loss: Any, device: torch.device) -> Tensor:
        """The closure's loss as a detached 0-d tensor on ``device``, averaged over the ranks."""
        if isinstance(loss, Tensor) and loss.numel() == 1:
            value = loss.detach().reshape(()).to(device)
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
            value = torch.tensor(float(loss), device=device)
        else:
            raise ValueError(
                "Invalid closure result for spike_guard: expected the loss as a number or a "
                f"one-element tensor, got {loss!r}"
            )
        shard_group = getattr(self, "_shard_group", None)
        value = value.clone()  # averaged in place: never the caller's tensor
        average_over_ranks([value], "auto" if shard_group in (None, "world") else shard_group)
        return value

    def _guard_group(self, group: dict[str, Any], loss: Tensor, finite: Tensor) -> None:
        anchor = group["params"][0]
        state = self.state[anchor]
        if SPIKE_KEY not in state:
            state[SPIKE_KEY] = initial_spike_stats(anchor.device, rate_dtype(anchor))
        stats = state[SPIKE_KEY] = padded_spike_stats(state[SPIKE_KEY])
        lr = scalar_lr(group["lr"])
        new_stats, factor = spike_guard_update(stats, loss, lr, group["spike_guard"])
        stats.copy_(torch.where(finite, new_stats, stats))
        params = [p for p in group["params"] if RATE_KEY in self.state.get(p, ())]
        if not params:
            return
        rates = [self.state[p][RATE_KEY] for p in params]
        controllers = None
        if group["rule"] == "seek":
            controllers = [self._controller(p, group) for p in params]
        bounds = group["lr_bounds"]  # the cut acts on the rates in use (a bound may hold them)
        in_use = rates_in_use(rates, lr, bounds)
        new_rates, new_controllers = spike_cut(in_use, controllers, factor, group["seek"])
        new_rates = [
            clamp_rates(n, lr, bounds, previous=r, start=s)
            for n, r, s in zip(new_rates, rates, in_use)
        ]
        cut = (factor < 1) & finite
        commit_rates(rates, new_rates, cut, known_finite=False)
        if controllers is not None and new_controllers is not None:  # unchanged without a cut
            kept = [torch.where(cut, n, c) for n, c in zip(new_controllers, controllers)]
            torch._foreach_copy_(controllers, kept)
        # the validation hold restores a rate to its level at the last observation: a cut lowers
        # that level too (to the cut rate at most), or the next observation would take it back
        if not self._follows_validation(group):  # no level yet: nothing to lower
            return
        for p, rate in zip(params, rates):
            stats = self.state[p].get(VALIDATION_KEY)
            if stats is not None:
                level = stats[LEVEL]
                lowered = torch.minimum(
                    level + torch.log(factor).to(device=level.device, dtype=level.dtype),
                    log_level(rate, group["granularity"]).to(
                        device=level.device, dtype=level.dtype
                    ),
                )
                stats[LEVEL] = torch.where(cut.to(level.device), lowered, level)

    @torch.no_grad()
    def spike_summary(self) -> list[dict[str, float]]:
        """Per guarded param group that has seen a loss: the guard's running mean and standard
        deviation of the loss, the losses seen and the spikes that cut its rates (reads the
        statistics back to the host: call it between steps, e.g. for logging)."""
        out = []
        for group in self.param_groups:
            if not group.get("spike_guard") or not group["params"]:
                continue
            stats = self.state.get(group["params"][0], {}).get(SPIKE_KEY)
            if stats is None:
                continue
            values = stats.double().cpu()
            if values[COUNT] == 0:  # created at the first step, before any finite loss
                continue
            out.append({"mean": float(values[MEAN]), "std": float(values[VAR].sqrt()),
                        "losses": int(values[COUNT]), "spikes": int(values[SPIKES])})  # fmt: skip
        return out
