"""LR range test (Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017).

Train a fresh model for ``num_steps`` steps while the learning rate grows exponentially from
``start_lr`` to ``end_lr``; record the exponentially smoothed (bias-corrected) training loss; stop
when it exceeds ``divergence`` × the best smoothed loss so far (or turns non-finite). The suggested
rate is one decade below the rate of the smallest smoothed loss (``"min/10"``, Smith's advice), or
the rate of steepest descent of the smoothed loss in log-lr (``"steepest"``)::

    res = metalr.workbench.find_lr(lambda: make_model(), lambda p: torch.optim.Adam(p),
                                   lambda model, batch: loss_fn(model(batch[0]), batch[1]),
                                   batches=lambda: next_batch())
    res.suggested_lr; res.plot("range_test.png")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class RangeTest:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed
    raw_losses: list[float] = field(default_factory=list)
    diverged_at: float | None = None
    method: str = "min/10"

    @property
    def min_loss_lr(self) -> float:
        return self.lrs[min(range(len(self.losses)), key=self.losses.__getitem__)]

    @property
    def steepest_lr(self) -> float:
        """Rate of the most negative slope of the smoothed loss (central differences in log lr),
        searched only up to the minimum (past it the loss rises)."""
        stop = min(range(len(self.losses)), key=self.losses.__getitem__)
        if stop < 2:
            return self.lrs[0]
        logs = [math.log(lr) for lr in self.lrs]
        slopes = [(self.losses[i + 1] - self.losses[i - 1]) / (logs[i + 1] - logs[i - 1])
                  for i in range(1, stop)]  # fmt: skip
        return self.lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]

    @property
    def suggested_lr(self) -> float:
        return self.steepest_lr if self.method == "steepest" else self.min_loss_lr / 10

    def to_dict(self) -> dict[str, Any]:
        return {"suggested_lr": self.suggested_lr, "method": self.method,
                "min_loss_lr": self.min_loss_lr, "steepest_lr": self.steepest_lr,
                "diverged_at": self.diverged_at, "steps": len(self.lrs)}  # fmt: skip

    def plot(self, path: str | Path, title: str = "LR range test") -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(self.lrs, self.raw_losses, color="0.75", lw=0.8, label="loss")
        ax.plot(self.lrs, self.losses, color="C0", label="smoothed")
        ax.axvline(
            self.suggested_lr, color="C3", ls="--", label=f"suggested {self.suggested_lr:.2g}"
        )
        finite = [v for v in self.losses if math.isfinite(v)]
        if finite:
            ax.set_ylim(min(finite) - 0.05 * abs(min(finite)), 1.5 * finite[0] + 1e-12)
        ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title=title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def find_lr(
    model_factory: Callable[[], torch.nn.Module],
    optimizer_factory: Callable[[Any], torch.optim.Optimizer],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Callable[[], Any] | Iterable[Any],
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smoothing: float = 0.98,
    divergence: float = 4.0,
    method: str = "min/10",
) -> RangeTest:
    """Run the range test on a fresh model from ``model_factory`` (see the module docstring).

    ``optimizer_factory(params)`` builds the optimizer (any lr: it is overwritten every step, in
    every param group); ``loss_fn(model, batch)`` returns the scalar loss; ``batches`` is a
    callable returning the next batch, or an iterable (cycled).
    """
    if not 0.0 < start_lr < end_lr:
        raise ValueError(f"Invalid lr range: start_lr={start_lr}, end_lr={end_lr}")
    if num_steps < 2 or not 0.0 <= smoothing < 1.0 or divergence <= 1.0:
        raise ValueError("need num_steps >= 2, 0 <= smoothing < 1, divergence > 1")
    if method not in ("min/10", "steepest"):
        raise ValueError(f"Invalid method {method!r}; expected 'min/10' or 'steepest'")
    if not callable(batches):
        source = list(batches)
        it = iter(())

        def next_batch() -> Any:
            nonlocal it
            try:
                return next(it)
            except StopIteration:
                it = iter(source)
                return next(it)
    else:
        next_batch = batches
    model = model_factory()
    opt = optimizer_factory(model.parameters())
    res = RangeTest(method=method)
    ratio = (end_lr / start_lr) ** (1.0 / (num_steps - 1))
    avg, best = 0.0, math.inf
    for i in range(num_steps):
        lr = start_lr * ratio**i
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss = loss_fn(model, next_batch())
        value = loss.detach().item()
        if not math.isfinite(value):
            res.diverged_at = lr
            break
        avg = smoothing * avg + (1 - smoothing) * value
        smooth = avg / (1 - smoothing ** (i + 1))
        res.lrs.append(lr)
        res.raw_losses.append(value)
        res.losses.append(smooth)
        if smooth > divergence * best:
            res.diverged_at = lr
            break
        best = min(best, smooth)
        loss.backward()
        opt.step()
    if not res.lrs:
        raise ValueError("the range test diverged at its first step: lower start_lr")
    return res
