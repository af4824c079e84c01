"""FSDP2 (``fully_shard``, DTensor parameters), 2 gloo processes on CPU.

Every tensor is sharded across ranks, so per-tensor sums (the tensor-granularity inner product
and the normalized rule's norms) must cover every rank: the rules reduce DTensor sums to their
full value. Sharded training then equals single-process training on the same global batch, for
every granularity.
"""

from __future__ import annotations

import pytest
import torch
from _distributed import run_ranks
from test_zero import STEPS, _data, _model

import metalr

MAKERS = {
    "AdamHD": lambda p, g: metalr.AdamHD(p, lr=1e-2, hypergrad_lr=0.1, granularity=g),
    "SGDHD": lambda p, g: metalr.SGDHD(p, lr=0.05, momentum=0.9, hypergrad_lr=0.1, granularity=g),
}


CONFIGS = [(name, g) for name in MAKERS for g in ("group", "tensor", "element")]


def _train_sharded(rank: int, name: str, granularity: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = MAKERS[name](model.parameters(), granularity)
    for step in range(STEPS):
        x, y = _data(step)
        half = slice(rank * 4, rank * 4 + 4)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[half]), y[half]).backward()
        opt.step()
    params = [p.full_tensor().detach().clone() for p in model.parameters()]
    rates = []
    for p in model.parameters():
        rate = opt.state[p]["lr_multiplier"]
        rates.append(rate.full_tensor() if hasattr(rate, "full_tensor") else rate.clone())
    return {"params": params, "rates": rates}


def _fsdp_rank(rank: int) -> dict:
    """One process group for every configuration (start-up dominates the cost)."""
    return {f"{n}-{g}": _train_sharded(rank, n, g) for n, g in CONFIGS}


@pytest.fixture(scope="module")
def sharded_results():
    return run_ranks(_fsdp_rank)[0]


@pytest.mark.parametrize("name,granularity", CONFIGS)
def test_fsdp2_equals_single_process(sharded_results, name, granularity):
    result = sharded_results[f"{name}-{granularity}"]
    model = _model()
    opt = MAKERS[name](model.parameters(), granularity)
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for p, q in zip(result["params"], model.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-9, atol=1e-12)
    for rate, p in zip(result["rates"], model.parameters()):
        torch.testing.assert_close(rate, opt.state[p]["lr_multiplier"], rtol=1e-9, atol=0)
    assert any((r != 1).any() for r in result["rates"]), "rates never adapted"
