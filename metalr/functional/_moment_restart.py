r"""Restarting Adam's moment estimates at the ramp's turn (AdamHD's default since 2026-12-07:
``seek`` ``moment_restart`` 1 with ``restart_match`` 1; ``{"moment_restart": 0}`` turns it off).

While the seek rule's ramp searches the rate (:mod:`metalr.functional._controller`), the model
hardly moves and its gradients stay at their initial, largest size. Adam's second moment keeps
them: with ``β2 = 0.999`` their weight halves only every ~700 steps, so for hundreds of steps
after the ramp every Adam step is smaller, and shaped by the initial gradients rather than the
current ones, than a fresh Adam's at the same rate. On digits_logreg (development seeds 100–102)
Adam at its best fixed rate ends at validation loss 0.1169, the same Adam after 35 idle steps at
1e-6 at 0.1243, and at 0.1122 when its moments are reset after them.

With ``moment_restart > 0`` a tensor's ``m``, ``v`` and step count (the bias corrections') are
reset to zero at the step where its controller takes its first turn, so that from the next step
Adam runs as if it started there::

    at the step where s_t first becomes > 0  (s: the controller's steps since its first turn):
        m ← 0,   v ← 0,   step ← 0

The next step's previous direction is then zero, so the rates do not move at it (as at a
first step). No state is added: the first turn is read from the controller's own count
(``SINCE``). The step after the turn is a fresh Adam's first step (``m̂/√v̂ = ±1`` per element)
at the turn's rate, larger than the steps the turn measured: alone it overshoots on a task that
overfits (digits_mlp 1.65× → 3.3× of tuned Adam from lr0 1e-3), so it is meant for use with the
validation option's ray, whose ceiling and rewind take such an overshoot back. With the
recommended validation option, on fresh seeds 64–68 of four tasks, it put 14/20 cells within 10%
of tuned Adam against 13/20, paired mean log-ratio −0.037 (95% interval −0.099 to +0.014): a
gain five seeds do not separate from noise, so alone (``restart_match`` 0) it stays opt-in
(``experiments/results/fit_controller/moment_restart/result.md``).

**The size match** (``restart_match > 0``, with ``moment_restart > 0``). The fresh step's
size is then kept at the turn's: each turned tensor's multiplier is scaled by the mean size of
the direction ``d = m̂/(√v̂ + ε)`` it applied at the turn, before its moments are zeroed::

    m ← m · min(mean_i |d_i|, 1)        (group granularity: the mean over every element of the
                                          group's turned tensors, summed over ZeRO's ranks)

so the first fresh step, ``|d| = 1`` per element, moves the tensor as far on average as the
turn's step did. Without validation it passed its check (seeds 60–63, study 1's six tasks:
13/30 → 16/30 cells within 10% of tuned Adam, paired mean log-ratio −0.092, 95% interval
−0.148 to −0.050; ``experiments/results/fit_controller/matched_restart/result.md``), and so
it became the default; the CNN lost there (1.04–1.23× → 1.12–1.31×: its later layers' mean
``|d|`` at the turn is 0.26–0.64, so their rates are cut 2–7× while it still learns), and on
study 1's held-out transformer the rate settles below half the best fixed one.

Where the turn is read: on the CPU (and wherever the flags are free to read) only the turned
tensors are touched; the Triton step (CUDA, exact) restarts inside its writing launch; other
paths off the CPU multiply every moment by its 0/1 flag each step (no host read).

Example::

    optimizer = metalr.AdamHD(model.parameters(), lr=1e-3)  # the matched restart: default
    plain = metalr.AdamHD(model.parameters(), lr=1e-3, seek={"restart_match": 0})
    without = metalr.AdamHD(model.parameters(), lr=1e-3, seek={"moment_restart": 0})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metalr.functional._common import full_value, host_readable, mutable_view
from metalr.functional._controller import SINCE
from metalr.functional._distributed import ShardReducer
from metalr.functional._flat_state import zero_marked


def requested(seek: Mapping[str, Any] | None, controllers: Sequence[Tensor] | None) -> bool:
    """Whether a step restarts moments: the seek rule's controllers are given and its
    ``moment_restart`` is on."""
    return bool(controllers) and bool(seek) and seek.get("moment_restart", 0.0) > 0


@dataclass
class KernelRestart:
    """A moment restart that a kernel may take over (:func:`metalr.functional.adam_rule.adam_hd`
    hands it to the Triton step): ``match`` is ``seek["restart_match"] > 0``; the kernel sets
    ``done`` when it restarted (and matched) the turned tensors itself."""

    match: bool
    done: bool = False


def matched(seek: Mapping[str, Any] | None) -> bool:
    """Whether moments restart (``seek["moment_restart"] > 0``) and the restart also scales the
    turned tensors' multipliers by the size of the direction they just applied
    (``seek["restart_match"] > 0``)."""
    return bool(seek) and seek.get("moment_restart", 0.0) > 0 and seek.get("restart_match", 0.0) > 0


def turn_counts(controllers: Sequence[Tensor]) -> Tensor:
    """``[n]``: each controller's steps since its first turn (a copy: 0 before the turn)."""
    return torch.stack([c[SINCE] for c in controllers])


def first_turns(before: Tensor, controllers: Sequence[Tensor]) -> Tensor:
    """``[n]`` bool: the tensors whose controller took its first turn since ``before`` (their
    :func:`turn_counts` then) — their count went from 0 to more."""
    return (before == 0) & (turn_counts(controllers).to(before.device) > 0)


def restarted(moment: Tensor, turned: Tensor) -> Tensor:
    """``moment`` (``m``, ``v`` or the step count of one tensor), zero where ``turned`` (0-d):
    the pure face (differentiable, a new tensor)."""
    return torch.where(turned.to(moment.device), torch.zeros_like(moment), moment)


def restart_in_place(
    turned: Tensor, exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
) -> None:  # fmt: skip
    """Zero the moments and step counts of the tensors that ``turned`` (``[n]`` bool) marks: the
    in-place face. Where the flags are free to read (CPU, not compiling) only those tensors are
    touched (usually none); elsewhere every tensor is multiplied by its 0/1 flag, with no host
    synchronisation."""
    if host_readable(turned):
        for i in torch.nonzero(turned).flatten().tolist():
            exp_avgs[i].zero_()
            exp_avg_sqs[i].zero_()
            steps[i].zero_()
        return
    for group in (exp_avgs, exp_avg_sqs, steps):
        zero_marked(group, turned)


def match_factors(
    turned: Tensor,
    directions: Mapping[int, Tensor],
    granularity: str,
    shards: ShardReducer | None = None,
) -> dict[int, Tensor]:
    """The factor ``min(mean|d|, 1)`` of each tensor in ``directions`` (index → the direction
    ``d`` it just applied, real): its own mean at tensor and element granularity; at group
    granularity the mean over the elements of every *turned* tensor given (and over the ranks
    of ``shards``: one all-reduce of two numbers, run at every call so that every rank joins
    it), so the group's shared rate stays shared. Differentiable; no host-to-device copy (a
    CUDA graph may capture it)."""
    if granularity != "group":
        return {i: full_value(d.abs().mean()).clamp(max=1.0) for i, d in directions.items()}
    f64 = torch.float64
    total = torch.zeros(2, dtype=f64, device=turned.device)
    for i, d in directions.items():
        size = torch.stack([full_value(d.abs().sum(dtype=f64)).to(turned.device),
                            torch.full((), float(d.numel()), dtype=f64, device=turned.device)])  # fmt: skip
        total = total + turned[i].to(f64) * size
    if shards is not None:
        total = shards.sum(total)
    scale = (total[0] / total[1].clamp(min=1.0)).clamp(max=1.0)
    return {i: scale.to(d.dtype) for i, d in directions.items()}


def matched_rates(
    rates: Sequence[Tensor],
    turned: Tensor,
    directions: Sequence[Tensor],
    granularity: str,
    shards: ShardReducer | None = None,
) -> list[Tensor]:
    """The pure face of the match: new multipliers, ``m ← m · min(mean|d|, 1)`` where
    ``turned`` (``[n]`` bool), unchanged elsewhere (differentiable)."""
    factors = match_factors(turned, dict(enumerate(directions)), granularity, shards)
    return [
        torch.where(turned[i].to(r.device), r * factors[i].to(r.dtype), r)
        for i, r in enumerate(rates)
    ]


def match_in_place(
    rates: Sequence[Tensor],
    turned: Tensor,
    direction_of: Callable[[int], Tensor],
    granularity: str,
    shards: ShardReducer | None = None,
) -> None:
    """The in-place face of the match (``direction_of(i)``: tensor ``i``'s direction just
    applied, real). Where the flags are free to read only the turned tensors' directions are
    computed (usually none); elsewhere every tensor's is, and its multiplier is multiplied by
    its factor or by 1, with no host synchronisation (a pass over the moments per step)."""
    if host_readable(turned):
        indices = torch.nonzero(turned).flatten().tolist()
        factors = match_factors(turned, {i: direction_of(i) for i in indices}, granularity, shards)
        for i, factor in factors.items():
            rates[i].mul_(factor.to(rates[i].dtype))
        return
    factors = match_factors(
        turned, {i: direction_of(i) for i in range(len(rates))}, granularity, shards
    )
    for i, rate in enumerate(rates):
        one = torch.ones((), dtype=rate.dtype, device=rate.device)
        # through a view: torch.compile would drop a plain ``mul_`` on a float64 0-d rate
        scale = torch.where(turned[i].to(rate.device), factors[i].to(rate.dtype), one)
        mutable_view(rate).mul_(scale)


def match_rows(
    rate_buf: Tensor, turned: Tensor, size_sums: Tensor, numels: Tensor, granularity: str
) -> None:
    """The size match on a kernel's stacked rates (``rate_buf`` ``[n]``, in place): each turned
    tensor's multiplier times ``min(Σ|d| / n, 1)`` from the kernel's per-tensor sums of ``|d|``
    (``size_sums``) and element counts (``numels``, on the device: no host-to-device copy in a
    captured step); at group granularity pooled over the turned tensors, as
    :func:`match_factors`."""
    counts = numels.to(torch.float64)
    sums = size_sums.to(torch.float64)
    if granularity == "group":
        weight = turned.to(torch.float64)
        pooled = (weight * sums).sum() / (weight * counts).sum().clamp(min=1.0)
        factors = pooled.expand_as(sums)
    else:
        factors = sums / counts
    factors = factors.clamp(max=1.0).to(rate_buf.dtype)
    rate_buf.mul_(torch.where(turned, factors, torch.ones_like(factors)))
