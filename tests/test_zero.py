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

import metalr

STEPS = 8


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 2),
    ).double()  # fmt: skip


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(8, 6, generator=gen, dtype=torch.float64),
            torch.randn(8, 2, generator=gen, dtype=torch.float64))  # fmt: skip


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


def _val_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    return (torch.randn(8, 6, generator=gen, dtype=torch.float64),
            torch.randn(8, 2, generator=gen, dtype=torch.float64))  # fmt: skip


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
        _observe(opt, model, step, variant == "alone")
    return model, opt


@pytest.mark.parametrize("variant", list(OBSERVING))
def test_zero_observe_validation_equals_single_process(sharded, variant):
    model, opt = _observing_single(variant)
    if variant in ("rewind", "alone"):  # the rewind acted: without it the weights differ
        free, _ = _observing_single(variant, rewind=0.0)
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), free.parameters()))
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


EMPTY_RANK_CASES = {  # (dtype, rule, granularity, hypergrad_lr)
    "float64-normalized-group": (torch.float64, "normalized", "group", 0.1),
    "float64-seek-tensor": (torch.float64, "seek", "tensor", 0.1),
    "float32-seek-tensor-beta0": (torch.float32, "seek", "tensor", 0.0),
    "float32-normalized-group": (torch.float32, "normalized", "group", 0.1),
}


def _one_parameter_run(rank: int | None, case: str, observe: bool = False) -> list:
    """One parameter tensor: under ZeRO on two ranks, rank 1 holds none and joins the step's
    collectives in its place (``ShardReducer.participate``); with ``observe``, a validation
    batch after every step (rank 1 then computes no gradient at all)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dtype, rule, granularity, beta = EMPTY_RANK_CASES[case]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False).to(dtype)
    kwargs = {"lr": 1e-2, "rule": rule, "granularity": granularity, "hypergrad_lr": beta}
    if rank is None:
        module, opt = model, metalr.AdamHD(model.parameters(), **kwargs)
    else:
        module = torch.nn.parallel.DistributedDataParallel(model)
        opt = ZeroRedundancyOptimizer(module.parameters(), optimizer_class=metalr.AdamHD,
                                      shard_group=dist.group.WORLD, **kwargs)  # fmt: skip
    for step in range(4):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=gen).to(dtype)
        y = x.sum(1, keepdim=True)
        if rank is not None:
            x, y = x[rank * 4 : rank * 4 + 4], y[rank * 4 : rank * 4 + 4]
        opt.zero_grad()
        torch.nn.functional.mse_loss(module(x), y).backward()
        opt.step()
        if observe:  # the same batch on every rank
            xv = torch.randn(8, 4, generator=gen).to(dtype)
            loss = torch.nn.functional.mse_loss(model(xv), -xv.sum(1, keepdim=True))
            (opt if rank is None else opt.optim).observe_validation(loss, process_group=None)
    return [p.detach().clone() for p in model.parameters()]


def _empty_rank_runs(rank: int) -> dict:
    return {case: _one_parameter_run(rank, case) for case in EMPTY_RANK_CASES}


def test_zero_with_a_rank_holding_no_parameter_equals_single_process():
    """The rank without a parameter ran float32 collectives where the others ran the rate dtype
    (float64 models: gloo aborted on the size mismatch), and the seek rule's sequence where a
    zero hypergrad_lr runs the normalized rule's (a 15 s hang). Every case now equals
    single-process training."""
    per_rank = run_ranks(_empty_rank_runs, timeout_s=120)
    for case in EMPTY_RANK_CASES:
        ref = _one_parameter_run(None, case)
        for rank in range(2):
            torch.testing.assert_close(per_rank[rank][case][0], ref[0], rtol=1e-6, atol=1e-7,
                                       msg=case)  # fmt: skip


#: Observing runs in which a rank holds none of a group's trainable parameters at an
#: observation: (param groups' layout, optimizer options). "one-weight": group 0 is one tensor,
#: so ZeRO gives rank 1 none of it; "frozen": rank 1's part of group 0 (layer 0's bias) is
#: frozen while the first validation batch is observed ("frozen-group": all of group 0, so no
#: rank holds a trainable parameter of it then); "nan-shard": the first validation
#: gradient is NaN on rank 1's part of group 1 only (the loss is finite).
EMPTY_OBSERVING = {
    "seek-tensor": ("one-weight", {}),
    "seek-group": ("one-weight", {"granularity": "group"}),
    "seek-element": ("one-weight", {"granularity": "element"}),
    "normalized-tensor-w0": ("one-weight", {"rule": "normalized",
                                            "validation": {"train_weight": 0.0}}),
    "normalized-group": ("one-weight", {"rule": "normalized", "granularity": "group"}),
    "normalized-element": ("one-weight", {"rule": "normalized", "granularity": "element"}),
    "additive-group": ("one-weight", {"rule": "additive", "hypergrad_lr": 1e-4,
                                      "granularity": "group"}),
    "frozen-normalized-w0": ("frozen", {"rule": "normalized",
                                        "validation": {"train_weight": 0.0}}),
    "frozen-seek": ("frozen", {}),
    "frozen-group-normalized-w0": ("frozen-group", {"rule": "normalized",
                                                    "validation": {"train_weight": 0.0}}),
    "nan-shard-seek": ("nan-shard", {}),
    "nan-shard-normalized-group": ("nan-shard", {"rule": "normalized", "granularity": "group"}),
    # the loss observed alone (hypergradient=False; "+alone"): the rank holding none of group 0
    # joins that observation's collectives, which are not the gradient's
    "alone-seek-tensor": ("one-weight+alone", {"validation": {"hold": 2, "cut_after": 2}}),
    "alone-frozen-seek": ("frozen+alone", {"validation": {"hold": 2, "cut_after": 2}}),
}  # fmt: skip


def _empty_layout_groups(model: torch.nn.Module, layout: str) -> list[dict]:
    layout = layout.split("+")[0]
    first = [model[0].weight] if layout == "one-weight" else list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    return [{"params": first}, {"params": rest}]


def _empty_layout_observe(opt, model: torch.nn.Module, step: int, layout: str) -> None:
    if step % 2 == 0:
        return
    layout, alone = layout.split("+")[0], layout.endswith("+alone")
    first = step == 1
    if first and layout == "frozen":
        model[0].bias.requires_grad_(False)
    if first and layout == "frozen-group":
        model[0].requires_grad_(False)
    if alone:  # the rising loss of a held-out pass, observed alone (the same on every rank)
        opt.observe_validation(1.0 + 0.1 * step - 0.3 * (step == 3), hypergradient=False)
        model[0].requires_grad_(True)
        return
    x, y = _val_batch(step)
    loss = torch.nn.functional.mse_loss(model(x), y)
    if first and layout == "nan-shard":  # d sqrt(0 · |w|) / dw = inf · 0 = NaN; the loss is 0
        loss = loss + torch.sqrt(model[2].weight.abs() * 0).sum()
    opt.observe_validation(loss, process_group=None)
    model[0].requires_grad_(True)


def _empty_layout_run(rank: int | None, case: str) -> dict:
    """``case`` of EMPTY_OBSERVING: one process (``rank=None``) or ZeRO over two ranks."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    layout, options = EMPTY_OBSERVING[case]
    model = _model()
    kwargs = {"lr": 1e-2, "hypergrad_lr": 0.1, **options}
    if rank is None:
        module = model
        opt = inner = metalr.AdamHD(_empty_layout_groups(model, layout), **kwargs)
    else:
        module = torch.nn.parallel.DistributedDataParallel(model)
        opt = ZeroRedundancyOptimizer(_empty_layout_groups(model, layout),
                                      optimizer_class=metalr.AdamHD, shard_group="world",
                                      **kwargs)  # fmt: skip
        inner = opt.optim
    for step in range(STEPS):
        x, y = _data(step)
        if rank is not None:
            x, y = x[rank * 4 : rank * 4 + 4], y[rank * 4 : rank * 4 + 4]
        opt.zero_grad()
        torch.nn.functional.mse_loss(module(x), y).backward()
        opt.step()
        _empty_layout_observe(inner, model, step, layout)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "follows": [inner._follows_validation(g) for g in inner.param_groups],
        "held": [[index[id(p)] for p in g["params"]] for g in inner.param_groups],
    }


def _empty_layout_ranks(rank: int) -> dict:
    return {case: _empty_layout_run(rank, case) for case in EMPTY_OBSERVING}


def test_zero_observe_validation_with_a_rank_holding_none_of_a_group():
    """A rank holding none of a group's trainable parameters at an observation skipped the
    group's collectives while the others ran them (gloo aborted: "collective mismatch"), and one
    whose parameters were frozen then did not follow the validation signal afterwards; a NaN in
    one rank's part of a first observation switched the other ranks' group alone. Now every
    rank runs the same collectives and equals one process, for every rule and granularity."""
    per_rank = run_ranks(_empty_layout_ranks, timeout_s=240)
    for case, (layout, _) in EMPTY_OBSERVING.items():
        layout = layout.split("+")[0]
        ref = _empty_layout_run(None, case)
        for rank in range(2):
            out = per_rank[rank][case]
            for a, b in zip(out["params"], ref["params"]):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=case)
            for held, follows, expected in zip(out["held"], out["follows"], ref["follows"]):
                if held:
                    assert follows == expected, (case, rank)
        if layout == "one-weight":
            assert per_rank[1][case]["held"][0] == []  # the case the test is about
        if layout == "frozen":
            assert per_rank[1][case]["held"][0] == [1]  # layer 0's bias, frozen at step 1
        if layout == "frozen-group":  # one process: group 0 follows from step 3, not 1
            assert ref["follows"] == [True, True]
        if layout == "nan-shard":
            assert per_rank[1][case]["held"][1] == [2]  # layer 2's weight, NaN at step 1
            assert ref["follows"] == [True, True]  # switched at step 3
    reference = _empty_layout_run(None, "nan-shard-normalized-group")
    clean = _empty_layout_run(None, "normalized-group")  # the same run without the NaN
    assert any(not torch.equal(a, b) for a, b in zip(reference["params"], clean["params"]))


def _one_parameter_observing_ranks(rank: int) -> list:
    return _one_parameter_run(rank, "float64-normalized-group", observe=True)


def test_zero_observe_validation_on_a_rank_holding_no_parameter_at_all():
    """``torch.autograd.grad`` with no inputs raised on the rank holding nothing (and the other
    rank died with it): that rank now computes no gradient and joins the collectives."""
    per_rank = run_ranks(_one_parameter_observing_ranks, timeout_s=120)
    ref = _one_parameter_run(None, "float64-normalized-group", observe=True)
    for rank in range(2):
        torch.testing.assert_close(per_rank[rank][0], ref[0], rtol=1e-9, atol=1e-12)


def _guarded_run(rank: int | None, shard_group: str) -> dict:
    """The spike guard on group 0 (layer 0's weight: under ZeRO rank 1 holds none of it), every
    step with a closure; step 2's gradient is NaN in layer 2's weight only (rank 1's share) and
    step 5's loss spikes (targets x10)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = _model()
    groups = [{"params": [model[0].weight], "spike_guard": {"warmup": 3}},
              {"params": [p for p in model.parameters() if p is not model[0].weight]}]  # fmt: skip
    if rank is None:
        module = model
        opt = inner = metalr.AdamHD(groups, lr=1e-2)
    else:
        module = torch.nn.parallel.DistributedDataParallel(model)
        group = "world" if shard_group == "world" else dist.group.WORLD
        opt = ZeroRedundancyOptimizer(groups, optimizer_class=metalr.AdamHD, shard_group=group,
                                      lr=1e-2)  # fmt: skip
        inner = opt.optim
    for step in range(STEPS):
        x, y = _data(step)
        if step == 5:
            y = y * 10
        if rank is not None:
            x, y = x[rank * 4 : rank * 4 + 4], y[rank * 4 : rank * 4 + 4]

        def closure(x=x, y=y, step=step):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(module(x), y)
            if step == 2:  # d sqrt(0 · |w|) / dw = NaN; the loss stays finite
                loss = loss + torch.sqrt(model[2].weight.abs() * 0).sum()
            loss.backward()
            return loss

        opt.step(closure)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    return {"params": [p.detach().clone() for p in model.parameters()],
            "summary": inner.spike_summary(),
            "held": [[index[id(p)] for p in g["params"]] for g in inner.param_groups]}  # fmt: skip


def _guarded_ranks(rank: int) -> dict:
    return {group: _guarded_run(rank, group) for group in ("world", "object")}


def test_zero_spike_guard_with_a_rank_holding_none_of_the_guarded_group():
    """``shard_group="world"`` (README's recipe) made the guard's loss average fail (the name was
    handed to torch.distributed as a group); with a group object the rank holding none of the
    guarded group skipped the loss's all-reduce (gloo aborted); and a NaN gradient in one rank's
    share left the other rank's guard counting the step. Now both equal one process."""
    per_rank = run_ranks(_guarded_ranks, timeout_s=120)
    ref = _guarded_run(None, "")
    assert ref["summary"][0]["spikes"] >= 1 and ref["summary"][0]["losses"] == STEPS - 1
    for group in ("world", "object"):
        assert per_rank[1][group]["held"][0] == []  # the case the test is about
        assert per_rank[0][group]["summary"] == [
            pytest.approx(r, rel=1e-12) for r in ref["summary"]
        ]
        for rank in range(2):
            for a, b in zip(per_rank[rank][group]["params"], ref["params"]):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=group)


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
