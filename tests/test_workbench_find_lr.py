"""LR range test on problems with a known good rate: an isotropic quadratic with curvature L
(gradient descent converges fastest at lr = 1/L and diverges above 2/L), and least squares with
largest Hessian eigenvalue λ (SGD contracts every direction monotonically up to 1/λ and
diverges above 2/λ)."""

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
    assert res.suggested_lr <= res.raw_min_loss_lr
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


def test_default_smoothing_does_not_lag_past_the_raw_minimum_on_a_quadratic():
    """With the default settings the smoothed minimum stays on the stable side of 2/L (a
    one-sided moving average with the usual 0.98 lagged it to ~0.74 = 3/L, past divergence)."""
    target = torch.ones(20)
    gen = torch.Generator().manual_seed(1)
    res = find_lr(Quadratic, lambda p: torch.optim.SGD(p, lr=0.0), loss_fn,
                  lambda: target + 0.1 * torch.randn(20, generator=gen))  # fmt: skip
    assert 1 / L / 2 <= res.min_loss_lr < 2 / L
    assert 1 / L / 25 <= res.suggested_lr <= 1 / L / 2
    assert res.suggested_lr <= res.raw_min_loss_lr and res.steepest_lr <= res.raw_min_loss_lr


def least_squares(seed: int):
    """A 10-feature least-squares problem (feature scales 1 to 0.1), its loss and batches, and
    the largest eigenvalue λ of its full-batch Hessian."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=gen) * torch.logspace(0, -1, 10)
    y = x @ torch.randn(10, 1, generator=gen) + 0.1 * torch.randn(256, 1, generator=gen)
    lam = float(torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max())  # Hessian of the MSE

    def batches():
        i = torch.randint(0, len(x), (32,), generator=gen)
        return x[i], y[i]

    return (lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])), batches, lam


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("method", ["min/10", "steepest"])
def test_least_squares_suggestion_is_within_a_factor_25_below_the_known_rate(seed, method):
    loss, batches, lam = least_squares(seed)
    torch.manual_seed(seed)
    res = find_lr(lambda: torch.nn.Linear(10, 1), lambda p: torch.optim.SGD(p, lr=0.0), loss,
                  batches, method=method)  # fmt: skip
    good = 1 / lam
    # the smoothed minimum sits near the stability limit 2/λ, not decades past it
    assert good / 2 <= res.min_loss_lr <= 2.5 * good
    # the suggestion: stable, never past the raw minimum, within a factor 25 of 1/λ
    assert good / 25 <= res.suggested_lr <= good / 2
    assert res.suggested_lr <= res.raw_min_loss_lr
    assert res.to_dict()["raw_min_loss_lr"] == res.raw_min_loss_lr


def test_smoothing_is_centred():
    from metalr.workbench.find_lr import centered_mean, centered_median

    ramp = [float(i) for i in range(20)]
    assert centered_median(ramp, 5)[2:-2] == ramp[2:-2]  # no lag on a trend
    assert centered_mean(ramp, 5)[2:-2] == ramp[2:-2]
    spiky = [1.0] * 10 + [1e30]
    assert centered_median(spiky, 5)[:9] == [1.0] * 9  # a blow-up does not leak backwards


def test_range_test_on_a_real_task_with_adam():
    from metalr.workbench import make_task

    task = make_task("digits_mlp", "smoke")
    res = find_lr(lambda: task.model(0), lambda p: torch.optim.Adam(p),
                  lambda m, b: task.loss(m(b[0]), b[1]), task.batches(0), num_steps=80,
                  end_lr=100.0)  # fmt: skip
    assert res.diverged_at is not None and res.diverged_at < 100.0
    assert 1e-3 < res.suggested_lr < 1.0  # the default study's best Adam lr here is 1e-2
    assert res.suggested_lr <= res.raw_min_loss_lr


def test_invalid_arguments():
    with pytest.raises(ValueError, match="lr range"):
        find_lr(Quadratic, torch.optim.SGD, loss_fn, [torch.ones(20)], start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError, match="method"):
        find_lr(Quadratic, torch.optim.SGD, loss_fn, [torch.ones(20)], method="valley")
    for kwargs, name in [({"num_steps": 1}, "num_steps"), ({"smoothing": 1.0}, "smoothing"),
                         ({"divergence": 1.0}, "divergence"), ({"window": 0}, "window")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            find_lr(Quadratic, torch.optim.SGD, loss_fn, [torch.ones(20)], **kwargs)
