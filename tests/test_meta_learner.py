"""Behaviour of MetaLearner and the MetaLR facade: adaptation helps, guards hold, resume is exact."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from test_meta_common import SinusoidSampler, mlp, random_regression, sinusoid_batch
from torch import nn

from metalr.meta import MetaConfig, MetaLearner, MetaLR


def test_short_meta_sgd_training_on_sinusoid_beats_the_unadapted_model() -> None:
    """300 meta-iterations of Meta-SGD (1-40-40-1 ReLU, K=10, one step) in ~2-3 s."""
    learner = MetaLearner(
        mlp(), MetaConfig(rates="element", meta_lr=1e-2, meta_batch_size=10), loss_name="mse"
    )
    test = sinusoid_batch(200, 10, 50, torch.Generator().manual_seed(123))
    before = learner.evaluate(test)
    history = learner.fit(SinusoidSampler(), 300)
    after = learner.evaluate(test)
    assert all(h["finite"] for h in history) and learner.skipped_steps == 0
    # Measured: pre-adaptation 2.96, post-adaptation 0.86 (untrained: 3.97 / 3.80).
    assert after["query_loss"] < 1.2
    assert after["query_loss"] < 0.5 * after["pre_adaptation_loss"]
    assert (
        after["query_loss"] + after["query_loss_ci95"]
        < before["query_loss"] - before["query_loss_ci95"]
    )
    assert all(float(r.detach().min()) > 0 for r in learner.meta.rates().values())


def test_adapt_lowers_the_query_loss_on_held_out_tasks() -> None:
    cfg = MetaConfig(rates="tensor", inner_lr=0.01, meta_lr=1e-2, meta_batch_size=10)
    learner = MetaLearner(mlp(seed=3), cfg)
    learner.fit(SinusoidSampler(), 100)
    test = sinusoid_batch(20, 10, 50, torch.Generator().manual_seed(7))  # unseen tasks
    pre, post = [], []
    init = {n: p.detach() for n, p in learner.meta.init_params().items()}
    for sx, sy, qx, qy in zip(*test):
        adapted = learner.adapt(sx, sy)
        pre.append(float(learner.loss(init, qx, qy)))
        post.append(float(learner.loss(adapted, qx, qy).detach()))
    pre_mean, post_mean = sum(pre) / len(pre), sum(post) / len(post)
    # Measured: 4.26 -> 2.62, better on 20 of 20 tasks.
    assert post_mean < 0.7 * pre_mean and post_mean < 3.0, (pre_mean, post_mean)
    assert sum(b < a for a, b in zip(pre, post)) >= 18


def test_gradients_reach_weights_rates_and_hypergrad_lr_through_adapt() -> None:
    cfg = MetaConfig(inner_rule="sgd_hd", rates="element", inner_steps=2, inner_lr=0.05)
    learner = MetaLearner(mlp((1, 8, 1), nn.Tanh, torch.float64), cfg)
    sx, sy, qx, qy = (
        t[0] for t in sinusoid_batch(1, 10, 10, torch.Generator().manual_seed(0), torch.float64)
    )
    learner.loss(learner.adapt(sx, sy), qx, qy).backward()
    for kind in (learner.meta.init, learner.meta.log_rates, learner.meta.raw_hypergrad_lrs):
        for p in kind.values():
            assert p.grad is not None and float(p.grad.abs().max()) > 0


@pytest.mark.parametrize("rates", ["element", "tensor", "step_tensor"])
def test_rates_stay_positive_under_large_meta_steps(rates: str) -> None:
    cfg = MetaConfig(rates=rates, inner_steps=2, meta_lr=1.0, meta_grad_clip=None, inner_lr=1e-3)
    learner = MetaLearner(mlp((1, 8, 1)), cfg)
    learner.fit(SinusoidSampler(), 5)
    for r in learner.meta.rate_table().values():
        assert bool((r > 0).all())


def test_non_finite_meta_loss_skips_the_step_and_clipping_bounds_the_update() -> None:
    learner = MetaLearner(mlp((1, 8, 1), dtype=torch.float64), MetaConfig(meta_grad_clip=0.5))
    batch = random_regression(2, 4, 1, seed=0)
    before = copy.deepcopy(learner.meta.state_dict())
    bad = batch._replace(query_y=batch.query_y.clone().fill_(math.nan))
    stats = learner.meta_step(bad)
    assert not stats["finite"] and learner.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in learner.meta.state_dict().items())
    stats = learner.meta_step(batch._replace(query_y=batch.query_y * 1e6))
    assert stats["finite"] and stats["grad_norm"] > 0.5  # reported before clipping
    assert learner.step_count == 2 and learner.skipped_steps == 1


def test_checkpoint_resume_is_bit_exact() -> None:
    """5 steps, save, 5 more == load into a fresh learner, 5 more (dropout uses the RNG too)."""

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))

    cfg = MetaConfig(rates="tensor", inner_steps=2, meta_batch_size=4, seed=11)
    a = MetaLearner(model(), cfg)
    a.fit(SinusoidSampler(), 5)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    a.fit(SinusoidSampler(), 5)

    torch.manual_seed(999)  # the resumed run must not depend on the global RNG before loading
    b = MetaLearner(model(), cfg)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    b.fit(SinusoidSampler(), 5)
    assert a.step_count == b.step_count == 10
    for (name, pa), pb in zip(a.meta.state_dict().items(), b.meta.state_dict().values()):
        assert torch.equal(pa, pb), name
    sa, sb = a.meta_optimizer.state_dict()["state"], b.meta_optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_load_state_dict_refuses_another_configuration() -> None:
    a = MetaLearner(mlp((1, 4, 1)), MetaConfig(rates="tensor"))
    b = MetaLearner(mlp((1, 4, 1)), MetaConfig(rates="element"))
    with pytest.raises(ValueError, match=r"different configuration: \['rates'\]"):
        b.load_state_dict(a.state_dict())


def test_reptile_moves_the_initial_weights_towards_the_adapted_ones() -> None:
    cfg = MetaConfig(algorithm="reptile", rates="fixed", inner_steps=3, inner_lr=0.02,
                     reptile_step_size=0.5)  # fmt: skip
    learner = MetaLearner(mlp((1, 16, 1), dtype=torch.float64), cfg)
    batch = sinusoid_batch(4, 10, 10, torch.Generator().manual_seed(0), torch.float64)
    init = {n: p.detach().clone() for n, p in learner.meta.init_params().items()}
    adapted = [learner.adapt(*(t[i] for t in batch[:2])) for i in range(4)]
    learner.meta_step(batch)
    for n, p in learner.meta.init_params().items():
        mean = torch.stack([a[n] for a in adapted]).mean(0)
        torch.testing.assert_close(
            p.detach(), init[n] + 0.5 * (mean - init[n]), rtol=1e-12, atol=1e-14
        )


def test_cross_entropy_evaluation_reports_accuracy() -> None:
    from metalr.tasks import TaskBatch

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 3, 4, generator=g, dtype=torch.float64) * 3  # task, class, feature

    def split(shots: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(3).repeat(shots).expand(3, -1)
        noise = torch.randn(3, 3 * shots, 4, generator=g, dtype=torch.float64)
        return centers[torch.arange(3)[:, None], y] + noise, y

    (sx, sy), (qx, qy) = split(2), split(5)
    cfg = MetaConfig(inner_lr=0.5, inner_steps=3)
    learner = MetaLearner(mlp((4, 3), dtype=torch.float64), cfg, loss_name="cross_entropy")
    result = learner.evaluate(TaskBatch(sx, sy, qx, qy))
    assert 0.0 <= result["accuracy"] <= 1.0 and math.isfinite(result["accuracy_ci95"])
    assert result["query_loss"] < result["pre_adaptation_loss"]


def test_facade_clone_adapt_matches_the_learner() -> None:
    """learn2learn-style clone()/adapt(loss) gives the learner's meta-gradient (loop backend)."""
    cfg = MetaConfig(inner_rule="adam_hd", rates="tensor", inner_steps=2, inner_lr=0.05)
    model = mlp((1, 8, 1), nn.Tanh, torch.float64)
    learner = MetaLearner(copy.deepcopy(model), cfg)
    wrapped = MetaLR(model, cfg)
    batch = sinusoid_batch(2, 10, 10, torch.Generator().manual_seed(0), torch.float64)
    x = batch.support_x[0]
    clone = wrapped.clone()
    assert torch.equal(clone(x), wrapped(x)) and torch.equal(wrapped(x), model(x))
    total = 0.0
    for sx, sy, qx, qy in zip(*batch):
        clone = wrapped.clone()
        for _ in range(2):
            clone.adapt(nn.functional.mse_loss(clone(sx), sy))
        total = total + nn.functional.mse_loss(clone(qx), qy)
    (total / 2).backward()
    learner.meta_loss(batch).backward()
    for a, b in zip(wrapped.meta.learned_parameters(), learner.meta.learned_parameters()):
        assert a.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13)
    # No writes into the module: its weights are still the initial ones.
    assert all(p is q for p, q in zip(model.parameters(), wrapped.meta.init_params().values()))
    assert set(dict(wrapped.named_parameters())) >= {"meta.log_rates.0-weight"}


def test_adam_inner_loop_survives_dead_relu_units() -> None:
    """sqrt(v) at v = 0 (a dead unit) must not turn second derivatives into NaN."""
    model = mlp((1, 8, 1), dtype=torch.float64)
    with torch.no_grad():
        model[0].bias[:4] = -100.0  # four units never fire: zero gradients, v = 0
    cfg = MetaConfig(inner_rule="adam_hd", rates="tensor", inner_steps=3, inner_lr=0.01)
    learner = MetaLearner(model, cfg)
    batch = sinusoid_batch(4, 10, 10, torch.Generator().manual_seed(0), torch.float64)
    learner.meta_loss(batch).backward()
    grads = [p.grad for p in learner.meta.learned_parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert float(learner.meta.init["0-weight"].grad[4:].abs().max()) > 0


def test_fixed_initial_weights_learn_only_the_rates() -> None:
    learner = MetaLearner(mlp((1, 8, 1)), MetaConfig(learn_init=False, rates="tensor"))
    init = {n: p.clone() for n, p in learner.meta.init_params().items()}
    rates = {n: r.detach().clone() for n, r in learner.meta.rates().items()}
    learner.fit(SinusoidSampler(), 3)
    assert all(torch.equal(init[n], p) for n, p in learner.meta.init_params().items())
    assert any(not torch.equal(rates[n], r) for n, r in learner.meta.rates().items())
    assert learner.export_prior().init_weights is None


@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_evaluate_is_the_same_for_both_backends(loss_name: str) -> None:
    batch = random_regression(3, 6, 2, seed=1)
    out = 1
    if loss_name == "cross_entropy":
        out = 3
        batch = batch._replace(support_y=(batch.support_x[..., 0] > 0).long(),
                               query_y=(batch.query_x[..., 0] > 0).long() * 2)  # fmt: skip
    results = []
    for backend in ("vmap", "loop"):
        cfg = MetaConfig(inner_rule="sgd_hd", rates="element", inner_steps=2, backend=backend)
        model = mlp((2, 8, out), nn.Tanh, torch.float64)
        results.append(MetaLearner(model, cfg, loss_name=loss_name).evaluate(batch))
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        assert math.isclose(results[0][k], results[1][k], rel_tol=1e-12), k


def _small_learner() -> MetaLearner:
    return MetaLearner(mlp((1, 4, 1)), MetaConfig(rates="tensor", meta_batch_size=2))


def test_fit_progress_log_lines_when_not_on_a_terminal(capsys) -> None:
    learner = _small_learner()
    history = learner.fit(SinusoidSampler(), 20, progress=True)  # captured stderr: no TTY
    err = capsys.readouterr().err.splitlines()
    assert len(history) == 20
    assert len(err) == 10  # a line every tenth of the run
    assert err[0].startswith("meta-train: iteration 2/20  meta_loss ")
    assert err[-1].startswith("meta-train: iteration 20/20  meta_loss ")
    mean = sum(h["meta_loss"] for h in history[-2:]) / 2
    assert f"meta_loss {mean:.4f} (mean of the last 2)" in err[-1]
    learner.fit(SinusoidSampler(), 7, progress=True, log_every=3)
    err = capsys.readouterr().err.splitlines()
    assert [line.split()[2] for line in err] == ["3/7", "6/7", "7/7"]


def test_fit_is_silent_by_default_off_a_terminal_and_when_asked(capsys) -> None:
    learner = _small_learner()
    learner.fit(SinusoidSampler(), 5)  # stderr is captured, not a terminal: silent
    learner.fit(SinusoidSampler(), 5, progress=False)
    assert capsys.readouterr() == ("", "")


def test_fit_progress_bar_on_a_terminal(monkeypatch) -> None:
    pytest.importorskip("tqdm")
    import metalr.meta.learner as learner_module

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    assert learner_module._interactive()
    bars = []
    real = learner_module._progress_bar
    monkeypatch.setattr(learner_module, "_progress_bar", lambda n: bars.append(real(n)) or bars[-1])
    _small_learner().fit(SinusoidSampler(), 4)  # progress=None: on, since stderr is a terminal
    assert len(bars) == 1 and bars[0].n == 4 and bars[0].total == 4
    assert "meta-train" in term.getvalue() and "meta_loss=" in term.getvalue()


def test_fit_rejects_bad_counts() -> None:
    learner = _small_learner()
    assert learner.fit(SinusoidSampler(), 0) == []
    with pytest.raises(ValueError, match="num_iterations"):
        learner.fit(SinusoidSampler(), -1)
    with pytest.raises(ValueError, match="log_every"):
        learner.fit(SinusoidSampler(), 2, progress=True, log_every=0)
