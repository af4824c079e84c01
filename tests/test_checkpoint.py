"""Checkpoints: rates follow the parameters' dtype/device on load; older checkpoints still load."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import metalr
from metalr.optim._base import RATE_KEY

MAKERS = {
    "SGDHD": lambda p: metalr.SGDHD(p, lr=0.05, momentum=0.9),
    "AdamHD": lambda p: metalr.AdamHD(p, lr=1e-2, granularity="element"),
    "AdamWHD": lambda p: metalr.AdamWHD(p, lr=1e-2),
    "HyperLR": lambda p: metalr.HyperLR(torch.optim.Adam(p, lr=1e-2)),
}
#: Group keys metalr added on top of torch's; a checkpoint written before them must still load.
LATER_FLAGS = (
    "seek",
    "granularity",
    "rule",
    "lr_bounds",
    "fused",
    "differentiable",
    "decoupled_weight_decay",
)


def _steps(model, optimizer, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(n):
        x = torch.randn(8, 4, generator=gen).to(dtype)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", list(MAKERS))
def test_rates_are_cast_to_the_new_parameters_dtype(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    opt = MAKERS[name](model.parameters())
    _steps(model, opt)
    saved = _roundtrip(opt.state_dict())
    for dtype, rate_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        target = copy.deepcopy(model).to(dtype)
        new = MAKERS[name](target.parameters())
        new.load_state_dict(saved)
        for p in target.parameters():
            state = new.state[p]
            assert state[RATE_KEY].dtype == rate_dtype
            torch.testing.assert_close(
                state[RATE_KEY].double(),
                opt.state[dict(zip(target.parameters(), model.parameters()))[p]][RATE_KEY],
                rtol=1e-6,
                atol=0,
            )
            if "step" in state:
                assert state["step"].dtype == torch.float32 and state["step"].device == p.device
        _steps(target, new, n=2)
        assert all(torch.isfinite(p).all() for p in target.parameters())


# The defaults of checkpoints written before the flags existed: the normalized rule (the
# default until issue 10 made "seek" the default; a group without "rule" loads as normalized).
DEFAULT_MAKERS = {
    "SGDHD": lambda p: metalr.SGDHD(p, lr=0.05, momentum=0.9, rule="normalized"),
    "AdamHD": lambda p: metalr.AdamHD(p, lr=1e-2, rule="normalized"),
    "AdamWHD": lambda p: metalr.AdamWHD(p, lr=1e-2, rule="normalized"),
    "HyperLR": lambda p: metalr.HyperLR(torch.optim.Adam(p, lr=1e-2), rule="normalized"),
}


@pytest.mark.parametrize("name", list(DEFAULT_MAKERS))
def test_checkpoint_without_later_flags_loads_with_defaults(name):
    """A checkpoint from before the flags existed (defaults then = defaults now) resumes exactly."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = DEFAULT_MAKERS[name](model.parameters())
    _steps(model, opt)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in LATER_FLAGS:
            group.pop(key, None)
    reference = copy.deepcopy(model)
    ref_opt = DEFAULT_MAKERS[name](reference.parameters())
    ref_opt.load_state_dict(opt.state_dict())
    new = DEFAULT_MAKERS[name](model.parameters())
    new.load_state_dict(old)
    for group in new.param_groups:
        assert group["granularity"] == "tensor"
        assert group["rule"] == "normalized" and group["lr_bounds"] == (0.0, float("inf"))
    _steps(model, new, n=3, seed=1)
    _steps(reference, ref_opt, n=3, seed=1)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


SEEK_MAKERS = {
    "SGDHD": lambda p: metalr.SGDHD(p, lr=0.05, momentum=0.9),
    "AdamHD": lambda p: metalr.AdamHD(p, lr=1e-2),
    "HyperLR": lambda p: metalr.HyperLR(torch.optim.Adam(p, lr=1e-2)),
}


@pytest.mark.parametrize("saved_size", [7, 8, 10])
@pytest.mark.parametrize("name", list(SEEK_MAKERS))
def test_checkpoint_with_a_shorter_seek_controller_loads_and_resumes_exactly(name, saved_size):
    """Controllers saved before an entry existed are shorter — 7 entries before the steps since
    the first turn, 8 before the far test's slower average and its peak, 10 before the
    vanished-gradient gate's average and peak: they load padded with 0 (never turned, for the
    re-opened ramp; the averages starting afresh) and the run continues exactly as from the full
    checkpoint with those entries at 0."""
    from metalr.functional._controller import CONTROLLER_SIZE
    from metalr.optim._base import CONTROLLER_KEY

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = SEEK_MAKERS[name](model.parameters())
    _steps(model, opt, n=30)
    old = copy.deepcopy(opt.state_dict())
    for state in old["state"].values():
        state[CONTROLLER_KEY] = state[CONTROLLER_KEY][:saved_size].clone()
    full = copy.deepcopy(opt.state_dict())
    for state in full["state"].values():
        state[CONTROLLER_KEY][saved_size:] = 0.0
    reference = copy.deepcopy(model)
    ref_opt = SEEK_MAKERS[name](reference.parameters())
    ref_opt.load_state_dict(full)
    new = SEEK_MAKERS[name](model.parameters())
    new.load_state_dict(old)
    for p in model.parameters():
        ctrl = new.state[p][CONTROLLER_KEY]
        assert ctrl.numel() == CONTROLLER_SIZE == 12
        assert torch.equal(ctrl[saved_size:], torch.zeros(12 - saved_size, dtype=ctrl.dtype))
    _steps(model, new, n=5, seed=1)
    _steps(reference, ref_opt, n=5, seed=1)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(SEEK_MAKERS))
def test_checkpoint_with_a_seek_set_from_before_later_constants_resumes_without_them(name):
    """A seek set saved before the later constants existed (a checkpoint of 2026-12-03) loads
    with each later mechanism off, as it ran, and resumes exactly as the same checkpoint with
    those constants written out at their off values; the constants it has are kept."""
    from test_seek_provenance import OFF  # the constants added later, with their off values

    from metalr.functional._seek_constants import TRIAL11_SEEK

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = SEEK_MAKERS[name](model.parameters())
    _steps(model, opt, n=30)
    old = copy.deepcopy(opt.state_dict())
    full = copy.deepcopy(opt.state_dict())
    for o, f in zip(old["param_groups"], full["param_groups"]):
        for key, off in OFF.items():  # off None: ramp_fast, unread while slow_zone is 1
            del o["seek"][key]
            f["seek"][key] = TRIAL11_SEEK[key]
            assert off is None or TRIAL11_SEEK[key] == off
    reference = copy.deepcopy(model)
    ref_opt = SEEK_MAKERS[name](reference.parameters())
    ref_opt.load_state_dict(full)
    new = SEEK_MAKERS[name](model.parameters())
    new.load_state_dict(old)
    for group, saved in zip(new.param_groups, opt.param_groups):
        assert group["seek"]["ramp_rate"] == saved["seek"]["ramp_rate"]  # kept as saved
        assert group["seek"]["noise_hold"] == 0.0 and group["seek"]["moment_restart"] == 0.0
    _steps(model, new, n=5, seed=1)
    _steps(reference, ref_opt, n=5, seed=1)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
