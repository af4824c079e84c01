"""ZeroRedundancyOptimizer (2 gloo processes on CPU) where a rank holds none of a group's
parameters, or none at all: that rank must still join every collective of the step, of a
validation observation (with its gradient or its loss alone) and of the spike guard, in the
same order as the ranks that hold parameters, and training equals one process.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _distributed import run_ranks
from _zero_setup import STEPS, _data, _model, _val_batch

import metalr

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
    # the ray ceiling: the rank holding none of group 0 joins its cosine's all-reduce
    "ray-seek-tensor": ("one-weight", {"validation": {"ray_steps": 100, "ray_before": 1.0,
                                                      "ray_tau": -1.0, "ray_persist": 2}}),
    "ray-frozen-seek": ("frozen", {"validation": {"ray_steps": 100, "ray_before": 1.0,
                                                  "ray_tau": 0.0, "ray_persist": 1}}),
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


#: The ray ceiling with tensors that step at different counts: ``w`` trains at every step,
#: ``g1`` and ``g2`` only at even ones (their counts half of ``w``'s). A window that ends at step
#: 10, six looks in a row to act (τ −1: every look reads above it): by ``w``'s count the window
#: has closed before the sixth look; by ``g``'s it has not.
RAY_UNEVEN = {"ray_steps": 40, "ray_before": 0.25, "ray_tau": -1.0, "ray_persist": 6,
              "hypergrad_lr": 0.0, "hold": 0}  # fmt: skip


class _UnevenNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(6, 2, dtype=torch.float64) * 0.3)
        self.g1 = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.g2 = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def forward(self, x: torch.Tensor, with_g: bool) -> torch.Tensor:
        return x @ self.w + ((self.g1 * self.g2 + self.g1) if with_g else 0.0)


def _uneven_run(rank: int | None) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = _UnevenNet()
    kwargs = {"lr": 1e-2, "granularity": "tensor", "validation": RAY_UNEVEN}
    if rank is None:
        opt = inner = metalr.AdamHD(model.parameters(), **kwargs)
    else:
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=metalr.AdamHD,
                                      shard_group="world", **kwargs)  # fmt: skip
        inner = opt.optim
    for t in range(1, 15):
        x, y = _data(t)
        opt.zero_grad(set_to_none=True)
        ((model(x, t % 2 == 0) - y) ** 2).mean().backward()
        opt.step()
        if t % 2 == 0:
            xv, yv = _val_batch(t)
            inner.observe_validation(((model(xv, True) - yv) ** 2).mean(), process_group=None)
    return {name: (inner.state[p]["hd_ray"].clone(), inner.state[p]["lr_multiplier"].clone())
            for name, p in model.named_parameters() if p in inner.state}  # fmt: skip


def test_zero_ray_ranks_decide_on_the_groups_step_not_their_own():
    """Each rank's tensors of a group may have stepped a different number of times: the ray's
    step t is the largest count over the ranks, so a rank holding only the rarely stepped
    tensors does not act where one process does not."""
    reference = _uneven_run(None)
    assert all(float(state[1]) == 0.0 for state, _ in reference.values())  # one process: never
    per_rank = run_ranks(_uneven_run)
    assert sorted(n for out in per_rank for n in out) == ["g1", "g2", "w"]
    for out in per_rank:
        for name, (state, rate) in out.items():
            torch.testing.assert_close(state, reference[name][0], rtol=0, atol=0, msg=name)
            torch.testing.assert_close(rate, reference[name][1], msg=name)
