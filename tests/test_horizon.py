"""The seek rule's long-horizon signal (``seek={"horizon": μ}``, metalr.functional._trail):
the trail is the discounted sum of the steps taken, the tracking phase reads the gradient's
cosine with it, every path computes the same, and state, skips, resume and errors behave."""

from __future__ import annotations

import copy

import pytest
import torch

import metalr
from metalr.functional import adam_hd_step
from metalr.functional._controller import seek_update
from metalr.functional._signals import seek_signals
from metalr.functional._trail import TRAIL_KEY

F64 = torch.float64


def _model(seed: int = 0, dtype: torch.dtype = F64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(
        dtype
    )


def _batch(step: int, dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 4, generator=g, dtype=F64)
    return x.to(dtype), (x[:, :2] * 2 - x[:, 2:]).to(dtype)


def _train(opt, model, steps: int, start: int = 0, dtype: torch.dtype = F64) -> list:
    seen = [[p.detach().clone() for p in model.parameters()]]
    for t in range(start, start + steps):
        x, y = _batch(t, dtype)
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append([p.detach().clone() for p in model.parameters()])
    return seen


@pytest.mark.parametrize("make", [
    lambda ps: metalr.AdamHD(ps, lr=3e-2, seek={"horizon": 0.9}),
    lambda ps: metalr.SGDHD(ps, lr=3e-2, momentum=0.9, seek={"horizon": 0.9}),
    lambda ps: metalr.SGDHD(ps, lr=3e-2, momentum=0.9, nesterov=True, seek={"horizon": 0.9}),
], ids=["adam", "sgd_momentum", "sgd_nesterov"])  # fmt: skip
def test_trail_is_the_discounted_sum_of_the_steps_taken(make):
    """After step t the trail is Z_{t-1} = Σ_{j<t} μ^{t-1-j} (θ_{j-1} − θ_j): every step taken
    but the last, each its own rate times its direction (float64, no weight decay)."""
    model = _model()
    opt = make(model.parameters())
    seen = _train(opt, model, 12)
    mu = 0.9
    for i, p in enumerate(model.parameters()):
        expected = torch.zeros_like(p)
        for j in range(1, 12):  # steps 1 … 11 (the 12th is not in the trail yet)
            expected = mu * expected + (seen[j - 1][i] - seen[j][i])
        torch.testing.assert_close(opt.state[p][TRAIL_KEY], expected, rtol=1e-10, atol=1e-14)


def test_tracking_reads_the_gradients_cosine_with_the_trail():
    """One step's new rates equal the seek controller fed, per tensor, with cos(g_t, Z_{t-1})
    computed by hand (Z_{t-1} = μ Z_{t-2} + η m d_{t-1}) and the greedy group cosine."""
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek={"horizon": 0.8})
    _train(opt, model, 80)  # past the ramp (it turns near step 55 here): settled rates
    params = list(model.parameters())
    before = copy.deepcopy(opt.state_dict())
    group = opt.param_groups[0]
    x, y = _batch(80)
    loss = ((model(x) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in params]
    beta1, beta2 = group["betas"]
    states = [opt.state[p] for p in params]
    directions, staged = [], []
    for s in states:
        t = float(s["step"])
        m_hat = s["exp_avg"] / (1 - beta1**t)
        v_hat = s["exp_avg_sq"] / (1 - beta2**t)
        d = m_hat / (v_hat.sqrt() + group["eps"])
        directions.append(d)
        staged.append(0.8 * s[TRAIL_KEY] + group["lr"] * s["lr_multiplier"] * d)
    cosines = [(g * z).sum() / (g.norm() * z.norm()) for g, z in zip(grads, staged)]
    greedy = seek_signals(grads, directions, "tensor")
    assert all(float(s["hd_controller"][0]) == 0 for s in states)  # settled: tracking
    expected, _ = seek_update(
        [s["lr_multiplier"].clone() for s in states], [s["hd_controller"].clone() for s in states],
        cosines, greedy.group_signal, greedy.active, [p.numel() for p in params],
        hypergrad_lr=group["hypergrad_lr"], seek=group["seek"], granularity="tensor",
        grad_norm=greedy.grad_norm,
    )  # fmt: skip
    opt.step()
    for s, e in zip(states, expected):
        torch.testing.assert_close(s["lr_multiplier"], e, rtol=1e-12, atol=0)
    for s, z in zip(states, staged):
        torch.testing.assert_close(s[TRAIL_KEY], z, rtol=1e-12, atol=1e-15)
    assert before["state"][0]["step"] + 1 == opt.state_dict()["state"][0]["step"]


@pytest.mark.parametrize("horizon, rises", [(0.0, False), (0.99, True)])
def test_oscillating_steps_cancel_in_the_trail(horizon, rises):
    """SGD-HD without momentum fed g_t = ((-1)^t, 0.3): successive steps disagree along the
    first axis (the greedy cosine is negative, so its rate falls) while the second axis makes
    steady progress; in the trail the oscillation cancels and the rate rises instead."""
    w = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    seek = {"horizon": horizon} if horizon else {}
    opt = metalr.SGDHD([w], lr=0.1, momentum=0.0, seek=seek)
    rates = []
    for t in range(200):
        w.grad = torch.tensor([(-1.0) ** t, 0.3], dtype=F64)
        opt.step()
        rates.append(float(opt.state[w]["lr_multiplier"]))
    settled = rates[2]  # the turn comes at once: the greedy group cosine is negative
    if rises:
        assert rates[-1] > 2.0 * settled
    else:
        assert rates[-1] < 0.2 * settled


@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
def test_every_path_computes_the_same(granularity):
    """foreach and single-tensor (in place) give the same parameters, rates and trails (float64;
    the pure step under autograd is checked against them in the finite-difference test)."""
    runs = []
    for options in ({"foreach": True}, {"foreach": False}):
        model = _model()
        opt = metalr.AdamHD(model.parameters(), lr=3e-2, granularity=granularity,
                            seek={"horizon": 0.95}, weight_decay=1e-2, **options)  # fmt: skip
        _train(opt, model, 25)
        runs.append([(p.detach(), opt.state[p]["lr_multiplier"], opt.state[p][TRAIL_KEY])
                     for p in model.parameters()])  # fmt: skip
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)


def test_a_non_finite_gradient_leaves_the_trail_and_rates():
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek={"horizon": 0.9})
    _train(opt, model, 6)
    before = copy.deepcopy(opt.state_dict())
    x, y = _batch(6)
    ((model(x) - y) ** 2).mean().backward()
    next(iter(model.parameters())).grad[0, 0] = float("nan")
    opt.step()
    after = opt.state_dict()
    for key, state in before["state"].items():
        assert TRAIL_KEY in state
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after["state"][key][name], value), name


def test_resume_is_bit_exact():
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek={"horizon": 0.95})
    _train(opt, model, 16)
    straight = [p.detach().clone() for p in model.parameters()]

    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek={"horizon": 0.95})
    _train(opt, model, 8)
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    model = _model(seed=1)
    model.load_state_dict(weights)
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek={"horizon": 0.95})
    opt.load_state_dict(saved)
    _train(opt, model, 8, start=8)
    for a, b in zip(straight, model.parameters()):
        assert torch.equal(a, b.detach())


def test_half_precision_keeps_a_float32_trail_across_a_checkpoint():
    model = _model(dtype=torch.bfloat16)
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek={"horizon": 0.9})
    _train(opt, model, 3, dtype=torch.bfloat16)
    saved = copy.deepcopy(opt.state_dict())
    fresh = metalr.AdamHD(model.parameters(), lr=3e-2, seek={"horizon": 0.9})
    fresh.load_state_dict(saved)
    for p in model.parameters():
        assert fresh.state[p][TRAIL_KEY].dtype == torch.float32
        assert torch.equal(fresh.state[p][TRAIL_KEY], opt.state[p][TRAIL_KEY])


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_a_horizon_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match="horizon"):
        metalr.AdamHD(_model().parameters(), seek={"horizon": bad})


def test_the_pure_step_takes_and_returns_trails():
    """adam_hd_step with trails returns (state, controllers, trails); horizon > 0 without
    trails (or trails without it) is refused rather than read greedily."""
    w = torch.ones(3, dtype=F64)
    seek = {**metalr.functional.SEEK_DEFAULTS, "horizon": 0.9}
    kwargs = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
              "decoupled_weight_decay": False, "hypergrad_lr": 0.04, "rule": "seek",
              "granularity": "tensor", "lr_bounds": (0.0, float("inf")), "seek": seek}  # fmt: skip
    state = ([w], [torch.zeros(3, dtype=F64)], [torch.zeros(3, dtype=F64)],
             [torch.ones((), dtype=F64)], [torch.zeros((), dtype=F64)])  # fmt: skip
    ctrl = [metalr.functional.initial_controller(w, F64, seek)]
    out = adam_hd_step(state[0], [w.clone()], *state[1:], controllers=ctrl,
                       trails=[torch.zeros(3, dtype=F64)], **kwargs)  # fmt: skip
    assert len(out) == 3 and out[2][0].shape == w.shape
    with pytest.raises(ValueError, match="horizon"):
        adam_hd_step(state[0], [w.clone()], *state[1:], controllers=ctrl, **kwargs)


@pytest.mark.parametrize("cls", [metalr.AdamHD, metalr.SGDHD], ids=lambda c: c.__name__)
def test_the_pure_step_under_autograd_computes_what_the_in_place_path_does(cls):
    """differentiable=True (the pure step written back, reading clones under autograd) and the
    default in-place path give the same parameters after settled steps that read the trail
    (their gradients are checked against finite differences in test_single_tensor_path)."""
    options = {"weight_decay": 0.1, "seek": {"horizon": 0.9, "turn_threshold": 1.0}}
    if cls is metalr.SGDHD:
        options["momentum"] = 0.9
    w0 = torch.tensor([0.3, -1.2, 0.7, 0.1], dtype=F64, requires_grad=True)
    finals = []
    for differentiable in (True, False):
        p = w0.clone() if differentiable else w0.detach().clone()
        opt = cls([p], lr=torch.tensor(0.05, dtype=F64), differentiable=differentiable, **options)
        for t in range(6):
            p.grad = torch.sin((t + 1) * w0.detach()) + 0.1 * t
            opt.step()
        finals.append(p.detach())
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-12, atol=0)


def test_hyper_lr_keeps_a_trail():
    model = _model()
    inner = torch.optim.Adam(model.parameters(), lr=3e-2)
    opt = metalr.HyperLR(inner, seek={"horizon": 0.9})
    _train(opt, model, 10)
    for p in model.parameters():
        trail = opt.state[p][TRAIL_KEY]
        assert trail.shape == p.shape and torch.isfinite(trail).all() and trail.abs().sum() > 0


def test_the_held_out_study_runs_and_reads_study_1s_records(tmp_path, capsys):
    """experiments/horizon_heldout.py end to end at smoke size (appends its runs, reruns skip
    them), and its reference from study 1's committed records: best-of-grid Adam per task is
    the lowest seed-mean over the grid, and AdamHD's per-cell means are the records' own."""
    import sys
    from pathlib import Path

    experiments = Path(__file__).resolve().parents[1] / "experiments"
    sys.path.insert(0, str(experiments))
    import horizon_heldout

    horizon_heldout.main(["--horizon", "0.9", "--smoke", "--workers", "1", "--out",
                          str(tmp_path)])  # fmt: skip
    assert "15 cells, all finite: True" in capsys.readouterr().out
    lines = (tmp_path / "runs_smoke.jsonl").read_text().splitlines()
    assert len(lines) == 45  # 3 tasks x 5 rates x 3 seeds
    horizon_heldout.main(["--horizon", "0.9", "--smoke", "--workers", "1", "--out",
                          str(tmp_path)])  # fmt: skip
    assert len((tmp_path / "runs_smoke.jsonl").read_text().splitlines()) == 45  # nothing rerun
    adam, hd = horizon_heldout.study1_reference()
    assert set(adam) == set(horizon_heldout.TASKS) and len(hd) == 15
    import csv  # the study's own summary (written by its report) agrees with the records

    rows = list(csv.DictReader((experiments / "results/ablate_study1/summary.csv").open()))
    for task in adam:
        means = {
            float(r["lr"]): float(r["val_loss_mean"])
            for r in rows
            if r["task"] == task and r["optimizer"] == "adam" and r["val_loss_mean"]
        }
        assert adam[task] == pytest.approx(min(means.values()), rel=1e-9)
        for lr in horizon_heldout.LRS:
            hd_mean = next(
                float(r["val_loss_mean"])
                for r in rows
                if r["task"] == task and r["optimizer"] == "adam_hd" and float(r["lr"]) == lr
            )
            assert hd[(task, lr)] == pytest.approx(hd_mean, rel=1e-9)


def test_fused_true_compiles_the_pure_step_with_its_trail():
    """No kernel reads the trail: fused=True takes the torch.compile'd pure step, which keeps
    the trail as the eager path does (float32; compiled kernels reorder sums: 1e-5)."""

    def run(**options):
        model = _model(dtype=torch.float32)
        opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek={"horizon": 0.9}, **options)
        _train(opt, model, 6, dtype=torch.float32)
        return [(p.detach(), opt.state[p][TRAIL_KEY]) for p in model.parameters()]

    for (p_fused, z_fused), (p_eager, z_eager) in zip(run(fused=True), run()):
        torch.testing.assert_close(p_fused, p_eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z_fused, z_eager, rtol=1e-4, atol=1e-7)


def test_hypergrad_lr_0_moves_nothing_and_keeps_the_trail_on_every_path():
    """β = 0 switches the rule off (nothing moves): with a trail the pure step returned None
    for it and the write-back under autograd raised; now every path keeps it (zeros) and the
    parameters are the same."""
    w0 = torch.tensor([0.3, -1.2, 0.7], dtype=F64, requires_grad=True)
    finals = []
    for differentiable in (True, False):
        p = w0.clone() if differentiable else w0.detach().clone()
        opt = metalr.AdamHD([p], lr=torch.tensor(0.05, dtype=F64), hypergrad_lr=0.0,
                            differentiable=differentiable, seek={"horizon": 0.9})  # fmt: skip
        for t in range(3):
            p.grad = torch.sin((t + 1) * w0.detach())
            opt.step()
        assert torch.equal(opt.state[p][TRAIL_KEY], torch.zeros_like(p))
        finals.append((p.detach(), opt.state[p]["lr_multiplier"]))
    torch.testing.assert_close(finals[0], finals[1], rtol=0, atol=0)
