"""The moment restart's size match (``seek={"moment_restart": 1, "restart_match": 1}``,
metalr.functional._moment_restart): at the first turn each turned tensor's multiplier is scaled
by min(mean|d|, 1) of the direction it just applied (pooled over the group, and over ZeRO's
ranks, at group granularity), so the fresh Adam's first step has the turn's size; every path
computes the same, the meta-gradient through it matches finite differences, resume is exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from _distributed import run_ranks
from test_moment_restart import _first_turn, _grads, _loss, _loss_of, _model, _train, run_path

import metalr
from metalr.functional import adam_hd_step
from metalr.functional._controller import SINCE
from metalr.functional.adam_rule import adam_direction

F64 = torch.float64
MATCHED = {"moment_restart": 1.0, "restart_match": 1.0}  # the default
PLAIN = {"moment_restart": 1.0, "restart_match": 0.0}
OFF = {"moment_restart": 0.0}


def _through_turn(seek: dict | None, **options) -> tuple[torch.nn.Module, metalr.AdamHD]:
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek=seek, **options)
    _train(opt, model, _first_turn(**options))
    return model, opt


@pytest.mark.parametrize("lagged", [False, True], ids=["exact", "lagged"])
@pytest.mark.parametrize("granularity", ["tensor", "element", "group"])
def test_at_the_turn_each_rate_is_scaled_by_the_size_of_the_direction_it_applied(
    granularity, lagged
):
    """Against a run without the restart (the same until the turn's step has been taken): the
    moments are zero and each multiplier is that run's times min(mean|d|, 1), d = m̂/(√v̂+ε)
    from that run's moments (at group granularity the mean over all the group's elements)."""
    _, opt_none = _through_turn(OFF, granularity=granularity, lagged=lagged)
    model, opt = _through_turn(MATCHED, granularity=granularity, lagged=lagged)
    beta1, beta2 = opt.param_groups[0]["betas"]
    eps = opt.param_groups[0]["eps"]
    params = list(model.parameters())
    none_states = [opt_none.state[p] for p in opt_none.param_groups[0]["params"]]
    dirs = [adam_direction(s["exp_avg"], s["exp_avg_sq"], s["step"], beta1, beta2, eps)
            for s in none_states]  # fmt: skip
    if granularity == "group":
        pooled = sum(d.abs().sum() for d in dirs) / sum(d.numel() for d in dirs)
        factors = [pooled.clamp(max=1.0)] * len(dirs)
    else:
        factors = [d.abs().mean().clamp(max=1.0) for d in dirs]
    assert all(f < 1 for f in factors), "the turn's steps are smaller than a fresh Adam's"
    for p, s_none, factor in zip(params, none_states, factors):
        state = opt.state[p]
        assert state["hd_controller"][SINCE] > 0 and state["step"].item() == 0
        assert torch.count_nonzero(state["exp_avg"]) == 0
        expected = s_none["lr_multiplier"] * factor
        torch.testing.assert_close(state["lr_multiplier"], expected, rtol=1e-12, atol=0)
    if granularity == "group":
        rates = [opt.state[p]["lr_multiplier"] for p in params]
        assert all(torch.equal(r, rates[0]) for r in rates), "the group's rate stays shared"


def test_the_first_fresh_step_has_the_size_of_the_turns_step():
    """The step after the turn is a fresh Adam's (|d| = 1 per element up to ε) at the matched
    rate: its mean |Δθ| per tensor equals lr · rate_turn · mean|d_turn|."""
    _, opt_none = _through_turn(OFF)
    model, opt = _through_turn(MATCHED)
    group = opt.param_groups[0]
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    _loss(model, _first_turn()).backward()
    opt.step()
    for p, old, q in zip(model.parameters(), before, opt_none.param_groups[0]["params"]):
        s = opt_none.state[q]
        d = adam_direction(s["exp_avg"], s["exp_avg_sq"], s["step"], *group["betas"], group["eps"])
        expected = 3e-2 * s["lr_multiplier"] * d.abs().mean()
        torch.testing.assert_close((p.detach() - old).abs().mean(), expected, rtol=1e-6, atol=0)


def test_on_by_default_off_without_the_match_and_refused_without_the_restart():
    assert metalr.functional.SEEK_DEFAULTS["restart_match"] == 1.0
    _, default = _through_turn(None)
    _, matched = _through_turn(MATCHED)
    _, plain = _through_turn(PLAIN)
    _, unmatched = _through_turn({"moment_restart": 1.0, "restart_match": 0.0})
    pairs = zip(*(o.param_groups[0]["params"] for o in (default, matched, plain, unmatched)))
    for p, q, r, s in pairs:
        assert torch.equal(default.state[p]["lr_multiplier"], matched.state[q]["lr_multiplier"])
        assert torch.equal(plain.state[r]["lr_multiplier"], unmatched.state[s]["lr_multiplier"])
        assert not torch.equal(matched.state[q]["lr_multiplier"], plain.state[r]["lr_multiplier"])
    for seek in ({"moment_restart": 0.0, "restart_match": 1.0}, {**MATCHED, "restart_match": 2.0},
                 {**MATCHED, "restart_match": -0.5}):  # fmt: skip
        with pytest.raises(ValueError, match="restart_match"):
            metalr.AdamHD(torch.nn.Linear(2, 2).parameters(), seek=seek)


def _pure_step_at_turn(opt, params, seek, granularity="tensor"):
    group = opt.param_groups[0]
    states = [opt.state[p] for p in params]
    return adam_hd_step(
        [p.detach() for p in params], [p.grad for p in params],
        [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
        [s["lr_multiplier"] for s in states], [s["step"] for s in states],
        lr=3e-2, beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
        weight_decay=0.0, decoupled_weight_decay=False, hypergrad_lr=group["hypergrad_lr"],
        rule="seek", granularity=granularity, lr_bounds=(0.0, float("inf")),
        controllers=[s["hd_controller"] for s in states], seek=seek,
    )  # fmt: skip


@pytest.mark.parametrize("granularity", ["tensor", "group"])
def test_the_pure_step_matches_what_the_optimizer_matches(granularity):
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek=MATCHED, granularity=granularity)
    _train(opt, model, _first_turn() - 1)
    params = list(model.parameters())
    opt.zero_grad()
    _loss(model, _first_turn() - 1).backward()
    pure, _ = _pure_step_at_turn(opt, params, opt.param_groups[0]["seek"], granularity)
    opt.step()
    for i, p in enumerate(params):
        assert pure.steps[i].item() == 0
        torch.testing.assert_close(opt.state[p]["lr_multiplier"], pure.rates[i], rtol=1e-12,
                                   atol=0)  # fmt: skip
        torch.testing.assert_close(p.detach(), pure.params[i], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("granularity", ["tensor", "group"])
def test_the_meta_gradient_through_the_match_equals_finite_differences(granularity):
    """d loss(θ after the turn and the fresh step) / d log-rates by autograd through the pure
    step equals central finite differences (float64; the turn's step is not moved by them)."""
    turn = _first_turn()
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek=MATCHED, granularity=granularity)
    _train(opt, model, turn - 1)
    start = [p.detach().clone() for p in model.parameters()]
    states = [opt.state[p] for p in model.parameters()]
    group = opt.param_groups[0]
    log_rates0 = [s["lr_multiplier"].log().clone() for s in states]

    def loss_of(log_rates: list[torch.Tensor], create_graph: bool) -> torch.Tensor:
        params = list(start)
        moments = ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states])
        rates, steps = [r.exp() for r in log_rates], [s["step"] for s in states]
        controllers = [s["hd_controller"] for s in states]
        for t in (turn - 1, turn):
            grads = _grads(params, t) if create_graph else _plain_grads(params, t)
            state, controllers = adam_hd_step(
                params, grads, *moments, rates, steps, lr=3e-2, beta1=group["betas"][0],
                beta2=group["betas"][1], eps=group["eps"], weight_decay=0.0,
                decoupled_weight_decay=False, hypergrad_lr=group["hypergrad_lr"], rule="seek",
                granularity=granularity, lr_bounds=(0.0, float("inf")),
                controllers=controllers, seek=group["seek"],
            )  # fmt: skip
            if t == turn - 1:
                assert all(int(s) == 0 for s in state.steps), "the match ran at the turn"
            params, moments = state.params, (state.exp_avgs, state.exp_avg_sqs)
            rates, steps = state.rates, state.steps
        return _loss_of(params, turn + 1)

    leaves = [r.clone().requires_grad_() for r in log_rates0]
    meta = torch.autograd.grad(loss_of(leaves, True), leaves)
    h = 1e-6
    for i, r in enumerate(log_rates0):
        for j in range(r.numel()):
            shifted = []
            for sign in (1.0, -1.0):
                bumped = [x.clone() for x in log_rates0]
                bumped[i].view(-1)[j] += sign * h
                with torch.no_grad():
                    shifted.append(loss_of(bumped, False))
            fd = (shifted[0] - shifted[1]) / (2 * h)
            torch.testing.assert_close(meta[i].view(-1)[j], fd, rtol=1e-5, atol=1e-9)
    assert any(g.abs().sum() > 0 for g in meta)


def _plain_grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_() for p in params]
        return list(torch.autograd.grad(_loss_of(leaves, step), leaves))


@pytest.mark.parametrize("options", [
    {"foreach": False}, {"foreach": True}, {"granularity": "element"}, {"granularity": "group"},
    {"granularity": "group", "foreach": True}, {"lagged": True}, {"lagged": True, "foreach": True},
], ids=["single", "foreach", "element", "group", "group-foreach", "lagged", "lagged-foreach"])  # fmt: skip
@pytest.mark.parametrize("host_reads", [True, False], ids=["host_reads", "no_host_reads"])
def test_every_path_matches_alike(options, host_reads, monkeypatch):
    """Each path, and the branch that never reads a flag on the host (accelerators), gives the
    parameters and state of the single-tensor path with host reads (float64); the match ran
    (the rates differ from the plain restart's)."""
    reference_options = {k: v for k, v in options.items() if k in ("granularity", "lagged")}
    reference = run_path(monkeypatch, {**reference_options, "foreach": False}, True, MATCHED)
    for a, b in zip(run_path(monkeypatch, options, host_reads, MATCHED), reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    plain = run_path(monkeypatch, {**reference_options, "foreach": False}, True, PLAIN)
    assert any(not torch.allclose(a, b) for a, b in zip(plain, reference))


def test_the_fused_step_matches_alike(monkeypatch):
    """fused=True (on the CPU in float64: the compiled pure step, told not to restart: the
    restart runs once, after it) equals the eager path."""
    test_every_path_matches_alike({"fused": True}, True, monkeypatch)


ZERO_STEPS = 65  # the turn is at step 58


def _zero_run(rank: int | None, layout: str) -> dict:
    """AdamHD at group granularity with the matched restart, past the turn: "split": ZeRO gives
    each rank some of the model's tensors (the pooled size is summed over ranks); "one": one
    tensor, so rank 1 holds none and joins the pooling in its place."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if layout == "split":
        model = _model()
    else:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2, bias=False).to(F64)
    kwargs = {"lr": 3e-2, "granularity": "group", "seek": MATCHED}
    if rank is None:
        opt = metalr.AdamHD(model.parameters(), **kwargs)
    else:
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=metalr.AdamHD,
                                      shard_group=dist.group.WORLD, **kwargs)  # fmt: skip
    for t in range(ZERO_STEPS):  # every rank computes the full batch: no DDP needed
        opt.zero_grad()
        g = torch.Generator().manual_seed(100 + t)
        x = torch.randn(16, 4, generator=g, dtype=F64)
        ((model(x)[:, :2] - (x[:, :2] * 2 - x[:, 2:])) ** 2).mean().backward()
        opt.step()
    inner = opt if rank is None else opt.optim
    held = inner.param_groups[0]["params"]
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "rate": inner.state[held[0]]["lr_multiplier"].clone() if held else None,
        "turned": bool(held) and bool(inner.state[held[0]]["hd_controller"][SINCE] > 0),
    }


def _zero_runs(rank: int) -> dict:
    return {layout: _zero_run(rank, layout) for layout in ("split", "one")}


def test_zero_pools_the_group_match_over_ranks_and_equals_single_process():
    per_rank = run_ranks(_zero_runs, timeout_s=180)
    for layout in ("split", "one"):
        reference = _zero_run(None, layout)
        assert reference["turned"], f"{layout}: the run must pass the turn"
        for rank in range(2):
            got = per_rank[rank][layout]
            for a, b in zip(got["params"], reference["params"]):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=layout)
            if got["rate"] is not None:  # rank 1 holds no tensor of "one"
                torch.testing.assert_close(got["rate"], reference["rate"], rtol=1e-9, atol=0)
        assert per_rank[1]["one"]["rate"] is None, "ZeRO should leave rank 1 without a tensor"


def test_a_checkpoint_from_before_the_restart_resumes_without_it():
    """A param group saved before the restart existed has neither key in its ``seek``: it
    resumes as it was saved (no restart), while a new optimizer restarts by default."""
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=3e-2, seek=OFF)
    _train(opt, model, 5)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["seek"]["moment_restart"], group["seek"]["restart_match"]
    resumed = metalr.AdamHD(model.parameters(), lr=3e-2)
    assert resumed.param_groups[0]["seek"]["moment_restart"] == 1.0
    resumed.load_state_dict(saved)
    _train(resumed, model, _first_turn() + 5, start=5)
    for p in model.parameters():
        assert resumed.state[p]["hd_controller"][SINCE] > 0, "the run passed its turn"
        assert int(resumed.state[p]["step"]) == _first_turn() + 10, "no restart"
