"""The loss-spike guard under DistributedDataParallel (gloo, 2 CPU processes).

Each rank's closure returns the loss of its own half of the global batch; at one step only
rank 0's loss spikes (a constant added to its value, not to its gradient). The guard averages
the loss over the ranks before its test, so both ranks must cut their rates at that step and
hold the same weights, rates and statistics — equal to one process whose closure returns the mean
of the two halves' losses (float64, same batch sizes on both ranks).
"""

from __future__ import annotations

import pytest
import torch
from _distributed import run_ranks
from torch import nn
from torch.nn import functional as F

import metalr
from metalr.optim._state_keys import RATE_KEY, SPIKE_KEY

WORLD = 2
STEPS = 12
SPIKE_AT = 8
GLOBAL_BATCH = 16
TIMEOUT_S = 120
GUARD = {"warmup": 4.0, "sigmas": 3.0}
KINDS = ["AdamHD", "SGDHD"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)
    return x, torch.stack([torch.sin(x[:, 0] + x[:, 1]), x[:, 2] * x[:, 3]], dim=-1)


def _half(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, ...]:
    n = GLOBAL_BATCH // WORLD
    return tuple(t[rank * n : (rank + 1) * n] for t in batch)


def _spike(rank: int, step: int) -> float:
    return 100.0 if rank == 0 and step == SPIKE_AT else 0.0


def _train(kind: str, rank: int | None) -> dict[str, list[torch.Tensor]]:
    """``rank=None``: one process on the global batch, its closure returning the mean of the
    halves' losses (with rank 0's spike); else DDP on this rank's half."""
    model = _model()
    net = model if rank is None else nn.parallel.DistributedDataParallel(model)
    if kind == "AdamHD":
        opt = metalr.AdamHD(net.parameters(), lr=1e-2, spike_guard=GUARD)
    else:
        opt = metalr.SGDHD(net.parameters(), lr=0.05, momentum=0.9, spike_guard=GUARD)
    for step in range(STEPS):

        def closure(step=step):
            opt.zero_grad()
            if rank is None:
                x, y = _batch(step)
                F.mse_loss(net(x), y).backward()
                with torch.no_grad():
                    halves = [F.mse_loss(net(xh), yh) + _spike(r, step)
                              for r, (xh, yh) in ((r, _half(_batch(step), r)) for r in range(WORLD))]  # fmt: skip
                return sum(halves) / WORLD
            x, y = _half(_batch(step), rank)
            loss = F.mse_loss(net(x), y)
            loss.backward()
            return loss.detach() + _spike(rank, step)

        opt.step(closure)
    params = list(model.parameters())
    return {
        "params": [p.detach().clone() for p in params],
        "rates": [opt.state[p][RATE_KEY].clone() for p in params],
        "stats": [opt.state[params[0]][SPIKE_KEY].clone()],
    }


def _ddp_rank(rank: int) -> dict:
    return {kind: _train(kind, rank) for kind in KINDS}


@pytest.fixture(scope="module")
def ddp_results() -> list[dict]:
    return run_ranks(_ddp_rank, world=WORLD, timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("kind", KINDS)
def test_spike_guard_ddp_matches_single_process(ddp_results, kind) -> None:
    reference = _train(kind, rank=None)
    assert reference["stats"][0][3].item() == 1  # the spike was seen and cut the rates
    for rank, results in enumerate(ddp_results):
        for name, wanted in reference.items():
            for a, b in zip(results[kind][name], wanted):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"rank {rank} {name}")
    for name in reference:  # the ranks agree exactly: the same averaged loss and gradients
        for a, b in zip(ddp_results[0][kind][name], ddp_results[1][kind][name]):
            assert torch.equal(a, b), name
