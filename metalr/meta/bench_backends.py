"""The backends of the meta-learner benchmark (:mod:`metalr.meta.benchmark`) and their task.

MAML's sinusoid tasks and MLP, then one runner per backend (metalr vmap/loop, ``higher``,
learn2learn MetaSGD), each doing a full meta-step the same way, and :func:`available_backends`,
which says which of them import here.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalr.meta.config import MetaConfig
from metalr.meta.learner import MetaLearner
from metalr.tasks.base import TaskBatch

VMAP = "metalr vmap"
LOOP = "metalr loop"
HIGHER_SGD = "higher+SGD"
HIGHER_SGDHD = "higher+SGDHD"
L2L = "learn2learn MetaSGD"
BACKENDS = (VMAP, LOOP, HIGHER_SGD, HIGHER_SGDHD, L2L)
#: The issue's goal: metalr vmap's meta-tasks/s over learn2learn MetaSGD's.
GOAL_ROW, GOAL_SPEEDUP = VMAP, 3.0

INNER_LR = 0.01
META_LR = 1e-3
CLIP = 1.0


def sinusoid_tasks(
    n: int, shots: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> TaskBatch:
    """MAML's sinusoid: A ∈ [0.1, 5], φ ∈ [0, π], x ∈ [-5, 5]; ``shots`` support and query."""
    amp = torch.rand(n, 1, 1, generator=generator) * 4.9 + 0.1
    phase = torch.rand(n, 1, 1, generator=generator) * torch.pi
    x = torch.rand(n, 2 * shots, 1, generator=generator) * 10 - 5
    y = amp * torch.sin(x - phase)
    x, y = x.to(dtype), y.to(dtype)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def make_model(hidden: int = 40, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The 1-``hidden``-``hidden``-1 ReLU MLP, with the same weights for every backend."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )
    return model.to(dtype)


# --------------------------------------------------------------------------------------------
# Backends. Each runner owns its own copy of the model and meta-optimizer and offers
#   step(batch)            one full meta-step (what is timed)
#   meta_gradients(batch)  [∂L/∂θ_0 ..., ∂L/∂log α ...] in the model's parameter order, at the
#                          current point, without updating anything (the agreement check)


def _guarded_update(
    loss: Tensor, params: Sequence[Tensor], optimizer: torch.optim.Optimizer, clip: float
) -> None:
    """What :meth:`MetaLearner.meta_step` does after the meta-loss: skip a non-finite loss or
    gradient, clip the gradient norm, one optimizer step."""
    if bool(torch.isfinite(loss)):
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if math.isfinite(float(norm)):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class MetalrRunner:
    """:class:`MetaLearner` with element rates (Meta-SGD) and ``backend`` ``"vmap"``/``"loop"``."""

    def __init__(self, backend: str, steps: int, model: nn.Module) -> None:
        config = MetaConfig(
            rates="element", inner_steps=steps, inner_lr=INNER_LR, backend=backend,
            meta_lr=META_LR, meta_grad_clip=CLIP,
        )  # fmt: skip
        self.learner = MetaLearner(model, config)

    def step(self, batch: TaskBatch) -> None:
        self.learner.meta_step(batch)

    def meta_gradients(self, batch: TaskBatch) -> list[Tensor]:
        meta = self.learner.meta
        inputs = list(meta.init_params().values()) + list(meta.log_rates.values())
        return list(torch.autograd.grad(self.learner.meta_loss(batch), inputs))


class HigherRunner:
    """``higher.innerloop_ctx`` per task, rates as per-element ``lr`` through ``override``."""

    def __init__(self, optimizer_name: str, steps: int, model: nn.Module) -> None:
        import metalr
        from metalr.meta.higher_backend import meta_gradient_via_higher

        self._meta_gradient = meta_gradient_via_higher
        self.model, self.steps = model, steps
        self.params = list(model.parameters())
        self.log_rates = [
            torch.full_like(p, math.log(INNER_LR)).requires_grad_() for p in self.params
        ]
        groups = [{"params": [p]} for p in self.params]
        if optimizer_name == "SGD":
            self.inner: torch.optim.Optimizer = torch.optim.SGD(groups, lr=INNER_LR)
        else:
            self.inner = metalr.SGDHD(groups, lr=INNER_LR, hypergrad_lr=0.0, granularity="element")
        self.meta_opt = torch.optim.Adam(self.params + self.log_rates, lr=META_LR)

    def _grads(self, batch: TaskBatch) -> tuple[Tensor, list[Tensor]]:
        rates = [r.exp() for r in self.log_rates]
        loss, grads = self._meta_gradient(
            self.model, self.inner, batch, inner_steps=self.steps, override={"lr": rates}
        )
        n = len(self.params)
        # ∂/∂α → ∂/∂log α through the exp.
        rate_grads = torch.autograd.grad(rates, self.log_rates, grads[n:])
        return loss, list(grads[:n]) + list(rate_grads)

    def step(self, batch: TaskBatch) -> None:
        loss, grads = self._grads(batch)
        everything = self.params + self.log_rates
        if bool(torch.isfinite(loss)):
            for p, g in zip(everything, grads):
                p.grad = g
            norm = torch.nn.utils.clip_grad_norm_(everything, CLIP)
            if math.isfinite(float(norm)):
                self.meta_opt.step()
        self.meta_opt.zero_grad(set_to_none=True)

    def meta_gradients(self, batch: TaskBatch) -> list[Tensor]:
        return self._grads(batch)[1]


class L2LRunner:
    """``learn2learn.algorithms.MetaSGD``: ``clone()`` + ``adapt()`` per task, as its examples."""

    def __init__(self, steps: int, model: nn.Module) -> None:
        import learn2learn as l2l

        self.steps = steps
        self.meta = l2l.algorithms.MetaSGD(model, lr=INNER_LR, first_order=False)
        self.params = list(self.meta.parameters())  # module's weights, then the rates (lrs)
        self.meta_opt = torch.optim.Adam(self.params, lr=META_LR)

    def meta_loss(self, batch: TaskBatch) -> Tensor:
        total: Tensor | None = None
        for i in range(batch.num_tasks):
            sx, sy, qx, qy = (t[i] for t in batch)
            learner = self.meta.clone()
            for _ in range(self.steps):
                learner.adapt(F.mse_loss(learner(sx), sy))
            query = F.mse_loss(learner(qx), qy)
            total = query if total is None else total + query
        assert total is not None
        return total / batch.num_tasks

    def step(self, batch: TaskBatch) -> None:
        _guarded_update(self.meta_loss(batch), self.params, self.meta_opt, CLIP)

    def meta_gradients(self, batch: TaskBatch) -> list[Tensor]:
        weights = list(self.meta.module.parameters())
        lrs = list(self.meta.lrs)
        grads = torch.autograd.grad(self.meta_loss(batch), weights + lrs)
        n = len(weights)
        # learn2learn learns α itself: ∂L/∂log α = α ⊙ ∂L/∂α.
        return list(grads[:n]) + [a.detach() * g for a, g in zip(lrs, grads[n:])]


def _import_status(module: str) -> tuple[bool, str]:
    """(importable, installed version or the reason it does not import)."""
    try:
        importlib.import_module(module)
    # ImportError, or anything a broken torchvision/gym raises while learn2learn imports.
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0]
    try:
        return True, importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return True, "?"


def learn2learn_status() -> tuple[bool, str]:
    """(importable, version or the reason it is not); imports learn2learn (slow: torchvision)."""
    return _import_status("learn2learn")


def higher_status() -> tuple[bool, str]:
    """(importable, version or the reason it is not)."""
    return _import_status("higher")


Factory = Callable[[int, nn.Module], Any]


def available_backends(
    names: Sequence[str] | None = None,
) -> tuple[dict[str, Factory], dict[str, str], dict[str, str]]:
    """``({name: factory(steps, model)}, {skipped name: why}, {library: version})``."""
    wanted = list(BACKENDS if names is None else names)
    unknown = [n for n in wanted if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; expected some of {list(BACKENDS)}")
    factories: dict[str, Factory] = {}
    skipped: dict[str, str] = {}
    versions = {"torch": torch.__version__}
    if VMAP in wanted:
        factories[VMAP] = lambda s, m: MetalrRunner("vmap", s, m)
    if LOOP in wanted:
        factories[LOOP] = lambda s, m: MetalrRunner("loop", s, m)
    if HIGHER_SGD in wanted or HIGHER_SGDHD in wanted:
        ok, info = higher_status()
        for name, opt in ((HIGHER_SGD, "SGD"), (HIGHER_SGDHD, "SGDHD")):
            if name not in wanted:
                continue
            if ok:
                factories[name] = lambda s, m, opt=opt: HigherRunner(opt, s, m)
            else:
                skipped[name] = f"higher not importable ({info}); pip install 'metalr[meta]'"
        if ok:
            versions["higher"] = info
    if L2L in wanted:
        ok, info = learn2learn_status()
        if ok:
            factories[L2L] = L2LRunner
            versions["learn2learn"] = info
        else:
            skipped[L2L] = (
                f"learn2learn not importable ({info}); see the learn2learn section of "
                "/work/shared/ENV.md for a benchmark-only environment"
            )
    return factories, skipped, versions
