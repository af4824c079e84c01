"""Regressions found by running metalr through torch's own optimizer checks (issue 9).

Each test pins one behaviour torch.optim has and metalr lacked: fused float64 rates, one-element
tensor learning rates, old checkpoints with a Python-number ``step``, HyperLR's loaded param
groups, ``fused=True`` on the meta device, global step hooks around HyperLR, and checkpoints of
``torch.optim.Adam``/``AdamW``/``SGD`` loaded into their metalr counterparts.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import metalr
from metalr.functional._controller import SEEK_DEFAULTS
from metalr.optim._base import CONTROLLER_KEY, RATE_KEY


def _params(dtype: torch.dtype = torch.float64) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=dtype)),
        torch.nn.Parameter(torch.randn(3, generator=gen, dtype=dtype)),
    ]


def _train(params: list[Tensor], optimizer: torch.optim.Optimizer, steps: int, start: int = 0):
    """Deterministic gradients that depend on the weights (so every path sees the same ones)."""
    for i in range(start, start + steps):
        for p in params:
            p.grad = torch.sin(p.detach() * (i + 1)) + 0.1 * (p.detach() - 1)
        optimizer.step()


# -- 2. fused=True with float64 parameters adapts at group/tensor granularity ---------------------


@pytest.mark.compile
@pytest.mark.parametrize(
    ("granularity", "rule"), [("group", "normalized"), ("tensor", "normalized"), ("tensor", "seek")]
)
@pytest.mark.parametrize("name", ["SGDHD", "AdamHD"])
def test_fused_float64_rates_adapt_like_eager(name: str, granularity: str, rule: str) -> None:
    """torch 2.13's compile dropped in-place writes to 0-d float64 CPU inputs: rates stayed put."""
    cls = getattr(metalr, name)
    torch._dynamo.reset()
    results = {}
    for fused in (True, False):
        p = torch.nn.Parameter(torch.randn(8, dtype=torch.float64, generator=_gen()))
        opt = cls([p], lr=0.01, granularity=granularity, fused=fused, foreach=None, rule=rule)
        for _ in range(3):
            p.grad = p.detach() - 1
            opt.step()
        results[fused] = (p.detach().clone(), opt.state[p][RATE_KEY].clone(), opt.state[p])
    (p_fused, m_fused, st_fused), (p_eager, m_eager, st_eager) = results[True], results[False]
    assert m_fused.dtype == torch.float64 and m_fused.dim() == 0
    torch.testing.assert_close(m_fused, m_eager, rtol=1e-12, atol=0)
    torch.testing.assert_close(p_fused, p_eager, rtol=1e-12, atol=1e-14)
    if rule == "seek":  # the ramp moved the rate off its start, and the controller matches eager
        assert m_fused.item() > 1.3 * SEEK_DEFAULTS["init_scale"], "the multiplier never adapted"
        torch.testing.assert_close(
            st_fused["hd_controller"], st_eager["hd_controller"], rtol=1e-12, atol=0
        )
        return
    assert m_fused.item() > 1.03, "the multiplier never adapted"
    if name == "SGDHD":  # two cosine-1 updates of log m by β = 0.02
        assert m_fused.item() == pytest.approx(1.0408, abs=1e-4)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# -- 3. a one-element tensor lr of shape [1] or [1, 1] ---------------------------------------------

LR_MAKERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGDHD": lambda p, lr, fe: metalr.SGDHD(p, lr=lr, foreach=fe),
    "SGDHD-momentum": lambda p, lr, fe: metalr.SGDHD(p, lr=lr, momentum=0.9, foreach=fe),
    "SGDHD-nesterov": lambda p, lr, fe: metalr.SGDHD(
        p, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.1, foreach=fe
    ),
    "AdamHD": lambda p, lr, fe: metalr.AdamHD(p, lr=lr, weight_decay=0.1, foreach=fe),
    "AdamHD-element": lambda p, lr, fe: metalr.AdamHD(
        p, lr=lr, granularity="element", lr_bounds=(1e-4, 0.05), foreach=fe
    ),
    "AdamWHD": lambda p, lr, fe: metalr.AdamWHD(p, lr=lr, weight_decay=0.1, foreach=fe),
    "HyperLR(SGD)": lambda p, lr, fe: metalr.HyperLR(
        torch.optim.SGD(p, lr=lr, momentum=0.9, foreach=fe)
    ),
    "HyperLR(Adam)": lambda p, lr, fe: metalr.HyperLR(
        torch.optim.Adam(p, lr=lr, foreach=False), lr_bounds=(1e-4, 0.05)
    ),
}


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("shape", [(1,), (1, 1)], ids=["shape1", "shape1x1"])
@pytest.mark.parametrize("name", list(LR_MAKERS))
def test_one_element_tensor_lr_equals_a_0d_lr(name: str, shape: tuple[int, ...], foreach: bool):
    make = LR_MAKERS[name]
    ref_params, params = _params(), _params()
    ref = make(ref_params, torch.tensor(0.01, dtype=torch.float64), foreach)
    opt = make(params, torch.full(shape, 0.01, dtype=torch.float64), foreach)
    _train(ref_params, ref, 4)
    _train(params, opt, 4)
    for p, q in zip(params, ref_params, strict=True):
        assert p.shape == q.shape
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-15)
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(opt.state[p][RATE_KEY], ref.state[q][RATE_KEY])
    for eff, ref_eff in zip(opt.effective_lrs().values(), ref.effective_lrs().values()):
        assert eff.shape == ref_eff.shape
    assert opt.lr_summary() == [pytest.approx(s) for s in ref.lr_summary()]


# -- 4. a Python-number step (older torch checkpoints) ---------------------------------------------


@pytest.mark.parametrize("name", ["AdamHD", "AdamWHD"])
def test_python_number_step_in_a_checkpoint_is_converted(name: str) -> None:
    cls = getattr(metalr, name)
    params, ref_params = _params(), _params()
    opt = cls(params, lr=0.01)
    _train(params, opt, 3)
    saved = copy.deepcopy(opt.state_dict())
    ref = cls(ref_params, lr=0.01)
    ref.load_state_dict(copy.deepcopy(saved))
    with torch.no_grad():
        for p, q in zip(ref_params, params, strict=True):
            p.copy_(q)
    for state in saved["state"].values():
        state["step"] = int(state["step"].item())  # as torch < 1.12 saved it
    new_params = [p.detach().clone().requires_grad_() for p in params]
    new = cls(new_params, lr=0.01)
    new.load_state_dict(saved)
    for p in new_params:
        step = new.state[p]["step"]
        assert isinstance(step, Tensor) and step.dtype == torch.float32 and step.item() == 3
    _train(new_params, new, 2, start=3)
    _train(ref_params, ref, 2, start=3)
    for p, q in zip(new_params, ref_params, strict=True):
        assert torch.equal(p, q)


# -- 5. HyperLR.load_state_dict keeps the top-level param groups ----------------------------------


def _hyper_sgd(params: list[Tensor]) -> metalr.HyperLR:
    return metalr.HyperLR(torch.optim.SGD(params, lr=0.1, momentum=0.9))


def test_hyperlr_load_keeps_an_edited_lr() -> None:
    params = _params()
    opt = _hyper_sgd(params)
    _train(params, opt, 2)
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = 0.05
    saved["param_groups"][0]["hypergrad_lr"] = 0.0
    new = _hyper_sgd(_params())
    new.load_state_dict(saved)
    assert new.param_groups[0]["lr"] == 0.05
    assert new.optimizer.param_groups[0]["lr"] == 0.05
    assert new.param_groups[0]["hypergrad_lr"] == 0.0
    assert new.param_groups is new.optimizer.param_groups


def test_hyperlr_load_keeps_a_pre_hook_change() -> None:
    params = _params()
    opt = _hyper_sgd(params)
    _train(params, opt, 2)

    def halve_lr(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = copy.deepcopy(state_dict)
        for group in state_dict["param_groups"]:
            group["lr"] = group["lr"] / 2
        return state_dict

    new = _hyper_sgd(_params())
    new.register_load_state_dict_pre_hook(halve_lr)
    new.load_state_dict(opt.state_dict())
    assert new.param_groups[0]["lr"] == 0.05
    assert new.optimizer.param_groups[0]["lr"] == 0.05


# -- fused=True on the meta device ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["SGDHD", "AdamHD"])
def test_fused_on_meta_device_raises_like_torch(name: str) -> None:
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    p.grad = torch.empty(3, device="meta")
    opt = getattr(metalr, name)([p], fused=True)
    with pytest.raises(RuntimeError, match=r"fused=True.*supported devices.*meta"):
        opt.step()


# -- HyperLR runs the global step hooks once per step ----------------------------------------------


def test_hyperlr_runs_global_step_hooks_once_per_step() -> None:
    """Global hooks see the HyperLR once per step; hooks on the wrapped optimizer still run."""
    seen: list[tuple[str, object]] = []
    inner_calls: list[str] = []
    params = _params()
    inner = torch.optim.SGD(params, lr=0.1)
    opt = metalr.HyperLR(inner)
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("pre", o))),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append(("post", o))),
        inner.register_step_pre_hook(lambda o, a, k: inner_calls.append("pre")),
        inner.register_step_post_hook(lambda o, a, k: inner_calls.append("post")),
    ]
    try:
        _train(params, opt, 3)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [("pre", opt), ("post", opt)] * 3
    assert inner_calls == ["pre", "post"] * 3


def test_hyperlr_global_hooks_once_even_without_gradients() -> None:
    calls: list[object] = []
    params = _params()
    opt = metalr.HyperLR(torch.optim.SGD(params, lr=0.1))
    handle = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(o))
    try:
        opt.step()  # no gradients yet: HyperLR only forwards to the wrapped optimizer
    finally:
        handle.remove()
    assert calls == [opt]


# -- loading torch.optim checkpoints ----------------------------------------------------------------

MIGRATIONS = {
    "Adam": (torch.optim.Adam, metalr.AdamHD, {"weight_decay": 0.01}),
    "AdamW": (torch.optim.AdamW, metalr.AdamWHD, {"weight_decay": 0.1}),
    "SGD-momentum": (torch.optim.SGD, metalr.SGDHD, {"momentum": 0.9}),
    "SGD-nesterov": (torch.optim.SGD, metalr.SGDHD, {"momentum": 0.9, "nesterov": True}),
    "SGD": (torch.optim.SGD, metalr.SGDHD, {}),
}


@pytest.mark.parametrize("name", list(MIGRATIONS))
def test_torch_checkpoint_loads_and_continues_exactly(name: str) -> None:
    torch_cls, cls, kwargs = MIGRATIONS[name]
    params = _params()
    reference = torch_cls(params, lr=0.01, **kwargs)
    _train(params, reference, 5)
    saved = copy.deepcopy(reference.state_dict())
    migrated_params = [p.detach().clone().requires_grad_() for p in params]
    migrated = cls(migrated_params, lr=0.5, hypergrad_lr=0.0, granularity="group")
    migrated.load_state_dict(saved)
    group = migrated.param_groups[0]
    assert group["lr"] == 0.01  # the checkpoint's hyperparameters ...
    assert group["hypergrad_lr"] == 0.0 and group["granularity"] == "group"  # ... and ours
    _train(params, reference, 5, start=5)
    _train(migrated_params, migrated, 5, start=5)
    for p, q in zip(migrated_params, params, strict=True):
        assert torch.equal(p, q)
        assert torch.all(migrated.state[p][RATE_KEY] == 1)


def test_torch_checkpoint_continues_with_adaptation() -> None:
    """With hypergrad_lr > 0 the migrated moments feed the first hypergradient."""
    params = _params()
    reference = torch.optim.Adam(params, lr=0.01)
    _train(params, reference, 5)
    migrated = metalr.AdamHD(params, lr=0.01)
    migrated.load_state_dict(reference.state_dict())
    _train(params, migrated, 1, start=5)
    assert all(migrated.state[p][RATE_KEY].item() != 1.0 for p in params)


@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
@pytest.mark.parametrize(
    ("torch_cls", "build"),
    [
        (torch.optim.Adam, lambda ps, g: metalr.AdamHD(ps, lr=0.01, granularity=g)),
        (torch.optim.Adam, lambda ps, g: metalr.HyperLR(torch.optim.Adam(ps, lr=0.01), granularity=g)),
        (torch.optim.SGD, lambda ps, g: metalr.SGDHD(ps, lr=0.01, granularity=g)),
        (torch.optim.SGD, lambda ps, g: metalr.HyperLR(torch.optim.SGD(ps, lr=0.01), granularity=g)),
    ],
    ids=["AdamHD", "HyperLR-Adam", "SGDHD-no-momentum", "HyperLR-SGD-no-momentum"],
)  # fmt: skip
def test_a_torch_checkpoint_continues_at_its_rate_under_the_seek_rule(
    torch_cls, build, granularity
) -> None:
    """Moments trained at lr continue at lr (multiplier 1, a settled controller tracking from
    there), not from the ramp's start (0.0045 x lr: a silent 220x cut before); so does SGD
    without momentum, whose checkpoint holds no per-parameter state."""
    params = _params()
    reference = torch_cls(params, lr=0.01)
    _train(params, reference, 5)
    migrated_params = [p.detach().clone().requires_grad_() for p in params]
    migrated = build(migrated_params, granularity)
    migrated.load_state_dict(copy.deepcopy(reference.state_dict()))
    for p in migrated_params:
        assert torch.all(migrated.state[p][RATE_KEY] == 1)
        assert migrated.state[p][CONTROLLER_KEY][0] == 0  # not ramping
    _train(migrated_params, migrated, 1, start=5)
    beta = migrated.param_groups[0]["hypergrad_lr"]
    for p in migrated_params:  # one tracking step at most
        assert torch.all(migrated.state[p][RATE_KEY].log().abs() <= 2 * beta)


@pytest.mark.parametrize(
    ("saved", "loading", "message"),
    [
        (torch.optim.Adam, metalr.SGDHD, "has no 'momentum', 'dampening': it is not a checkpoint of SGDHD or of torch.optim.SGD"),
        (torch.optim.SGD, metalr.AdamHD, "has no 'betas': it is not a checkpoint of AdamHD or of torch.optim.Adam"),
        (torch.optim.SGD, metalr.AdamWHD, "has no 'betas': it is not a checkpoint of AdamWHD or of torch.optim.AdamW"),
        (metalr.SGDHD, metalr.AdamHD, "has no 'betas'"),
        (metalr.AdamHD, metalr.SGDHD, "has no 'momentum', 'dampening'"),
    ],
    ids=["Adam-SGDHD", "SGD-AdamHD", "SGD-AdamWHD", "SGDHD-AdamHD", "AdamHD-SGDHD"],
)  # fmt: skip
def test_a_checkpoint_of_another_optimizer_family_is_refused(saved, loading, message) -> None:
    params = _params()
    reference = saved(params, lr=0.01)
    _train(params, reference, 2)
    with pytest.raises(ValueError, match=re.escape(f"param group 0 of this checkpoint {message}")):
        loading(params).load_state_dict(reference.state_dict())


@pytest.mark.parametrize(
    ("torch_cls", "cls", "dropped"),
    [(torch.optim.SGD, metalr.SGDHD, "nesterov"), (torch.optim.Adam, metalr.AdamHD, "eps")],
)
def test_a_checkpoint_without_a_key_torch_defaults_still_loads(torch_cls, cls, dropped) -> None:
    """Older checkpoints may lack keys the family check does not need (torch fills them)."""
    params = _params()
    reference = torch_cls(params, lr=0.01)
    _train(params, reference, 2)
    saved = reference.state_dict()
    for group in saved["param_groups"]:
        del group[dropped]
    migrated = cls(params, lr=0.01)
    migrated.load_state_dict(saved)
    assert dropped in migrated.param_groups[0]


def test_torch_amsgrad_checkpoint_is_refused() -> None:
    params = _params()
    reference = torch.optim.Adam(params, lr=0.01, amsgrad=True)
    _train(params, reference, 1)
    with pytest.raises(ValueError, match="amsgrad"):
        metalr.AdamHD(params).load_state_dict(reference.state_dict())


def test_hyperlr_loads_a_checkpoint_of_the_wrapped_optimizer() -> None:
    params = _params()
    reference = torch.optim.Adam(params, lr=0.01)
    _train(params, reference, 5)
    migrated_params = [p.detach().clone().requires_grad_() for p in params]
    migrated = metalr.HyperLR(torch.optim.Adam(migrated_params, lr=0.5), hypergrad_lr=0.0)
    migrated.load_state_dict(copy.deepcopy(reference.state_dict()))
    assert migrated.param_groups[0]["lr"] == 0.01
    _train(params, reference, 3, start=5)
    _train(migrated_params, migrated, 3, start=5)
    for p, q in zip(migrated_params, params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
