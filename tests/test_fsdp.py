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
# the spike guard: rank 0's loss (its value only) spikes at one step; the ranks average it
GUARDED = [("AdamHD", "tensor"), ("AdamHD", "element"), ("SGDHD", "group")]
GUARD = {"warmup": 3.0, "sigmas": 3.0}
SPIKE_AT, SPIKE = 6, 100.0


def _train_sharded(rank: int, name: str, granularity: str, guard: bool = False) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = MAKERS[name](model.parameters(), granularity)
    if guard:
        opt = type(opt)(model.parameters(), **{**opt.defaults, "spike_guard": GUARD})
    for step in range(STEPS):
        x, y = _data(step)
        half = slice(rank * 4, rank * 4 + 4)

        def closure(x=x[half], y=y[half], step=step):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss.detach() + (SPIKE if rank == 0 and step == SPIKE_AT else 0.0)

        opt.step(closure)
    params = [p.full_tensor().detach().clone() for p in model.parameters()]
    rates = []
    for p in model.parameters():
        rate = opt.state[p]["lr_multiplier"]
        rates.append(rate.full_tensor() if hasattr(rate, "full_tensor") else rate.clone())
    return {"params": params, "rates": rates}


def _fsdp_rank(rank: int) -> dict:
    """One process group for every configuration (start-up dominates the cost)."""
    results = {f"{n}-{g}": _train_sharded(rank, n, g) for n, g in CONFIGS}
    results.update({f"{n}-{g}-guard": _train_sharded(rank, n, g, guard=True) for n, g in GUARDED})
    return results


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


@pytest.mark.parametrize("name,granularity", GUARDED)
def test_fsdp2_spike_guard_equals_single_process(sharded_results, name, granularity):
    """The guard averages the ranks' losses: one process whose loss is their mean (plus half
    rank 0's spike) cuts at the same step and ends with the same weights and rates."""
    result = sharded_results[f"{name}-{granularity}-guard"]
    model = _model()
    plain = MAKERS[name](model.parameters(), granularity)
    opt = type(plain)(model.parameters(), **{**plain.defaults, "spike_guard": GUARD})
    for step in range(STEPS):
        x, y = _data(step)

        def closure(x=x, y=y, step=step):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss.detach() + (SPIKE / 2 if step == SPIKE_AT else 0.0)

        opt.step(closure)
    assert opt.spike_summary()[0]["spikes"] >= 1  # rank 0's spike (random targets add one)
    for p, q in zip(result["params"], model.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-9, atol=1e-12)
    for rate, p in zip(result["rates"], model.parameters()):
        torch.testing.assert_close(rate, opt.state[p]["lr_multiplier"], rtol=1e-9, atol=0)
