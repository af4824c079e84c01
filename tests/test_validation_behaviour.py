"""``observe_validation`` as a user meets it: rates fall when validation rises, the brake, state
and resume, non-finite input, schedulers, AMP, ``torch.compile``, bad input and old checkpoints.
The equations themselves are checked in ``test_validation_signal.py``."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from _validation_setup import LR, OPTIMIZERS, TRAIN, VAL, _data, _loss, _model, _train_step

import metalr
from metalr.functional.validation import VALIDATION_DEFAULTS, initial_validation_stats
from metalr.optim._base import RATE_KEY, VALIDATION_KEY


@pytest.mark.parametrize("rule", ["seek", "normalized"])
def test_rates_fall_when_validation_rises_while_training_falls(rule):
    """Linear regression whose validation targets disagree with the training ones: every
    training step lowers the training loss and raises the validation loss."""
    torch.manual_seed(0)
    x = torch.randn(64, 8, dtype=torch.float64)
    w_train, w_val = torch.randn(8, 1, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    model = torch.nn.Linear(8, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_val.T)  # start at the validation optimum
    kw = {"seek": {"ramp_rate": 0.0, "init_scale": 1.0}} if rule == "seek" else {}
    opt = metalr.AdamHD(model.parameters(), lr=1e-2, rule=rule, **kw)
    train_losses, val_losses, rates = [], [], []
    for step in range(1, 61):
        loss = ((model(x) - x @ w_train) ** 2).mean()
        train_losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0:
            val_losses.append(float(opt.observe_validation(((model(x) - x @ w_val) ** 2).mean())))
            rates.append(float(opt.state[model.weight][RATE_KEY]))
    assert train_losses[-1] < 0.9 * train_losses[0]
    assert val_losses[-1] > val_losses[0]
    assert rates[-1] < 0.5 * rates[0], rates
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(rates))  # never rises


@pytest.mark.parametrize("climb", [1.0, 0.0])
@pytest.mark.parametrize("rule", ["seek", "normalized", "additive"])
def test_climb_zero_lets_the_validation_signal_only_hold_rates_back(rule, climb):
    """Validation data from the training distribution (its gradient agrees with the steps):
    with climb 1 some observations raise a rate; with climb 0 none does."""
    torch.manual_seed(0)
    x, w = torch.randn(256, 8, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    y = x @ w + 0.1 * torch.randn(256, 1, dtype=torch.float64)
    model = torch.nn.Linear(8, 1).double()
    kw = {"seek": {"ramp_rate": 0.0, "init_scale": 1.0}} if rule == "seek" else {}
    beta = {"additive": {"hypergrad_lr": 1e-4}}.get(rule, {})
    # the hold off: it raises rates to their last level while the loss improves (its own tests)
    seek_only = {"evidence": -0.5, "hold": 0} if rule == "seek" else {}
    opt = metalr.AdamHD(model.parameters(), lr=1e-3, rule=rule,
                        validation={"climb": climb, **seek_only, **beta}, **kw)  # fmt: skip
    rises = 0
    for step in range(1, 41):
        idx = torch.randint(0, 192, (32,))
        opt.zero_grad()
        ((model(x[idx]) - y[idx]) ** 2).mean().backward()
        opt.step()
        if step % 4 == 0:
            before = [opt.state[p][RATE_KEY].clone() for p in model.parameters()]
            opt.observe_validation(((model(x[192:]) - y[192:]) ** 2).mean())
            after = [opt.state[p][RATE_KEY] for p in model.parameters()]
            rises += sum(int((a > b).any()) for a, b in zip(after, before))
    assert (rises > 0) == (climb == 1.0), rises


def test_observe_validation_leaves_grad_and_weights_alone():
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR)
    _train_step(model, opt)
    grads = [p.grad.clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    out = opt.observe_validation(lambda: _loss(model, VAL))  # a closure works too
    assert not out.requires_grad and float(out) == pytest.approx(float(_loss(model, VAL)))
    for p, g, w in zip(model.parameters(), grads, weights):
        assert torch.equal(p.grad, g) and torch.equal(p.detach(), w)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_validation_changes_nothing(bad, where):
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, seek={"ramp_rate": 0.0, "init_scale": 1.0})
    for _ in range(3):
        _train_step(model, opt)
    opt.observe_validation(_loss(model, VAL))
    before = copy.deepcopy(opt.state_dict())
    if where == "loss":
        loss = _loss(model, VAL) + bad
    else:  # a finite loss whose gradient is not (0 · inf)
        loss = _loss(model, VAL) + 0 * (model[0].weight.sum() * bad)
    opt.observe_validation(loss)
    after = opt.state_dict()
    for pid, s in before["state"].items():
        for key, value in s.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after["state"][pid][key], value), key
            else:  # the flag that the group follows the validation signal
                assert after["state"][pid][key] == value, key
    _train_step(model, opt)  # and the run goes on, finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "hyperlr_rmsprop"])
def test_resume_is_bit_exact(name):
    def run(model, opt, start, stop):
        for step in range(start, stop):
            _train_step(model, opt, _data(100 + step))
            if step % 3 == 0:
                opt.observe_validation(_loss(model, _data(200 + step)))

    model_a = _model()
    opt_a = OPTIMIZERS[name](model_a.parameters())
    run(model_a, opt_a, 0, 20)
    model_b = _model()
    opt_b = OPTIMIZERS[name](model_b.parameters())
    run(model_b, opt_b, 0, 10)
    saved = (copy.deepcopy(model_b.state_dict()), copy.deepcopy(opt_b.state_dict()))
    model_c = _model(seed=5)
    opt_c = OPTIMIZERS[name](model_c.parameters())
    model_c.load_state_dict(saved[0])
    opt_c.load_state_dict(saved[1])
    assert opt_c._follows_validation(opt_c.param_groups[0])
    run(model_c, opt_c, 10, 20)
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        for key in (RATE_KEY, VALIDATION_KEY):
            assert torch.equal(opt_a.state[p][key], opt_c.state[q][key])


def test_training_signal_stops_tracking_once_validation_is_observed():
    """seek, settled, train_weight 0: between observations the rate holds."""
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, seek={"ramp_rate": 0.0, "init_scale": 1.0},
                        validation={"train_weight": 0.0})  # fmt: skip
    _train_step(model, opt)
    _train_step(model, opt)
    moved = float(opt.state[model[0].weight][RATE_KEY])
    assert moved != 1.0  # the training signal tracks before any observation
    opt.observe_validation(_loss(model, VAL))
    held = opt.state[model[0].weight][RATE_KEY].clone()
    for _ in range(3):
        _train_step(model, opt)
    assert torch.equal(opt.state[model[0].weight][RATE_KEY], held)


def test_scheduler_and_observations_compose():
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, seek={"ramp_rate": 0.0, "init_scale": 1.0})
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(6):
        _train_step(model, opt)
        sched.step()
        opt.observe_validation(_loss(model, VAL))
    eff = opt.effective_lrs()
    for p in model.parameters():  # effective rate = scheduled lr × the learned multiplier
        torch.testing.assert_close(eff[p], opt.param_groups[0]["lr"] * opt.state[p][RATE_KEY])
    assert opt.param_groups[0]["lr"] == pytest.approx(LR / 8)


def test_bfloat16_autocast_and_grad_scaler():
    model = _model().float()
    opt = metalr.AdamHD(model.parameters(), lr=LR, seek={"ramp_rate": 0.0, "init_scale": 1.0})
    x, y = (t.float() for t in TRAIN)
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    ref = copy.deepcopy(opt.state_dict())
    xv, yv = (t.float() for t in VAL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        val = ((model(xv) - yv) ** 2).mean()
    opt.observe_validation(val)
    rates = [opt.state[p][RATE_KEY].clone() for p in model.parameters()]
    assert all(torch.isfinite(r) and r != 1.0 for r in rates)
    # a GradScaler's scale cancels: the same rates as observing the unscaled loss
    opt.load_state_dict(ref)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        val = ((model(xv) - yv) ** 2).mean()
    opt.observe_validation(val, scaler=scaler)
    for p, r in zip(model.parameters(), rates):
        torch.testing.assert_close(opt.state[p][RATE_KEY], r)


def test_compiled_model_and_fused_step():
    model = _model().float()
    compiled = torch.compile(model, backend="eager")
    opt = metalr.AdamHD(model.parameters(), lr=LR, fused=True)
    x, y = (t.float() for t in TRAIN)
    xv, yv = (t.float() for t in VAL)
    eager = _model().float()
    opt_e = metalr.AdamHD(eager.parameters(), lr=LR)
    for _ in range(12):
        for m, o in ((compiled, opt), (eager, opt_e)):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
            o.observe_validation(((m(xv) - yv) ** 2).mean())
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(opt.state[p][RATE_KEY], opt_e.state[q][RATE_KEY])
        torch.testing.assert_close(p, q)


def test_bad_input_is_refused_with_the_argument_named():
    model = _model()
    opt = metalr.AdamHD(model.parameters())
    with pytest.raises(ValueError, match="observe_validation"):
        opt.observe_validation(1.0)
    with pytest.raises(ValueError, match="requires grad"):
        opt.observe_validation(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"Invalid validation\['hypergrad_lr'\] value: -1"):
        metalr.AdamHD(model.parameters(), validation={"hypergrad_lr": -1})
    with pytest.raises(ValueError, match="Invalid validation key: 'beta'"):
        metalr.SGDHD(model.parameters(), validation={"beta": 0.1})
    with pytest.raises(ValueError, match=r"validation\['train_weight'\]"):
        metalr.HyperLR(torch.optim.SGD(model.parameters(), lr=0.1), validation={"train_weight": 2})
    with pytest.raises(ValueError, match=r"validation\['climb'\]"):
        metalr.AdamHD(model.parameters(), validation={"climb": 1.5})
    for bad in (-0.5, 11.0):
        with pytest.raises(ValueError, match=r"validation\['noise_hold'\]"):
            metalr.AdamHD(model.parameters(), validation={"noise_hold": bad})
    assert opt.param_groups[0]["validation"] == VALIDATION_DEFAULTS


def test_checkpoint_without_validation_options_loads():
    """A checkpoint written before issue 11 (no 'validation' in its groups) loads with defaults."""
    model = _model()
    opt = metalr.AdamHD(model.parameters())
    _train_step(model, opt)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["validation"]
    fresh = metalr.AdamHD(_model().parameters())
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["validation"] == VALIDATION_DEFAULTS


def test_additive_validation_beta_defaults_to_the_training_one():
    """The additive β is in rate units: the scale-free default would be meaningless there."""
    model = _model()
    assert metalr.AdamHD(model.parameters(), rule="additive").param_groups[0]["validation"][
        "hypergrad_lr"
    ] == pytest.approx(1e-7)
    opt = metalr.SGDHD(model.parameters(), rule="additive", hypergrad_lr=2e-3)
    assert opt.param_groups[0]["validation"]["hypergrad_lr"] == pytest.approx(2e-3)
    given = metalr.SGDHD(model.parameters(), rule="additive", validation={"hypergrad_lr": 0.5})
    assert given.param_groups[0]["validation"]["hypergrad_lr"] == 0.5


@pytest.mark.parametrize("rule", ["seek", "normalized", "additive"])
def test_an_observation_before_the_first_step_changes_nothing(rule):
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, rule=rule)
    opt.observe_validation(_loss(model, VAL))  # no last direction yet
    assert not opt.state  # no parameter observed, no state created (test_validation_edges)


def _hold_run(seek: dict, validation: dict, observe_from: int, steps: int = 40, hold_from=None):
    """A settled seek AdamHD (no ramp) on a noisy regression: the rates after each step, with a
    validation observation every 5 steps from ``observe_from`` on (the seek set's own
    ``noise_hold`` 0 unless ``seek`` says otherwise; ``hold_from``: the step after which it is set
    to 2)."""
    torch.manual_seed(3)
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, seek={"ramp_rate": 0.0, "init_scale": 1.0,
                        "noise_hold": 0.0, **seek}, validation=validation)  # fmt: skip
    g = torch.Generator().manual_seed(7)
    rates = []
    for t in range(1, steps + 1):
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        _train_step(model, opt, (x, torch.randn(8, 2, generator=g, dtype=torch.float64)))
        if t >= observe_from and t % 5 == 0:
            opt.observe_validation(_loss(model, VAL))
        if t == hold_from:
            opt.param_groups[0]["seek"]["noise_hold"] = 2.0
        rates.append([float(opt.state[p][RATE_KEY]) for p in model.parameters()])
    return rates


def test_validation_noise_hold_is_the_seek_hold_while_the_validation_signal_is_followed():
    """``validation={"noise_hold": h}``: before the first observation the rule runs with the seek
    set's own hold (here none), from it on exactly as with the seek set's ``noise_hold`` at
    ``h``; the larger of the two wins; the hold slows the anneal (the rates end higher)."""
    hold = {"noise_hold": 2.0}
    plain = _hold_run({}, {}, observe_from=20)
    via_validation = _hold_run({}, hold, observe_from=20)
    via_seek = _hold_run({}, {}, observe_from=20, hold_from=20)  # the seek set's, from step 21
    # the seek set's 2 against the validation option's 1: the larger holds
    larger_seek = _hold_run({}, {"noise_hold": 1.0}, observe_from=20, hold_from=20)
    assert via_validation[:20] == plain[:20]  # no observation yet: the seek set's hold (0)
    assert via_validation == via_seek and larger_seek == via_seek
    assert _hold_run({}, {"noise_hold": 1.0}, observe_from=20) != via_seek
    never = _hold_run({}, hold, observe_from=10_000)  # never observed: the option does nothing
    assert never == _hold_run({}, {}, observe_from=10_000)
    # where the rule anneals after step 20, the held rates fall less
    annealed = [i for i, (a, b) in enumerate(zip(plain[-1], plain[19])) if a < b]
    assert annealed and all(via_validation[-1][i] > plain[-1][i] for i in annealed)


def test_checkpoint_without_the_validation_noise_hold_resumes_without_it():
    """A checkpoint from before the option (its validation options lack ``noise_hold``, its seek
    set has the hold of its day, 0) resumes as it ran: no hold."""
    model = _model()
    opt = metalr.AdamHD(
        model.parameters(), lr=LR, seek={"ramp_rate": 0.0, "init_scale": 1.0, "noise_hold": 0.0}
    )
    _train_step(model, opt)
    opt.observe_validation(_loss(model, VAL))
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        del group["validation"]["noise_hold"]
    resumed = metalr.AdamHD(model.parameters(), lr=LR)
    resumed.load_state_dict(sd)
    assert "noise_hold" not in resumed.param_groups[0]["validation"]
    assert resumed._controller_args(resumed.param_groups[0], [])["seek"]["noise_hold"] == 0.0


@pytest.mark.parametrize(
    ("make", "options"),
    [(metalr.AdamHD, {"train_weight": 0.0}), (metalr.AdamHD, {"train_weight": 0.5}),
     (metalr.SGDHD, {"train_weight": 0.0})],
)  # fmt: skip
@pytest.mark.parametrize("rule", ["seek", "normalized"])
def test_a_non_finite_first_observation_does_not_switch_the_group(make, options, rule):
    """The first observation switches a group to the validation signal (its training signal then
    keeps ``train_weight``): a NaN loss may not, so the run goes on exactly as one that never
    observed, with its validation statistics as the first step created them; a NaN before any
    step creates no rate either."""
    runs = []
    for observe in (False, True):
        model = _model()
        opt = make(model.parameters(), lr=LR, rule=rule, validation=options)
        if observe:
            opt.observe_validation(_loss(model, VAL) * float("nan"))  # before any step
            assert not opt.state, "a NaN observation created state"
        for step in range(1, 13):
            _train_step(model, opt)
            if observe and step == 4:
                opt.observe_validation(_loss(model, VAL) * float("nan"))
                assert not opt._follows_validation(opt.param_groups[0])
                fresh = initial_validation_stats(next(model.parameters()), torch.float32)
                for p in model.parameters():
                    assert torch.equal(opt.state[p][VALIDATION_KEY], fresh)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
