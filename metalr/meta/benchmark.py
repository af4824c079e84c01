"""Meta-tasks/s of Meta-SGD on MAML's sinusoid: vmap vs per-task loop vs ``higher``.

Run: ``python -m metalr.meta.benchmark [--iterations 20] [--threads 1]``. Setup as MAML's
regression benchmark: a 1-40-40-1 ReLU MLP, K=10 support and 10 query points, meta-batch 25,
second-order meta-gradients, one learned rate per weight. Every backend does the full meta-step
(inner loop, query loss, meta-gradient, Adam update). ``higher`` rows need
``pip install "metalr[meta]"``; ``higher+SGD`` is higher's own differentiable SGD with the rates
passed as per-element ``lr`` through ``override``, ``higher+SGDHD`` is metalr's registered twin.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable

import torch
from torch import nn

from metalr.meta.config import MetaConfig
from metalr.meta.learner import MetaLearner
from metalr.tasks.base import TaskBatch


def sinusoid_tasks(n: int, shots: int, generator: torch.Generator) -> TaskBatch:
    """MAML's sinusoid: A ∈ [0.1, 5], φ ∈ [0, π], x ∈ [-5, 5]; ``shots`` support and query."""
    amp = torch.rand(n, 1, 1, generator=generator) * 4.9 + 0.1
    phase = torch.rand(n, 1, 1, generator=generator) * torch.pi
    x = torch.rand(n, 2 * shots, 1, generator=generator) * 10 - 5
    y = amp * torch.sin(x - phase)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def _learner_step(backend: str, steps: int) -> Callable[[TaskBatch], None]:
    learner = MetaLearner(_model(), MetaConfig(rates="element", inner_steps=steps, backend=backend))

    def step(batch: TaskBatch) -> None:
        learner.meta_step(batch)

    return step


def _higher_step(optimizer_name: str, steps: int) -> Callable[[TaskBatch], None]:
    import metalr
    from metalr.meta.higher_backend import meta_gradient_via_higher

    model = _model()
    params = list(model.parameters())
    log_rates = [torch.full_like(p, 0.01).log().requires_grad_() for p in params]
    groups = [{"params": [p]} for p in params]
    if optimizer_name == "SGD":
        inner = torch.optim.SGD(groups, lr=0.01)
    else:
        inner = metalr.SGDHD(groups, lr=0.01, hypergrad_lr=0.0, granularity="element")
    meta_opt = torch.optim.Adam(params + log_rates, lr=1e-3)

    def step(batch: TaskBatch) -> None:
        rates = [r.exp() for r in log_rates]
        _, grads = meta_gradient_via_higher(
            model, inner, batch, inner_steps=steps, override={"lr": rates}
        )
        # ∂/∂α → ∂/∂log α through the exp, then the same clipped Adam step as the learner.
        rate_grads = torch.autograd.grad(rates, log_rates, grads[len(params) :])
        for p, g in zip(params + log_rates, list(grads[: len(params)]) + list(rate_grads)):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params + log_rates, 1.0)
        meta_opt.step()

    return step


def measure(step: Callable[[TaskBatch], None], iterations: int, batch_size: int = 25) -> float:
    """Meta-tasks per second over ``iterations`` meta-steps (after two warm-up steps)."""
    g = torch.Generator().manual_seed(0)
    batches = [sinusoid_tasks(batch_size, 10, g) for _ in range(iterations + 2)]
    for b in batches[:2]:
        step(b)
    start = time.perf_counter()
    for b in batches[2:]:
        step(b)
    return iterations * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """Print a table of meta-tasks/s per backend for 1 and 5 inner steps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[tuple[str, Callable[[int], Callable[[TaskBatch], None]]]] = [
        ("vmap", lambda s: _learner_step("vmap", s)),
        ("loop", lambda s: _learner_step("loop", s)),
    ]
    if importlib.util.find_spec("higher"):
        rows += [("higher+SGD", lambda s: _higher_step("SGD", s)),
                 ("higher+SGDHD", lambda s: _higher_step("SGDHD", s))]  # fmt: skip
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.iterations} meta-steps")
    print(f"{'backend':<14}{'1 step':>12}{'5 steps':>12}   (meta-tasks/s)")
    for name, make in rows:
        rates = [measure(make(steps), args.iterations) for steps in (1, 5)]
        print(f"{name:<14}{rates[0]:>12.0f}{rates[1]:>12.0f}")


if __name__ == "__main__":
    main()
