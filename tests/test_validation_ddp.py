"""``observe_validation`` under DistributedDataParallel (gloo, 2 CPU processes).

Each rank trains on its half of the global batch and, every other step, observes the loss of its
own validation minibatch through ``ddp_model.module`` (or through the DDP wrapper inside
``no_sync()``). ``process_group="auto"`` averages the validation gradients, so every rank must
hold the same rates and validation statistics, and these (and the weights trained with them) must
equal one process that trains on the global batch and observes the mean of the two ranks'
validation losses (float64; same batch sizes on both ranks). With ``process_group=None`` nothing
is averaged: each rank follows its own minibatch, as one process observing only that one.

The two workers are spawned once (~7 s of start-up, mostly imports) and run every case.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _distributed import run_ranks
from torch import nn
from torch.nn import functional as F

import metalr
from metalr.optim._base import CONTROLLER_KEY, RATE_KEY, VALIDATION_KEY
from metalr.optim._state_keys import SNAPSHOT_KEY

WORLD = 2
STEPS = 8
OBSERVE_EVERY = 2
GLOBAL_BATCH = 16
TIMEOUT_S = 120
CASES = [
    ("SGDHD", "normalized", "tensor", "module"),
    ("SGDHD", "seek", "element", "module"),
    ("AdamHD", "normalized", "element", "module"),
    ("AdamHD", "seek", "tensor", "module"),
    ("AdamHD", "normalized", "tensor", "no_sync"),
    ("AdamHD", "additive", "group", "world"),
    ("HyperLR(Adam)", "normalized", "tensor", "module"),
    ("HyperLR(SGD)", "seek", "group", "module"),
    ("AdamHD", "seek", "tensor", "rising"),  # a validation loss that rises: the rewind acts
    ("AdamHD", "seek", "element", "alone"),  # the same, its loss observed alone (no gradient)
]
IDS = ["-".join(c) for c in CASES]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def _optimizer(
    kind: str, rule: str, granularity: str, params, rewind: float = 1.0
) -> torch.optim.Optimizer:
    params = list(params)
    # A seek rule that turns at once and for good (no re-opened ramp), so that it reaches the
    # tracking phase the validation drives.
    hyper: dict[str, Any] = {"rule": rule, "granularity": granularity}
    if rule == "additive":  # its β is in rate units: the validation one too (default 0.1)
        hyper.update(hypergrad_lr=1e-3, validation={"hypergrad_lr": 1e-3})
    if rule == "seek":
        hyper["seek"] = {"init_scale": 0.5, "turn_threshold": 0.99, "resume_window": 0.0}
        # a signal that moves the rates both ways (the default brake may never act here), and the
        # hold and its cut after one observation (every 2 steps), which read the validation loss
        # (averaged over the ranks like the gradient), with the rewind to the best parameters
        hyper["validation"] = {"climb": 1.0, "evidence": 0.2, "hypergrad_lr": 0.3, "hold": 2,
                               "cut_after": 2, "plateau_cut": 0.5, "rewind": rewind}  # fmt: skip
    if kind == "SGDHD":
        return metalr.SGDHD(params, lr=0.05, momentum=0.9, **hyper)
    if kind == "AdamHD":
        return metalr.AdamHD(params, lr=1e-2, **hyper)
    inner = (
        torch.optim.SGD(params, lr=0.05, momentum=0.9)
        if kind == "HyperLR(SGD)"
        else torch.optim.Adam(params, lr=1e-2)
    )
    return metalr.HyperLR(inner, **hyper)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)
    y = torch.stack([torch.sin(x[:, 0] + x[:, 1]), x[:, 2] * x[:, 3]], dim=-1)
    return x, y


def _shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, ...]:
    n = GLOBAL_BATCH // WORLD
    return tuple(t[rank * n : (rank + 1) * n] for t in batch)


def _val_batch(step: int, rising: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _batch(1000 + step)
    if rising:  # targets against the training ones: the validation loss rises as training goes
        return x, -2.0 * y
    return x, y + 0.3 * torch.cos(3 * x[:, :2])  # shifted targets: a signal unlike the training one


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, list[torch.Tensor]]:
    params = list(model.parameters())
    state = opt.state
    return {
        "params": [p.detach().clone() for p in params],
        "rates": [state[p][RATE_KEY].clone() for p in params],
        "validation": [state[p][VALIDATION_KEY].clone() for p in params],
        "controllers": [
            state[p][CONTROLLER_KEY].clone() for p in params if CONTROLLER_KEY in state[p]
        ],
        "snapshots": [state[p][SNAPSHOT_KEY].clone() for p in params if SNAPSHOT_KEY in state[p]],
    }


def _train(
    case: tuple[str, ...],
    rank: int | None,
    observe_ranks: tuple[int, ...] = (0, 1),
    process_group: Any = "auto",
    steps: int = STEPS,
    every: int = OBSERVE_EVERY,
    rewind: float = 1.0,
) -> dict:
    """``rank=None``: one process on the global batches, observing the mean of the validation
    losses of ``observe_ranks``; else DDP on this rank's halves, observing its own."""
    kind, rule, granularity, via = case
    model = _model()
    ddp = model if rank is None else nn.parallel.DistributedDataParallel(model)
    opt = _optimizer(kind, rule, granularity, ddp.parameters(), rewind)
    if via == "world" and rank is not None and process_group == "auto":
        process_group = torch.distributed.group.WORLD
    for step in range(steps):
        x, y = _batch(step) if rank is None else _shard(_batch(step), rank)
        opt.zero_grad()
        F.mse_loss(ddp(x), y).backward()
        opt.step()
        if (step + 1) % every:
            continue
        grads = [p.grad.clone() for p in model.parameters()]
        rising = via in ("rising", "alone")
        if rank is None:
            with torch.set_grad_enabled(via != "alone"):
                losses = [F.mse_loss(model(xv), yv) for xv, yv in
                          (_shard(_val_batch(step, rising), r) for r in observe_ranks)]  # fmt: skip
            opt.observe_validation(sum(losses) / len(losses), hypergradient=via != "alone")
        elif via == "alone":  # each rank's loss, averaged over the ranks; nothing backpropagated
            xv, yv = _shard(_val_batch(step, rising), rank)
            with torch.no_grad():
                loss = F.mse_loss(ddp.module(xv), yv)
            opt.observe_validation(loss, process_group=process_group, hypergradient=False)
        elif via == "no_sync":
            xv, yv = _shard(_val_batch(step), rank)
            with ddp.no_sync():
                opt.observe_validation(F.mse_loss(ddp(xv), yv), process_group=process_group)
        else:
            xv, yv = _shard(_val_batch(step, rising), rank)
            opt.observe_validation(F.mse_loss(ddp.module(xv), yv), process_group=process_group)
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    return _snapshot(model, opt)


def _steps(case: tuple[str, ...]) -> int:
    """Training steps of a case: the rising one runs until the hold's cut (and the rewind) act."""
    return 14 if case[3] in ("rising", "alone") else STEPS


def _ddp_rank(rank: int) -> dict:
    results = {key: _train(case, rank, steps=_steps(case)) for key, case in zip(IDS, CASES)}
    # process_group=None: no averaging. One observation, after the last step, so that the
    # weights (trained by DDP with equal rates on both ranks) are still those of one process.
    results["none"] = _train(CASES[2], rank, process_group=None, every=STEPS)
    return results


@pytest.fixture(scope="module")
def ddp_results() -> list[dict]:
    return run_ranks(_ddp_rank, world=WORLD, timeout_s=TIMEOUT_S)


def _assert_same(got: dict, want: dict, exact: bool = False, msg: str = "") -> None:
    for name, wanted in want.items():
        assert len(got[name]) == len(wanted), f"{msg} {name}"
        for a, b in zip(got[name], wanted):
            if exact:
                assert torch.equal(a, b), f"{msg} {name}"
            else:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"{msg} {name}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_validation_ddp_matches_single_process(ddp_results, case) -> None:
    key = "-".join(case)
    reference = _train(case, rank=None, steps=_steps(case))
    observations = _steps(case) // OBSERVE_EVERY
    if case[3] in ("rising", "alone"):  # the rewind sent the parameters back (not without it)
        without = _train(case, rank=None, steps=_steps(case), rewind=0.0)
        assert any(not torch.equal(a, b) for a, b in zip(without["params"], reference["params"]))
    # The validation signal was used: every observation counted, and the rates differ from a
    # run that observed the first rank's minibatch alone (observed alone: its loss counted, no
    # signal, and the loss's statistics differ).
    first_rank = _train(case, rank=None, observe_ranks=(0,), steps=_steps(case))
    if case[3] == "alone":
        assert {(int(v[2]), int(v[6])) for v in reference["validation"]} == {(0, observations)}
        assert any(not torch.equal(a[3:5], b[3:5])
                   for a, b in zip(first_rank["validation"], reference["validation"]))  # fmt: skip
    else:
        assert {int(v[2]) for v in reference["validation"]} == {observations}
        assert any(not torch.allclose(a, b)
                   for a, b in zip(first_rank["rates"], reference["rates"]))  # fmt: skip
    for rank, results in enumerate(ddp_results):
        _assert_same(results[key], reference, msg=f"rank {rank}")
    # The ranks agree with each other exactly (same averaged gradients, same arithmetic).
    _assert_same(ddp_results[0][key], ddp_results[1][key], exact=True)


def test_validation_ddp_process_group_none_does_not_average(ddp_results) -> None:
    ranks = [results["none"] for results in ddp_results]
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["rates"], ranks[1]["rates"]))
    for rank, got in enumerate(ranks):
        alone = _train(CASES[2], rank=None, observe_ranks=(rank,), every=STEPS)
        _assert_same(got, alone, msg=f"rank {rank}")
