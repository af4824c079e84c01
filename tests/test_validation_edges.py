"""``observe_validation`` at its edges: before the first step, a loss that reaches no parameter,
option values of the wrong kind (found by a review of the validation option)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from _validation_setup import VAL, _loss, _model, _train_step

import metalr
from metalr.optim._base import FOLLOWS_VALIDATION, RATE_KEY


@pytest.mark.parametrize("rule", ["seek", "normalized"])
def test_an_observation_before_the_first_step_changes_nothing(rule) -> None:
    """No parameter has a last direction yet: no state is created and the groups do not switch
    to the validation signal (with train_weight 0 that switch froze the rates for good)."""
    runs = []
    for observe_first in (False, True):
        model = _model()
        opt = metalr.AdamHD(model.parameters(), lr=0.05, rule=rule,
                            validation={"train_weight": 0.0})  # fmt: skip
        if observe_first:
            opt.observe_validation(_loss(model, VAL))
            assert not opt.state, "state created by an observation before any step"
        for _ in range(5):
            _train_step(model, opt)
        runs.append([opt.state[p][RATE_KEY].clone() for p in model.parameters()])
        assert not any(opt.state[p][FOLLOWS_VALIDATION] for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert all(bool((r != 1).all()) for r in runs[0])  # the training signal moved them


def test_only_groups_already_stepped_are_observed() -> None:
    """A group none of whose parameters has stepped is not observed (its neighbour is)."""
    model = _model()
    first, second = model[0], model[2]
    opt = metalr.AdamHD([{"params": first.parameters()}, {"params": second.parameters()}], lr=0.05)
    for p in second.parameters():
        p.requires_grad_(False)
    _train_step(model, opt)
    for p in second.parameters():
        p.requires_grad_(True)
    opt.observe_validation(_loss(model, VAL))
    assert all(p not in opt.state for p in second.parameters())
    assert all(opt.state[p][FOLLOWS_VALIDATION] for p in first.parameters())


def test_a_loss_that_reaches_none_of_the_parameters_is_refused() -> None:
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=0.05)
    _train_step(model, opt)
    before = copy.deepcopy(opt.state_dict())
    other = copy.deepcopy(model)
    with pytest.raises(ValueError, match="depends on none of the parameters this optimizer trains"):
        opt.observe_validation(_loss(other, VAL))
    after = opt.state_dict()
    for key, state in before["state"].items():
        for name, value in state.items():
            same = torch.equal(value, after["state"][key][name]) if torch.is_tensor(value) else (
                value == after["state"][key][name])  # fmt: skip
            assert same, name


@pytest.mark.parametrize(
    ("argument", "options", "message"),
    [
        ("validation", {"hold": "x"}, "Invalid validation['hold'] value: 'x'; expected a number in [0.0, "),
        ("validation", {"hold": None}, "Invalid validation['hold'] value: None"),
        ("validation", {"hold": True}, "Invalid validation['hold'] value: True"),
        ("validation", {"hold": torch.ones(2)}, "Invalid validation['hold'] value: tensor"),
        ("validation", {"loss_decay": 1.0}, "Invalid validation['loss_decay'] value: 1.0; expected a number in [0.0, 1.0)"),
        ("seek", {"far_decay": 1.0}, "Invalid seek['far_decay'] value: 1.0; expected a number in [0.0, 1.0)"),
        ("seek", {"vanish_decay": 1.0}, "Invalid seek['vanish_decay'] value: 1.0; expected a number in [0.0, 1.0)"),
        ("spike_guard", {"cut": "half"}, "Invalid spike_guard['cut'] value: 'half'; expected a number in (0.0, 1.0]"),
    ],
)  # fmt: skip
def test_option_values_of_the_wrong_kind_name_the_key(argument, options, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        metalr.AdamHD(_model().parameters(), **{argument: options})


def test_option_values_may_be_any_one_real_number() -> None:
    """NumPy numbers and 0-d arrays, one-element tensors, Decimals, and the strings YAML 1.1
    makes of 1e-2 (as they were before values were checked for kind)."""
    import decimal

    import numpy as np

    values = {"hold": np.float32(20), "loss_decay": torch.tensor(0.25),
              "train_weight": np.array(0.5), "hypergrad_lr": "1e-2",
              "climb": decimal.Decimal("0.5")}  # fmt: skip
    opt = metalr.AdamHD(_model().parameters(), validation=values)
    got = {k: opt.param_groups[0]["validation"][k] for k in values}
    assert got == {"hold": 20.0, "loss_decay": 0.25, "train_weight": 0.5, "hypergrad_lr": 0.01,
                   "climb": 0.5}  # fmt: skip


def test_a_prior_loaded_before_the_first_step_is_not_observed_yet() -> None:
    """A prior writes rates but no last direction: an observation then observes nothing."""
    from metalr.meta import LRPrior, load_prior

    model = _model()
    prior = LRPrior({n: torch.tensor(0.01, dtype=torch.float64)
                     for n, _ in model.named_parameters()}, "tensor", "sgd")  # fmt: skip
    opt = metalr.SGDHD(model.parameters(), lr=0.05)
    load_prior(opt, model, prior)
    opt.observe_validation(_loss(model, VAL))
    assert not any(opt.state[p].get(FOLLOWS_VALIDATION, False) for p in model.parameters())
    _train_step(model, opt)
    opt.observe_validation(_loss(model, VAL))
    assert all(opt.state[p][FOLLOWS_VALIDATION] for p in model.parameters())
