"""Helpers shared by the meta-learner tests (a local sinusoid generator, tiny MLPs), and their tests.

The sinusoid tasks follow MAML (Finn et al. 2017): ``y = A sin(x - φ)``, ``A ∈ [0.1, 5]``,
``φ ∈ [0, π]``, ``x ∈ [-5, 5]``. Kept local so these tests do not depend on metalr.tasks'
samplers.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from metalr.tasks import TaskBatch


def sinusoid_batch(
    num_tasks: int,
    shots: int,
    queries: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> TaskBatch:
    amp = torch.rand(num_tasks, 1, 1, generator=generator, dtype=torch.float64) * 4.9 + 0.1
    phase = torch.rand(num_tasks, 1, 1, generator=generator, dtype=torch.float64) * torch.pi
    x = torch.rand(num_tasks, shots + queries, 1, generator=generator, dtype=torch.float64) * 10 - 5
    y = amp * torch.sin(x - phase)
    x, y = x.to(dtype), y.to(dtype)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


class SinusoidSampler:
    """The ``TaskSampler`` protocol over :func:`sinusoid_batch`."""

    loss_name = "mse"

    def __init__(self, shots: int = 10, queries: int = 10, dtype: torch.dtype = torch.float32):
        self.shots, self.queries, self.dtype = shots, queries, dtype

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        return sinusoid_batch(batch_size, self.shots, self.queries, generator, self.dtype)


def mlp(
    sizes: tuple[int, ...] = (1, 40, 40, 1),
    act: type[nn.Module] = nn.ReLU,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def random_regression(num_tasks: int, shots: int, features: int, seed: int) -> TaskBatch:
    """Gaussian float64 regression tasks, for gradient checks."""
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(num_tasks, shots, d, generator=g, dtype=torch.float64) for d in (features, 1)]
    q = [torch.randn(num_tasks, shots, d, generator=g, dtype=torch.float64) for d in (features, 1)]
    return TaskBatch(t[0], t[1], q[0], q[1])


def test_sinusoid_batch_shapes_and_determinism() -> None:
    a = sinusoid_batch(3, 5, 7, torch.Generator().manual_seed(0))
    b = sinusoid_batch(3, 5, 7, torch.Generator().manual_seed(0))
    assert a.support_x.shape == (3, 5, 1) and a.query_y.shape == (3, 7, 1)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert float(a.support_x.abs().max()) <= 5 and float(a.support_y.abs().max()) <= 5


def test_sampler_follows_the_protocol() -> None:
    from metalr.tasks import TaskSampler

    assert isinstance(SinusoidSampler(), TaskSampler)
