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

To let the rates follow a held-out loss (``optimizer.observe_validation``), add an
:class:`ObserveValidationCallback`: every ``k`` steps it observes the loss of one batch of the eval
dataset, computed as the Trainer computes its losses::

    add_observe_validation_callback(trainer, every_n_steps=20)

or hand it the loss of each of its own evaluations (the whole eval set, already computed; with
``eval_strategy="steps"``, every ``eval_steps``) as a loss observed alone (the seek rule's hold and
rewind; no backward) with :class:`ObserveEvalLossCallback`::

    trainer.add_callback(ObserveEvalLossCallback("eval_loss"))

The Trainer steps its optimizer without a closure, so a metalr optimizer's loss-spike guard
(``spike_guard=True``) would see no loss; :func:`add_spike_guard_callback` hands it each step's
training loss::

    add_spike_guard_callback(trainer)

Importing this module imports ``transformers``; ``import metalr`` never does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
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

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "metalr.integrations.huggingface needs transformers (and accelerate for its Trainer): "
        'pip install "torch==<your torch>" transformers accelerate'
    ) from exc

__all__ = [
    "EffectiveLRCallback",
    "ObserveEvalLossCallback",
    "ObserveValidationCallback",
    "SpikeGuardCallback",
    "add_effective_lr_callback",
    "add_observe_validation_callback",
    "add_spike_guard_callback",
]


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


class ObserveValidationCallback(TrainerCallback):
    """Every ``every_n_steps`` optimizer steps, observe the loss of an eval batch: the metalr
    optimizer's rates then follow the validation signal (``optimizer.observe_validation``).

    At ``on_step_end`` (after the optimizer and scheduler steps, once per step with gradient
    accumulation) the callback draws the next batch of ``trainer.get_eval_dataloader()`` (the
    eval dataset, collated, column-filtered and sharded over the processes as the Trainer's own
    evaluation does; restarted when it runs out), computes its loss with ``trainer.compute_loss``
    on the unwrapped model (outside DDP's wrapper, as ``observe_validation`` asks; accelerate's
    autocast stays on the model's forward, and its fp16 ``GradScaler`` is passed on) in eval
    mode, and calls ``observe_validation`` on the Trainer's optimizer, unwrapped from
    accelerate's ``AcceleratedOptimizer``. Under DDP every process observes its own batch and the
    validation gradients are averaged (``process_group="auto"``). ``.grad``, the Trainer's
    evaluation and its logs are left alone.

    The Trainer does not hand itself to its callbacks, so this one is built with it; register it
    with :func:`add_observe_validation_callback` (or ``trainer.add_callback``). A resumed run
    draws the eval batches the uninterrupted run would have drawn (the observations before the
    checkpoint are counted and their batches skipped). DeepSpeed and FSDP (sharded parameters, or an
    optimizer that is not metalr's) are not supported.

    Args:
        trainer: the ``transformers.Trainer`` whose optimizer observes.
        every_n_steps: observe after every this many optimizer steps (default: 20, the
            recommended frequency).
        eval_dataset: a dataset, or the key of one in the Trainer's ``eval_dataset`` dict
            (default: None, i.e. the Trainer's ``eval_dataset``; when that is a dict of
            datasets, its first one).
        dataloader: batches to use instead (any iterable of input dicts; default: None).
        loss_fn: ``loss_fn(model, inputs) -> Tensor`` instead of ``trainer.compute_loss``
            (default: None).
        eval_mode: compute the loss with the model in eval mode (default: True).
        process_group: passed to ``observe_validation`` (default: "auto").

    Attributes:
        observations: how many times the loss was observed.
        last_loss: the last observed loss (detached tensor; None before the first).

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
        ...                   optimizers=(metalr.AdamWHD(model.parameters(), lr=3e-4), None))
        >>> add_observe_validation_callback(trainer, every_n_steps=20)
        >>> trainer.train()
    """

    def __init__(
        self,
        trainer: Any,
        every_n_steps: int = RECOMMENDED_EVERY,
        *,
        eval_dataset: Any = None,
        dataloader: Iterable[Any] | None = None,
        loss_fn: Callable[[Any, Mapping[str, Any]], Tensor] | None = None,
        eval_mode: bool = True,
        process_group: Any = "auto",
    ) -> None:
        self.trainer = trainer
        self.every_n_steps = check_every_n_steps(every_n_steps)
        self.eval_dataset = eval_dataset
        self.dataloader = dataloader
        self.loss_fn = loss_fn
        self.eval_mode = eval_mode
        self.process_group = process_group
        self.observations = 0
        self.last_loss: Tensor | None = None
        self._batches = BatchCycle(self._validation_data)

    def _validation_data(self) -> Iterable[Any]:
        if self.dataloader is not None:
            return self.dataloader
        return self.trainer.get_eval_dataloader(self._eval_dataset())

    def _eval_dataset(self) -> Any:
        """What to hand ``get_eval_dataloader``: ours, else the Trainer's, whose dict of
        datasets (several evaluation sets) gives its first key (a loader of the dict itself
        would index it by position)."""
        if self.eval_dataset is not None:
            return self.eval_dataset
        datasets = self.trainer.eval_dataset
        if isinstance(datasets, Mapping):
            return next(iter(datasets), None)
        return None

    def _optimizer(self, optimizer: Any) -> Any:
        return optimizer if optimizer is not None else self.trainer.optimizer

    def on_train_begin(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        hypergrad_optimizers([self._optimizer(optimizer)], type(self).__name__)
        datasets = self.trainer.eval_dataset
        if self.dataloader is None and self.eval_dataset is None and not datasets:
            raise ValueError(
                "ObserveValidationCallback needs validation data: give the Trainer an "
                "eval_dataset, or pass eval_dataset= or dataloader="
            )
        if isinstance(self.eval_dataset, str) and not (
            isinstance(datasets, Mapping) and self.eval_dataset in datasets
        ):
            raise ValueError(
                f"ObserveValidationCallback: eval_dataset={self.eval_dataset!r} names no dataset "
                f"of the Trainer's eval_dataset ({sorted(datasets) if isinstance(datasets, Mapping) else 'not a dict'})"
            )
        # A resumed run (resume_from_checkpoint) goes on where the uninterrupted one would be:
        # the observations so far counted, and the validation batches they drew skipped.
        done = state.global_step // self.every_n_steps
        self.observations = done
        self._batches.skip(done)

    def on_step_end(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        step = state.global_step
        if step == 0 or step % self.every_n_steps != 0:
            return
        trainer = self.trainer
        optimizers = hypergrad_optimizers([self._optimizer(optimizer)], type(self).__name__)
        inputs = self._batches.next()
        prepare = getattr(trainer, "_prepare_inputs", None)
        if prepare is not None and isinstance(inputs, Mapping):
            inputs = prepare(inputs)  # on the device, as the Trainer's own steps have them
        model = trainer.accelerator.unwrap_model(trainer.model)
        context = getattr(trainer, "compute_loss_context_manager", contextlib.nullcontext)

        def closure() -> Tensor:
            with context():
                if self.loss_fn is not None:
                    return as_loss(self.loss_fn(model, inputs))
                return as_loss(trainer.compute_loss(model, dict(inputs)))

        with eval_mode(model, self.eval_mode):
            self.last_loss = observe_all(
                optimizers, closure, scaler=getattr(trainer.accelerator, "scaler", None),
                process_group=self.process_group,
            )  # fmt: skip
        self.observations += 1


def add_observe_validation_callback(
    trainer: Any, every_n_steps: int = RECOMMENDED_EVERY, **kwargs: Any
) -> ObserveValidationCallback:
    """Build an :class:`ObserveValidationCallback` for ``trainer`` and register it.

    Example:
        >>> callback = add_observe_validation_callback(trainer, every_n_steps=20)
        >>> trainer.train()
        >>> callback.observations  # = trainer.state.global_step // 20
    """
    callback = ObserveValidationCallback(trainer, every_n_steps, **kwargs)
    trainer.add_callback(callback)
    return callback


class ObserveEvalLossCallback(TrainerCallback):
    """After each evaluation during training, hand its loss (``metrics[metric]``, the Trainer's
    ``eval_loss`` over the whole eval set, gathered over the processes) to the metalr optimizer
    as a loss observed alone (``optimizer.observe_validation(loss, hypergradient=False)``): the
    seek rule's hold keeps the rates while it improves and cuts them once it has stopped, and
    with ``validation={"rewind": 1}`` the cut sends the weights back to the best evaluation's.

    It costs nothing beyond the evaluations themselves (``eval_strategy="steps"``,
    ``eval_steps``); an evaluation before the first step, or after training, is not observed.
    A loss measured on the same examples each time needs no running average:
    ``validation={"loss_decay": 0.0}`` is the setting study 9 uses with it.

    Args:
        metric: the key of the loss in the evaluation's metrics (default: "eval_loss").
        process_group: passed to ``observe_validation`` (default: "auto").

    Attributes:
        observations: how many evaluation losses were observed.
        last_loss: the last observed loss (detached tensor; None before the first).

    Example:
        >>> args = TrainingArguments(..., eval_strategy="steps", eval_steps=20)
        >>> optimizer = metalr.AdamWHD(model.parameters(), lr=3e-4,
        ...                            validation={"loss_decay": 0.0, "rewind": 1.0})
        >>> trainer = Trainer(model=model, args=args, eval_dataset=val,
        ...                   optimizers=(optimizer, None), callbacks=[ObserveEvalLossCallback()])
    """

    def __init__(self, metric: str = "eval_loss", *, process_group: Any = "auto") -> None:
        if not isinstance(metric, str) or not metric:
            raise TypeError(f"metric must be the evaluation metric's key, got {metric!r}")
        self.metric = metric
        self.process_group = process_group
        self.observations = 0
        self.last_loss: Tensor | None = None
        self._training = False

    def on_train_begin(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        hypergrad_optimizers([optimizer], type(self).__name__)
        self._training = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._training = False

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: Mapping[str, Any] | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if not self._training or state.global_step == 0:
            return
        who = type(self).__name__
        value = observed_metric(metrics, self.metric, who)
        optimizers = hypergrad_optimizers([optimizer], who)
        self.last_loss = observe_loss_alone(optimizers, value, self.process_group)
        self.observations += 1


class SpikeGuardCallback(TrainerCallback):
    """Hand each optimizer step's training loss to the metalr optimizer's loss-spike guard
    (``spike_guard=``; the Trainer calls ``optimizer.step()`` without a closure).

    ``trainer.training_step`` is wrapped so that what it returns (the loss the Trainer logs, per
    micro-batch) is summed over the step's micro-batches; ``on_pre_optimizer_step`` (after the
    gradient clipping, before the step) passes the sum to ``optimizer.observe_loss``. Under DDP
    the guard averages it over the ranks. ``observed`` counts the losses handed over.
    """

    def __init__(self, trainer: Any) -> None:
        self.observed = 0
        self._loss: Tensor | None = None
        step = trainer.training_step

        def training_step(*args: Any, **kwargs: Any) -> Tensor:
            loss = step(*args, **kwargs)
            value = loss.detach()
            self._loss = value if self._loss is None else self._loss + value
            return loss

        trainer.training_step = training_step

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._loss is None:
            return
        for optimizer in hypergrad_optimizers([kwargs["optimizer"]], type(self).__name__):
            optimizer.observe_loss(self._loss)
        self._loss = None
        self.observed += 1


def add_spike_guard_callback(trainer: Any) -> SpikeGuardCallback:
    """Build a :class:`SpikeGuardCallback` for ``trainer`` and register it.

    Example:
        >>> optimizer = metalr.AdamWHD(model.parameters(), lr=3e-4, spike_guard=True)
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, None))
        >>> callback = add_spike_guard_callback(trainer)
        >>> trainer.train()
        >>> optimizer.spike_summary()  # running mean and std of the loss, spikes
    """
    callback = SpikeGuardCallback(trainer)
    trainer.add_callback(callback)
    return callback
