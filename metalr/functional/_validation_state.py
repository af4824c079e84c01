"""The validation statistics (``optimizer.state[p]['hd_validation']``) and the hold (pure).

One small vector per parameter tensor: the validation cosine's running averages (the
validation signal's, :func:`metalr.functional._validation_update.seek_validation_update`), the
validation loss's trend and the tensor's rate level after the last observation — what the
seek rule's hold (``validation={"hold": P, "plateau_cut": c}``) reads: :func:`loss_trend` and
:func:`held_rates`; and the rewind's pure halves (``validation={"rewind": r}``): which
parameters become the snapshot and which go back to it (:class:`Rewind`,
:func:`kept_snapshots`, :func:`restored`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from metalr.functional._rate_moves import log_level

#: Entries of a validation-statistics vector: the validation cosine's running mean, mean square
#: and observation count; the validation loss's running average, its best, the training step
#: (the controller's count) of that best and the losses counted (the hold's); the tensor's
#: log-rate level after the last observation (``-inf``: none yet, or the tensor was still ramping).
VAL_MEAN, VAL_SQ, VAL_COUNT, LOSS_AVG, LOSS_BEST, BEST_STEP, LOSS_COUNT, LEVEL = range(8)
VALIDATION_SIZE = 8


def initial_validation_stats(param: Tensor, dtype: torch.dtype) -> Tensor:
    """Fresh statistics for ``param``: no observation yet (no best loss, no level)."""
    stats = torch.zeros(VALIDATION_SIZE, dtype=dtype, device=param.device)
    stats[LOSS_BEST] = math.inf
    stats[LEVEL] = -math.inf
    return stats


def observed(stats: Sequence[Tensor]) -> list[bool]:
    """Whether each statistics vector has counted a validation observation (one host read)."""
    if not stats:
        return []
    ref = stats[0]
    counts = torch.stack(
        [completed_validation_stats(s)[[VAL_COUNT, LOSS_COUNT]].to(ref.device, ref.dtype)
         for s in stats]
    )  # fmt: skip
    return (counts > 0).any(dim=1).tolist()


def completed_validation_stats(stats: Tensor) -> Tensor:
    """``stats`` from a checkpoint of before the hold (3 entries), completed with fresh loss
    statistics and no level; a full vector as it is."""
    if stats.numel() >= VALIDATION_SIZE:
        return stats
    fresh = initial_validation_stats(stats, stats.dtype)
    return torch.cat([stats, fresh[stats.numel() :]])


class LossTrend(NamedTuple):
    """The loss statistics after one observation and what they decide, per tensor (``[n]``
    bools): ``improved`` (the running average made a new best now), ``holding`` (a new best
    within the last ``hold`` steps) and ``cutting`` (none for ``max(cut_after, hold)`` steps)."""

    stats: Tensor
    improved: Tensor
    holding: Tensor
    cutting: Tensor


def loss_trend(
    loss_stats: Tensor, loss: Tensor, step: Tensor, options: Mapping[str, float]
) -> LossTrend:
    """The validation loss's running average ``A``, its best ``B``, the training step ``t_B`` of
    that best and the count ``n`` (stacked ``[n_tensors, 4]``) after one observation ``v`` at
    training step ``t`` (``step``: the controllers' count of active steps, ``[n_tensors]``),
    whether it improved (``A < B_old``), whether the hold holds (``t − t_B < hold``: a new best
    within the last ``hold`` steps) and whether the cut cuts (``t − t_B ≥ max(cut_after,
    hold)``)::

        A ← v if n = 0 else δ A + (1 − δ) v,    B ← min(B, A),    t_B ← t if A < B_old

    (``δ = loss_decay``). Counting steps, not observations, keeps the hold's patience the same
    whatever the observation frequency."""
    avg, best, best_step, count = loss_stats.unbind(1)
    v = loss.detach().to(device=avg.device, dtype=avg.dtype).reshape(())
    step = step.to(device=avg.device, dtype=avg.dtype)
    decay = options.get("loss_decay", 0.5)
    new_avg = torch.where(count > 0, decay * avg + (1 - decay) * v, v.expand_as(avg))
    improved = new_avg < best
    new_best = torch.minimum(best, new_avg)
    new_best_step = torch.where(improved, step, best_step)
    waited = step - new_best_step
    holding = waited < options.get("hold", 0.0)
    cutting = waited >= max(options.get("cut_after", 0.0), options.get("hold", 0.0))
    stats = torch.stack([new_avg, new_best, new_best_step, count + 1], dim=1)
    return LossTrend(stats, improved, holding, cutting)


def held_rates(
    rates: Sequence[Tensor],
    levels: Tensor,
    settled: Tensor,
    holding: Tensor,
    cutting: Tensor,
    options: Mapping[str, float],
    granularity: str,
) -> list[Tensor]:
    """The rates the hold leaves before the validation move: a settled rate below its level
    ``ℓ`` after the last observation is brought back up to it while the loss improves (per
    element: all of the tensor's rates by the one factor that brings their largest back), and
    multiplied by ``plateau_cut`` once it has not improved for ``max(cut_after, hold)`` training
    steps (in between, the training signal alone moves it)::

        log m ← log m + max(0, ℓ − log m)     (holding; ℓ = -inf: no level yet, no move)
        log m ← log m + log(plateau_cut)       (cutting)
    """
    now = torch.stack([log_level(r, granularity).to(levels.dtype) for r in rates])
    back = (levels - now).clamp_min(0)
    back = torch.where(torch.isfinite(back), back, torch.zeros_like(back))
    cut = math.log(options.get("plateau_cut", 1.0))
    cuts = torch.where(cutting, torch.full_like(back, cut), torch.zeros_like(back))
    shift = torch.where(holding, back, cuts)
    shift = torch.where(settled, shift, torch.zeros_like(shift))
    return [r * torch.exp(s).to(r.dtype) for r, s in zip(rates, shift.unbind(0))]


class Rewind(NamedTuple):
    """What the rewind does to each parameter tensor at one observation (``[n]`` bools):
    ``keep``: the loss's running average made a new best, so the parameters become the
    snapshot (:func:`kept_snapshots`); ``restore``: the hold's cut fires (no new best for
    ``max(cut_after, hold)`` training steps), so the parameters go back to the snapshot
    (:func:`restored`) as their rate is cut."""

    keep: Tensor
    restore: Tensor


def kept_snapshots(
    params: Sequence[Tensor], snapshots: Sequence[Tensor], keep: Tensor
) -> list[Tensor]:
    """The snapshots after an observation (pure): ``S ← θ`` where the loss's running average
    made a new best (``keep[i]``), else ``S`` as it was."""
    return [
        torch.where(k.to(device=p.device, dtype=torch.bool), p, s)
        for p, s, k in zip(params, snapshots, keep)
    ]


def restored(
    params: Sequence[Tensor],
    snapshots: Sequence[Tensor],
    restore: Tensor | Sequence[Tensor],
    fraction: float,
) -> list[Tensor]:
    """The parameters after a cut's rewind (pure; ``fraction`` ``r``, 1: all the way back)::

        θ ← θ + r (S − θ)      where ``restore[i]``, else θ as it is

    The optimizers apply it at the end of the training step that follows the observation (in
    place of that step's move), so that under ZeroRedundancyOptimizer, whose ranks each update
    their own share and then broadcast it, every rank sees the rewound parameters as one
    process would."""
    out = []
    for p, s, r in zip(params, snapshots, restore):
        back = s if fraction == 1.0 else torch.lerp(p, s, fraction)
        out.append(torch.where(r.to(device=p.device, dtype=torch.bool), back, p))
    return out
