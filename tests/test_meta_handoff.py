"""The prior hand-off beyond the first step: fixed-rate priors, LSLR tables, checks before writes."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from test_meta_common import SinusoidSampler, mlp, sinusoid_batch
from torch import nn

import metalr
from metalr.meta import (
    LRPrior,
    MetaConfig,
    MetaLearner,
    load_prior,
    load_step_rates,
    param_groups_from_prior,
    unroll,
)
from metalr.meta.handoff import STEP_RATES_WARNING
from metalr.tasks import TaskBatch


def _learner(steps: int = 3, **options) -> MetaLearner:
    cfg = MetaConfig(inner_rule="sgd", inner_steps=steps, meta_lr=0.05, meta_batch_size=4,
                     backend="loop", **options)  # fmt: skip
    learner = MetaLearner(mlp((1, 8, 1), dtype=torch.float64), cfg)
    learner.fit(SinusoidSampler(dtype=torch.float64), 3)
    return learner


def _support() -> tuple[torch.Tensor, torch.Tensor]:
    sx, sy, _, _ = (
        t[0] for t in sinusoid_batch(1, 10, 1, torch.Generator().manual_seed(9), torch.float64)
    )
    return sx, sy


def _distance_to_inner_loop(learner, optimizer, model, steps, each_step=None) -> list[float]:
    """max |w_optimizer - w_inner| after each of ``steps`` optimizer steps."""
    sx, sy = _support()
    out = []
    for t in range(steps):
        if each_step is not None:
            each_step(t)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(sx), sy).backward()
        optimizer.step()
        expected = learner.adapt(sx, sy, steps=t + 1)
        out.append(max(float((p.detach() - expected[n].detach()).abs().max())
                       for n, p in model.named_parameters()))  # fmt: skip
    return out


@pytest.mark.parametrize("rates", ["tensor", "element"])
@pytest.mark.parametrize("bounds", [None, (0.0, 0.02)], ids=["unbounded", "bounded"])
def test_a_fixed_rate_prior_steps_as_its_inner_loop_at_every_step(rates, bounds) -> None:
    """MAML / Meta-SGD priors (``inner_rule="sgd"``) keep their rates fixed, and the bounds
    the inner loop clamped them with, through the groups ``param_groups_from_prior`` builds."""
    extra = {"inner_lr": 0.05, "lr_bounds": bounds} if bounds else {}
    learner = _learner(rates=rates, **extra)
    prior = learner.export_prior()
    model = mlp((1, 8, 1), dtype=torch.float64, seed=5)
    groups = param_groups_from_prior(model, prior)
    assert all(g["hypergrad_lr"] == 0.0 and g["rule"] == "additive" for g in groups)
    assert all(tuple(g["lr_bounds"]) == (bounds or (0.0, math.inf)) for g in groups)
    optimizer = metalr.SGDHD(groups, granularity=prior.granularity, foreach=False)
    load_prior(optimizer, model, prior, load_weights=True)
    assert _distance_to_inner_loop(learner, optimizer, model, 3) == [0.0, 0.0, 0.0]


def test_an_optimizer_that_adapts_from_a_fixed_rate_prior_chooses_its_own_bounds() -> None:
    """The bounds were the fixed rates' (clamped at use): ``fixed_rates=False`` groups and an
    optimizer built without the groups keep their own, and no constant is refused."""
    prior = _learner(inner_lr=0.05, lr_bounds=(0.0, 0.02)).export_prior()
    model = mlp((1, 8, 1), dtype=torch.float64)
    groups = param_groups_from_prior(model, prior, fixed_rates=False)
    assert all({"hypergrad_lr", "rule", "lr_bounds"}.isdisjoint(g) for g in groups)
    optimizer = metalr.SGDHD(model.parameters(), granularity=prior.granularity, lr_bounds=(0, 0.5))
    load_prior(optimizer, model, prior)
    assert optimizer.param_groups[0]["lr_bounds"] == (0, 0.5)


def test_an_optimizer_built_without_the_groups_adapts_from_a_fixed_rate_prior() -> None:
    """The prior as the start of online adaptation: SGD-HD's own rule moves the rates."""
    learner = _learner()
    prior = learner.export_prior()
    model = mlp((1, 8, 1), dtype=torch.float64, seed=5)
    optimizer = metalr.SGDHD(model.parameters(), granularity=prior.granularity, foreach=False)
    load_prior(optimizer, model, prior, load_weights=True)
    distances = _distance_to_inner_loop(learner, optimizer, model, 3)
    assert distances[0] == 0.0 and distances[-1] > 0.0


def _lslr_prior() -> tuple[MetaLearner, LRPrior]:
    learner = MetaLearner(mlp((1, 8, 1), dtype=torch.float64),
                          MetaConfig(rates="step_tensor", inner_steps=3, inner_lr=0.05))  # fmt: skip
    with torch.no_grad():
        for log_rate in learner.meta.log_rates.values():
            log_rate.copy_(torch.log(torch.tensor([0.05, 0.01, 0.1], dtype=torch.float64)))
    return learner, learner.export_prior()


def test_an_lslr_prior_follows_its_table_with_load_step_rates_and_warns_without() -> None:
    learner, prior = _lslr_prior()
    for follow in (False, True):
        model = mlp((1, 8, 1), dtype=torch.float64, seed=5)
        optimizer = metalr.SGDHD(param_groups_from_prior(model, prior), foreach=False)
        with pytest.warns(UserWarning, match=re.escape(STEP_RATES_WARNING)):
            load_prior(optimizer, model, prior, load_weights=True)

        def write(t, optimizer=optimizer, model=model):
            load_step_rates(optimizer, model, prior, t)

        distances = _distance_to_inner_loop(learner, optimizer, model, 3, write if follow else None)
        if follow:
            assert distances == [0.0, 0.0, 0.0]
        else:  # the first step's rate at every step: off from the second
            assert distances[0] == 0.0 and min(distances[1:]) > 1e-3


def test_load_step_rates_checks_its_step_and_the_prior() -> None:
    _, prior = _lslr_prior()
    model = mlp((1, 8, 1), dtype=torch.float64)
    optimizer = metalr.SGDHD(param_groups_from_prior(model, prior))
    for step in (-1, 3, 1.0, True):
        with pytest.raises(
            ValueError,
            match=re.escape(f"Invalid step value: {step!r}; expected an integer in [0, 3)"),
        ):
            load_step_rates(optimizer, model, prior, step)  # fmt: skip
    plain = LRPrior(prior.rates, "tensor", "sgd")
    with pytest.raises(ValueError, match="prior has no rate_schedule"):
        load_step_rates(optimizer, model, plain, 0)


def test_a_constant_table_loads_without_the_warning() -> None:
    learner = MetaLearner(mlp((1, 8, 1), dtype=torch.float64),
                          MetaConfig(rates="step_tensor", inner_steps=3, inner_lr=0.05))  # fmt: skip
    prior = learner.export_prior()  # every step's rate is inner_lr: one rate
    model = mlp((1, 8, 1), dtype=torch.float64)
    optimizer = metalr.SGDHD(param_groups_from_prior(model, prior))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_prior(optimizer, model, prior)


def _snapshot(optimizer, model) -> tuple:
    groups = [(g["lr"], g["hypergrad_lr"]) for g in optimizer.param_groups]
    state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for p, s in optimizer.state.items()}  # fmt: skip
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return groups, state, weights


def _equal(x, y) -> bool:
    return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def _same(a: tuple, b: tuple) -> bool:
    if a[0] != b[0] or a[1].keys() != b[1].keys():
        return False
    states = all(
        s.keys() == b[1][k].keys() and all(_equal(s[x], b[1][k][x]) for x in s)
        for k, s in a[1].items()
    )
    return states and all(torch.equal(w, b[2][n]) for n, w in a[2].items())


def test_a_refused_prior_changes_nothing() -> None:
    """Every check runs before the first write: a mis-shaped last layer leaves lr, hypergrad_lr,
    the multipliers and the earlier layers' weights as they were."""
    source = mlp((1, 8, 1), dtype=torch.float64)
    names = [n for n, _ in source.named_parameters()]
    weights = {n: p.detach().clone() + 1 for n, p in source.named_parameters()}
    weights[names[-2]] = torch.zeros(1, 9, dtype=torch.float64)  # the last weight: wrong shape
    prior = LRPrior({n: torch.tensor(0.1, dtype=torch.float64) for n in names}, "tensor", "sgd_hd",
                    hypergrad_lrs={n: torch.tensor(0.5) for n in names}, init_weights=weights)  # fmt: skip
    model = mlp((1, 8, 1), dtype=torch.float64)
    optimizer = metalr.SGDHD(model.parameters(), lr=1e-3, rule="normalized")
    optimizer.zero_grad()
    model(torch.ones(2, 1, dtype=torch.float64)).sum().backward()
    optimizer.step()
    before = _snapshot(optimizer, model)
    with pytest.raises(
        ValueError, match=re.escape(f"prior weights for {names[-2]!r} have shape (1, 9)")
    ):
        load_prior(optimizer, model, prior, load_weights=True)  # fmt: skip
    assert _same(before, _snapshot(optimizer, model))


def test_initial_weights_are_required_only_for_the_parameters_the_optimizer_holds() -> None:
    model = mlp((1, 8, 1), dtype=torch.float64)
    named = dict(model.named_parameters())
    first = [n for n in named if n.startswith("0.")]
    prior = LRPrior({n: torch.tensor(0.1, dtype=torch.float64) for n in first}, "tensor", "sgd",
                    init_weights={n: torch.zeros_like(named[n]) for n in first})  # fmt: skip
    optimizer = metalr.SGDHD([named[n] for n in first])
    load_prior(optimizer, model, prior, load_weights=True)
    assert all(bool((named[n] == 0).all()) for n in first)
    everything = metalr.SGDHD(model.parameters())
    missing = sorted(set(named) - set(first))
    with pytest.raises(ValueError, match=re.escape("prior has no rate for parameter")):
        load_prior(everything, model, prior, load_weights=True)
    assert missing  # the second layer: neither a rate nor weights


_RATES = {"w": torch.tensor(0.1)}


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: LRPrior([0.1], "tensor", "sgd"), TypeError, "rates must be a dict of parameter name -> tensor"),
        (lambda: LRPrior({"w": 0.1}, "tensor", "sgd"), TypeError, "rates must be a dict of parameter name -> tensor"),
        (lambda: LRPrior({"w": torch.tensor(math.inf)}, "tensor", "sgd"), ValueError, "rate of 'w' must be positive and finite"),
        (lambda: LRPrior({"w": torch.tensor(math.nan)}, "tensor", "sgd"), ValueError, "rate of 'w' must be positive and finite"),
        (lambda: LRPrior(_RATES, "tensor", "sgd", base_lr="fast"), TypeError, "base_lr must be a real number, got str"),
        (lambda: LRPrior({"w": torch.ones(2)}, "element", "sgd", rate_schedule={"w": torch.ones(3)}), ValueError, "rate_schedule (per-step rates, MAML++ LSLR) needs granularity='tensor'"),
        (lambda: LRPrior(_RATES, "tensor", "sgd", rate_schedule={"w": torch.ones(0)}), ValueError, "rate_schedule of 'w' must be a 1-d tensor of positive, finite rates"),
        (lambda: LRPrior(_RATES, "tensor", "sgd", base_lr=math.inf), ValueError, "Invalid base_lr value: inf; expected a finite value > 0"),
        (lambda: LRPrior(_RATES, "tensor", "sgd_hd", hypergrad_rule="seek"), ValueError, "Invalid hypergrad_rule: 'seek'; expected one of ('normalized', 'additive')"),
        (lambda: LRPrior(_RATES, "tensor", "sgd_hd", hypergrad_lrs={"w": torch.tensor(-1.0)}), ValueError, "hypergrad_lr of 'w' must be one finite value >= 0, got [-1.0]"),
        (lambda: LRPrior(_RATES, "tensor", "sgd_hd", hypergrad_lrs={"w": torch.ones(2)}), ValueError, "hypergrad_lr of 'w' must be one finite value >= 0"),
        (lambda: LRPrior(_RATES, "tensor", "sgd_hd", hypergrad_lrs={"v": torch.tensor(0.1)}), ValueError, "hypergrad_lrs must name the parameters the rates name: missing ['w'], extra ['v']"),
        (lambda: LRPrior(_RATES, "tensor", "sgd", init_weights={"v": torch.ones(1)}), ValueError, "init_weights has parameter(s) with no rate: ['v']"),
        (lambda: LRPrior(_RATES, "tensor", "sgd", rate_schedule={"w": torch.tensor([0.1, -1.0])}), ValueError, "rate_schedule of 'w' must be a 1-d tensor of positive, finite rates"),
        (lambda: LRPrior(_RATES, "tensor", "sgd", rate_schedule={}), ValueError, "rate_schedule must name the parameters the rates name: missing ['w']"),
    ],
)  # fmt: skip
def test_a_prior_checks_every_field(build, error, message) -> None:
    with pytest.raises(error, match=re.escape(message)):
        build()


def test_a_prior_takes_any_real_scalar_as_base_lr_and_the_old_imports_work() -> None:
    import numpy as np

    from metalr.meta import handoff, prior

    assert LRPrior(_RATES, "tensor", "sgd", base_lr=np.float32(0.5)).base_lr == 0.5
    assert LRPrior(_RATES, "tensor", "sgd", base_lr=torch.tensor(2.0)).base_lr == 2.0
    assert prior.load_prior is handoff.load_prior  # moved in 2026-12 and still importable
    assert prior.param_groups_from_prior is handoff.param_groups_from_prior


def test_the_hand_off_names_an_argument_of_the_wrong_type() -> None:
    model = mlp((1, 8, 1))
    prior = LRPrior({n: torch.tensor(0.1) for n, _ in model.named_parameters()}, "tensor", "sgd")
    optimizer = metalr.SGDHD(model.parameters())
    hint = "prior must be an LRPrior, got str; read a file with LRPrior.load(path)"
    with pytest.raises(TypeError, match=re.escape(hint)):
        load_prior(optimizer, model, "x.prior")
    with pytest.raises(TypeError, match=re.escape(hint)):
        param_groups_from_prior(model, "x.prior")
    with pytest.raises(TypeError, match="model must be an nn.Module, got NoneType"):
        load_prior(optimizer, None, prior)
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        param_groups_from_prior({}, prior)


def test_meta_inputs_name_what_is_wrong() -> None:
    with pytest.raises(TypeError, match="MetaConfig.from_dict needs a mapping, got list"):
        MetaConfig.from_dict([1])
    learner = MetaLearner(mlp((1, 4, 1)), MetaConfig(inner_steps=1))
    batch = sinusoid_batch(2, 5, 5, torch.Generator().manual_seed(0), torch.float32)
    empty = TaskBatch(*(t[:0] for t in batch))
    with pytest.raises(ValueError, match=re.escape("task batch is empty (support_x has 0 tasks)")):
        learner.meta_step(empty)
    with pytest.raises(ValueError, match=re.escape("task batch is empty")):
        learner.evaluate(empty)
    sx, sy = batch.support_x[0], batch.support_y[0]
    with pytest.raises(
        ValueError, match=re.escape("Invalid mode: 'bogus'; expected one of ('func', 'autograd')")
    ):
        unroll(learner.loss, learner.meta.init_params(), lambda t: learner.meta.rates(), None, sx, sy,
               learner.rule, 1, mode="bogus")  # fmt: skip
