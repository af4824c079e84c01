"""The ray ceiling (``validation={"ray_steps": T}``, :mod:`metalr.functional._ray`): the cosine
between the validation gradient and the travel ``θ_t − θ_0``, and the one-time ceiling and
rewind it decides.

References: the cosine's inner product against a central finite difference of
``L_val(θ_0 + α(θ_t − θ_0))`` at ``α = 1`` (float64); the decision against the rule written out
in Python floats (:func:`_reference_decision`); the optimizer against the parameters recorded
by the test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _validation_setup import (
    LR,
    OPTIMIZERS,
    TRAIN,
    VAL,
    _data,
    _loss,
    _model,
    _overfitting_run,
    _train_step,
)

import metalr
from metalr.functional._controller import CEILING, COUNT, RAMP, SINCE, initial_controller
from metalr.functional._ray import (
    DONE,
    KEPT,
    STREAK,
    initial_ray_state,
    ray_cosine,
    ray_sums,
    ray_update,
)
from metalr.functional._validation_state import LEVEL, initial_validation_stats
from metalr.functional.validation import VALIDATION_DEFAULTS
from metalr.optim._state_keys import (
    CONTROLLER_KEY,
    RATE_KEY,
    RAY_ANCHOR_KEY,
    RAY_KEY,
    SNAPSHOT_KEY,
    VALIDATION_KEY,
)

#: The ray alone (no validation signal, no hold), acting at the first look above τ = 0, on the
#: step clock and without the gate (the rule of the first checks; the clock and the gate, the
#: defaults since check 8, are tests/test_validation_ray_clock.py's).
RAY_ONLY = {"ray_steps": 1000, "ray_tau": 0.0, "ray_persist": 1, "hypergrad_lr": 0.0, "hold": 0,
            "ray_clock": 0, "ray_gate": 1}  # fmt: skip
SEEK = {k: v for k, v in metalr.functional.SEEK_DEFAULTS.items()}


def _options(**over) -> dict:
    return {**VALIDATION_DEFAULTS, **RAY_ONLY, **over}


def test_the_ray_inner_product_is_the_derivative_along_the_ray():
    """⟨∇L_val(θ), θ − θ_0⟩ = d/dα L_val(θ_0 + α(θ − θ_0)) at α = 1 (central differences)."""
    model = _model()
    anchors = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i),
                               dtype=p.dtype) * 0.3)  # fmt: skip
    params = list(model.parameters())
    grads = torch.autograd.grad(_loss(model, VAL), params)
    sums = ray_sums(grads, params, anchors)
    travel = [p.detach() - a for p, a in zip(params, anchors)]

    def along(alpha: float) -> float:
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for q, a, d in zip(twin.parameters(), anchors, travel):
                q.copy_(a + alpha * d)
        return float(_loss(twin, VAL).detach())

    h = 1e-5
    derivative = (along(1 + h) - along(1 - h)) / (2 * h)
    assert float(sums[0]) == pytest.approx(derivative, rel=1e-6)
    norms = math.sqrt(sum(float((g * g).sum()) for g in grads)) * math.sqrt(
        sum(float((d * d).sum()) for d in travel)
    )
    assert float(ray_cosine(sums)) == pytest.approx(derivative / norms, rel=1e-6)
    assert float(ray_cosine(torch.zeros(3, dtype=torch.float64))) == 0.0  # no travel yet


def _reference_decision(cosines, counts, options, level0):
    """The rule in Python floats: the observation at which it acts, the factor, and which
    observations kept a snapshot (before the action; none after it)."""
    streak, kept, acted = 0, [], None
    for i, (c, count) in enumerate(zip(cosines, counts)):
        t = count + 1
        streak = streak + 1 if c > options["ray_tau"] else 0
        window = t < options["ray_before"] * options["ray_steps"]
        if window and streak >= options["ray_persist"]:
            factor = min(max(t / (options["ray_target"] * options["ray_steps"]),
                             options["ray_floor"]), 1.0)  # fmt: skip
            return i, factor, kept, math.log(level0) + math.log(factor)
        if window and c <= options["ray_tau"]:
            kept.append(i)
    return acted, None, kept, None


@pytest.mark.parametrize(
    ("cosines", "persist"),
    [
        ([-0.1, 0.02, 0.03, 0.5], 2),  # acts at the second look in a row above τ
        ([0.02, -0.1, 0.02, -0.3, 0.04, 0.05], 2),  # single blips do not act
        ([0.3, 0.3], 1),  # acts at the first look; nothing kept, so no rewind
        ([-0.2, -0.1, 0.001, 0.3, 0.3, 0.3, 0.3], 2),  # past the window: never acts
    ],
)
def test_the_decision_follows_the_rule_in_python_floats(cosines, persist):
    options = _options(ray_tau=0.005, ray_persist=persist, ray_steps=100, ray_before=0.1)
    rate = torch.tensor(0.8, dtype=torch.float64)
    param = torch.zeros(3, dtype=torch.float64)
    ctrl = initial_controller(param, torch.float64, SEEK)
    ctrl[RAMP] = 0.2  # still ramping
    stats = initial_validation_stats(param, torch.float64)
    stats[LEVEL] = math.log(0.9)
    ray = initial_ray_state(param, torch.float64)
    counts = [2 * i + 1 for i in range(len(cosines))]  # an observation every other step
    acted_at, factor, kept, cap = _reference_decision(cosines, counts, options, 0.8)
    for i, (c, count) in enumerate(zip(cosines, counts)):
        ctrl[COUNT] = count
        out = ray_update([rate], [ctrl], [stats], [ray], torch.tensor(c, dtype=torch.float64),
                         torch.tensor(True), options=options, seek=SEEK, granularity="tensor")  # fmt: skip
        assert bool(out.rewind.keep[0]) == (i in kept)
        acts = i == acted_at
        assert bool(out.rewind.restore[0]) == (acts and bool(kept))
        if acts:
            assert float(out.rates[0]) == pytest.approx(0.8 * factor, rel=1e-12)
            assert float(out.controllers[0][CEILING]) == pytest.approx(cap, rel=1e-12)
            assert float(out.controllers[0][RAMP]) == 0.0  # the ramp stops
            assert float(out.stats[0][LEVEL]) == pytest.approx(cap, rel=1e-12)  # the hold too
        else:  # nothing moves but the streak and the flags
            assert torch.equal(out.rates[0], rate)
            assert float(out.controllers[0][CEILING]) == float(ctrl[CEILING])
        rate, ctrl, stats, ray = out.rates[0], out.controllers[0], out.stats[0], out.ray[0]
        assert float(ray[DONE]) == float(acted_at is not None and i >= acted_at)
        assert float(ray[KEPT]) == float(any(k <= i for k in kept))
    tail = 0  # the observations in a row above τ at the end (frozen once it acted)
    for c in cosines[: None if acted_at is None else acted_at + 1]:
        tail = tail + 1 if c > options["ray_tau"] else 0
    assert float(ray[STREAK]) == tail


def test_an_action_closes_a_turn_that_could_be_taken_back_and_a_nan_changes_nothing():
    options = _options(ray_steps=100, ray_before=0.5)
    rate = torch.tensor(0.5, dtype=torch.float64)
    param = torch.zeros(2, dtype=torch.float64)
    ctrl = initial_controller(param, torch.float64, SEEK)
    ctrl[RAMP], ctrl[SINCE], ctrl[COUNT], ctrl[CEILING] = 0.0, 3.0, 9.0, math.log(2.0)
    stats, ray = (
        initial_validation_stats(param, torch.float64),
        initial_ray_state(param, torch.float64),
    )
    nan = ray_update([rate], [ctrl], [stats], [ray], torch.tensor(0.5, dtype=torch.float64),
                     torch.tensor(False), options=options, seek=SEEK, granularity="tensor")  # fmt: skip
    assert torch.equal(nan.rates[0], rate) and torch.equal(nan.controllers[0], ctrl)
    assert torch.equal(nan.ray[0], ray) and not bool(nan.rewind.restore.any())
    out = ray_update([rate], [ctrl], [stats], [ray], torch.tensor(0.5, dtype=torch.float64),
                     torch.tensor(True), options=options, seek=SEEK, granularity="tensor")  # fmt: skip
    factor = 10 / 30
    assert float(out.rates[0]) == pytest.approx(0.5 * factor)
    assert float(out.controllers[0][SINCE]) == SEEK["resume_window"] + 1  # no resume any more
    assert float(out.controllers[0][CEILING]) == pytest.approx(math.log(0.5 * factor))
    assert math.isinf(float(out.stats[0][LEVEL]))  # no level yet: none to lower
    again = ray_update(out.rates, out.controllers, out.stats, out.ray,
                       torch.tensor(0.9, dtype=torch.float64), torch.tensor(True),
                       options=options, seek=SEEK, granularity="tensor")  # fmt: skip
    assert torch.equal(again.rates[0], out.rates[0])  # once only


def test_per_element_rates_are_capped_at_the_factor_times_their_largest():
    options = _options(ray_steps=100)
    rates = torch.tensor([0.1, 0.4, 1.0], dtype=torch.float64)
    ctrl = initial_controller(rates, torch.float64, SEEK)
    ctrl[COUNT] = 5.0  # t = 6: factor 0.2
    out = ray_update([rates], [ctrl], [initial_validation_stats(rates, torch.float64)],
                     [initial_ray_state(rates, torch.float64)],
                     torch.tensor(0.4, dtype=torch.float64), torch.tensor(True),
                     options=options, seek=SEEK, granularity="element")  # fmt: skip
    torch.testing.assert_close(out.rates[0], torch.tensor([0.1, 0.2, 0.2], dtype=torch.float64))


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd_momentum", "sgd_nesterov",
                                  "hyperlr_rmsprop"])  # fmt: skip
def test_the_anchor_is_each_parameter_before_its_first_step(name):
    model, opt, first, _ = _overfitting_run(OPTIMIZERS[name], {**RAY_ONLY, "ray_tau": 1.0})
    for p, a in zip(model.parameters(), first):
        torch.testing.assert_close(opt.state[p][RAY_ANCHOR_KEY], a, rtol=0, atol=0)
        assert float(opt.state[p][RAY_KEY][DONE]) == 0.0  # τ = 1: never above it
        assert float(opt.state[p][RAY_KEY][KEPT]) == 1.0


@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "hyperlr_rmsprop"])
@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
def test_the_optimizer_acts_once_caps_the_rates_and_rewinds(name, granularity):
    """τ between the first and later cosines: the first observation keeps a snapshot, the
    second acts — the rates fall to the factor, never rise above the ceiling again, and the
    parameters at the end of the next step are the snapshot's."""
    make = OPTIMIZERS[name]

    def build(params, **kw):
        if name == "adam":  # the ray's clock counts the steps with a direction: the step after
            kw["seek"] = {"moment_restart": 0}  # Adam's moment restart has none (one fewer)
        return make(params, granularity=granularity, **kw)

    cosines = []  # the cosines this path reads (τ 1: it never acts), to place τ between them
    model = _model()
    opt = build(model.parameters(), validation={**RAY_ONLY, "ray_tau": 1.0})
    for t in range(1, 7):
        _train_step(model, opt, _data(10 + t))
        if t % 3 == 0:
            params = list(model.parameters())
            grads = torch.autograd.grad(_loss(model, VAL), params)
            anchors = [opt.state[p][RAY_ANCHOR_KEY] for p in params]
            cosines.append(float(ray_cosine(ray_sums(grads, params, anchors))))
            opt.observe_validation(_loss(model, VAL))
    assert cosines[1] > cosines[0], cosines  # the premise: the second look reads more
    validation = {**RAY_ONLY, "ray_tau": sum(cosines) / 2, "ray_steps": 30, "ray_before": 1.0}
    model = _model()
    opt = build(model.parameters(), validation=validation)
    kept = None
    for t in range(1, 16):
        _train_step(model, opt, _data(10 + t))
        if t == 7:  # the step after the action: the parameters went back to the snapshot
            for p, s in zip(model.parameters(), kept):
                torch.testing.assert_close(p.detach(), s, rtol=0, atol=0)
        if t > 6:  # the ceiling holds whatever the ramp or the tracking would do
            for p in model.parameters():
                level = float(opt.state[p][RATE_KEY].max())
                assert level <= math.exp(float(opt.state[p][CONTROLLER_KEY][CEILING])) * (1 + 1e-9)
                assert float(opt.state[p][CONTROLLER_KEY][RAMP]) == 0.0
        if t == 3:
            kept = [p.detach().clone() for p in model.parameters()]
            opt.observe_validation(_loss(model, VAL))
            assert all(float(opt.state[p][RAY_KEY][KEPT]) == 1.0 for p in model.parameters())
        if t == 6:
            levels = {p: float(opt.state[p][RATE_KEY].max()) for p in model.parameters()}
            opt.observe_validation(_loss(model, VAL))
            factor = 6 / (0.3 * 30)
            for p in model.parameters():
                assert float(opt.state[p][RAY_KEY][DONE]) == 1.0
                cap = float(opt.state[p][CONTROLLER_KEY][CEILING])
                assert cap == pytest.approx(math.log(levels[p] * factor), rel=1e-9, abs=1e-12)
                assert float(opt.state[p][RATE_KEY].max()) == pytest.approx(
                    levels[p] * factor, rel=1e-9
                )


def test_a_nan_observation_changes_nothing_and_a_resume_is_bit_exact():
    validation = {**RAY_ONLY, "ray_tau": -1.0, "ray_persist": 3, "ray_steps": 100}
    model, opt, _, _ = _overfitting_run(OPTIMIZERS["adam"], validation, steps=6)
    before = {p: copy.deepcopy(opt.state[p]) for p in model.parameters()}
    opt.observe_validation(_loss(model, VAL) * float("nan"))
    for p in model.parameters():
        for key in (RATE_KEY, CONTROLLER_KEY, VALIDATION_KEY, RAY_KEY, RAY_ANCHOR_KEY):
            torch.testing.assert_close(opt.state[p][key], before[p][key], rtol=0, atol=0)
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    twin = _model()
    twin.load_state_dict(weights)
    twin_opt = metalr.AdamHD(twin.parameters(), lr=LR, validation=validation)
    twin_opt.load_state_dict(saved)
    for m, o in ((model, opt), (twin, twin_opt)):
        for t in range(7, 16):
            _train_step(m, o, _data(10 + t))
            if t % 3 == 0:
                o.observe_validation(_loss(m, VAL))
    assert float(opt.state[next(model.parameters())][RAY_KEY][DONE]) == 1.0  # it acted
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        for key in (RATE_KEY, CONTROLLER_KEY, RAY_KEY, RAY_ANCHOR_KEY, SNAPSHOT_KEY):
            torch.testing.assert_close(opt.state[p][key], twin_opt.state[q][key], rtol=0, atol=0)


def test_the_loss_alone_leaves_the_ray_as_it_is():
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR,
                         validation={**RAY_ONLY, "ray_tau": -1.0, "hold": 40})  # fmt: skip
    _train_step(model, opt, TRAIN)
    _train_step(model, opt, _data(3))
    opt.observe_validation(0.5, hypergradient=False)
    assert all(float(opt.state[p][RAY_KEY].abs().sum()) == 0 for p in model.parameters())
    opt.observe_validation(_loss(model, VAL))  # with the gradient: τ -1 reads it at once
    assert all(float(opt.state[p][RAY_KEY][DONE]) == 1 for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"validation": {"ray_steps": 100, "rewind": 1.0}}, "'ray_steps'.*'rewind'"),
        ({"validation": {"ray_steps": -1}}, r"ray_steps"),
        ({"validation": {"ray_floor": 0.0}}, r"ray_floor"),
        ({"validation": {"ray_persist": 0.5}}, r"ray_persist"),
        ({"validation": {"ray_target": 0}}, r"ray_target"),
        ({"validation": {"ray_steps": 100}, "rule": "normalized"}, "rule='seek' only"),
    ],
)
def test_bad_ray_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        metalr.AdamHD(_model().parameters(), lr=LR, **kwargs)


def test_without_the_ray_no_anchor_is_kept():
    model, opt, _, _ = _overfitting_run(OPTIMIZERS["adam"], {"hypergrad_lr": 0.0}, steps=6)
    assert all(RAY_ANCHOR_KEY not in opt.state[p] and RAY_KEY not in opt.state[p]
               for p in model.parameters())  # fmt: skip


def test_the_workbench_fills_the_step_budget():
    from metalr.workbench.validation import with_step_budget

    spec = {"kind": "adam_hd", "validation": {"ray_steps": "budget", "hold": 0}}
    assert with_step_budget(spec, 700)["validation"] == {"ray_steps": 700.0, "hold": 0}
    assert spec["validation"]["ray_steps"] == "budget"  # the spec itself is left as it is
    plain = {"kind": "adam_hd"}
    assert with_step_budget(plain, 700) is plain


def _ddp_ray_run(rank: int | None) -> list[torch.Tensor]:
    """DDP over two ranks, each observing its own half of the validation batch (``process_group``
    "auto" averages the gradients), or one process observing the whole batch (``rank=None``)."""
    model = _model()
    module = model if rank is None else torch.nn.parallel.DistributedDataParallel(model)
    # c = -0.35, then -0.23 on this path: a snapshot at the first look, the action and the
    # rewind (at the end of the next step, on every rank) at the second
    validation = {**RAY_ONLY, "ray_steps": 30, "ray_before": 1.0, "ray_tau": -0.3}
    opt = metalr.AdamHD(module.parameters(), lr=LR, validation=validation)
    x_val, y_val = VAL
    half = slice(None) if rank is None else slice(8 * rank, 8 * rank + 8)
    for t in range(1, 10):
        x, y = _data(10 + t)
        opt.zero_grad()
        ((module(x[half]) - y[half]) ** 2).mean().backward()
        opt.step()
        if t % 3 == 0:
            opt.observe_validation(((model(x_val[half]) - y_val[half]) ** 2).mean())
    assert all(opt.state[p][RAY_KEY][DONE] == 1 == opt.state[p][RAY_KEY][KEPT]
               for p in model.parameters())  # fmt: skip
    return [p.detach().clone() for p in model.parameters()]


def _ddp_ray_rank(rank: int) -> list[torch.Tensor]:
    return _ddp_ray_run(rank)


def test_ddp_equals_one_process():
    from _distributed import run_ranks

    per_rank = run_ranks(_ddp_ray_rank)
    reference = _ddp_ray_run(None)
    for params in per_rank:
        for a, b in zip(params, reference):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_compiled_step_with_the_ray_equals_eager_without_recompiling():
    """``torch.compile(opt.step)``: the anchor is taken inside the first compiled step, the
    ray's ceiling and rewind act as in eager mode, and the observations (which write the
    controllers in place) add at most the rewind hook's graph, not a recompilation per
    observation."""
    from torch._dynamo.utils import counters

    # this path reads c = -0.35, then -0.23: a snapshot at the first look, the action (and the
    # rewind, in the compiled step's post hook) at the second
    validation = {**RAY_ONLY, "ray_steps": 30, "ray_before": 1.0, "ray_tau": -0.3}

    def run(compiled: bool, ray: bool = True) -> tuple[list[torch.Tensor], int]:
        torch._dynamo.reset()
        counters.clear()
        model = _model()
        opt = metalr.AdamHD(model.parameters(), lr=LR,
                            validation=validation if ray else {"hypergrad_lr": 0.0, "hold": 0})  # fmt: skip
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        for t in range(1, 13):
            opt.zero_grad()
            _loss(model, _data(10 + t)).backward()
            step()
            if t % 3 == 0:
                opt.observe_validation(_loss(model, VAL))
        if ray:
            assert all(opt.state[p][RAY_KEY][DONE] == 1 == opt.state[p][RAY_KEY][KEPT]
                       for p in model.parameters())  # fmt: skip
        return [p.detach().clone() for p in model.parameters()], counters["stats"]["unique_graphs"]

    eager, _ = run(compiled=False)
    compiled, graphs = run(compiled=True)
    _, baseline = run(compiled=True, ray=False)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert 0 < baseline and graphs <= baseline + 1


def test_a_second_look_before_the_step_keeps_the_rewind_due():
    """After the ray acts, another observation before the next step (a second validation
    batch) must not cancel the rewind it left due."""

    def run(second_look: bool) -> bool:
        model = _model()
        opt = metalr.AdamHD(model.parameters(), lr=LR, validation={
            **RAY_ONLY, "ray_tau": -0.3, "ray_steps": 30, "ray_before": 1.0})  # fmt: skip
        for t in range(1, 8):
            _train_step(model, opt, _data(10 + t))
            if t == 3:
                kept = [p.detach().clone() for p in model.parameters()]
            if t in (3, 6):
                opt.observe_validation(_loss(model, VAL))
            if t == 6 and second_look:
                rates = [opt.state[p][RATE_KEY].clone() for p in model.parameters()]
                opt.observe_validation(_loss(model, _data(99)))
                for p, r in zip(model.parameters(), rates):  # once only: nothing moves now
                    torch.testing.assert_close(opt.state[p][RATE_KEY], r, rtol=0, atol=0)
        return all(torch.equal(p.detach(), k) for p, k in zip(model.parameters(), kept))

    assert run(second_look=False) and run(second_look=True)


def test_the_anchor_of_a_resumed_run_is_taken_at_its_next_step_not_at_the_load():
    """A checkpoint without the ray (here: options of before it, no ``ray_*`` keys) loaded
    into an optimizer with it: nothing is created at the load (the model's weights may be
    loaded after the optimizer's), the anchor is the weights the next step starts from, and
    the options the checkpoint lacks take their defaults."""
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, validation={"hold": 0})
    for t in range(1, 4):
        _train_step(model, opt, _data(10 + t))
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        group["validation"] = {k: v for k, v in group["validation"].items()
                               if not k.startswith("ray_")}  # fmt: skip
    resumed = metalr.AdamHD(model.parameters(), lr=LR, validation={"ray_steps": 30})
    resumed.load_state_dict(saved)
    resumed.param_groups[0]["validation"]["ray_steps"] = 30.0  # the checkpoint's options won
    assert all(RAY_ANCHOR_KEY not in resumed.state[p] for p in model.parameters())
    start = [p.detach().clone() for p in model.parameters()]
    _train_step(model, resumed, _data(20))
    for p, s in zip(model.parameters(), start):
        torch.testing.assert_close(resumed.state[p][RAY_ANCHOR_KEY], s, rtol=0, atol=0)
    resumed.observe_validation(_loss(model, VAL))  # the missing ray_* keys: their defaults
    assert all(float(resumed.state[p][RAY_KEY][STREAK]) in (0.0, 1.0) for p in model.parameters())


def test_a_study_spec_may_ask_for_the_runs_budget():
    from metalr.workbench.optimizers import check_spec

    spec = {"kind": "adam_hd", "validation": {"ray_steps": "budget", "hold": 0}}
    assert check_spec("ray", spec) is spec
    with pytest.raises(ValueError, match=r"optimizers\.ray: .*ray_steps"):
        check_spec("ray", {"kind": "adam_hd", "validation": {"ray_steps": "soon"}})
