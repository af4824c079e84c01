"""PyTorch Lightning: log metalr's effective learning rates with a callback.

``configure_optimizers`` can return a metalr optimizer exactly like a ``torch.optim`` one (alone,
or in the ``{"optimizer": ..., "lr_scheduler": {...}}`` dict with any scheduler); the learned
multipliers live in the optimizer state, so Lightning checkpoints and restores them
(``trainer.fit(model, ckpt_path=...)``) with nothing else to do. Lightning's own
``LearningRateMonitor`` logs only ``group['lr']`` (the schedule); add :class:`EffectiveLRMonitor`
to see the rates actually used::

    from metalr.integrations.lightning import EffectiveLRMonitor
    trainer = L.Trainer(callbacks=[EffectiveLRMonitor(per_tensor=True)], ...)

To let the rates follow a held-out loss (``optimizer.observe_validation``), add
:class:`ObserveValidation`: every ``k`` training steps it draws a validation batch and observes the
loss your module computes on it (a ``validation_loss(batch)`` method by default)::

    trainer = L.Trainer(callbacks=[ObserveValidation(every_n_steps=20)], ...)

or, with the validation loop's own loss (the whole validation set, already computed, e.g.
every 20 steps with ``val_check_interval=20``), :class:`ObserveValidationLoss` hands it to the
optimizer as a loss observed alone (the seek rule's hold and rewind; no backward)::

    trainer = L.Trainer(val_check_interval=20, callbacks=[ObserveValidationLoss("val_loss")], ...)

The ray ceiling (``validation={"ray_steps": T}``) needs the budget: give ``configure_optimizers``
``self.trainer.estimated_stepping_batches``. With :class:`ObserveValidation`'s minibatches that
is the recommended option; the ray alone (``"hypergrad_lr": 0, "hold": 0, "ray_clock": 0,
"ray_gate": 1``) reads the whole set's gradient: give :class:`ObserveValidation` a loader of the
whole set as one batch (``dataloader=``).

Importing this module imports Lightning (``lightning.pytorch``, else ``pytorch_lightning``);
``import metalr`` never does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

from metalr.functional.validation import RECOMMENDED_EVERY
from metalr.integrations._observe import (
    BatchCycle,
    as_loss,
    check_every_n_steps,
    eval_mode,
    hypergrad_optimizers,
    observe_all,
    observe_loss_alone,
    observed_metric,
)
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

__all__ = ["EffectiveLRMonitor", "ObserveValidation", "ObserveValidationLoss"]


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
        # Log when the step count has passed a multiple of the interval since the last log: with
        # gradient accumulation several batches share a step (logged once); with several
        # optimizers the count moves by more than one per batch (a test of step % interval
        # would then see only some multiples).
        if not _passed_a_multiple(step, self._last_logged_step, interval) or not trainer.optimizers:
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


class ObserveValidation(Callback):
    """Every ``every_n_steps`` optimizer steps, observe a validation batch's loss: the metalr
    optimizers' rates then follow the validation signal (``optimizer.observe_validation``).

    After the optimizer step (in ``on_train_batch_end``; with ``accumulate_grad_batches`` once per
    step), the callback draws the next batch of the validation data, moves it to the device
    (through the module's batch-transfer hooks, called as in the validation loop), and calls
    ``observe_validation`` on every metalr optimizer of the trainer with the loss ``loss_fn``
    computes on it, under the trainer's precision (autocast; fp16's ``GradScaler`` is passed on).
    ``.grad`` is not touched, nothing is logged, and Lightning's own validation loop runs as
    before.

    The loss comes from the module by default, a method ``validation_loss(batch) -> Tensor``:
    Lightning's ``validation_step`` is not called, because it logs (``self.log("val_loss", ...)``
    from inside a training hook would be recorded as a training-step value and could feed a
    checkpoint's ``monitor``) and usually returns nothing; most modules already have the shared
    loss function that ``training_step`` and ``validation_step`` call. It runs in eval mode
    (dropout off, BatchNorm's running statistics unchanged by validation data), after which
    every submodule's mode is restored.

    The batches come from ``dataloader`` (any iterable of batches), else from the trainer's
    (first) validation dataloader, which Lightning has already given a ``DistributedSampler``
    under DDP, so each rank observes its own batch and the validation gradient is averaged
    over the ranks (``process_group="auto"``). The callback keeps its own iterator and starts it
    again when it runs out; prefer a dedicated loader when the validation one has
    ``persistent_workers=True`` (one worker pool, one iterator at a time). Checkpoints save
    how many batches were drawn; a resumed run continues with the same batches for a loader
    with a deterministic order.

    DDP and single-device strategies are supported (the loss is computed on the
    ``LightningModule`` itself, outside DDP's wrapper, as ``observe_validation`` asks); sharded
    strategies (FSDP, DeepSpeed) are not.

    Args:
        every_n_steps: observe after every this many optimizer steps (default: 20, the
            recommended frequency).
        loss_fn: the name of a method of the ``LightningModule`` called as ``method(batch)``, or
            a function called as ``loss_fn(pl_module, batch)`` (an unbound method such as
            ``MyModule.shared_loss`` works too); it returns the loss tensor, or a dict with
            ``"loss"`` (default: "validation_loss").
        dataloader: the validation batches (default: None, i.e. the trainer's validation
            dataloader).
        eval_mode: compute the loss with the module in eval mode (default: True).
        process_group: passed to ``observe_validation`` (default: "auto").

    Attributes:
        observations: how many times the loss was observed.
        last_loss: the last observed loss (detached tensor; None before the first).

    Example:
        >>> class Model(L.LightningModule):
        ...     def validation_loss(self, batch):
        ...         x, y = batch
        ...         return F.cross_entropy(self(x), y)
        ...     def training_step(self, batch, batch_idx):
        ...         return self.validation_loss(batch)
        ...     def configure_optimizers(self):
        ...         return metalr.AdamHD(self.parameters(), lr=1e-3)
        >>> trainer = L.Trainer(callbacks=[ObserveValidation(every_n_steps=20)])
        >>> trainer.fit(Model(), train_loader, val_loader)
    """

    def __init__(
        self,
        every_n_steps: int = RECOMMENDED_EVERY,
        loss_fn: str | Callable[[Any, Any], Tensor | Mapping[str, Tensor]] = "validation_loss",
        dataloader: Iterable[Any] | None = None,
        *,
        eval_mode: bool = True,
        process_group: Any = "auto",
    ) -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps)
        if not (isinstance(loss_fn, str) or callable(loss_fn)):
            raise TypeError(f"loss_fn must be a method name or a callable, got {loss_fn!r}")
        self.loss_fn = loss_fn
        self.dataloader = dataloader
        self.eval_mode = eval_mode
        self.process_group = process_group
        self.observations = 0
        self.last_loss: Tensor | None = None
        self._last_step = -1
        self._trainer: Any = None
        self._batches = BatchCycle(self._validation_data)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._trainer = trainer
        hypergrad_optimizers(trainer.optimizers, type(self).__name__)
        if isinstance(self.loss_fn, str) and not callable(getattr(pl_module, self.loss_fn, None)):
            raise AttributeError(  # noqa: TRY004 - a missing method, not a wrong type
                f"ObserveValidation: {type(pl_module).__name__} has no method {self.loss_fn!r}; "
                f"define {self.loss_fn}(self, batch) returning the validation loss, or pass "
                "loss_fn=<method name> or loss_fn=lambda module, batch: ..."
            )
        self._check_validation_data()

    def _validation_data(self) -> Iterable[Any]:
        if self.dataloader is not None:
            return self.dataloader
        loaders = self._trainer.val_dataloaders if self._trainer is not None else None
        if loaders is None:  # validation not set up (no validation_step, or not run yet)
            loaders = _fit_validation_source(self._trainer)
        if isinstance(loaders, Mapping):
            loaders = next(iter(loaders.values()), None)
        elif isinstance(loaders, Sequence):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            raise ValueError(
                "ObserveValidation found no validation dataloader: pass dataloader= or give "
                "the Trainer one (trainer.fit(model, train_loader, val_loader), a datamodule or "
                "the module's val_dataloader())"
            )
        return loaders

    def _check_validation_data(self) -> None:
        """At the start of training: refuse a run that will have no validation batches to draw
        (rather than fail ``every_n_steps`` steps into it)."""
        if self.dataloader is None and self._trainer is None:
            return
        data = self._validation_data()
        try:
            empty = len(data) == 0  # a loader over an empty dataset (an iterable may not say)
        except TypeError:
            return
        if empty:
            raise ValueError(
                "ObserveValidation's validation dataloader has no batches (an empty dataset?): "
                "there would be nothing to observe"
            )

    def _loss(self, pl_module: Any, batch: Any) -> Tensor:
        if isinstance(self.loss_fn, str):
            return as_loss(getattr(pl_module, self.loss_fn)(batch))
        return as_loss(self.loss_fn(pl_module, batch))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # counts optimizer steps; already past the one just taken
        if not _passed_a_multiple(step, self._last_step, self.every_n_steps):
            return
        self._last_step = step
        self._trainer = trainer
        optimizers = hypergrad_optimizers(trainer.optimizers, type(self).__name__)
        val_batch = self._to_device(trainer, self._batches.next())
        precision = trainer.precision_plugin

        def closure() -> Tensor:
            with precision.forward_context():
                return self._loss(pl_module, val_batch)

        with eval_mode(pl_module, self.eval_mode):
            self.last_loss = observe_all(
                optimizers, closure, scaler=getattr(precision, "scaler", None),
                process_group=self.process_group,
            )  # fmt: skip
        self.observations += 1

    @staticmethod
    def _to_device(trainer: Any, batch: Any) -> Any:
        """The batch on the device through the module's transfer hooks, which see the stage
        they see in Lightning's validation loop (``trainer.validating``: no training-only
        augmentation); the training stage is back before the loss is computed."""
        stage = trainer.state.stage
        trainer.validating = True  # as Lightning does to set up its validation data mid-fit
        try:
            return trainer.strategy.batch_to_device(batch)
        finally:
            trainer.state.stage = stage

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self._last_step,
            "observations": self.observations,
            "batches_drawn": self._batches.drawn,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step", -1)
        self.observations = state_dict.get("observations", 0)
        self._batches.skip(state_dict.get("batches_drawn", 0))


class ObserveValidationLoss(Callback):
    """After each validation run of ``trainer.fit``, hand the logged validation loss to every
    metalr optimizer of the trainer as a loss observed alone
    (``optimizer.observe_validation(loss, hypergradient=False)``): the seek rule's hold keeps the
    rates while it improves and cuts them once it has stopped, and with
    ``validation={"rewind": 1}`` the cut sends the weights back to the best run's.

    The loss is ``trainer.callback_metrics[monitor]`` — what ``validation_step`` logs with
    ``self.log(monitor, ...)``, averaged over the whole validation set by Lightning — so it
    costs nothing beyond the validation loop itself; schedule that loop with the Trainer's
    ``val_check_interval`` (steps) or ``check_val_every_n_epoch``. The sanity check's run and
    ``trainer.validate()`` are not observed. Under DDP a loss logged without ``sync_dist=True``
    differs between ranks: it is averaged over them (``process_group="auto"``), so the
    replicated optimizers stay equal. A loss measured on the same examples each time needs no
    running average: ``validation={"loss_decay": 0.0}`` is the setting study 9 uses with it.

    Args:
        monitor: the logged name of the validation loss (default: "val_loss").
        process_group: passed to ``observe_validation`` (default: "auto").

    Attributes:
        observations: how many validation losses were observed.
        last_loss: the last observed loss (detached tensor; None before the first).

    Example:
        >>> class Model(L.LightningModule):
        ...     def validation_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         self.log("val_loss", F.cross_entropy(self(x), y))
        ...     def configure_optimizers(self):
        ...         return metalr.AdamHD(self.parameters(), lr=1e-3,
        ...                              validation={"loss_decay": 0.0, "rewind": 1.0})
        >>> trainer = L.Trainer(val_check_interval=20, callbacks=[ObserveValidationLoss()])
    """

    def __init__(self, monitor: str = "val_loss", *, process_group: Any = "auto") -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor must be the logged metric's name, got {monitor!r}")
        self.monitor = monitor
        self.process_group = process_group
        self.observations = 0
        self.last_loss: Tensor | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        hypergrad_optimizers(trainer.optimizers, type(self).__name__)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.state.fn.value != "fit":
            return
        who = type(self).__name__
        value = observed_metric(trainer.callback_metrics, self.monitor, who)
        optimizers = hypergrad_optimizers(trainer.optimizers, who)
        self.last_loss = observe_loss_alone(optimizers, value, self.process_group)
        self.observations += 1

    def state_dict(self) -> dict[str, Any]:
        return {"observations": self.observations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.observations = state_dict.get("observations", 0)


def _fit_validation_source(trainer: Any) -> Any:
    """The validation loader(s) given to ``trainer.fit`` (or the module's / datamodule's
    ``val_dataloader()``), read from Lightning's fit loop when it has not set validation up
    itself (a module without ``validation_step``, validation not run yet); None if there is none.
    Lightning keeps the source in a private attribute: without it, None."""
    try:
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
    except AttributeError:
        return None
    if source is None or not source.is_defined():
        return None
    return source.dataloader()


def _passed_a_multiple(step: int, last: int, every: int) -> bool:
    """Whether the optimizer-step count ``step`` has passed a multiple of ``every`` since
    ``last`` (the step of the last action; -1 before any: counted from step 0)."""
    return step > 0 and step // every > max(last, 0) // every
