"""What the ``observe_validation`` tests share: a tiny float64 regression model, its train and
validation batches, and every optimizer family at one rate."""

from __future__ import annotations

import torch

import metalr

LR = 0.05
OPTIMIZERS = {
    "adam": lambda ps, **kw: metalr.AdamHD(ps, lr=LR, **kw),
    "adam_l2": lambda ps, **kw: metalr.AdamHD(ps, lr=LR, weight_decay=0.05, **kw),
    "adamw": lambda ps, **kw: metalr.AdamWHD(ps, lr=LR, weight_decay=0.05, **kw),
    "sgd": lambda ps, **kw: metalr.SGDHD(ps, lr=LR, **kw),
    "sgd_momentum": lambda ps, **kw: metalr.SGDHD(ps, lr=LR, momentum=0.9, dampening=0.1, **kw),
    "sgd_nesterov": lambda ps, **kw: metalr.SGDHD(ps, lr=LR, momentum=0.9, nesterov=True, **kw),
    "hyperlr_rmsprop": lambda ps, **kw: metalr.HyperLR(torch.optim.RMSprop(ps, lr=LR), **kw),
}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    ).double()


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(
        16, 2, generator=g, dtype=torch.float64
    )


TRAIN, VAL = _data(1), _data(2)


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch=TRAIN) -> None:
    opt.zero_grad()
    _loss(model, batch).backward()
    opt.step()


def _overfitting_run(make, validation, steps=24, every=3):
    """A run that observes the validation batch every ``every`` steps; the parameters at each
    observation and the anchors the optimizer kept."""
    model = _model()
    first = [p.detach().clone() for p in model.parameters()]
    opt = make(model.parameters(), validation=validation)
    seen = []
    for t in range(1, steps + 1):
        _train_step(model, opt, _data(10 + t))
        if t % every == 0:
            seen.append([p.detach().clone() for p in model.parameters()])
            opt.observe_validation(_loss(model, VAL))
    return model, opt, first, seen
