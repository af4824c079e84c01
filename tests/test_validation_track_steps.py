"""A short run tracks faster (``validation={"track_steps": S}`` with ``ray_steps`` ``T``): a seek
group's tracking ``β`` is ``β · max(1, S / T)``.

References: the scaled run against the same optimizer built with ``hypergrad_lr`` × the factor
(bit for bit, every family), the unscaled run where ``T ≥ S``, torch's Adam where ``β = 0``.
"""

from __future__ import annotations

import pytest
import torch
from _configs import same_state_value
from _validation_setup import OPTIMIZERS, VAL, _data, _loss, _model, _train_step

import metalr
from metalr.functional.validation import VALIDATION_DEFAULTS, tracking_scale
from metalr.optim._state_keys import RATE_KEY


def _run(make, steps: int = 60, every: int = 5, **kw):
    model = _model()
    opt = make(model.parameters(), **kw)
    for t in range(1, steps + 1):
        _train_step(model, opt, _data(10 + t))
        if t % every == 0:
            opt.observe_validation(_loss(model, VAL))
    return model, opt


def _same(a: object, b: object) -> bool:
    """Bit for bit, through the dicts and lists of a state dict (HyperLR nests its inner
    optimizer's)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return same_state_value(a, b)


def _same_run(a, b) -> bool:
    (ma, oa), (mb, ob) = a, b
    if not all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters())):
        return False
    return _same(oa.state_dict()["state"], ob.state_dict()["state"])


def test_tracking_scale_is_the_ratio_of_the_span_to_the_budget_and_never_below_one():
    assert tracking_scale({"ray_steps": 100.0, "track_steps": 400.0}) == 4.0
    assert tracking_scale({"ray_steps": 400.0, "track_steps": 400.0}) == 1.0
    assert tracking_scale({"ray_steps": 1000.0, "track_steps": 400.0}) == 1.0
    assert tracking_scale({"ray_steps": 100.0, "track_steps": 0.0}) == 1.0  # off
    assert tracking_scale({"ray_steps": 0.0, "track_steps": 400.0}) == 1.0  # length unknown
    assert tracking_scale({"ray_steps": 100.0}) == 1.0  # a checkpoint from before the key
    assert VALIDATION_DEFAULTS["track_steps"] >= 0.0


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_short_run_equals_the_optimizer_built_with_the_scaled_beta(name):
    make = OPTIMIZERS[name]
    short = {"ray_steps": 30, "track_steps": 120, "hypergrad_lr": 0.0, "hold": 0}
    scaled = _run(make, validation=short)
    beta = scaled[1].param_groups[0]["hypergrad_lr"]
    assert beta > 0
    built = _run(make, hypergrad_lr=4.0 * beta, validation={**short, "track_steps": 0})
    assert built[1].param_groups[0]["hypergrad_lr"] == 4.0 * beta  # 120 / 30
    assert _same_run(scaled, built)
    plain = _run(make, validation={**short, "track_steps": 0})
    rates = [s[RATE_KEY] for s in scaled[1].state.values()]
    plain_rates = [s[RATE_KEY] for s in plain[1].state.values()]
    assert not all(torch.equal(a, b) for a, b in zip(rates, plain_rates))  # the scale acted
    assert scaled[1].param_groups[0]["hypergrad_lr"] == beta  # the group keeps the user's β


@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "hyperlr_rmsprop"])
def test_a_run_at_least_track_steps_long_is_unchanged(name):
    make = OPTIMIZERS[name]
    long = {"ray_steps": 400, "hypergrad_lr": 0.0, "hold": 0}
    assert _same_run(
        _run(make, validation={**long, "track_steps": 400}),
        _run(make, validation={**long, "track_steps": 0}),
    )


def test_a_zero_beta_stays_zero_and_equals_torch():
    """``hypergrad_lr=0`` scaled is 0: the rates never move and the run is torch's Adam."""
    model, plain, ref = _model(), _model(), _model()
    opt = metalr.AdamHD(
        model.parameters(), lr=0.05, hypergrad_lr=0.0,
        validation={"ray_steps": 10, "track_steps": 400},
    )  # fmt: skip
    plain_opt = metalr.AdamHD(plain.parameters(), lr=0.05, hypergrad_lr=0.0)
    torch_opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    for t in range(1, 16):
        for m, o in ((model, opt), (plain, plain_opt), (ref, torch_opt)):
            _train_step(m, o, _data(10 + t))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-13)
    assert all(torch.all(s[RATE_KEY] == 1) for s in opt.state.values())


def test_bad_track_steps_is_refused_by_name_and_other_rules_refuse_it():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="track_steps"):
        metalr.AdamHD(params, validation={"ray_steps": 100, "track_steps": -1})
    with pytest.raises(ValueError, match="track_steps"):
        metalr.AdamHD(params, rule="normalized", validation={"track_steps": 400})


def test_a_checkpoint_without_the_key_resumes_untouched():
    """Options saved before ``track_steps`` existed read it as 0: the resumed run tracks at the
    group's β, as it did when it was saved."""
    make = OPTIMIZERS["adam"]
    validation = {"ray_steps": 30, "hypergrad_lr": 0.0, "hold": 0, "track_steps": 0}
    model, opt = _run(make, steps=20, validation=validation)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["validation"]["track_steps"]
    again = make(model.parameters(), validation={**validation, "track_steps": 120})
    again.load_state_dict(saved)
    assert "track_steps" not in again.param_groups[0]["validation"]
    _train_step(model, again, _data(99))
    assert torch.isfinite(torch.stack([p.sum() for p in model.parameters()])).all()
