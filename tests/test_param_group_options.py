"""Per-param-group hypergradient options (``rule``, ``granularity``, ``hypergrad_lr``,
``lr_bounds``, ``seek``, ``validation``, ``spike_guard``): validated and completed like the
constructor's, whether the group comes through the constructor or ``add_param_group``.

Before this, a group's options bypassed every check: a partial ``seek`` or ``validation`` dict
crashed at the first step or observation with a ``KeyError``, and a negative ``hypergrad_lr`` or
an unknown granularity was stored and run."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

import metalr
from metalr.functional._hypergrad import DEFAULT_NORMALIZED_HYPERGRAD_LR
from metalr.functional._seek_constants import SEEK_DEFAULTS, SGD_SEEK_DEFAULTS
from metalr.functional.validation import VALIDATION_DEFAULTS
from metalr.optim.adam_hd import ADDITIVE_DEFAULT_HYPERGRAD_LR as ADAM_ADDITIVE

LR = 1e-2
Factory = Callable[..., torch.optim.Optimizer]
FACTORIES: dict[str, Factory] = {
    "adamhd": lambda groups, **kw: metalr.AdamHD(groups, lr=LR, **kw),
    "sgdhd": lambda groups, **kw: metalr.SGDHD(groups, lr=LR, momentum=0.9, **kw),
    "hyperlr": lambda groups, **kw: metalr.HyperLR(torch.optim.Adam(groups, lr=LR), **kw),
}


def _problem(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return (
        torch.nn.Linear(4, 3).double(),
        torch.nn.Linear(3, 1).double(),
        torch.randn(16, 4).double(),
    )


def _train(opt: torch.optim.Optimizer, body, head, x, steps: int = 12, observe: bool = True):
    for step in range(1, steps + 1):
        opt.zero_grad()
        head(body(x)).pow(2).mean().backward()
        opt.step()
        if observe and step % 4 == 0:
            opt.observe_validation(head(body(x[:8])).pow(2).mean())
    return [p.detach().clone() for p in [*body.parameters(), *head.parameters()]]


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize(
    "options",
    [{"granularity": "element"}, {"seek": {"turn_cut": 0.3, "headroom": 2.0}},
     {"validation": {"hold": 0, "climb": 1.0}}, {"rule": "normalized"},
     {"rule": "normalized", "hypergrad_lr": 0.05, "validation": {"climb": 0.5}},
     {"lr_bounds": (0.0, 5e-3)}, {"spike_guard": True}],
    ids=["granularity", "seek", "validation", "rule", "rule+beta+validation", "lr_bounds",
         "spike_guard"],
)  # fmt: skip
def test_a_group_with_its_own_options_runs_as_an_optimizer_built_with_them(name, options):
    """Two groups, the second with its own options, step for step equal (float64, bit-exact)
    to two optimizers, one per group, the second constructed with those options."""
    make = FACTORIES[name]
    body, head, x = _problem()
    together = make([{"params": body.parameters()}, {"params": head.parameters(), **options}])
    got = _train(together, body, head, x)

    body2, head2, x2 = _problem()
    first = make([{"params": body2.parameters()}])
    second = make([{"params": head2.parameters()}], **options)
    for step in range(1, 13):
        first.zero_grad(), second.zero_grad()
        head2(body2(x2)).pow(2).mean().backward()
        first.step(), second.step()
        if step % 4 == 0:
            # the same validation loss, each optimizer taking its gradient for its own params
            first.observe_validation(head2(body2(x2[:8])).pow(2).mean())
            second.observe_validation(head2(body2(x2[:8])).pow(2).mean())
    want = [p.detach().clone() for p in [*body2.parameters(), *head2.parameters()]]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_partial_seek_and_validation_dicts_are_completed(name):
    body, head, x = _problem()
    opt = FACTORIES[name]([{"params": body.parameters()},
                           {"params": head.parameters(), "seek": {"turn_cut": 0.3},
                            "validation": {"hold": 0}}])  # fmt: skip
    group = opt.param_groups[1]
    family = SGD_SEEK_DEFAULTS if name == "sgdhd" else SEEK_DEFAULTS
    if name == "hyperlr":  # no Adam moments to restart: the restart resolves to off
        family = {**family, "moment_restart": 0.0, "restart_match": 0.0}
    assert group["seek"] == {**family, "turn_cut": 0.3}
    assert group["validation"] == {**VALIDATION_DEFAULTS, "hold": 0.0}
    assert opt.param_groups[0]["seek"] == family  # the other group keeps the optimizer's
    _train(opt, body, head, x)  # steps and observes (a KeyError before)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_group_changing_the_rule_starts_from_that_rules_defaults(name):
    body, head, _ = _problem()
    opt = FACTORIES[name]([{"params": body.parameters()},
                           {"params": head.parameters(), "rule": "normalized"}],
                          hypergrad_lr=0.07)  # fmt: skip
    assert opt.param_groups[0]["hypergrad_lr"] == 0.07  # the optimizer's, for its rule
    assert opt.param_groups[1]["hypergrad_lr"] == DEFAULT_NORMALIZED_HYPERGRAD_LR
    assert opt.param_groups[1]["validation"]["climb"] == 1.0  # the plain rules' default
    assert opt.param_groups[0]["validation"]["climb"] == VALIDATION_DEFAULTS["climb"]


def test_additive_group_takes_the_optimizers_additive_default():
    body, head, _ = _problem()
    opt = metalr.AdamHD([{"params": body.parameters()},
                         {"params": head.parameters(), "rule": "additive"}], lr=LR)  # fmt: skip
    assert opt.param_groups[1]["hypergrad_lr"] == ADAM_ADDITIVE
    wrapped = metalr.HyperLR(torch.optim.SGD(body.parameters(), lr=LR))
    with pytest.raises(ValueError, match="hypergrad_lr"):  # HyperLR's additive needs a β
        wrapped.add_param_group({"params": head.parameters(), "rule": "additive"})


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize(
    ("options", "key"),
    [({"hypergrad_lr": -1.0}, "hypergrad_lr"), ({"granularity": "layer"}, "granularity"),
     ({"rule": "sign"}, "rule"), ({"lr_bounds": (1.0, 0.5)}, "lr_bounds"),
     ({"seek": {"turn_cut": 5.0}}, "turn_cut"), ({"seek": {"bogus": 1.0}}, "bogus"),
     ({"validation": {"hold": -1.0}}, "hold"), ({"rule": "normalized", "seek": {}}, "seek"),
     ({"rule": "normalized", "validation": {"hold": 3.0}}, "hold"),
     ({"spike_guard": {"sigmas": -1.0}}, "sigmas"), ({"lagged": "no"}, "lagged"),
     ({"seek": "fast"}, "seek"), ({"validation": [("hold", 0)]}, "validation")],
)  # fmt: skip
def test_bad_group_options_are_refused_naming_the_key(name, options, key):
    body, head, _ = _problem()
    with pytest.raises(ValueError, match=key):
        FACTORIES[name]([{"params": body.parameters()}, {"params": head.parameters(), **options}])
    opt = FACTORIES[name]([{"params": body.parameters()}])
    with pytest.raises(ValueError, match=key):  # the same through add_param_group
        opt.add_param_group({"params": head.parameters(), **options})
    assert len(opt.param_groups) == 1, "a refused group is not added"


@pytest.mark.parametrize("name", list(FACTORIES))
def test_group_options_survive_a_checkpoint(name):
    body, head, x = _problem()
    groups = lambda b, h: [{"params": b.parameters()},
                           {"params": h.parameters(), "granularity": "element",
                            "seek": {"turn_cut": 0.3}}]  # fmt: skip
    opt = FACTORIES[name](groups(body, head))
    _train(opt, body, head, x, steps=6)
    saved = copy.deepcopy(opt.state_dict())  # load_state_dict may share tensors
    body2, head2, _ = _problem()
    body2.load_state_dict(body.state_dict()), head2.load_state_dict(head.state_dict())
    again = FACTORIES[name](groups(body2, head2))
    again.load_state_dict(saved)
    assert again.param_groups[1]["seek"]["turn_cut"] == 0.3
    a = _train(opt, body, head, x, steps=6)
    b = _train(again, body2, head2, x, steps=6)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_hyperlr_takes_a_group_added_to_the_wrapped_optimizer():
    """HyperLR shares the wrapped optimizer's groups: one added there directly gets HyperLR's
    options (its own checked) at the next step, as if added through HyperLR."""
    body, head, x = _problem()
    base = torch.optim.Adam(body.parameters(), lr=LR)
    wrapped = metalr.HyperLR(base)
    base.add_param_group({"params": head.parameters(), "granularity": "element"})
    body2, head2, _ = _problem()
    through = metalr.HyperLR(torch.optim.Adam(body2.parameters(), lr=LR))
    through.add_param_group({"params": head2.parameters(), "granularity": "element"})
    a = _train(wrapped, body, head, x)
    b = _train(through, body2, head2, x)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert wrapped.param_groups[1]["granularity"] == "element"
    base.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "rule": "sign"})
    with pytest.raises(ValueError, match="rule"):
        wrapped.lr_summary()
