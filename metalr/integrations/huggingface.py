"""Hugging Face transformers ``Trainer``: metalr optimizers and effective-rate logging.

Pass a metalr optimizer as ``Trainer(..., optimizers=(optimizer, scheduler))``; with
``scheduler=None`` the Trainer builds its own (``lr_scheduler_type``). Every Trainer scheduler
rewrites ``group['lr']`` each step; the learned multiplier lives in the optimizer state, so the
adaptation survives and the rate used is ``group['lr'] × multiplier``. The Trainer's
``learning_rate`` log is the schedule only; :func:`add_effective_lr_callback` adds the effective
rates to every log::

    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, None))
    add_effective_lr_callback(trainer, per_tensor=True)
    trainer.train()

Importing this module imports ``transformers``; ``import metalr`` never does.
"""

from __future__ import annotations

from typing import Any

from metalr.integrations._stats import effective_lr_stats, group_lrs

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "metalr.integrations.huggingface needs transformers (and accelerate for its Trainer): "
        'pip install "torch==<your torch>" transformers accelerate'
    ) from exc

__all__ = ["EffectiveLRCallback", "add_effective_lr_callback"]


class EffectiveLRCallback(TrainerCallback):
    """Add the effective rates to the Trainer's logs (``state.log_history`` and reporters).

    Adds ``{prefix}/group{i}/min|mean|max`` and, with ``per_tensor``, ``{prefix}/{name}`` per
    parameter tensor to every ``on_log`` event: the rates the last step used, i.e. its
    multipliers times the lr read just before ``optimizer.step()`` (the Trainer's
    ``learning_rate``; its scheduler has already moved ``group['lr']`` on by the time it logs).

    The Trainer hands the same ``logs`` dict to its callbacks in order, so reporting
    integrations (TensorBoard, W&B, ...) see the new entries only if this callback runs before
    them: register it with :func:`add_effective_lr_callback`.
    """

    def __init__(self, per_tensor: bool = False, prefix: str = "effective_lr") -> None:
        self.per_tensor = per_tensor
        self.prefix = prefix
        self._step_lrs: list[Any] | None = None

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if optimizer is not None:
            self._step_lrs = group_lrs(optimizer)

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: dict[str, float] | None = None,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if (
            logs is None
            or optimizer is None
            or not any(k in logs for k in ("loss", "learning_rate"))
        ):
            return  # evaluation and end-of-training summaries carry no rates
        lrs = self._step_lrs
        if lrs is not None and len(lrs) != len(group_lrs(optimizer)):
            lrs = None
        stats = effective_lr_stats(
            optimizer, model, per_tensor=self.per_tensor, prefix=self.prefix, lrs=lrs
        )
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)


def add_effective_lr_callback(
    trainer: Any, per_tensor: bool = False, **kwargs: Any
) -> EffectiveLRCallback:
    """Register an :class:`EffectiveLRCallback` first in ``trainer``, so reporters log it too."""
    callback = EffectiveLRCallback(per_tensor=per_tensor, **kwargs)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
