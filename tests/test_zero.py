"""Optimizer-state sharding (ZeroRedundancyOptimizer, 2 gloo processes on CPU).

Each rank steps only its own parameters, so group-granularity sums and the skip decision must be
all-reduced (``shard_group=``): with it, sharded training equals single-process training on the
same global batch; without it the ranks adapt different rates.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _distributed import run_ranks
from _zero_setup import STEPS, _data, _model, _val_batch

import metalr


def _optimizer_kwargs(name: str) -> dict:
    return {
        "AdamHD": {"optimizer_class": metalr.AdamHD, "lr": 1e-2, "hypergrad_lr": 0.1},
        "AdamHD-normalized": {
            "optimizer_class": metalr.AdamHD,
            "lr": 1e-2,
            "hypergrad_lr": 0.1,
            "rule": "normalized",
        },
        "SGDHD": {
            "optimizer_class": metalr.SGDHD,
            "lr": 0.05,
            "momentum": 0.9,
            "hypergrad_lr": 0.1,
        },
        # the long-horizon signal, settled after the first step so that later steps read trails
        "AdamHD-horizon": {
            "optimizer_class": metalr.AdamHD,
            "lr": 1e-2,
            "hypergrad_lr": 0.1,
            "seek": {"horizon": 0.9, "turn_threshold": 1.0},
        },
    }[name]


RUNS = [("AdamHD", "group", True), ("SGDHD", "group", True), ("AdamHD", "group", False),
        ("AdamHD", "tensor", False), ("AdamHD", "tensor", True),
        ("AdamHD-normalized", "tensor", False), ("AdamHD-horizon", "tensor", True)]  # fmt: skip


def _train_sharded(rank: int, name: str, granularity: str, reduce: bool) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_model())
    kwargs = dict(_optimizer_kwargs(name), granularity=granularity)
    if reduce:
        kwargs["shard_group"] = dist.group.WORLD
    opt = ZeroRedundancyOptimizer(model.parameters(), **kwargs)
    for step in range(STEPS):
        x, y = _data(step)
        half = slice(rank * 4, rank * 4 + 4)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[half]), y[half]).backward()
        opt.step()
    rates = {
        i: opt.optim.state[p]["lr_multiplier"].clone()
        for i, p in enumerate(model.parameters())
        if p in opt.optim.state
    }
    controllers = {
        i: opt.optim.state[p]["hd_controller"].clone()
        for i, p in enumerate(model.parameters())
        if "hd_controller" in opt.optim.state.get(p, {})
    }
    return {"params": [p.detach().clone() for p in model.parameters()], "rates": rates,
            "controllers": controllers}  # fmt: skip


def _observe(opt, model: torch.nn.Module, step: int, alone: bool = False, **kwargs) -> None:
    """Every other step, the same validation batch on every rank (``alone``: its loss observed
    alone, computed without grad)."""
    if step % 2 == 1:
        x, y = _val_batch(step)
        with torch.set_grad_enabled(not alone):
            loss = torch.nn.functional.mse_loss(model(x), y)
        opt.observe_validation(loss, **kwargs, **({"hypergradient": False} if alone else {}))


#: The observing runs: the seek rule's defaults, and the normalized rule with the training
#: signal's weight 0 once a group follows the validation signal (ZeRO copies its own param
#: groups over the inner optimizer's before every step: a flag kept there was lost each step).
OBSERVING = {
    "seek": {},
    "normalized": {"rule": "normalized", "validation": {"train_weight": 0.0}},
    # settled at once, and a cut (and the rewind, applied at the end of the next step on each
    # rank's own share before ZeRO broadcasts it) two steps after the last new best
    "rewind": {
        "seek": {"init_scale": 0.5, "turn_threshold": 0.99, "resume_window": 0.0},
        "validation": {"rewind": 1.0, "hold": 2, "cut_after": 2},
    },
    # the same with the loss observed alone (hypergradient=False: no gradient, so "auto" may
    # average it; the same loss on every rank)
    "alone": {
        "seek": {"init_scale": 0.5, "turn_threshold": 0.99, "resume_window": 0.0},
        "validation": {"rewind": 1.0, "hold": 2, "cut_after": 2, "loss_decay": 0.0},
    },
    # the ray ceiling (its cosine summed over the ranks): a snapshot at the first observation
    # (c < 0), the ceiling and the rewind at the second (c > 0)
    "ray": {
        "seek": {"init_scale": 0.5, "turn_threshold": 0.99, "resume_window": 0.0},
        "validation": {
            "ray_steps": 100,
            "ray_clock": 0,
            "ray_gate": 1,
            "ray_before": 1.0,
            "ray_tau": 0.0,
            "ray_persist": 1,
            "hypergrad_lr": 0.0,
            "hold": 0,
        },
    },
}
# the ray on the rate-weighted clock: its factor t_eff / (a T) (a T = 4 here) reads the group's
# largest rate, maxed over the ranks' tensors
OBSERVING["ray_clock"] = {
    "seek": OBSERVING["ray"]["seek"],
    "validation": {
        **OBSERVING["ray"]["validation"],
        "ray_steps": 40,
        "ray_target": 0.1,
        "ray_clock": 1,
    },
}


def _train_sharded_observing(rank: int, variant: str) -> dict:
    """ZeRO + observe_validation(process_group=None): the same batch on every rank."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_model())
    # "world": the default group, by name, so that ZeRO's state dict (which keeps the
    # constructor arguments in its param groups) can be pickled
    kwargs = dict(_optimizer_kwargs("AdamHD"), granularity="tensor", shard_group="world")
    kwargs.update(OBSERVING[variant])
    opt = ZeroRedundancyOptimizer(model.parameters(), **kwargs)
    refused = ""
    for step in range(STEPS):
        x, y = _data(step)
        half = slice(rank * 4, rank * 4 + 4)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[half]), y[half]).backward()
        opt.step()
        _spread_rates(opt.optim, list(model.parameters()), variant, step)
        alone = variant == "alone"
        if step == 0 and not alone:
            try:  # "auto" would average different ranks' parameters: refused
                _observe(opt.optim, model.module, 1)
            except ValueError as exc:
                refused = str(exc)
        _observe(opt.optim, model.module, step, alone, process_group="auto" if alone else None)
    rates = {i: opt.optim.state[p]["lr_multiplier"].clone()
             for i, p in enumerate(model.parameters()) if p in opt.optim.state}  # fmt: skip
    # ZeRO's checkpoint: it broadcasts each rank's state dict (a ProcessGroup in the groups,
    # ZeRO's copy of shard_group, could not be pickled before 2026-12-05)
    opt.consolidate_state_dict(to=0)
    consolidated = opt.state_dict() if rank == 0 else None
    return {"params": [p.detach().clone() for p in model.parameters()], "rates": rates,
            "refused": refused, "consolidated": consolidated}  # fmt: skip


def _zero_rank(rank: int) -> dict:
    out = {run: _train_sharded(rank, *run) for run in RUNS}
    for variant in OBSERVING:
        out[f"observing-{variant}"] = _train_sharded_observing(rank, variant)
    return out


@pytest.fixture(scope="module")
def sharded():
    per_rank = run_ranks(_zero_rank)
    names = (*RUNS, *(f"observing-{v}" for v in OBSERVING))
    return {run: [per_rank[r][run] for r in range(2)] for run in names}


def _observing_optimizer(params, variant: str):
    kwargs = dict(_optimizer_kwargs("AdamHD"), granularity="tensor", **OBSERVING[variant])
    return kwargs.pop("optimizer_class")(params, **kwargs)


def _observing_single(variant: str, rewind: float | None = None):
    """One process: the sharded run's steps and observations (``rewind``: overrides it)."""
    model = _model()
    opt = _observing_optimizer(model.parameters(), variant)
    if rewind is not None:
        opt.param_groups[0]["validation"]["rewind"] = rewind
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        _spread_rates(opt, list(model.parameters()), variant, step)
        _observe(opt, model, step, variant == "alone")
    return model, opt


def _spread_rates(opt, params: list, variant: str, step: int) -> None:
    """ "ray_clock": between the first two looks, tensor ``i``'s multiplier × (1 + i / 2): the
    ranks' largest multipliers move apart (the ramp alone moves all alike): a rank reading its own
    would run another clock."""
    if variant != "ray_clock" or step != 2:
        return
    for i, p in enumerate(params):
        if p in opt.state:
            opt.state[p]["lr_multiplier"].mul_(1 + i / 2)


@pytest.mark.parametrize("variant", list(OBSERVING))
def test_zero_observe_validation_equals_single_process(sharded, variant):
    model, opt = _observing_single(variant)
    if variant in ("rewind", "alone"):  # the rewind acted: without it the weights differ
        free, _ = _observing_single(variant, rewind=0.0)
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), free.parameters()))
    if variant.startswith("ray"):  # it acted (and its keys are in the consolidated checkpoint)
        assert all(float(opt.state[p]["hd_ray"][1]) == 1.0 for p in model.parameters())
    ranks = sharded[f"observing-{variant}"]
    if variant != "alone":  # a gradient cannot be averaged over ranks holding other parameters
        assert all("pass process_group=None" in r["refused"] for r in ranks)
    for r in ranks:
        for a, b in zip(r["params"], model.parameters()):
            torch.testing.assert_close(a, b.detach())
        for i, rate in r["rates"].items():
            torch.testing.assert_close(
                rate, opt.state[list(model.parameters())[i]]["lr_multiplier"]
            )
    assert {**ranks[0]["rates"], **ranks[1]["rates"]}.keys() == set(range(6))
    consolidated = ranks[0]["consolidated"]
    assert all(s["hd_follows_validation"] for s in consolidated["state"].values())
    if variant.startswith("ray"):
        assert all("hd_ray_anchor" in s for s in consolidated["state"].values())
    resumed = _observing_optimizer(model.parameters(), variant)
    resumed.load_state_dict(consolidated)
    assert resumed._follows_validation(resumed.param_groups[0])


def _run_single(name, granularity):
    model = _model()
    kwargs = dict(_optimizer_kwargs(name), granularity=granularity)
    opt = kwargs.pop("optimizer_class")(model.parameters(), **kwargs)
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    rates = [opt.state[p]["lr_multiplier"] for p in model.parameters()]
    return [p.detach() for p in model.parameters()], rates


@pytest.mark.parametrize("name", ["AdamHD", "SGDHD"])
def test_zero_group_granularity_equals_single_process(sharded, name):
    ranks = sharded[(name, "group", True)]
    params, rates = _run_single(name, "group")
    for result in ranks:
        for p, q in zip(result["params"], params):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
        for i, rate in result["rates"].items():
            torch.testing.assert_close(rate, rates[i], rtol=1e-9, atol=0)


def test_zero_without_the_reduction_drifts(sharded):
    """The failure the reduction prevents: each rank adapts its own group rate."""
    ranks = sharded[("AdamHD", "group", False)]
    owned = [set(r["rates"]) for r in ranks]
    assert owned[0].isdisjoint(owned[1]), "ZeRO should give each rank its own parameters"
    rate0 = next(iter(ranks[0]["rates"].values()))
    rate1 = next(iter(ranks[1]["rates"].values()))
    # The seek rule's ramp moves every rank's rate alike; its signal averages drift at once.
    ctrl0 = next(iter(ranks[0]["controllers"].values()))
    ctrl1 = next(iter(ranks[1]["controllers"].values()))
    drift = not torch.allclose(rate0, rate1, rtol=1e-6, atol=0)
    assert drift or not torch.allclose(ctrl0, ctrl1, rtol=1e-6, atol=0)


def test_zero_tensor_granularity_needs_no_reduction_under_the_normalized_rule(sharded):
    ranks = sharded[("AdamHD-normalized", "tensor", False)]
    params, _ = _run_single("AdamHD-normalized", "tensor")
    for p, q in zip(ranks[0]["params"], params):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_zero_seek_rule_needs_the_reduction_at_tensor_granularity_too(sharded):
    """The seek rule's ramp reads the group cosine (a sum over the group's tensors): with
    shard_group every rank equals single-process training; without it ranks part ways."""
    params, rates = _run_single("AdamHD", "tensor")
    for result in sharded[("AdamHD", "tensor", True)]:
        for p, q in zip(result["params"], params):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
        for i, rate in result["rates"].items():
            torch.testing.assert_close(rate, rates[i], rtol=1e-9, atol=0)
    drifted = sharded[("AdamHD", "tensor", False)][0]["params"]
    assert any(not torch.allclose(p, q, rtol=1e-6, atol=0) for p, q in zip(drifted, params))


def test_state_dict_leaves_out_zeros_copy_of_shard_group():
    """ZeRO copies its constructor arguments into the inner optimizer's groups: a process group
    there made ``consolidate_state_dict`` fail to pickle the state dict. It is wiring, not
    state: left out of the state dict, kept in the live group."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = metalr.AdamHD([p], lr=1e-2)
    handle = object()  # stands for a ProcessGroup (not picklable either)
    opt.param_groups[0]["shard_group"] = handle
    assert "shard_group" not in opt.state_dict()["param_groups"][0]
    assert opt.param_groups[0]["shard_group"] is handle


@pytest.mark.parametrize("make", [metalr.AdamHD, metalr.SGDHD])
def test_shard_group_takes_world_by_name_and_refuses_other_strings(make):
    p = torch.nn.Parameter(torch.ones(3))
    assert make([p], lr=1e-2, shard_group="world")._shard_reducer().process_group is None
    with pytest.raises(ValueError, match="Invalid shard_group: 'everyone'"):
        make([p], lr=1e-2, shard_group="everyone")
