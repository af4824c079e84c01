"""DistributedDataParallel (gloo, 2 CPU processes) matches single-process training.

DDP averages the gradients of the two half-batches, which is the gradient of the mean loss over
the global batch; every metalr rule then sees the same gradient on every rank, so the weights and
effective rates of each rank must equal those of one process training on the global batch (up to
the float rounding of the all-reduce), for SGDHD, AdamHD and HyperLR at every granularity.

The two workers are spawned once (``torch.multiprocessing``, ~7 s of start-up, mostly imports)
and run every case; the test fails instead of hanging if they do not finish within the timeout.
"""

from __future__ import annotations

import pytest
import torch
from _distributed import run_ranks
from torch import nn
from torch.nn import functional as F

import metalr

WORLD = 2
STEPS = 8
GLOBAL_BATCH = 32
TIMEOUT_S = 120
CASES = [
    (kind, granularity)
    for kind in ("SGDHD", "AdamHD", "HyperLR(SGD)", "HyperLR(Adam)")
    for granularity in ("group", "tensor", "element")
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def _optimizer(kind: str, granularity: str, params) -> torch.optim.Optimizer:
    params = list(params)
    hyper = {"hypergrad_lr": 0.1, "granularity": granularity}
    if kind == "SGDHD":
        return metalr.SGDHD(params, lr=0.05, momentum=0.9, **hyper)
    if kind == "AdamHD":
        return metalr.AdamHD(params, lr=1e-2, **hyper)
    if kind == "HyperLR(SGD)":
        return metalr.HyperLR(torch.optim.SGD(params, lr=0.05, momentum=0.9), **hyper)
    return metalr.HyperLR(torch.optim.Adam(params, lr=1e-2), **hyper)


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)
    y = torch.stack([torch.sin(x[:, 0] + x[:, 1]), x[:, 2] * x[:, 3]], dim=-1)
    return x, y


def _train(kind: str, granularity: str, rank: int | None) -> dict[str, list[torch.Tensor]]:
    """``rank=None``: one process on the global batch; else DDP on this rank's half."""
    model = _model()
    module = model if rank is None else nn.parallel.DistributedDataParallel(model)
    opt = _optimizer(kind, granularity, module.parameters())
    for step in range(STEPS):
        x, y = _global_batch(step)
        if rank is not None:
            shard = GLOBAL_BATCH // WORLD
            x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        opt.zero_grad()
        F.mse_loss(module(x), y).backward()
        opt.step()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "rates": [r.clone() for r in opt.effective_lrs().values()],
    }


def _ddp_rank(rank: int) -> dict:
    return {f"{kind}-{gran}": _train(kind, gran, rank) for kind, gran in CASES}


@pytest.fixture(scope="module")
def ddp_results() -> list[dict]:
    return run_ranks(_ddp_rank, world=WORLD, timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("kind,granularity", CASES, ids=[f"{k}-{g}" for k, g in CASES])
def test_ddp_matches_single_process(ddp_results, kind: str, granularity: str) -> None:
    reference = _train(kind, granularity, rank=None)
    key = f"{kind}-{granularity}"
    for rank, results in enumerate(ddp_results):
        got = results[key]
        for name in ("params", "rates"):
            assert len(got[name]) == len(reference[name])
            for a, b in zip(got[name], reference[name]):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"rank {rank} {name}")
    # The ranks agree with each other exactly (same all-reduced gradient, same arithmetic).
    for a, b in zip(ddp_results[0][key]["rates"], ddp_results[1][key]["rates"]):
        assert torch.equal(a, b)
    base_lr = 0.05 if "SGD" in kind else 1e-2
    assert any((r != base_lr).any() for r in reference["rates"])  # the rates adapted
