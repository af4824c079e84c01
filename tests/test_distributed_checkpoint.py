"""``torch.distributed.checkpoint`` (DCP) resumes metalr's optimizers exactly (one process here;
FSDP2 across two ranks in ``test_fsdp.py``).

DCP keeps only ``state`` and ``param_groups`` and loads a checkpoint *into a template*: the state
dict of a fresh optimizer after one zero step (``get_optimizer_state_dict``). Before 2026-12-05
it lost three things: the validation statistics and the spike guard's (created by later calls,
so missing from the template: the resumed run forgot it followed the validation signal) and
HyperLR's wrapped optimizer (kept under a top-level key DCP drops: the load was refused).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import metalr
from metalr.optim._state_keys import FOLLOWS_VALIDATION, SPIKE_KEY, VALIDATION_KEY

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

MAKERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "AdamHD": lambda ps: metalr.AdamHD(ps, lr=1e-2, spike_guard=True),
    "AdamWHD-element": lambda ps: metalr.AdamWHD(ps, lr=1e-2, granularity="element"),
    "SGDHD": lambda ps: metalr.SGDHD(
        ps, lr=0.05, momentum=0.9, rule="normalized", spike_guard=True
    ),
    "HyperLR-Adam": lambda ps: metalr.HyperLR(torch.optim.Adam(ps, lr=1e-2), spike_guard=True),
    # a wrapped optimizer without state (plain SGD): its entries are empty
    "HyperLR-SGD": lambda ps: metalr.HyperLR(torch.optim.SGD(ps, lr=0.05)),
    "HyperLR-RMSprop": lambda ps: metalr.HyperLR(torch.optim.RMSprop(ps, lr=1e-3)),
}
NATIVE = ["AdamHD", "AdamWHD-element", "SGDHD"]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, observe: bool) -> None:
    """Steps with a closure (the guard sees its loss) and, with ``observe``, a validation batch
    every other step (from the fourth on: the group switches to the validation signal)."""
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        if observe and step >= 3 and step % 2 == 1:
            xv, yv = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
            opt.observe_validation(torch.nn.functional.mse_loss(model(xv), yv))


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    """A state dict's leaves by path, for an exact comparison."""
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}/{key}"))
        return out
    if isinstance(tree, (list, tuple)) and not all(isinstance(v, (int, float)) for v in tree):
        out = {}
        for i, value in enumerate(tree):
            out.update(_flat(value, f"{prefix}/{i}"))
        return out
    return {prefix: tree}


def _assert_same_state(a: dict, b: dict) -> None:
    flat_a, flat_b = _flat(a), _flat(b)
    assert flat_a.keys() == flat_b.keys()
    for key, value in flat_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, flat_b[key]), key
        else:
            assert value == flat_b[key], key


def _resume_through_dcp(name: str, tmp_path, observe: bool, options: StateDictOptions | None):
    """Train 6 steps, save with DCP, train 6 more; then a fresh model and optimizer (another
    initialisation) load the checkpoint DCP's way and train the same 6 steps."""
    model = _model(0)
    opt = MAKERS[name](model.parameters())
    _train(model, opt, range(6), observe)
    saved = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt, options=options),
    }
    dcp.save(saved, checkpoint_id=tmp_path)
    _train(model, opt, range(6, 12), observe)

    fresh_model = _model(1)
    fresh = MAKERS[name](fresh_model.parameters())
    template = {
        "model": get_model_state_dict(fresh_model),
        "optim": get_optimizer_state_dict(fresh_model, fresh, options=options),
    }
    dcp.load(template, checkpoint_id=tmp_path)
    set_model_state_dict(fresh_model, template["model"])
    set_optimizer_state_dict(fresh_model, fresh, template["optim"], options=options)
    _train(fresh_model, fresh, range(6, 12), observe)
    return (model, opt), (fresh_model, fresh)


@pytest.mark.parametrize("observe", [True, False], ids=["validation", "training-only"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_dcp_resumes_exactly(name, observe, tmp_path):
    (model, opt), (fresh_model, fresh) = _resume_through_dcp(name, tmp_path, observe, None)
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)
    _assert_same_state(opt.state_dict(), fresh.state_dict())
    assert [fresh._follows_validation(g) for g in fresh.param_groups] == [observe]
    assert fresh.spike_summary() == opt.spike_summary()
    if name == "AdamHD":
        assert fresh.spike_summary()[0]["losses"] == 12


@pytest.mark.parametrize("name", list(MAKERS))
def test_dcp_flattened_state_dict_resumes_exactly(name, tmp_path):
    """``flatten_optimizer_state_dict=True`` (torchtitan's choice) rebuilds each parameter's
    entry from the keys the live optimizer has: every key exists from the first step, and
    HyperLR's live entries hold the wrapped optimizer's state under ``"wrapped"`` (before
    2026-12-05, evening, they did not: the load lost it and was refused)."""
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    (model, opt), (fresh_model, fresh) = _resume_through_dcp(name, tmp_path, True, options)
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)
    _assert_same_state(opt.state_dict(), fresh.state_dict())


class _CountingAdam(torch.optim.Adam):
    """Adam whose checkpoint holds a top-level entry besides state and param groups (as
    PostLocalSGDOptimizer's step count): HyperLR saves such a wrapped checkpoint whole."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def step(self, closure=None):
        self.calls += 1
        return super().step(closure)

    def state_dict(self):
        return {**super().state_dict(), "calls": self.calls}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.calls = state_dict.pop("calls")
        super().load_state_dict(state_dict)


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
def test_dcp_of_a_wrapped_checkpoint_kept_whole_is_refused(flatten, tmp_path):
    """DCP keeps only per-parameter state: the wrapped optimizer's top-level entry is lost on the
    way, and the load says so (after f7febb5 it went through, the wrapped optimizer restarting
    its count), while torch.save carries it and resumes exactly."""
    MAKERS["HyperLR-counting"] = lambda ps: metalr.HyperLR(_CountingAdam(ps, lr=1e-2))
    try:
        options = StateDictOptions(flatten_optimizer_state_dict=flatten)
        with pytest.raises(ValueError, match="top-level 'wrapped'"):
            _resume_through_dcp("HyperLR-counting", tmp_path, False, options)
        model = _model(0)
        opt = MAKERS["HyperLR-counting"](model.parameters())
        _train(model, opt, range(4), False)
        torch.save(opt.state_dict(), tmp_path / "whole.pt")
        fresh_model = _model(1)
        fresh_model.load_state_dict(model.state_dict())
        fresh = MAKERS["HyperLR-counting"](fresh_model.parameters())
        fresh.load_state_dict(torch.load(tmp_path / "whole.pt", weights_only=False))
        assert fresh.optimizer.calls == 4
        _train(model, opt, range(4, 8), False)
        _train(fresh_model, fresh, range(4, 8), False)
        for p, q in zip(model.parameters(), fresh_model.parameters()):
            assert torch.equal(p, q)
    finally:
        del MAKERS["HyperLR-counting"]


def test_a_per_parameter_checkpoint_loads_whatever_the_live_wrapped_optimizer_saves():
    """Whether the wrapped part went missing is read from the checkpoint (its param groups'
    flag), not from the live wrapped optimizer: one whose state dict now carries a top-level
    entry (a post hook's metadata) still loads a complete per-parameter checkpoint."""
    model = _model(0)
    opt = MAKERS["HyperLR-Adam"](model.parameters())
    _train(model, opt, range(3), False)
    saved = copy.deepcopy(opt.state_dict())
    assert not any(g["hd_wrapped_kept_whole"] for g in saved["param_groups"])
    fresh = MAKERS["HyperLR-Adam"](_model(1).parameters())
    fresh.optimizer.register_state_dict_post_hook(lambda _o, sd: {**sd, "meta": {"by": "v2"}})
    fresh.load_state_dict(saved)
    for p, q in zip(model.parameters(), fresh.param_groups[0]["params"]):
        assert torch.equal(fresh.optimizer.state[q]["exp_avg"], opt.optimizer.state[p]["exp_avg"])
    assert all(g["hd_wrapped_kept_whole"] is False for g in fresh.param_groups)


def test_hyper_lr_live_state_holds_the_wrapped_state():
    """``state[p]["wrapped"]`` is the wrapped optimizer's own dict for ``p``, after a step and
    after a load (which replaces the wrapped optimizer's dicts); a flattened checkpoint loaded
    into a HyperLR that never stepped (no live key to rebuild) is refused, not trained afresh."""
    model = _model(0)
    opt = MAKERS["HyperLR-Adam"](model.parameters())
    _train(model, opt, range(3), False)
    for p in model.parameters():
        assert opt.state[p]["wrapped"] is opt.optimizer.state[p]
        assert set(opt.state[p]["wrapped"]) == {"step", "exp_avg", "exp_avg_sq"}
    saved = opt.state_dict()
    fresh_model = _model(1)
    fresh = MAKERS["HyperLR-Adam"](fresh_model.parameters())
    fresh.load_state_dict(saved)
    for p in fresh_model.parameters():
        assert fresh.state[p]["wrapped"] is fresh.optimizer.state[p]
        assert int(fresh.state[p]["wrapped"]["step"]) == 3
    lost = {**saved, "state": {i: {k: v for k, v in s.items() if k != "wrapped"}
                               for i, s in saved["state"].items()}}  # fmt: skip
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict"):
        MAKERS["HyperLR-Adam"](_model(2).parameters()).load_state_dict(lost)


def test_every_entry_exists_from_the_first_step():
    """The template DCP loads into is a fresh optimizer after one zero step: it must hold the
    validation statistics of every parameter and the guard's at each guarded group's first."""
    model = _model(0)
    groups = [
        {"params": list(model[0].parameters()), "spike_guard": True},
        {"params": list(model[2].parameters())},
    ]
    opt = metalr.AdamHD(groups, lr=1e-2)
    template = get_optimizer_state_dict(model, opt)["state"]
    assert all(VALIDATION_KEY in entry for entry in template.values())
    assert [k for k, entry in template.items() if SPIKE_KEY in entry] == ["0.weight"]
    assert all(entry[FOLLOWS_VALIDATION] is False for entry in template.values())
    assert opt.spike_summary() == []  # no loss seen yet


def _as_before(state_dict: dict, hyper_lr: bool) -> dict:
    """A checkpoint as the code before 2026-12-05 wrote it: no flag, validation statistics only
    where an observation created them (here: not on the first layer), the guard's only after a
    loss, and HyperLR's wrapped state under a top-level ``wrapped``."""
    old = copy.deepcopy(state_dict)
    for entry in old["state"].values():
        del entry[FOLLOWS_VALIDATION]
    if hyper_lr:
        inner = {i: entry.pop("wrapped") for i, entry in old["state"].items()}
        old["wrapped"] = {
            "state": {i: s for i, s in inner.items() if s},
            "param_groups": copy.deepcopy(old["param_groups"]),
        }
    for index in list(old["state"])[:2]:  # the first layer's weight and bias
        del old["state"][index][VALIDATION_KEY]
    return old


@pytest.mark.parametrize("name", NATIVE + ["HyperLR-Adam"])
def test_a_checkpoint_from_before_resumes_exactly(name):
    """A ``torch.save`` checkpoint from before 2026-12-05 resumes exactly: a group followed the
    validation signal when any of its parameters had statistics; the missing entries are
    created."""
    model = _model(0)
    opt = MAKERS[name](model.parameters())
    _train(model, opt, range(6), True)
    old = _as_before(opt.state_dict(), name.startswith("HyperLR"))
    resumed_model = copy.deepcopy(model)
    resumed = MAKERS[name](resumed_model.parameters())
    resumed.load_state_dict(old)
    assert [resumed._follows_validation(g) for g in resumed.param_groups] == [True]
    for p in resumed_model.parameters():
        assert VALIDATION_KEY in resumed.state[p]
    _train(model, opt, range(6, 9), True)
    _train(resumed_model, resumed, range(6, 9), True)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_checkpoint_from_before_without_statistics_does_not_follow_validation():
    model = _model(0)
    opt = MAKERS["AdamHD"](model.parameters())
    _train(model, opt, range(4), False)
    old = copy.deepcopy(opt.state_dict())
    for entry in old["state"].values():
        del entry[FOLLOWS_VALIDATION]
        del entry[VALIDATION_KEY]
    fresh = MAKERS["AdamHD"](_model(1).parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(old)
    assert not fresh._follows_validation(fresh.param_groups[0])
    assert all(s[FOLLOWS_VALIDATION] is False for s in fresh.state.values())


@pytest.mark.parametrize("name", NATIVE)
def test_a_dcp_checkpoint_from_before_loads_with_a_partial_template(name, tmp_path):
    """A DCP checkpoint from before 2026-12-05 lacks the entries the template now has; loaded
    with ``DefaultLoadPlanner(allow_partial_load=True)`` the template's values stand in for
    them, and the statistics that were saved say the group followed the validation signal."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException

    model = _model(0)
    opt = MAKERS[name](model.parameters())
    _train(model, opt, range(6), True)
    old = _as_before(get_optimizer_state_dict(model, opt), hyper_lr=False)
    dcp.save({"model": get_model_state_dict(model), "optim": old}, checkpoint_id=tmp_path)
    _train(model, opt, range(6, 9), True)

    fresh_model = _model(1)
    fresh = MAKERS[name](fresh_model.parameters())
    template = {
        "model": get_model_state_dict(fresh_model),
        "optim": get_optimizer_state_dict(fresh_model, fresh),
    }
    with pytest.raises(CheckpointException, match="Missing key"):  # DCP's strict default
        dcp.load(copy.deepcopy(template), checkpoint_id=tmp_path)
    dcp.load(template, checkpoint_id=tmp_path, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(fresh_model, template["model"])
    set_optimizer_state_dict(fresh_model, fresh, template["optim"])
    assert fresh._follows_validation(fresh.param_groups[0])
    _train(fresh_model, fresh, range(6, 9), True)
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_prior_written_into_the_state_resumes_through_dcp(tmp_path):
    """``metalr.meta.load_prior`` writes the multipliers into the state directly: the entries
    created at a first step are completed at the next step, so the run's checkpoint fits a
    fresh template."""
    model = _model(0)
    opt = MAKERS["AdamHD"](model.parameters())
    for p in model.parameters():
        opt.state[p]["lr_multiplier"] = torch.tensor(0.5)
    _train(model, opt, range(3), False)
    state = get_optimizer_state_dict(model, opt)["state"]
    assert all(VALIDATION_KEY in entry and FOLLOWS_VALIDATION in entry for entry in state.values())


def test_hyper_lr_state_dict_leaves_the_live_state_alone():
    """torch's state dict holds the live per-parameter dicts: folding the wrapped state into
    them would change HyperLR's own state (its ``wrapped`` entry stays the wrapped optimizer's
    live dict, and the wrapped optimizer's dicts keep their own keys)."""
    model = _model(0)
    opt = MAKERS["HyperLR-Adam"](model.parameters())
    _train(model, opt, range(3), False)
    before = {p: dict(state) for p, state in opt.state.items()}
    saved = opt.state_dict()
    assert all("wrapped" in entry for entry in saved["state"].values())
    for p, state in opt.state.items():
        assert state.keys() == before[p].keys()
        assert all(state[k] is before[p][k] for k in state)
        assert state["wrapped"] is opt.optimizer.state[p]
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in opt.optimizer.state.values())


@pytest.mark.parametrize("observe", [False, True], ids=["never-observed", "observed"])
@pytest.mark.parametrize("name", ["AdamHD", "HyperLR-Adam"])
def test_a_checkpoint_with_the_group_flag_resumes_exactly(name, observe):
    """Commit 60fae6b (2026-12-05) kept the flag in ``param_groups["follows_validation"]`` with
    the statistics created at the first step: its value, not the statistics' presence, says
    whether the group followed the validation signal, and it leaves the groups."""
    model = _model(0)
    opt = MAKERS[name](model.parameters())
    _train(model, opt, range(6), observe)
    interim = copy.deepcopy(opt.state_dict())
    for entry in interim["state"].values():
        del entry[FOLLOWS_VALIDATION]
    for group in interim["param_groups"]:
        group["follows_validation"] = observe
    resumed_model = copy.deepcopy(model)
    resumed = MAKERS[name](resumed_model.parameters())
    resumed.load_state_dict(interim)
    assert [resumed._follows_validation(g) for g in resumed.param_groups] == [observe]
    assert all("follows_validation" not in g for g in resumed.state_dict()["param_groups"])
    _train(model, opt, range(6, 9), False)
    _train(resumed_model, resumed, range(6, 9), False)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
