"""Loading a checkpoint: the caller's load hooks have the last word, and every piece of metalr
state keeps the dtype it was created in (float32 for half-precision parameters), the spike
guard's statistics included."""

from __future__ import annotations

import copy

import pytest
import torch

import metalr
from metalr.optim._state_keys import (
    CONTROLLER_KEY,
    FOLLOWS_VALIDATION,
    RATE_KEY,
    SPIKE_KEY,
    VALIDATION_KEY,
)

MAKERS = {
    "adamhd": lambda params, **kw: metalr.AdamHD(params, lr=0.01, **kw),
    "sgdhd": lambda params, **kw: metalr.SGDHD(params, lr=0.01, momentum=0.9, **kw),
    "hyperlr": lambda params, **kw: metalr.HyperLR(torch.optim.Adam(params, lr=0.01), **kw),
}


def _trained(make, steps: int = 3):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3))
    opt = make([p])
    for _ in range(steps):
        opt.zero_grad()
        (p**2).sum().backward()
        opt.step()
    return p, opt


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_post_hook_changes_what_loads(name):
    """torch runs the load post hooks last; metalr's own casting of its state runs before them,
    so a hook that resets the counters and multipliers (a "restart" trick) is not undone."""
    p, opt = _trained(MAKERS[name])
    saved = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    fresh = MAKERS[name]([q])

    def reset(optimizer):
        for state in optimizer.state.values():
            state["step"] = torch.tensor(0.0)
            state[RATE_KEY] = torch.tensor(1.0)

    fresh.register_load_state_dict_post_hook(reset)
    fresh.load_state_dict(saved)
    assert float(fresh.state[q]["step"]) == 0.0
    assert float(fresh.state[q][RATE_KEY]) == 1.0
    assert float(opt.state[p][RATE_KEY]) != 1.0  # the hook had something to undo


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_pre_hook_changes_what_loads(name):
    """A pre hook that returns an edited state dict: the edited multiplier and count load (in
    the rate dtype), not the ones of the dict passed to ``load_state_dict``."""
    p, opt = _trained(MAKERS[name])
    saved = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    fresh = MAKERS[name]([q])

    def edit(optimizer, state_dict):
        state = {pid: {**s, "step": torch.tensor(100.0), RATE_KEY: torch.tensor(2.0)}
                 for pid, s in state_dict["state"].items()}  # fmt: skip
        return {**state_dict, "state": state}

    fresh.register_load_state_dict_pre_hook(edit)
    fresh.load_state_dict(saved)
    assert float(fresh.state[q]["step"]) == 100.0
    assert float(fresh.state[q][RATE_KEY]) == 2.0
    assert fresh.state[q][RATE_KEY].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_spike_guard_statistics_stay_float32_and_resume_exactly(dtype):
    """A half-precision model with the spike guard: after a resume its statistics are still
    float32 (torch's load would cast them to the parameter's dtype, where a running mean of
    1002.8 rounds to 1004 and a slowly rising loss then reads as a spike), and the resumed run
    equals the uninterrupted one."""

    def loss_at(p, i):
        return (p.float() ** 2).sum() * 1e-3 + 1002.3 + 0.2 * i  # rises slowly, no spike

    def run(opt, p, start, n):
        for i in range(start, start + n):

            def closure(i=i):
                opt.zero_grad()
                loss = loss_at(p, i)
                loss.backward()
                return loss

            opt.step(closure)

    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(4).to(dtype))
    p2 = torch.nn.Parameter(p1.detach().clone())
    whole = metalr.AdamHD([p1], lr=0.01, spike_guard=True)
    run(whole, p1, 0, 30)
    first = metalr.AdamHD([p2], lr=0.01, spike_guard=True)
    run(first, p2, 0, 5)
    saved = copy.deepcopy(first.state_dict())
    resumed = metalr.AdamHD([p2], lr=0.01, spike_guard=True)
    resumed.load_state_dict(saved)
    for key in (SPIKE_KEY, RATE_KEY, CONTROLLER_KEY):
        assert resumed.state[p2][key].dtype == torch.float32, key
        torch.testing.assert_close(resumed.state[p2][key], saved["state"][0][key].float(),
                                   rtol=0, atol=0)  # fmt: skip
    run(resumed, p2, 5, 25)
    assert whole.spike_summary() == resumed.spike_summary()
    assert resumed.spike_summary()[0]["spikes"] == 0
    torch.testing.assert_close(p1, p2, rtol=0, atol=0)


def test_hyper_lr_state_dict_hooks_see_the_wrapped_optimizer():
    """HyperLR's checkpoint holds, per parameter, its own state and the wrapped optimizer's
    under ``wrapped``; hooks registered on the HyperLR see and edit all of it: a save post hook
    that records the inner step count, and a load pre hook that halves the inner optimizer's
    saved moments."""
    p, opt = _trained(MAKERS["hyperlr"])
    seen = {}

    def after_save(_opt, state_dict):
        seen["saved"] = sorted(state_dict["state"][0])
        seen["inner_step"] = float(state_dict["state"][0]["wrapped"]["step"])

    opt.register_state_dict_post_hook(after_save)
    saved = copy.deepcopy(opt.state_dict())
    assert sorted(saved) == ["param_groups", "state"]
    assert seen == {
        "saved": sorted(
            [
                RATE_KEY,
                CONTROLLER_KEY,
                VALIDATION_KEY,
                FOLLOWS_VALIDATION,
                "prev_direction",
                "wrapped",
            ]
        ),
        "inner_step": 3.0,
    }

    def halve_inner_moments(_opt, state_dict):
        seen["loading"] = sorted(state_dict["state"][0])
        entry = copy.deepcopy(state_dict["state"][0])
        entry["wrapped"]["exp_avg"] = entry["wrapped"]["exp_avg"] / 2
        return {**state_dict, "state": {0: entry}}

    q = torch.nn.Parameter(p.detach().clone())
    fresh = MAKERS["hyperlr"]([q])
    fresh.register_load_state_dict_pre_hook(halve_inner_moments)
    fresh.load_state_dict(saved)
    assert seen["loading"] == seen["saved"]
    torch.testing.assert_close(
        fresh.optimizer.state[q]["exp_avg"], saved["state"][0]["wrapped"]["exp_avg"] / 2
    )
    torch.testing.assert_close(fresh.state[q][RATE_KEY], opt.state[p][RATE_KEY])
    # HyperLR's live entry links the wrapped optimizer's state, not a copy of the checkpoint's
    assert fresh.state[q]["wrapped"] is fresh.optimizer.state[q]


def test_hyper_lr_load_pre_hooks_see_a_plain_checkpoint_of_the_wrapped_optimizer():
    """A checkpoint of the wrapped optimizer alone (no ``wrapped`` entry) passes through the
    HyperLR's load pre hooks too, so a hook can convert it before it loads."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3))
    plain = torch.optim.Adam([p], lr=0.01)
    p.grad = torch.ones(3)
    plain.step()
    saved = copy.deepcopy(plain.state_dict())
    fresh = MAKERS["hyperlr"]([p])
    seen = []

    def lower_the_rate(_opt, state_dict):
        seen.append(sorted(state_dict))
        groups = [{**g, "lr": 0.001} for g in state_dict["param_groups"]]
        return {**state_dict, "param_groups": groups}

    fresh.register_load_state_dict_pre_hook(lower_the_rate)
    fresh.load_state_dict(saved)
    assert seen == [["param_groups", "state"]]
    assert fresh.optimizer.param_groups[0]["lr"] == fresh.param_groups[0]["lr"] == 0.001


def test_hyper_lr_refuses_its_own_checkpoint_without_the_wrapped_state():
    """A HyperLR checkpoint that lost the wrapped optimizer's state (``torch.distributed.
    checkpoint`` with ``flatten_optimizer_state_dict=True`` rebuilds only the entries the live
    HyperLR state has) loaded HyperLR's multipliers into the wrapped Adam, which failed with
    ``KeyError: 'step'``; it is refused, and a plain checkpoint of the wrapped optimizer still
    loads."""
    p, opt = _trained(MAKERS["hyperlr"])
    partial = copy.deepcopy(opt.state_dict())
    for entry in partial["state"].values():
        del entry["wrapped"]
    fresh = MAKERS["hyperlr"]([torch.nn.Parameter(p.detach().clone())])
    with pytest.raises(ValueError, match="without the wrapped optimizer's state"):
        fresh.load_state_dict(partial)
    fresh.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))  # the wrapped Adam's own
