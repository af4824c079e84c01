r"""Restarting Adam's moment estimates at the ramp's turn (``seek={"moment_restart": 1}``).

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
gain five seeds do not separate from noise, so it is opt-in and not part of the recommended
option (``experiments/results/fit_controller/moment_restart/result.md``).

Example::

    optimizer = metalr.AdamHD(model.parameters(), lr=1e-3, seek={"moment_restart": 1},
                              validation={"ray_steps": total_steps})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metalr.functional._common import host_readable
from metalr.functional._controller import SINCE


def requested(seek: Mapping[str, Any] | None, controllers: Sequence[Tensor] | None) -> bool:
    """Whether a step restarts moments: the seek rule's controllers are given and its
    ``moment_restart`` is on."""
    return controllers is not None and bool(seek) and seek.get("moment_restart", 0.0) > 0


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
    keep = (~turned).unbind(0)
    for group in (exp_avgs, exp_avg_sqs, steps):
        torch._foreach_mul_(list(group), [k.to(t.dtype) for k, t in zip(keep, group)])
