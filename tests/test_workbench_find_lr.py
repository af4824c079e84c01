"""LR range test on a problem with a known good rate: an isotropic quadratic with curvature L
(gradient descent converges fastest at lr = 1/L and diverges above 2/L)."""

from __future__ import annotations

import pytest
import torch

from metalr.workbench import find_lr

L = 4.0


class Quadratic(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(20, generator=torch.Generator().manual_seed(0)))


def loss_fn(model, batch):
    return 0.5 * L * (model.w - batch).pow(2).sum()


def test_range_test_finds_a_stable_rate_near_the_optimum(tmp_path):
    target = torch.ones(20)
    gen = torch.Generator().manual_seed(1)
    noisy = lambda: target + 0.1 * torch.randn(20, generator=gen)
    res = find_lr(Quadratic, lambda p: torch.optim.SGD(p, lr=0.0), loss_fn, noisy,
                  start_lr=1e-4, end_lr=100.0, num_steps=120, smoothing=0.5)  # fmt: skip
    assert res.diverged_at is not None and res.diverged_at > 1 / L  # stops on divergence
    assert len(res.lrs) < 120
    # "min/10" is by design about a decade below the rate of the lowest loss: stable, and within
    # a factor 20 of the optimum 1/L
    assert 1 / L / 20 <= res.suggested_lr < 2 / L
    assert res.steepest_lr < res.min_loss_lr  # where the loss falls fastest: earlier, stable
    assert 1 / L / 2 <= res.min_loss_lr < 2 / L
    # training at the suggested rate converges
    model = Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=res.suggested_lr)
    start = loss_fn(model, target).item()
    for _ in range(100):
        opt.zero_grad()
        loss_fn(model, target).backward()
        opt.step()
    assert loss_fn(model, target).item() < 1e-3 * start
    png = res.plot(tmp_path / "rt.png")
    assert png.stat().st_size > 1000
    assert res.to_dict()["suggested_lr"] == res.suggested_lr


def test_range_test_on_a_real_task_with_adam():
    from metalr.workbench import make_task

    task = make_task("digits_mlp", "smoke")
    res = find_lr(lambda: task.model(0), lambda p: torch.optim.Adam(p),
                  lambda m, b: task.loss(m(b[0]), b[1]), task.batches(0), num_steps=80,
                  end_lr=100.0)  # fmt: skip
    assert res.diverged_at is not None and res.diverged_at < 100.0
    assert 1e-3 < res.suggested_lr < 1.0  # the default study's best Adam lr here is 1e-2


def test_invalid_arguments():
    with pytest.raises(ValueError, match="lr range"):
        find_lr(Quadratic, torch.optim.SGD, loss_fn, [torch.ones(20)], start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError, match="method"):
        find_lr(Quadratic, torch.optim.SGD, loss_fn, [torch.ones(20)], method="valley")
