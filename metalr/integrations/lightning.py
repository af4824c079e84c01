"""PyTorch Lightning: log metalr's effective learning rates with a callback.

``configure_optimizers`` can return a metalr optimizer exactly like a ``torch.optim`` one (alone,
or in the ``{"optimizer": ..., "lr_scheduler": {...}}`` dict with any scheduler); the learned
multipliers live in the optimizer state, so Lightning checkpoints and restores them
(``trainer.fit(model, ckpt_path=...)``) with nothing else to do. Lightning's own
``LearningRateMonitor`` logs only ``group['lr']`` (the schedule); add :class:`EffectiveLRMonitor`
to see the rates actually used::

    from metalr.integrations.lightning import EffectiveLRMonitor
    trainer = L.Trainer(callbacks=[EffectiveLRMonitor(per_tensor=True)], ...)

Importing this module imports Lightning (``lightning.pytorch``, else ``pytorch_lightning``);
``import metalr`` never does.
"""

from __future__ import annotations

from typing import Any

from metalr.integrations._stats import effective_lr_stats, group_lrs

try:  # the unified package first, as Lightning recommends
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback
    except ImportError as exc:
        raise ImportError(
            "metalr.integrations.lightning needs Lightning: pip install lightning "
            "(pin torch in the same command)"
        ) from exc

__all__ = ["EffectiveLRMonitor"]


class EffectiveLRMonitor(Callback):
    """Log the effective rates ``group['lr'] × multiplier`` of every optimizer while training.

    After an optimizer step, every ``logging_interval`` steps (default: the trainer's
    ``log_every_n_steps``), writes to every logger of the trainer:

    * ``{prefix}/group{i}/min``, ``/mean``, ``/max`` per param group (reduced as in
      ``lr_summary()``);
    * with ``per_tensor=True``, one curve per parameter tensor, named after the module's
      parameters: ``{prefix}/{name}`` ("group"/"tensor" granularity) or
      ``{prefix}/{name}/min|mean|max`` ("element" granularity).

    The values are the rates the step just taken used: its multipliers times the ``group['lr']``
    read at the start of the batch (Lightning steps ``interval="step"`` schedulers before
    ``on_train_batch_end``, so the current ``group['lr']`` is already the next step's). With
    several optimizers the prefix gains ``/opt{k}``. Plain ``torch.optim`` optimizers report
    their lr. The last values logged are kept in :attr:`last_metrics` (also when the trainer
    has no logger).

    Args:
        logging_interval: log every this many optimizer steps (default: None, i.e. the
            trainer's ``log_every_n_steps``).
        per_tensor: also log one rate per parameter tensor (default: False).
        prefix: metric name prefix (default: "effective_lr").
    """

    def __init__(
        self,
        logging_interval: int | None = None,
        per_tensor: bool = False,
        prefix: str = "effective_lr",
    ) -> None:
        if logging_interval is not None and logging_interval < 1:
            raise ValueError(f"Invalid logging_interval: {logging_interval}; expected an int >= 1")
        self.logging_interval = logging_interval
        self.per_tensor = per_tensor
        self.prefix = prefix
        self.last_metrics: dict[str, float] = {}
        self._last_logged_step = -1
        self._step_lrs: list[list[Any]] | None = None

    def metrics(
        self, trainer: Any, pl_module: Any, lrs: list[list[Any]] | None = None
    ) -> dict[str, float]:
        """The values this callback logs: the trainer's optimizers, with ``lrs`` per optimizer
        (a list per param group) instead of the current ``group['lr']`` when given."""
        optimizers = list(trainer.optimizers)
        names = dict(pl_module.named_parameters())
        metrics: dict[str, float] = {}
        for k, optimizer in enumerate(optimizers):
            prefix = self.prefix if len(optimizers) == 1 else f"{self.prefix}/opt{k}"
            group_lr = lrs[k] if lrs is not None and k < len(lrs) else None
            metrics.update(
                effective_lr_stats(
                    optimizer, names, per_tensor=self.per_tensor, prefix=prefix, lrs=group_lr
                )
            )
        return metrics

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._step_lrs = [group_lrs(optimizer) for optimizer in trainer.optimizers]

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # counts optimizer steps; already advanced past this one
        interval = self.logging_interval or max(int(trainer.log_every_n_steps), 1)
        # With gradient accumulation several batches share a step: log each step once.
        if step == self._last_logged_step or step % interval != 0 or not trainer.optimizers:
            return
        self._last_logged_step = step
        lrs = self._step_lrs
        if lrs is not None and [len(x) for x in lrs] != [
            len(o.param_groups) for o in trainer.optimizers
        ]:
            lrs = None  # param groups were added during the step: fall back to the current lr
        self.last_metrics = self.metrics(trainer, pl_module, lrs)
        for logger in trainer.loggers:
            logger.log_metrics(self.last_metrics, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"last_logged_step": self._last_logged_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_logged_step = state_dict.get("last_logged_step", -1)
