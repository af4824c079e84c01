"""TensorBoard: write metalr's effective learning rates with any ``SummaryWriter``.

::

    from torch.utils.tensorboard import SummaryWriter
    from metalr.integrations.tensorboard import log_effective_lrs

    writer = SummaryWriter("runs/exp")
    for step, batch in enumerate(loader):
        ...
        optimizer.step()
        if step % 50 == 0:
            log_effective_lrs(writer, optimizer, step, model.named_parameters())

Nothing is imported from TensorBoard here: the writer is used through ``add_scalar`` (and
``add_histogram``), so ``torch.utils.tensorboard.SummaryWriter``, tensorboardX's, or any object
with those methods works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from metalr.integrations._stats import (
    NamedParams,
    _effective_rates,
    _names,
    effective_lr_stats,
    unwrap_optimizer,
)

__all__ = ["log_effective_lrs"]


def log_effective_lrs(
    writer: Any,
    optimizer: Any,
    step: int,
    named_parameters: NamedParams = None,
    *,
    per_tensor: bool = True,
    histograms: bool = False,
    prefix: str = "effective_lr",
    lrs: Sequence[Any] | None = None,
) -> dict[str, float]:
    """Write per-group statistics and per-layer effective rates of ``optimizer`` at ``step``.

    Scalars (see :func:`metalr.integrations.effective_lr_stats`):
    ``{prefix}/group{i}/min|mean|max`` and, with ``per_tensor``, ``{prefix}/{name}`` per
    parameter tensor (``{prefix}/{name}/min|mean|max`` at ``"element"`` granularity), named from
    ``named_parameters`` (a module, a mapping, or ``model.named_parameters()``). With
    ``histograms``, per-element rates also go to ``add_histogram`` under ``{prefix}/{name}``.

    Call it after ``optimizer.step()`` and before ``scheduler.step()`` to log the rates that step
    used; after the scheduler has moved ``group['lr']``, pass the lrs read before it as ``lrs``
    (``metalr.integrations.group_lrs(optimizer)``, one per param group).

    Returns the scalars written.
    """
    stats = effective_lr_stats(
        optimizer, named_parameters, per_tensor=per_tensor, prefix=prefix, lrs=lrs
    )
    for tag, value in stats.items():
        writer.add_scalar(tag, value, global_step=step)
    if histograms:
        inner = unwrap_optimizer(optimizer)
        if hasattr(inner, "effective_lrs"):
            names = _names(named_parameters)
            rates = _effective_rates(inner, lrs)
            for i, group in enumerate(inner.param_groups):
                for j, p in enumerate(group["params"]):
                    if rates[p].numel() > 1:
                        name = names.get(p, f"group{i}.param{j}")
                        writer.add_histogram(
                            f"{prefix}/{name}", rates[p].detach().float().cpu(), global_step=step
                        )
    return stats
