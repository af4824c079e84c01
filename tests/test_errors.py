"""Every invalid argument is rejected with a precise, torch-style message."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler

import metalr


def _params() -> list[torch.Tensor]:
    return [torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)]


# Builders taking hypergradient options; HyperLR wraps a plain SGD.
BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGDHD": lambda **kw: metalr.SGDHD(_params(), lr=0.1, **kw),
    "AdamHD": lambda **kw: metalr.AdamHD(_params(), **kw),
    "AdamWHD": lambda **kw: metalr.AdamWHD(_params(), **kw),
    "HyperLR": lambda **kw: metalr.HyperLR(torch.optim.SGD(_params(), lr=0.1), **kw),
}
NATIVE = {"SGDHD": metalr.SGDHD, "AdamHD": metalr.AdamHD, "AdamWHD": metalr.AdamWHD}


def _raises(exc: type[Exception], message: str):
    """``pytest.raises`` matching ``message`` literally from the start of the error text."""
    return pytest.raises(exc, match="^" + re.escape(message))


# ------------------------------------------------------------------------------------------
# options shared by every optimizer
# ------------------------------------------------------------------------------------------

HYPER_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"hypergrad_lr": -1}, "Invalid hypergrad_lr value: -1; expected a finite number >= 0"),
    ({"hypergrad_lr": -1e-9}, "Invalid hypergrad_lr value: -1e-09"),
    ({"hypergrad_lr": math.nan}, "Invalid hypergrad_lr value: nan"),
    ({"hypergrad_lr": math.inf}, "Invalid hypergrad_lr value: inf"),
    ({"hypergrad_lr": "0.1"}, "Invalid hypergrad_lr value: '0.1'; expected a number >= 0"),
    ({"hypergrad_lr": True}, "Invalid hypergrad_lr value: True"),
    (
        {"granularity": "layer"},
        "Invalid granularity: 'layer'; expected one of 'group', 'tensor', 'element'",
    ),
    ({"granularity": "Tensor"}, "Invalid granularity: 'Tensor'"),
    ({"granularity": None}, "Invalid granularity: None"),
    ({"rule": "foo"}, "Invalid rule: 'foo'; expected one of 'seek', 'normalized', 'additive'"),
    ({"rule": "multiplicative"}, "Invalid rule: 'multiplicative'"),
    (
        {"lr_bounds": (1, 0.1)},
        "Invalid lr_bounds: (1, 0.1); expected (min, max) with 0 <= min <= max",
    ),
    ({"lr_bounds": (-1, 1)}, "Invalid lr_bounds: (-1, 1)"),
    ({"lr_bounds": "x"}, "Invalid lr_bounds: 'x'"),
    ({"lr_bounds": (0.1,)}, "Invalid lr_bounds: (0.1,)"),
    ({"lr_bounds": (0, 1, 2)}, "Invalid lr_bounds: (0, 1, 2)"),
    ({"lr_bounds": (None, 1)}, "Invalid lr_bounds: (None, 1)"),
    ({"lr_bounds": (math.nan, 1)}, "Invalid lr_bounds: (nan, 1)"),
    ({"lr_bounds": (0, math.nan)}, "Invalid lr_bounds: (0, nan)"),
    ({"lr_bounds": 0.1}, "Invalid lr_bounds: 0.1"),
    ({"lr_bounds": (math.inf, math.inf)}, "Invalid lr_bounds: (inf, inf)"),  # every rate inf
    ({"lr_bounds": "01"}, "Invalid lr_bounds: '01'"),  # iterates to two numbers, still refused
    ({"lr_bounds": {0: 0, 1: 1}}, "Invalid lr_bounds: {0: 0, 1: 1}"),
    ({"seek": "fast"}, "Invalid seek: 'fast'; expected a dict of constants"),
    ({"seek": [("turn_cut", 0.3)]}, "Invalid seek: [('turn_cut', 0.3)]"),
    ({"validation": "x"}, "Invalid validation: 'x'; expected a dict of constants"),
]


@pytest.mark.parametrize(("kwargs", "message"), HYPER_ERRORS, ids=lambda v: repr(v)[:40])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_invalid_hypergradient_options(name: str, kwargs: dict[str, Any], message: str) -> None:
    with _raises(ValueError, message):
        BUILDERS[name](**kwargs)


VALID_OPTIONS: list[dict[str, Any]] = [
    {"hypergrad_lr": 0},
    {"hypergrad_lr": 0.0, "rule": "additive"},
    {"hypergrad_lr": 1},
    {"lr_bounds": (0, 0)},
    {"lr_bounds": [1e-4, 1.0]},
    {"lr_bounds": (0.0, math.inf)},
    *({"granularity": g} for g in ("group", "tensor", "element")),
    {"rule": "normalized"},
]


@pytest.mark.parametrize("kwargs", VALID_OPTIONS, ids=repr)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_boundary_values_are_accepted(name: str, kwargs: dict[str, Any]) -> None:
    opt = BUILDERS[name](**kwargs)
    group = opt.param_groups[0]
    if "hypergrad_lr" in kwargs:
        assert group["hypergrad_lr"] == kwargs["hypergrad_lr"]
        assert type(group["hypergrad_lr"]) is float
    if "lr_bounds" in kwargs:
        assert group["lr_bounds"] == tuple(float(b) for b in kwargs["lr_bounds"])
    for key in ("granularity", "rule"):
        if key in kwargs:
            assert group[key] == kwargs[key]


@pytest.mark.parametrize(
    ("name", "rule", "expected"),
    [
        ("SGDHD", "normalized", 0.02),
        ("SGDHD", "additive", 1e-3),
        ("AdamHD", "normalized", 0.02),
        ("AdamHD", "additive", 1e-7),
        ("AdamWHD", "additive", 1e-7),
        ("HyperLR", "normalized", 0.02),
    ],
)
def test_hypergrad_lr_default_follows_the_rule(name: str, rule: str, expected: float) -> None:
    assert BUILDERS[name](rule=rule).param_groups[0]["hypergrad_lr"] == expected


# ------------------------------------------------------------------------------------------
# the native optimizers' own arguments (worded exactly like torch.optim's)
# ------------------------------------------------------------------------------------------

NATIVE_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("SGDHD", {"lr": -1}, "Invalid learning rate: -1"),
    ("SGDHD", {"lr": math.nan}, "Invalid learning rate: nan"),
    ("SGDHD", {"lr": -0.5}, "Invalid learning rate: -0.5"),
    ("SGDHD", {"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
    ("SGDHD", {"momentum": -0.1}, "Invalid momentum value: -0.1"),
    ("SGDHD", {"momentum": math.nan}, "Invalid momentum value: nan"),
    ("SGDHD", {"weight_decay": -1}, "Invalid weight_decay value: -1"),
    ("SGDHD", {"nesterov": True}, "Nesterov momentum requires a momentum and zero dampening"),
    (
        "SGDHD",
        {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
        "Nesterov momentum requires a momentum and zero dampening",
    ),
    ("AdamHD", {"lr": -1}, "Invalid learning rate: -1"),
    ("AdamHD", {"lr": math.nan}, "Invalid learning rate: nan"),
    ("AdamHD", {"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0: 1.0"),
    ("AdamHD", {"betas": (-0.1, 0.999)}, "Invalid beta parameter at index 0: -0.1"),
    ("AdamHD", {"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1: 1.0"),
    ("AdamHD", {"betas": (0.9, 1.5)}, "Invalid beta parameter at index 1: 1.5"),
    ("AdamHD", {"eps": -1e-8}, "Invalid epsilon value: -1e-08"),
    ("AdamHD", {"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
    ("AdamWHD", {"lr": -1}, "Invalid learning rate: -1"),
    ("AdamWHD", {"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0: 1.0"),
    ("AdamWHD", {"eps": -1}, "Invalid epsilon value: -1"),
    ("AdamWHD", {"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
    (
        "AdamWHD",
        {"decoupled_weight_decay": False},
        "AdamWHD always uses decoupled weight decay; use AdamHD otherwise",
    ),
]


@pytest.mark.parametrize(("name", "kwargs", "message"), NATIVE_ERRORS, ids=lambda v: repr(v)[:40])
def test_invalid_native_arguments(name: str, kwargs: dict[str, Any], message: str) -> None:
    with _raises(ValueError, message):
        NATIVE[name](_params(), **kwargs)


# The same bad argument gives the same message as the torch optimizer it replaces.
TORCH_TWINS: list[tuple[str, type[torch.optim.Optimizer], dict[str, Any]]] = [
    ("SGDHD", torch.optim.SGD, {"lr": -1}),
    ("SGDHD", torch.optim.SGD, {"lr": 0.1, "momentum": -0.5}),
    ("SGDHD", torch.optim.SGD, {"lr": 0.1, "weight_decay": -1}),
    ("SGDHD", torch.optim.SGD, {"lr": 0.1, "nesterov": True}),
    ("AdamHD", torch.optim.Adam, {"lr": -1}),
    ("AdamHD", torch.optim.Adam, {"betas": (1.0, 0.999)}),
    ("AdamHD", torch.optim.Adam, {"betas": (0.9, 1.0)}),
    ("AdamHD", torch.optim.Adam, {"eps": -1}),
    ("AdamHD", torch.optim.Adam, {"weight_decay": -1}),
    ("AdamWHD", torch.optim.AdamW, {"betas": (0.9, -0.1)}),
]


@pytest.mark.parametrize(("name", "torch_cls", "kwargs"), TORCH_TWINS, ids=lambda v: repr(v)[:40])
def test_messages_match_torch(name: str, torch_cls: type, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as theirs:
        torch_cls(_params(), **kwargs)
    with pytest.raises(ValueError) as ours:
        NATIVE[name](_params(), **kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("name", list(NATIVE))
def test_empty_parameter_list(name: str) -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        NATIVE[name]([])


# ------------------------------------------------------------------------------------------
# HyperLR's wrapped optimizer
# ------------------------------------------------------------------------------------------


class _NoLR(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


@pytest.mark.parametrize(
    ("inner", "message"),
    [
        (object(), "object is not an Optimizer"),
        (_params(), "list is not an Optimizer"),
        (None, "NoneType is not an Optimizer"),
        (torch.nn.Linear(2, 2), "Linear is not an Optimizer"),
    ],
    ids=["object", "list", "None", "Module"],
)
def test_hyperlr_rejects_non_optimizers(inner: Any, message: str) -> None:
    with _raises(TypeError, message):
        metalr.HyperLR(inner)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: metalr.AdamHD(_params()),
            "AdamHD already adapts its rates; wrap a plain optimizer",
        ),
        (lambda: metalr.SGDHD(_params()), "SGDHD already adapts its rates"),
        (lambda: metalr.AdamWHD(_params()), "AdamWHD already adapts its rates"),
        (
            lambda: metalr.HyperLR(torch.optim.SGD(_params(), lr=0.1)),
            "HyperLR already adapts its rates",
        ),
    ],
    ids=["AdamHD", "SGDHD", "AdamWHD", "HyperLR"],
)
def test_hyperlr_rejects_adaptive_optimizers(build: Callable[[], Any], message: str) -> None:
    with _raises(ValueError, message):
        metalr.HyperLR(build())


def test_hyperlr_additive_rule_needs_an_explicit_hypergrad_lr() -> None:
    with _raises(ValueError, "Invalid hypergrad_lr value: None; rule='additive' needs an explicit"):
        metalr.HyperLR(torch.optim.SGD(_params(), lr=0.1), rule="additive")
    opt = metalr.HyperLR(torch.optim.SGD(_params(), lr=0.1), 1e-4, rule="additive")
    assert opt.param_groups[0]["hypergrad_lr"] == 1e-4


def test_hyperlr_refuses_an_optimizer_whose_step_needs_a_closure() -> None:
    with _raises(ValueError, "HyperLR cannot wrap LBFGS: its step() needs a closure"):
        metalr.HyperLR(torch.optim.LBFGS(_params(), lr=1.0))


def test_hyperlr_needs_an_lr_entry() -> None:
    with _raises(ValueError, "HyperLR needs an optimizer whose param groups have an 'lr' entry"):
        metalr.HyperLR(_NoLR(_params()))


# ------------------------------------------------------------------------------------------
# torch's schedulers accept every metalr optimizer
# ------------------------------------------------------------------------------------------

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=2),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda k: 0.9**k),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=4),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(
        o, max_lr=0.1, total_steps=4, cycle_momentum=False
    ),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("name", list(BUILDERS))
def test_torch_schedulers_accept_metalr_optimizers(name: str, scheduler: str) -> None:
    opt = BUILDERS[name]()
    assert isinstance(opt, torch.optim.Optimizer)
    sched = SCHEDULERS[scheduler](opt)
    opt.step()
    if scheduler == "ReduceLROnPlateau":
        sched.step(1.0)
    else:
        sched.step()
    assert sched.optimizer is opt


@pytest.mark.parametrize("name", list(NATIVE))
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"fused": True, "foreach": True}, "Invalid flags: fused=True and foreach=True"),
     ({"fused": True, "differentiable": True}, "Invalid flags: fused=True does not support")],
)  # fmt: skip
def test_fused_with_foreach_or_differentiable_is_refused_as_torch_does(name, kwargs, message):
    with _raises(ValueError, message):
        NATIVE[name](_params(), lr=0.1, **kwargs)


@pytest.mark.parametrize("name", ["AdamHD", "AdamWHD"])
def test_torch_adam_keywords_amsgrad_and_capturable(name):
    """Drop-in: ``amsgrad=False`` / ``capturable=False`` (often passed explicitly) are accepted
    and change nothing; ``True`` is refused with the reason, a non-bool like any flag."""
    plain, explicit = (
        NATIVE[name](_params()),
        NATIVE[name](_params(), amsgrad=False, capturable=False),
    )
    assert plain.param_groups[0].keys() == explicit.param_groups[0].keys()
    with _raises(ValueError, "Invalid amsgrad value: True; metalr's Adam has no AMSGrad"):
        NATIVE[name](_params(), amsgrad=True)
    with _raises(ValueError, "Invalid capturable value: True"):
        NATIVE[name](_params(), capturable=True)
    with _raises(ValueError, "Invalid amsgrad value: 'no'; expected True or False"):
        NATIVE[name](_params(), amsgrad="no")
