r"""A loss-spike guard for ``step(closure)``: a training loss far above its running level cuts the
rates before the step that follows it (pure functions).

A loss that jumps is the plainest evidence a controller gets that the last steps were too large:
the hypergradient's cosine sees it only through the gradients, a few steps late (the seek rule
rolls back ``turn_lag`` ramp steps for that lag). When ``step(closure)`` returns the loss, the
guard keeps an exponentially weighted mean ``μ`` and variance ``σ²`` of it and calls a step a
*spike* when, after ``warmup`` observed losses,

::

    δ_t = L_t − μ_{t−1} > sigmas · σ_{t−1}

(a one-sided z-test, free of the loss's scale and offset). Then, before the step's update,

* every rate multiplier is multiplied by ``min(cut, lr_calm / lr_t)``: halved (``cut``), or,
  when the scheduled ``lr`` has jumped since the last calm loss (``lr_calm``: the ``lr`` of the
  update that led to it), brought back to the effective rate that was calm — a failed increase
  rolled back, as AdaLRS does (a warm restart, a resumed run at the wrong ``lr``, a typo in a
  schedule); the step uses the cut rates;
* with ``rule="seek"`` a tensor still ramping turns there (its ramp ends, its ceiling becomes
  ``headroom`` × the cut level, as at the controller's own turn), and no tensor takes a turn
  back through the re-opened ramp (steps since the turn are set past ``resume_window``).

The statistics then take the loss in; a spike re-centres the mean at its level (a lasting change
of level costs one cut; only a further escalation cuts again)::

    μ_t = μ_{t−1} + (1 − decay) δ_t   (a spike: μ_t = L_t),     σ²_t = decay · (σ²_{t−1} + (1 − decay) δ_t²)

(the first loss sets ``μ`` and ``σ² = 0``); a calm loss sets ``lr_calm`` to the ``lr`` of the
previous step, a spike to this step's (the cut rates have absorbed the jump). A loss that is not finite changes nothing (a NaN gradient skips the step
already). The statistics ``(μ, σ², count, spikes, lr of the last step, lr_calm)`` are one small
vector per param group (:data:`SPIKE_STATS_SIZE` entries), in the state of the group's first
parameter (``optimizer.state[p]['hd_spike_guard']``), so ``state_dict()`` resumes them.

The defaults (:data:`SPIKE_GUARD_DEFAULTS`) are reasoned, not fitted: a 4σ rise is rare for
minibatch noise yet far below a divergence; halving is Rprop's fall; 20 losses of warm-up and a
decay of 0.95 give the variance a ~20-step memory.

Example:
    >>> optimizer = metalr.AdamHD(model.parameters(), lr=1e-3, spike_guard=True)
    >>> def closure():
    ...     optimizer.zero_grad()
    ...     loss = loss_fn(model(x), y)
    ...     loss.backward()
    ...     return loss
    >>> optimizer.step(closure)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metalr.functional._common import resolve_constants
from metalr.functional._controller import CEILING, RAMP, SINCE
from metalr.functional._rate_moves import log_level

#: The guard's constants (``spike_guard={...}`` overrides them; ``True`` takes them as they are).
SPIKE_GUARD_DEFAULTS: dict[str, float] = {
    "sigmas": 4.0,
    "cut": 0.5,
    "decay": 0.95,
    "warmup": 20.0,
}
_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "sigmas": (0.0, math.inf, True),
    "cut": (0.0, 1.0, True),
    "decay": (0.0, 1.0, False),
    "warmup": (1.0, math.inf, False),
}
#: Entries of the statistics vector: running mean, running variance, losses seen, spikes, the
#: scheduled lr of the last step, the lr of the last update whose loss was calm (0: none yet).
MEAN, VAR, COUNT, SPIKES, LAST_LR, CALM_LR = range(6)
SPIKE_STATS_SIZE = 6


def resolve_spike_guard(options: bool | Mapping[str, float] | None) -> dict[str, float] | None:
    """``None`` (off) for ``None``/``False``, the defaults for ``True``, else the defaults
    overridden by ``options``, each checked; raises ``ValueError`` naming the key and its
    range (``decay`` below 1, ``warmup`` finite)."""
    if options is None or options is False:
        return None
    if options is True:
        return dict(SPIKE_GUARD_DEFAULTS)
    if not isinstance(options, Mapping):
        raise ValueError(  # noqa: TRY004 - torch.optim raises ValueError for bad options
            f"Invalid spike_guard: {options!r}; expected None, True, False or a dict of "
            f"{sorted(SPIKE_GUARD_DEFAULTS)}"
        )
    return resolve_constants("spike_guard", SPIKE_GUARD_DEFAULTS, _BOUNDS, options, finite=True)


def initial_spike_stats(device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """Fresh statistics: no loss seen yet."""
    return torch.zeros(SPIKE_STATS_SIZE, dtype=dtype, device=device)


def padded_spike_stats(stats: Tensor) -> Tensor:
    """Statistics saved with fewer entries (before the rolled-back rate) completed with zeros
    (no calm rate known: the next spike cuts by ``cut``)."""
    if stats.numel() >= SPIKE_STATS_SIZE:
        return stats
    return torch.cat([stats, stats.new_zeros(SPIKE_STATS_SIZE - stats.numel())])


def spike_guard_update(
    stats: Tensor, loss: Tensor, lr: float | Tensor, options: Mapping[str, float]
) -> tuple[Tensor, Tensor]:
    """``(new statistics, factor)`` after observing ``loss`` (0-d) at a step whose scheduled rate
    is ``lr``: the factor the rates take (1 without a spike, else ``min(cut, lr_calm / lr)``),
    and the statistics with the loss taken in (unchanged for a loss that is not finite)."""
    loss = loss.detach().to(device=stats.device, dtype=stats.dtype).reshape(())
    if isinstance(lr, Tensor):
        lr_now = lr.detach().to(device=stats.device, dtype=stats.dtype).reshape(())
    else:
        lr_now = torch.tensor(float(lr), device=stats.device, dtype=stats.dtype)
    mean, var, count, spikes, last_lr, calm_lr = stats.unbind(0)
    finite = torch.isfinite(loss)
    delta = loss - mean
    spike = finite & (count >= options["warmup"]) & (delta > options["sigmas"] * torch.sqrt(var))
    cut = torch.full_like(loss, options["cut"])
    back = torch.where((calm_lr > 0) & (lr_now > 0), calm_lr / lr_now.clamp_min(1e-38), cut)
    factor = torch.where(spike, torch.minimum(cut, back), torch.ones_like(cut))
    decay = options["decay"]
    first = count == 0
    # a spike re-centres the mean at the new level (only a further escalation cuts again)
    new_mean = torch.where(first | spike, loss, mean + (1 - decay) * delta)
    new_var = torch.where(first, torch.zeros_like(var), decay * (var + (1 - decay) * delta * delta))
    # the cut rates absorb a jump of the scheduled lr: the calm lr is this step's from now on
    new_calm = torch.where(spike, lr_now, torch.where(last_lr > 0, last_lr, calm_lr))
    new = torch.stack([new_mean, new_var, count + 1, spikes + spike.to(stats.dtype), lr_now,
                       new_calm])  # fmt: skip
    return torch.where(finite, new, stats), factor


def spike_cut(
    rates: Sequence[Tensor],
    controllers: Sequence[Tensor] | None,
    factor: Tensor,
    seek: Mapping[str, Any] | None = None,
) -> tuple[list[Tensor], list[Tensor] | None]:
    """Rates (and seek controllers) after a step's guard decision ``factor`` (0-d; below 1 on a
    spike): every rate times ``factor`` and, on a spike, for the seek rule, the ramping tensors
    turned (ramp step 0, ceiling ``log(cut level) + log(headroom)``) and every tensor's steps
    since the turn set past ``resume_window`` (a spike's turn is not taken back); all unchanged
    without a spike."""
    spike = factor < 1
    new_rates = [r * factor.to(device=r.device, dtype=r.dtype) for r in rates]
    if controllers is None:
        return new_rates, None
    if seek is None:
        raise ValueError("spike_cut needs the seek constants with controllers")
    ctrl = torch.stack([c.to(controllers[0].dtype) for c in controllers])  # [n, K]
    hit = spike.to(ctrl.device)
    ramping = hit & (ctrl[:, RAMP] > 0)
    levels = torch.stack(  # each tensor's log-level after the cut (elements: their largest)
        [log_level(r, "element").to(device=ctrl.device, dtype=ctrl.dtype) for r in new_rates]
    )
    new = ctrl.clone()
    new[:, RAMP] = torch.where(ramping, torch.zeros_like(ctrl[:, RAMP]), ctrl[:, RAMP])
    new[:, CEILING] = torch.where(ramping, levels + math.log(seek["headroom"]), ctrl[:, CEILING])
    past_window = ctrl[:, SINCE].clamp_min(math.floor(seek["resume_window"]) + 1.0)
    new[:, SINCE] = torch.where(hit, past_window, ctrl[:, SINCE])
    return new_rates, [n.to(c.dtype) for n, c in zip(new.unbind(0), controllers)]
