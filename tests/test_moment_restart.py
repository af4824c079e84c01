"""Adam's moments restarted at the ramp's first turn (``seek={"moment_restart": 1}``,
metalr.functional._moment_restart): the restart is a fresh Adam from the turn on, every path
(pure, single-tensor, foreach, the no-host-read branch) computes the same, resume is exact, and
the optimizers without Adam's moments refuse it."""

from __future__ import annotations

import copy

import pytest
import torch

import metalr
import metalr.functional._moment_restart as restart_module
from metalr.functional import adam_hd_step
from metalr.functional._controller import SINCE

F64 = torch.float64
RESTART = {"moment_restart": 1.0, "restart_match": 0.0}  # the plain restart (opt-in)
OFF = {"moment_restart": 0.0}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(
        F64
    )


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 4, generator=g, dtype=F64)
    return ((model(x) - (x[:, :2] * 2 - x[:, 2:])) ** 2).mean()


def _train(opt, model, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        opt.zero_grad()
        _loss(model, t).backward()
        opt.step()


def _first_turn(seek: dict | None = None, **options) -> int:
    """The step (1-based) at which the first tensor's controller first turns (the same with or
    without the restart, which acts after it; lagged steps turn later)."""
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek=seek, **options)
    first = next(model.parameters())
    for t in range(200):
        _train(opt, model, 1, start=t)
        if opt.state[first]["hd_controller"][SINCE] > 0:
            return t + 1
    raise AssertionError("no turn within 200 steps")


def test_the_run_is_unchanged_until_the_turn():
    assert metalr.functional.SEEK_DEFAULTS["moment_restart"] == 1.0  # with the match
    turn = _first_turn()
    runs = []
    for seek in (OFF, RESTART, None):
        model = _model()
        opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek=seek)
        _train(opt, model, turn - 1)
        runs.append([p.detach().clone() for p in model.parameters()])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_at_the_first_turn_the_moments_restart_and_the_next_step_is_a_fresh_adams():
    """At the turn m, v and the step count of each turning tensor are zero; the next step is
    Adam's first step from there (m̂/√v̂ = g/(|g| + ε)) at the rate the turn left, and the rates
    do not move at it (its previous direction is zero)."""
    turn = _first_turn()
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek=RESTART)
    _train(opt, model, turn)
    params = list(model.parameters())
    turned = [p for p in params if opt.state[p]["hd_controller"][SINCE] > 0]
    assert len(turned) == len(params), "a group's tensors turn together (the group cosine)"
    for p in turned:
        state = opt.state[p]
        assert state["step"].item() == 0
        assert torch.count_nonzero(state["exp_avg"]) == 0
        assert torch.count_nonzero(state["exp_avg_sq"]) == 0
    rates = {p: opt.state[p]["lr_multiplier"].clone() for p in params}
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    _loss(model, turn).backward()
    grads = {p: p.grad.clone() for p in params}
    opt.step()
    eps = opt.param_groups[0]["eps"]
    for p, old in zip(params, before):
        torch.testing.assert_close(opt.state[p]["lr_multiplier"], rates[p], rtol=0, atol=0)
        g = grads[p]
        expected = old - 3e-2 * rates[p] * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15)
        assert opt.state[p]["step"].item() == 1


def test_the_pure_step_restarts_what_the_optimizer_restarts():
    """adam_hd_step (the meta-learner's face) returns zero moments and step counts exactly for
    the tensors whose controller took its first turn, the rest as without the restart."""
    turn = _first_turn()
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek=RESTART)
    _train(opt, model, turn - 1)
    params = list(model.parameters())
    opt.zero_grad()
    _loss(model, turn - 1).backward()
    group = opt.param_groups[0]
    states = [opt.state[p] for p in params]
    beta1, beta2 = group["betas"]
    outs = {}
    for restart in (0.0, 1.0):
        outs[restart] = adam_hd_step(
            [p.detach() for p in params], [p.grad for p in params],
            [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["lr_multiplier"] for s in states], [s["step"] for s in states],
            lr=3e-2, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=0.0,
            decoupled_weight_decay=False, hypergrad_lr=group["hypergrad_lr"], rule="seek",
            granularity="tensor", lr_bounds=(0.0, float("inf")),
            controllers=[s["hd_controller"] for s in states],
            seek={**group["seek"], "moment_restart": restart},
        )  # fmt: skip
    (plain, ctrl), (restarted, ctrl_r) = outs[0.0], outs[1.0]
    turned = [bool(c[SINCE] > 0) for c in ctrl]
    assert any(turned)
    for i, flag in enumerate(turned):
        torch.testing.assert_close(ctrl_r[i], ctrl[i], rtol=0, atol=0)
        torch.testing.assert_close(restarted.params[i], plain.params[i], rtol=0, atol=0)
        for field in ("exp_avgs", "exp_avg_sqs", "steps"):
            expected = getattr(plain, field)[i] * (0 if flag else 1)
            torch.testing.assert_close(getattr(restarted, field)[i], expected, rtol=0, atol=0)
    opt.step()  # the optimizer's own step: the same state as the pure one
    for i, s in enumerate(states):
        torch.testing.assert_close(s["exp_avg"], restarted.exp_avgs[i], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(s["step"], restarted.steps[i], rtol=0, atol=0)


def test_the_meta_gradient_passes_the_restart():
    """Through the pure step at the turn and the fresh step after it, the loss's gradient with
    respect to the rates is finite and nonzero (the restart zeroes moments, not the graph)."""
    turn = _first_turn()
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek=RESTART)
    _train(opt, model, turn - 1)
    params = [p.detach().clone() for p in model.parameters()]
    states = [opt.state[p] for p in model.parameters()]
    group = opt.param_groups[0]
    log_rates = [s["lr_multiplier"].log().clone().requires_grad_() for s in states]
    moments = ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states])
    rates, steps = [r.exp() for r in log_rates], [s["step"] for s in states]
    controllers = [s["hd_controller"] for s in states]
    for t in (turn - 1, turn):
        grads = _grads(params, t)
        state, controllers = adam_hd_step(
            params, grads, *moments, rates, steps, lr=3e-2, beta1=group["betas"][0],
            beta2=group["betas"][1], eps=group["eps"], weight_decay=0.0,
            decoupled_weight_decay=False, hypergrad_lr=group["hypergrad_lr"], rule="seek",
            granularity="tensor", lr_bounds=(0.0, float("inf")), controllers=controllers,
            seek=group["seek"],
        )  # fmt: skip
        if t == turn - 1:
            assert all(int(s) == 0 for s in state.steps), "the moments restarted at the turn"
        params, moments = state.params, (state.exp_avgs, state.exp_avg_sqs)
        rates, steps = state.rates, state.steps
    loss = _loss_of(params, turn + 1)
    meta = torch.autograd.grad(loss, log_rates)
    assert all(torch.isfinite(g).all() for g in meta)
    assert any(g.abs().sum() > 0 for g in meta)


def _forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def _loss_of(params: list[torch.Tensor], step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 4, generator=g, dtype=F64)
    return ((_forward(params, x) - (x[:, :2] * 2 - x[:, 2:])) ** 2).mean()


def _grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    leaves = [p if p.requires_grad else p.detach().requires_grad_() for p in params]
    grads = torch.autograd.grad(_loss_of(leaves, step), leaves, create_graph=True)
    return list(grads)


@pytest.mark.parametrize("options", [
    {"foreach": False}, {"foreach": True}, {"granularity": "element"}, {"granularity": "group"},
    {"lagged": True},
], ids=["single", "foreach", "element", "group", "lagged"])  # fmt: skip
@pytest.mark.parametrize("host_reads", [True, False], ids=["host_reads", "no_host_reads"])
def test_every_path_restarts_alike(options, host_reads, monkeypatch):
    """Each path, and the restart's branch that never reads a flag on the host (accelerators),
    gives the parameters and state of the single-tensor path with host reads (float64)."""
    reference_options = {k: v for k, v in options.items() if k in ("granularity", "lagged")}
    reference = run_path(monkeypatch, {**reference_options, "foreach": False}, True, RESTART)
    for a, b in zip(run_path(monkeypatch, options, host_reads, RESTART), reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def run_path(monkeypatch, options: dict, host_reads: bool, seek: dict) -> list[torch.Tensor]:
    """Parameters and Adam state after ten steps past the first turn, on the path ``options``
    choose; ``host_reads=False`` takes the restart's branch that never reads a flag on the
    host (as on accelerators)."""
    if not host_reads:
        monkeypatch.setattr(restart_module, "host_readable", lambda _t: False)
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek=seek, **options)
    _train(opt, model, _first_turn() + 10)
    monkeypatch.undo()
    out = [p.detach() for p in model.parameters()]
    for p in model.parameters():
        out += [opt.state[p][k] for k in ("exp_avg", "exp_avg_sq", "step", "lr_multiplier")]
    return out


def test_the_fused_step_restarts_alike(monkeypatch):
    """fused=True (on the CPU in float64: the compiled pure step) restarts as the eager path."""
    test_every_path_restarts_alike({"fused": True}, True, monkeypatch)


@pytest.mark.parametrize("seek", [RESTART, {"moment_restart": 1.0, "restart_match": 1.0}],
                         ids=["plain", "matched"])  # fmt: skip
def test_a_restarted_run_resumes_bit_for_bit(seek):
    turn = _first_turn()
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek=seek)
    _train(opt, model, turn + 20)
    straight = [p.detach().clone() for p in model.parameters()]

    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek=seek)
    _train(opt, model, turn - 1)  # saved the step before the turn
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    model = _model(seed=1)
    model.load_state_dict(saved_model)
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek=seek)
    opt.load_state_dict(saved_opt)
    _train(opt, model, 21, start=turn - 1)
    for a, b in zip(straight, model.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=0)


@pytest.mark.parametrize("make", [
    lambda ps, seek: metalr.SGDHD(ps, lr=0.1, momentum=0.9, seek=seek),
    lambda ps, seek: metalr.HyperLR(torch.optim.Adam(ps), seek=seek),
    lambda ps, seek: metalr.AdamHD(ps, seek={"moment_restart": 1.5}),
    lambda ps, seek: metalr.AdamHD(ps, seek={"moment_restart": -1.0}),
], ids=["sgd_hd", "hyper_lr", "above_range", "below_range"])  # fmt: skip
def test_bad_or_unsupported_moment_restart_is_refused_by_name(make):
    with pytest.raises(ValueError, match="moment_restart"):
        make(torch.nn.Linear(2, 2).parameters(), RESTART)


def test_a_param_group_of_sgd_hd_cannot_ask_for_it():
    opt = metalr.SGDHD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="moment_restart"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "seek": RESTART})
    adam = metalr.AdamHD(torch.nn.Linear(2, 2).parameters())
    adam.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "seek": RESTART})
    assert adam.param_groups[1]["seek"]["moment_restart"] == 1.0
