"""What the framework callbacks share to call ``observe_validation``: batches, eval mode.

No framework is imported here; :mod:`metalr.integrations.lightning` and
:mod:`metalr.integrations.huggingface` wrap these in their own callback classes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metalr.integrations._stats import unwrap_optimizer


def check_every_n_steps(every_n_steps: int) -> int:
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"Invalid every_n_steps: {every_n_steps!r}; expected an int >= 1")
    return every_n_steps


class BatchCycle:
    """Draws batches one at a time from an iterable, starting it again when it runs out.

    ``source`` returns the iterable (a DataLoader, a list of batches, ...); it is called again at
    every restart, so a framework that rebuilds its dataloader is followed. ``drawn`` counts the
    batches handed out; ``skip(n)`` makes the first draw continue where ``n`` draws had left off
    (to resume a run: with a ``len()``, only ``n % len`` batches are loaded and discarded).
    """

    def __init__(self, source: Callable[[], Iterable[Any]]) -> None:
        self._source = source
        self._iterator: Iterator[Any] | None = None
        self._to_skip = 0
        self.drawn = 0

    def skip(self, n: int) -> None:
        self._iterator = None
        self._to_skip = n
        self.drawn = n

    def _draw(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self._source())
        batch = next(self._iterator, _END)
        if batch is _END:  # one pass done: start the next one
            self._iterator = iter(self._source())
            batch = next(self._iterator, _END)
            if batch is _END:
                raise ValueError("The validation dataloader yielded no batch")
        return batch

    def next(self) -> Any:
        if self._to_skip:
            iterable = self._source()
            n, self._to_skip = self._to_skip, 0
            try:
                length = len(iterable)  # type: ignore[arg-type]
            except TypeError:  # an iterable without a length: draw all n
                length = 0
            if length > 0:
                n %= length
            self._iterator = iter(iterable)
            for _ in range(n):
                self._draw()
        batch = self._draw()
        self.drawn += 1
        return batch


_END = object()


@contextlib.contextmanager
def eval_mode(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """``module.eval()`` inside, then every submodule's own ``training`` flag back as it was
    (a frozen submodule kept in eval mode stays so)."""
    if not enabled:
        yield
        return
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def hypergrad_optimizers(optimizers: Sequence[Any], who: str) -> list[Any]:
    """The unwrapped optimizers that have ``observe_validation``; TypeError when there is none."""
    found = [o for o in map(unwrap_optimizer, optimizers) if hasattr(o, "observe_validation")]
    if not found:
        names = ", ".join(type(unwrap_optimizer(o)).__name__ for o in optimizers) or "none"
        raise TypeError(
            f"{who} needs a metalr optimizer (SGDHD, AdamHD, AdamWHD or HyperLR), which has "
            f"observe_validation; the trainer's optimizers are: {names}"
        )
    return found


def as_loss(value: Any) -> Tensor:
    """A loss function's result as a tensor: a tensor, or a mapping / model output with ``loss``."""
    if isinstance(value, Mapping) and "loss" in value:
        value = value["loss"]
    elif not isinstance(value, Tensor) and hasattr(value, "loss"):
        value = value.loss
    if not isinstance(value, Tensor):
        raise TypeError(
            f"The validation loss function must return a tensor (or a dict with 'loss'), "
            f"got {type(value).__name__}"
        )
    return value


def observe_all(
    optimizers: Sequence[Any],
    loss: Callable[[], Tensor],
    *,
    scaler: Any = None,
    process_group: Any = "auto",
) -> Tensor:
    """``observe_validation(loss, ...)`` on each optimizer (one forward each: each call
    differentiates the loss with respect to its own parameters only); the last loss, detached."""
    value = torch.zeros(())
    for optimizer in optimizers:
        value = optimizer.observe_validation(loss, scaler=scaler, process_group=process_group)
    return value


def observed_metric(metrics: Mapping[str, Any] | None, key: str, who: str) -> Tensor:
    """The logged validation loss ``metrics[key]`` as a tensor; ValueError naming the key and
    what was logged when it is missing."""
    value = None if metrics is None else metrics.get(key)
    if value is None:
        logged = sorted(metrics) if metrics else []
        raise ValueError(
            f"{who}: no metric {key!r} was logged by the validation run (logged: {logged}); "
            f"log the validation loss under that name or pass its name"
        )
    return value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))


def observe_loss_alone(optimizers: Sequence[Any], value: Tensor, process_group: Any) -> Tensor:
    """``observe_validation(value, hypergradient=False)`` on each optimizer: a validation pass's
    loss read by the seek rule's hold and rewind (no backward); the loss, detached."""
    for optimizer in optimizers:
        value = optimizer.observe_validation(
            value, hypergradient=False, process_group=process_group
        )
    return value
