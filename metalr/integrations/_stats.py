"""The scalars every integration logs: effective rates per group and per parameter tensor."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

NamedParams = Mapping[str, Tensor] | Iterable[tuple[str, Tensor]] | torch.nn.Module | None


def unwrap_optimizer(optimizer: Any) -> Any:
    """The metalr (or torch) optimizer inside framework wrappers.

    Lightning's ``LightningOptimizer`` keeps it in ``_optimizer``; accelerate's (so the
    transformers Trainer's) ``AcceleratedOptimizer`` in ``optimizer``; torch's
    ``ZeroRedundancyOptimizer`` this rank's shard in ``optim``. ``HyperLR`` also has an
    ``optimizer`` attribute (the one it wraps), so after Lightning's wrapper, unwrapping stops at
    the first object that exposes ``effective_lrs``.
    """
    for _ in range(8):  # wrappers of wrappers, never a cycle
        inner = getattr(optimizer, "_optimizer", None)
        if inner is not None and inner is not optimizer:
            optimizer = inner
            continue
        if hasattr(optimizer, "effective_lrs"):
            break
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "optim", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def _names(named_parameters: NamedParams) -> dict[Tensor, str]:
    if named_parameters is None:
        return {}
    if isinstance(named_parameters, torch.nn.Module):
        named_parameters = named_parameters.named_parameters()
    if isinstance(named_parameters, Mapping):
        named_parameters = named_parameters.items()
    return {p: name for name, p in named_parameters}


def group_lrs(optimizer: Any) -> list[Any]:
    """``group['lr']`` of every param group (of the unwrapped optimizer), for
    :func:`effective_lr_stats`: a tensor lr is copied (schedulers ``fill_`` it in place, so a
    reference taken before the step would read the next step's rate by logging time)."""
    return [
        group["lr"].detach().clone() if isinstance(group["lr"], Tensor) else group["lr"]
        for group in unwrap_optimizer(optimizer).param_groups
    ]


def _effective_rates(optimizer: Any, lrs: Sequence[Any] | None) -> dict[Tensor, Tensor]:
    groups = optimizer.param_groups
    if lrs is not None and len(lrs) != len(groups):
        raise ValueError(f"lrs has {len(lrs)} entries for {len(groups)} param groups")
    if not hasattr(optimizer, "effective_lrs"):  # a plain torch optimizer: its scheduled lr
        values = lrs if lrs is not None else [g["lr"] for g in groups]
        return {
            p: torch.as_tensor(lr, dtype=torch.float64).detach()
            for g, lr in zip(groups, values)
            for p in g["params"]
        }
    if lrs is None:
        return optimizer.effective_lrs()
    current = [g["lr"] for g in groups]
    try:  # the rates with another lr, clamped to lr_bounds exactly as the optimizer would
        for g, lr in zip(groups, lrs):
            g["lr"] = lr
        return optimizer.effective_lrs()
    finally:
        for g, lr in zip(groups, current):
            g["lr"] = lr


@torch.no_grad()
def effective_lr_stats(
    optimizer: Any,
    named_parameters: NamedParams = None,
    *,
    per_tensor: bool = True,
    prefix: str = "effective_lr",
    lrs: Sequence[Any] | None = None,
) -> dict[str, float]:
    """Effective learning rates as ``{tag: float}``, ready for any logger.

    * ``{prefix}/group{i}/min``, ``.../mean``, ``.../max`` for every param group: the same numbers
      as ``optimizer.lr_summary()`` (the mean is over rates, one per tensor at ``"tensor"``
      granularity, one per element at ``"element"``).
    * with ``per_tensor``: ``{prefix}/{name}`` for a parameter with one rate (``"group"`` and
      ``"tensor"`` granularity), ``{prefix}/{name}/min|mean|max`` for per-element rates.
      ``name`` comes from ``named_parameters`` (a module, a mapping or ``named_parameters()``);
      unnamed parameters are ``group{i}.param{j}``.

    The rates are ``lr × multiplier`` with the current ``group['lr']``, or with ``lrs`` (one per
    param group) when given. A step adapts the multiplier first and then uses it, so right after
    ``optimizer.step()`` the multipliers are those the step used; if a scheduler has already
    advanced ``group['lr']`` (Lightning and the transformers Trainer step it before their
    logging hooks), pass the lrs read before it did (:func:`group_lrs`) to log the rate the step
    actually used. A plain ``torch.optim`` optimizer (no ``effective_lrs``) reports its lr.
    Reads the rates back to the host: call it when logging, not every step on an accelerator.
    """
    optimizer = unwrap_optimizer(optimizer)
    names = _names(named_parameters)
    rates = _effective_rates(optimizer, lrs)
    stats: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        parts = []
        for j, p in enumerate(group["params"]):
            rate = rates[p].detach().double().cpu()
            parts.append(rate.reshape(-1))
            if not per_tensor:
                continue
            name = names.get(p, f"group{i}.param{j}")
            if rate.numel() == 1:
                stats[f"{prefix}/{name}"] = rate.item()
            else:
                stats[f"{prefix}/{name}/min"] = rate.min().item()
                stats[f"{prefix}/{name}/mean"] = rate.mean().item()
                stats[f"{prefix}/{name}/max"] = rate.max().item()
        flat = torch.cat(parts) if parts else torch.zeros(1, dtype=torch.float64)
        stats[f"{prefix}/group{i}/min"] = flat.min().item()
        stats[f"{prefix}/group{i}/mean"] = flat.mean().item()
        stats[f"{prefix}/group{i}/max"] = flat.max().item()
    return stats
