"""Meta-gradients are exact: finite differences, vmap vs loop, FOMAML, and higher agree (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_meta_common import mlp, random_regression
from torch import nn

import metalr
from metalr.meta import MetaConfig, MetaLearner
from metalr.meta.inner_loop import InnerRule, init_state, inner_step

CASES = [
    ("sgd", "element"),
    ("sgd", "tensor"),
    ("sgd", "step_tensor"),
    ("sgd_hd", "element"),
    ("sgd_hd", "tensor"),
    ("adam_hd", "element"),
    ("adam_hd", "tensor"),
]


def _learner(rule: str, rates: str, steps: int, backend: str = "loop", **kw) -> MetaLearner:
    lr = 0.02 if rule == "adam_hd" else 0.1
    cfg = MetaConfig(inner_rule=rule, rates=rates, inner_steps=steps, inner_lr=lr,
                     backend=backend, hypergrad_lr=0.05, **kw)  # fmt: skip
    learner = MetaLearner(mlp((2, 3, 1), nn.Tanh, torch.float64, seed=1), cfg)
    with torch.no_grad():  # spread the rates so per-element / per-step entries differ
        g = torch.Generator().manual_seed(2)
        for p in learner.meta.log_rates.values():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return learner


def _grads(learner: MetaLearner, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = learner.meta.learned_parameters()
    loss = learner.meta_loss(batch)
    return loss, list(torch.autograd.grad(loss, params))


def _central_differences(learner: MetaLearner, batch, h: float = 1e-6) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for p in learner.meta.learned_parameters():
            fd = torch.zeros_like(p)
            flat, fd_flat = p.view(-1), fd.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + h
                up = learner.meta_loss(batch).item()
                flat[i] = old - h
                down = learner.meta_loss(batch).item()
                flat[i] = old
                fd_flat[i] = (up - down) / (2 * h)
            out.append(fd)
    return out


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("rule,rates", CASES)
def test_meta_gradient_matches_finite_differences(rule: str, rates: str, steps: int) -> None:
    learner = _learner(rule, rates, steps)
    batch = random_regression(2, 4, 2, seed=3)
    _, grads = _grads(learner, batch)
    numeric = _central_differences(learner, batch)
    kinds = {"init": 0, "rates": 0, "hypergrad": 0}
    for name, p, g, n in zip(_names(learner), learner.meta.learned_parameters(), grads, numeric):
        torch.testing.assert_close(g, n, rtol=1e-6, atol=1e-7, msg=f"{name}")
        kinds[name.split(".")[0]] += int(g.abs().max() > 1e-6)
    assert kinds["init"] and kinds["rates"], kinds  # gradients reach weights and rates
    if rule != "sgd" and steps == 2:  # β acts from the second step on
        assert kinds["hypergrad"], kinds


def _names(learner: MetaLearner) -> list[str]:
    rename = {"init": "init", "log_rates": "rates", "raw_hypergrad_lrs": "hypergrad"}
    names = []
    for n, p in learner.meta.named_parameters():
        if p.requires_grad:
            kind, key = n.split(".", 1)
            names.append(f"{rename[kind]}.{key}")
    return names


@pytest.mark.parametrize("rule,rates", CASES)
def test_vmap_equals_loop(rule: str, rates: str) -> None:
    batch = random_regression(3, 5, 2, seed=4)
    loss_v, grads_v = _grads(_learner(rule, rates, 2, backend="vmap"), batch)
    loss_l, grads_l = _grads(_learner(rule, rates, 2, backend="loop"), batch)
    torch.testing.assert_close(loss_v, loss_l, rtol=1e-10, atol=0)
    for a, b in zip(grads_v, grads_l):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("rule,rates", [("sgd", "element"), ("adam_hd", "tensor")])
def test_first_order_drops_exactly_the_second_order_terms(rule: str, rates: str) -> None:
    batch = random_regression(2, 5, 2, seed=5)
    fo = _learner(rule, rates, 2, first_order=True)
    _, grads_fo = _grads(fo, batch)
    # Reference: second-order machinery (create_graph=True), inner gradients detached by hand.
    meta, rule_spec = fo.meta, InnerRule.from_config(fo.config)
    params = meta.learned_parameters()
    total = 0.0
    for sx, sy, qx, qy in zip(*batch):
        state = init_state(meta.init_params(), meta.rates(), rule_spec)
        beta = [b for b in meta.hypergrad_lrs().values()] if rule != "sgd" else 0.0
        for _ in range(2):
            loss = fo.loss(state.params, sx, sy)
            grads = torch.autograd.grad(loss, list(state.params.values()), create_graph=True)
            state = inner_step(state, [g.detach() for g in grads], rule_spec, beta)
        total = total + fo.loss(state.params, qx, qy)
    reference = torch.autograd.grad(total / batch.num_tasks, params)
    for a, b in zip(grads_fo, reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    _, grads_so = _grads(_learner(rule, rates, 2, first_order=False), batch)
    assert max(float((a - b).abs().max()) for a, b in zip(grads_fo, grads_so)) > 1e-6


def test_first_order_sgd_is_the_textbook_fomaml_update() -> None:
    """Meta-SGD FOMAML against a hand-written θ - α ⊙ ∇L(θ).detach() (one step)."""
    batch = random_regression(2, 5, 2, seed=6)
    learner = _learner("sgd", "element", 1, first_order=True)
    _, grads = _grads(learner, batch)
    init, rates = learner.meta.init_params(), learner.meta.rates()
    total = 0.0
    for sx, sy, qx, qy in zip(*batch):
        loss = learner.loss(init, sx, sy)
        g = torch.autograd.grad(loss, list(init.values()))
        adapted = {n: init[n] - rates[n] * gi for n, gi in zip(init, g)}
        total = total + learner.loss(adapted, qx, qy)
    reference = torch.autograd.grad(total / 2, learner.meta.learned_parameters())
    for a, b in zip(grads, reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "rule,higher_optimizer",
    [("sgd", "torch.optim.SGD"), ("sgd", "metalr.SGDHD"), ("sgd_hd", "metalr.SGDHD")],
)
def test_higher_backend_equals_torch_func(rule: str, higher_optimizer: str) -> None:
    """Per-tensor rates through higher's override={'lr': [...]}, one param group per parameter."""
    pytest.importorskip("higher")
    from metalr.meta.higher_backend import meta_gradient_via_higher

    steps = 2
    learner = _learner(rule, "tensor", steps, backend="vmap", learn_hypergrad_lr=False)
    batch = random_regression(3, 5, 2, seed=7)
    loss, grads = _grads(learner, batch)
    names = learner.meta.names
    n = len(names)

    model = mlp((2, 3, 1), nn.Tanh, torch.float64, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(learner.meta.init_params()[name])
    rates = [learner.meta.rates()[name].detach().clone().requires_grad_() for name in names]
    groups = [{"params": [p]} for p in model.parameters()]
    if higher_optimizer == "torch.optim.SGD":
        opt = torch.optim.SGD(groups, lr=0.1)
    else:
        opt = metalr.SGDHD(groups, lr=0.1, hypergrad_lr=0.05 if rule == "sgd_hd" else 0.0,
                           rule=learner.config.hypergrad_rule)  # fmt: skip
    h_loss, h_grads = meta_gradient_via_higher(
        model, opt, batch, inner_steps=steps, override={"lr": rates}
    )
    torch.testing.assert_close(h_loss, loss, rtol=1e-10, atol=0)
    for a, b in zip(grads[:n], h_grads[:n]):  # initial weights
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    for a, b, r in zip(grads[n:], h_grads[n:], rates):  # ∂/∂log α = α ∂/∂α
        torch.testing.assert_close(a, b * r.detach(), rtol=1e-8, atol=1e-10)


def test_higher_backend_adam_hd_equals_torch_func() -> None:
    pytest.importorskip("higher")
    from metalr.meta.higher_backend import meta_gradient_via_higher

    learner = _learner("adam_hd", "tensor", 2, learn_hypergrad_lr=False)
    batch = random_regression(2, 5, 2, seed=8)
    loss, grads = _grads(learner, batch)
    model = mlp((2, 3, 1), nn.Tanh, torch.float64, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(learner.meta.init_params()[name])
    rates = [learner.meta.rates()[n].detach().clone().requires_grad_() for n in learner.meta.names]
    opt = metalr.AdamHD([{"params": [p]} for p in model.parameters()], lr=0.1, hypergrad_lr=0.05,
                        rule=learner.config.hypergrad_rule)  # fmt: skip
    h_loss, h_grads = meta_gradient_via_higher(
        model, opt, batch, inner_steps=2, override={"lr": rates}
    )
    torch.testing.assert_close(h_loss, loss, rtol=1e-10, atol=0)
    n = len(rates)
    for a, b in zip(grads[:n], h_grads[:n]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    for a, b, r in zip(grads[n:], h_grads[n:], rates):
        torch.testing.assert_close(a, b * r.detach(), rtol=1e-8, atol=1e-10)


def test_higher_backend_needs_higher(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from metalr.meta import higher_backend

    monkeypatch.setitem(sys.modules, "higher", None)
    with pytest.raises(ImportError, match=r'pip install "metalr\[meta\]"'):
        higher_backend.register()


def test_loop_backend_handles_batchnorm_in_train_mode() -> None:
    """vmap cannot run modules that update buffers in place; the loop backend can."""
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    learner = MetaLearner(copy.deepcopy(model), MetaConfig(backend="loop", inner_lr=0.1))
    batch = random_regression(2, 6, 2, seed=9)
    before = learner.model[1].running_mean.clone()
    stats = learner.meta_step(batch)
    assert stats["finite"] and stats["grad_norm"] > 0
    assert not torch.equal(before, learner.model[1].running_mean)


def test_group_granularity_inside_the_rule_is_exact() -> None:
    """hypergrad_granularity='group': one adaptation signal for every tensor's rate."""
    learner = _learner("sgd_hd", "tensor", 2, hypergrad_granularity="group")
    batch = random_regression(2, 4, 2, seed=10)
    loss_l, grads = _grads(learner, batch)
    for g, n in zip(grads, _central_differences(learner, batch)):
        torch.testing.assert_close(g, n, rtol=1e-6, atol=1e-7)
    loss_v, grads_v = _grads(
        _learner("sgd_hd", "tensor", 2, backend="vmap", hypergrad_granularity="group"), batch
    )
    torch.testing.assert_close(loss_v, loss_l, rtol=1e-10, atol=0)
    for a, b in zip(grads_v, grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
