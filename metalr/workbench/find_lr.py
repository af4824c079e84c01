"""LR range test (Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017).

Train a fresh model for ``num_steps`` steps while the learning rate grows exponentially from
``start_lr`` to ``end_lr``; stop when an exponential moving average of the training loss exceeds
``divergence`` × its best value so far (or the loss turns non-finite).

The suggestion is read off a *centred* smoothing of the raw losses (a running median, then a
running mean, over ``window`` points centred on each step): a one-sided moving average lags the
curve by about ``1 / (1 - smoothing)`` steps (50 steps, four decades of lr, for the usual 0.98
over 100 steps), which put its minimum past the raw curve's, even past the rate where training
diverges. The suggested rate is one decade below the rate of the smallest smoothed loss
(``"min/10"``, Smith's advice), or the rate of steepest descent of the smoothed loss in log-lr
(``"steepest"``); either way it is never past the rate of the smallest *raw* loss::

    res = metalr.workbench.find_lr(lambda: make_model(), lambda p: torch.optim.Adam(p),
                                   lambda model, batch: loss_fn(model(batch[0]), batch[1]),
                                   batches=lambda: next_batch())
    res.suggested_lr; res.plot("range_test.png")

Checked on problems with a known good rate (``tests/test_workbench_find_lr.py``): on a
quadratic of curvature ``L`` and on least squares with largest Hessian eigenvalue ``λ`` (plain
SGD contracts every direction monotonically up to ``1/λ`` and diverges above ``2/λ``), both
suggestions lie between ``1/(25λ)`` and ``1/(2λ)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def centered_median(values: list[float], window: int) -> list[float]:
    """Running median over ``window`` points centred on each point (shrunk at the ends).

    Centred, so it does not lag the curve; a median, so the exploding losses past divergence
    do not leak into the points before them (a moving average spreads them back).

    Example::

        >>> centered_median([3.0, 1.0, 2.0, 100.0, 0.0], 3)
        [2.0, 2.0, 2.0, 2.0, 50.0]
    """
    half = window // 2
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        part = sorted(values[lo:hi])
        mid = len(part) // 2
        out.append(part[mid] if len(part) % 2 else 0.5 * (part[mid - 1] + part[mid]))
    return out


def centered_mean(values: list[float], window: int) -> list[float]:
    """Running mean over ``window`` points centred on each point (shrunk at the ends)."""
    half = window // 2
    return [
        sum(values[max(0, i - half) : i + half + 1]) / len(values[max(0, i - half) : i + half + 1])
        for i in range(len(values))
    ]


def _argmin(values: list[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)


@dataclass
class RangeTest:
    """The range test's curve and its suggestion (see the module docstring).

    Attributes:
        lrs: the rate of every step taken.
        losses: the centred smoothing of ``raw_losses`` (what the suggestion reads).
        raw_losses: the training loss at every step.
        diverged_at: the rate where the test stopped on divergence (``None``: ran to the end).
        method: ``"min/10"`` or ``"steepest"``.
        window: points of the centred smoothing (and of the slopes' half-baseline).
    """

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed, centred
    raw_losses: list[float] = field(default_factory=list)
    diverged_at: float | None = None
    method: str = "min/10"
    window: int = 5

    @property
    def raw_min_loss_lr(self) -> float:
        """Rate of the smallest raw loss: no suggestion goes past it."""
        return self.lrs[_argmin(self.raw_losses)]

    @property
    def min_loss_lr(self) -> float:
        """Rate of the smallest smoothed loss."""
        return self.lrs[_argmin(self.losses)]

    @property
    def steepest_lr(self) -> float:
        """Rate of the most negative slope of the smoothed loss in log lr (differences over
        ``window`` points each side), searched only before the smoothed and the raw minimum
        (past them the loss rises)."""
        stop = min(_argmin(self.losses), _argmin(self.raw_losses))
        if stop < 2:
            return self.lrs[0]
        logs = [math.log(lr) for lr in self.lrs]
        h, last = max(1, self.window), len(self.lrs) - 1
        slopes = [(self.losses[min(i + h, last)] - self.losses[max(i - h, 0)])
                  / (logs[min(i + h, last)] - logs[max(i - h, 0)]) for i in range(1, stop)]  # fmt: skip
        return self.lrs[1 + _argmin(slopes)]

    @property
    def suggested_lr(self) -> float:
        """``steepest_lr`` or ``min_loss_lr / 10``, capped at ``raw_min_loss_lr``."""
        lr = self.steepest_lr if self.method == "steepest" else self.min_loss_lr / 10
        return min(lr, self.raw_min_loss_lr)

    def to_dict(self) -> dict[str, Any]:
        return {"suggested_lr": self.suggested_lr, "method": self.method,
                "min_loss_lr": self.min_loss_lr, "raw_min_loss_lr": self.raw_min_loss_lr,
                "steepest_lr": self.steepest_lr,
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
        ax.axvline(self.raw_min_loss_lr, color="0.5", ls=":",
                   label=f"lowest raw loss at {self.raw_min_loss_lr:.2g}")  # fmt: skip
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
    smoothing: float = 0.9,
    window: int | None = None,
    divergence: float = 4.0,
    method: str = "min/10",
) -> RangeTest:
    """Run the range test on a fresh model from ``model_factory`` (see the module docstring).

    Args:
        model_factory: builds the model.
        optimizer_factory: ``optimizer_factory(params)`` builds the optimizer (any lr: it is
            overwritten every step, in every param group).
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss.
        batches: a callable returning the next batch, or an iterable (cycled).
        start_lr: first rate (default: 1e-7).
        end_lr: last rate (default: 10.0).
        num_steps: steps, spaced evenly in log lr (default: 100).
        smoothing: factor in [0, 1) of the stopping rule's exponential moving average
            (default: 0.9).
        window: points of the centred smoothing the suggestion reads (default:
            ``max(5, num_steps // 20)``, made odd).
        divergence: stop when the moving average exceeds this × its best value (default: 4.0).
        method: ``"min/10"`` or ``"steepest"`` (default: "min/10").

    Example::

        res = find_lr(Net, lambda p: torch.optim.SGD(p, lr=0.0), loss_fn, batches)
        res.suggested_lr
    """
    if not 0.0 < start_lr < end_lr:
        raise ValueError(
            f"Invalid lr range: start_lr={start_lr}, end_lr={end_lr}; need 0 < start_lr < end_lr"
        )
    if num_steps < 2:
        raise ValueError(f"Invalid num_steps value: {num_steps}; expected an integer >= 2")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"Invalid smoothing value: {smoothing}; expected 0 <= smoothing < 1")
    if divergence <= 1.0:
        raise ValueError(f"Invalid divergence value: {divergence}; expected > 1")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):  # fmt: skip
        raise ValueError(f"Invalid window value: {window!r}; expected an integer >= 1")
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
    if window is None:
        window = max(5, num_steps // 20) | 1
    res = RangeTest(method=method, window=window)
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
        if smooth > divergence * best:
            res.diverged_at = lr
            break
        best = min(best, smooth)
        loss.backward()
        opt.step()
    if not res.lrs:
        raise ValueError("the range test diverged at its first step: lower start_lr")
    res.losses = centered_mean(centered_median(res.raw_losses, window), window)
    return res
