"""The workbench's hypergradient warm-up (``hypergrad_warmup: {factor, steps}``): the β it writes
at each step, that the optimizer's rule uses it, and the errors for bad specs."""

from __future__ import annotations

import math

import pytest
import torch

import metalr
from metalr.workbench import make_task
from metalr.workbench import optimizers as O
from metalr.workbench.runner import train

WARM = {"factor": 10, "steps": 50}


def test_beta_follows_the_formula_in_every_group():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = metalr.AdamHD(
        [{"params": [a]}, {"params": [b], "hypergrad_lr": 0.05}], lr=1e-3, rule="normalized"
    )
    set_beta = O.build_hypergrad_warmup({"kind": "adam_hd", "hypergrad_warmup": WARM}, opt)
    expected = {1: 10.0, 51: 1 + 9 / math.e, 101: 1 + 9 / math.e**2}
    for step, scale in expected.items():
        set_beta(step)
        got = [g["hypergrad_lr"] for g in opt.param_groups]
        assert got == pytest.approx([0.02 * scale, 0.05 * scale], rel=1e-12)
    set_beta(5000)  # decays back to each group's own β
    assert [g["hypergrad_lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.05], rel=1e-12)
    assert O.build_hypergrad_warmup({"kind": "adam_hd"}, opt) is None


def test_the_rule_uses_the_warm_beta():
    """Step 2 (the first rate update) with the warm-up equals a plain AdamHD built at β_2."""
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def two_steps(opt_factory):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt, set_beta = opt_factory(model)
        for step in (1, 2):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x).squeeze(-1), y).backward()
            if set_beta is not None:
                set_beta(step)
            opt.step()
        return [opt.state[p]["lr_multiplier"] for p in model.parameters()]

    def warm(model):
        opt = metalr.AdamHD(model.parameters(), lr=1e-2, rule="normalized")
        return opt, O.build_hypergrad_warmup({"kind": "adam_hd", "hypergrad_warmup": WARM}, opt)

    beta_2 = 0.02 * (1 + 9 * math.exp(-1 / 50))
    warm_rates = two_steps(warm)
    plain_rates = two_steps(
        lambda m: (
            metalr.AdamHD(m.parameters(), lr=1e-2, hypergrad_lr=beta_2, rule="normalized"),
            None,
        )
    )
    default_rates = two_steps(
        lambda m: (metalr.AdamHD(m.parameters(), lr=1e-2, rule="normalized"), None)
    )
    for w, p, d in zip(warm_rates, plain_rates, default_rates):
        torch.testing.assert_close(w, p, rtol=0, atol=0)
        assert not torch.equal(w, d)  # the warm-up changed the update


def test_factor_one_is_no_warmup_and_a_warm_run_climbs_faster():
    task = make_task("digits_logreg", "smoke")
    run = lambda spec: train(task, spec, 1e-5, seed=0, steps=20, log_every=10, divergence=1e4,
                             device="cpu")  # fmt: skip
    # the warm-up was built for the normalized rule (study 5)
    plain = run({"kind": "adam_hd", "rule": "normalized"})
    same = run({"kind": "adam_hd", "rule": "normalized",
                "hypergrad_warmup": {"factor": 1, "steps": 50}})  # fmt: skip
    warm = run({"kind": "adam_hd", "rule": "normalized", "hypergrad_warmup": WARM})
    assert same["curves"]["val_loss"] == plain["curves"]["val_loss"]
    assert same["final_lr"] == plain["final_lr"]
    # from a rate 2-3 decades too small, ten times the β climbs further in 20 steps
    assert warm["final_lr"]["mean"] > 3 * plain["final_lr"]["mean"]
    assert warm["final_val_loss"] < plain["final_val_loss"]


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"kind": "adam", "hypergrad_warmup": WARM}, "kind 'adam' has no hypergradient"),
        ({"kind": "adam_hd", "hypergrad_warmup": {"factor": 10}}, "exactly the keys factor, steps"),
        ({"kind": "adam_hd", "hypergrad_warmup": [10, 50]}, "expected a mapping"),
        ({"kind": "adam_hd", "hypergrad_warmup": {"factor": 0.5, "steps": 50}},
         r"hypergrad_warmup.factor: 0.5 \(expected a number >= 1\)"),
        ({"kind": "adam_hd", "hypergrad_warmup": {"factor": 10, "steps": 0}},
         r"hypergrad_warmup.steps: 0 \(expected an integer >= 1\)"),
        ({"kind": "sgd_hd", "hypergrad_warmup": {"factor": True, "steps": 5}}, "factor: True"),
    ],
)  # fmt: skip
def test_bad_warmup_specs_name_the_key(spec, match):
    with pytest.raises(ValueError, match=match):
        O.check_spec("x", spec)


def test_hyperlr_and_prior_free_metalr_kinds_accept_it():
    for kind in ("sgd_hd", "adam_hd", "adamw_hd", "hyperlr"):
        assert O.check_spec("x", {"kind": kind, "hypergrad_warmup": WARM})["kind"] == kind
