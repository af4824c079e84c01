r"""The unrolled inner loop: a pure function of (meta-parameters, one task's support set).

Starting from the initial weights :math:`\theta_0` and rates :math:`\alpha_0`, each inner step
calls one of metalr's functional update rules — the same code the optimizers run::

    g_t          = ∇_θ L_support(θ_t)                   torch.func.grad, or autograd.grad
    θ_{t+1}, ... = sgd_hd_step(θ_t, g_t, ..., rates=α_t, lr=1, hypergrad_lr=β)   or adam_hd_step

* ``"sgd"`` (MAML / Meta-SGD / LSLR): ``hypergrad_lr=0`` so the rates do not move inside the
  loop and the step is ``θ - α ⊙ g``; for ``step_tensor`` the rates are replaced by the learned
  column of step ``t`` before each step.
* ``"sgd_hd"`` / ``"adam_hd"``: the rates start at the learned ``α_0`` and adapt by
  hypergradient inside the loop, with the learned per-tensor ``β`` (a list of 0-d tensors).

With ``lr=1`` the rule's multiplier *is* the effective rate, which is what an exported
:class:`~metalr.meta.LRPrior` stores.

The meta-gradient flows through every step (second order). ``first_order=True`` (FOMAML)
evaluates each inner gradient at detached weights, so ``∂g_t/∂θ_t`` and everything behind it is
dropped — exactly the second-order terms — while the paths through the update itself
(``θ_t`` and ``α_t`` in ``θ_t - α_t g_t``) stay.

Example (one task, two steps, Meta-SGD rates)::

    forward = make_forward(model)
    loss = make_loss(forward, "mse")
    rule = InnerRule.from_config(MetaConfig(inner_steps=2))
    adapted = unroll(loss, init, lambda t: rates, None, x, y, rule, steps=2)
    query_loss = loss(adapted, qx, qy)            # differentiable w.r.t. init and rates
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalr.functional import adam_hd_step, sgd_hd_step
from metalr.meta.config import MetaConfig

Params = dict[str, Tensor]
LossFn = Callable[[Params, Tensor, Tensor], Tensor]
LOSSES = ("mse", "cross_entropy")


@dataclass(frozen=True)
class InnerRule:
    """Static hyperparameters of the inner update (everything that is not a tensor)."""

    name: str
    granularity: str
    hypergrad_rule: str
    lr_bounds: tuple[float, float]
    betas: tuple[float, float]
    eps: float
    first_order: bool
    per_step_rates: bool

    @classmethod
    def from_config(cls, config: MetaConfig) -> InnerRule:
        """The rule a :class:`MetaConfig` describes."""
        return cls(
            name=config.inner_rule,
            granularity=config.rule_granularity,
            hypergrad_rule=config.hypergrad_rule,
            lr_bounds=config.lr_bounds,
            betas=config.adam_betas,
            eps=config.adam_eps,
            first_order=config.first_order or config.algorithm == "reptile",
            per_step_rates=config.rates == "step_tensor",
        )


class InnerState(NamedTuple):
    """Weights and the rule's state between inner steps (lists follow ``params``' key order)."""

    params: Params
    rates: list[Tensor]
    buffers: tuple[list, ...]  # SGD: (momentum_buffers, prev_directions); Adam: (m, v, steps)


def make_forward(model: nn.Module) -> Callable[[Params, Tensor], Tensor]:
    """``forward(params, x)``: the model applied with ``params`` via ``functional_call``.

    Buffers and frozen parameters are read from the module at call time; the module's own
    trainable parameters are never read or written.
    """

    def forward(params: Params, x: Tensor) -> Tensor:
        fixed = dict(model.named_buffers())
        fixed.update((n, p) for n, p in model.named_parameters() if n not in params)
        return functional_call(model, (params, fixed), (x,))

    return forward


def task_loss(pred: Tensor, y: Tensor, loss_name: str) -> Tensor:
    """Mean squared error or cross-entropy of one task's predictions."""
    if loss_name == "mse":
        if pred.shape != y.shape:
            raise ValueError(
                f"mse: prediction shape {tuple(pred.shape)} != target shape {tuple(y.shape)}"
            )
        return F.mse_loss(pred, y)
    return F.cross_entropy(pred, y)


def make_loss(forward: Callable[[Params, Tensor], Tensor], loss_name: str) -> LossFn:
    """``loss(params, x, y)`` for ``loss_name`` in ``"mse"``, ``"cross_entropy"``."""
    if loss_name not in LOSSES:
        allowed = ", ".join(repr(c) for c in LOSSES)
        raise ValueError(f"Invalid loss_name: {loss_name!r}; expected one of {allowed}")
    return lambda params, x, y: task_loss(forward(params, x), y, loss_name)


def init_state(params: Params, rates: Mapping[str, Tensor], rule: InnerRule) -> InnerState:
    """The state before the first step: fresh buffers, rates ``α_0``."""
    ps = list(params.values())
    rate_list = [rates[n] for n in params]
    if rule.name == "adam_hd":
        zeros = [torch.zeros_like(p) for p in ps]
        steps = [torch.zeros((), dtype=r.dtype, device=p.device) for p, r in zip(ps, rate_list)]
        return InnerState(dict(params), rate_list, (zeros, [z.clone() for z in zeros], steps))
    return InnerState(dict(params), rate_list, ([None] * len(ps), [None] * len(ps)))


def inner_step(
    state: InnerState,
    grads: Sequence[Tensor],
    rule: InnerRule,
    hypergrad_lr: float | Sequence[Tensor],
) -> InnerState:
    """One step of the rule from ``state`` with ``grads`` (pure; calls the functional step)."""
    names, ps = list(state.params), list(state.params.values())
    hyper: dict = {"lr": 1.0, "rule": rule.hypergrad_rule, "granularity": rule.granularity,
                   "lr_bounds": rule.lr_bounds}  # fmt: skip
    if rule.name == "adam_hd":
        m, v, steps = state.buffers
        new = adam_hd_step(
            ps, grads, m, v, state.rates, steps, beta1=rule.betas[0], beta2=rule.betas[1],
            eps=rule.eps, weight_decay=0.0, decoupled_weight_decay=False,
            hypergrad_lr=hypergrad_lr, **hyper,
        )  # fmt: skip
        buffers: tuple[list, ...] = (new.exp_avgs, new.exp_avg_sqs, new.steps)
    else:
        bufs, dirs = state.buffers
        if rule.name == "sgd":
            # Rates stay fixed inside the loop; "additive" with β = 0 adds exactly 0 and skips
            # the norms the normalized rule would compute.
            hyper.update(hypergrad_lr=0.0, rule="additive")
        else:
            hyper.update(hypergrad_lr=hypergrad_lr)
        new = sgd_hd_step(
            ps, grads, bufs, dirs, state.rates, momentum=0.0, dampening=0.0,
            weight_decay=0.0, nesterov=False, **hyper,
        )  # fmt: skip
        buffers = (new.momentum_buffers, new.prev_directions)
    return InnerState(dict(zip(names, new.params)), list(new.rates), buffers)


#: How :func:`support_grads` differentiates: ``torch.func.grad`` or ``torch.autograd.grad``.
SUPPORT_GRAD_MODES = ("func", "autograd")


def support_grads(
    loss_fn: LossFn, params: Params, x: Tensor, y: Tensor, *, mode: str, create_graph: bool
) -> list[Tensor]:
    """``∇_θ L(θ; x, y)`` as a list, by ``torch.func.grad`` (``mode="func"``, vmap-able) or
    ``torch.autograd.grad`` (``mode="autograd"``, works with modules that mutate buffers).

    ``create_graph=False`` evaluates the gradient at detached weights (FOMAML / evaluation).
    """
    if mode not in SUPPORT_GRAD_MODES:
        raise ValueError(f"Invalid mode: {mode!r}; expected one of {SUPPORT_GRAD_MODES}")
    if mode == "func":
        at = params if create_graph else {n: p.detach() for n, p in params.items()}
        grads = torch.func.grad(loss_fn)(at, x, y)
        return [grads[n] for n in params]
    with torch.enable_grad():
        at = {
            n: p if create_graph and p.requires_grad else p.detach().requires_grad_()
            for n, p in params.items()
        }
        loss = loss_fn(at, x, y)
        return list(
            torch.autograd.grad(
                loss, list(at.values()), create_graph=create_graph, materialize_grads=True
            )
        )


def unroll(
    loss_fn: LossFn,
    init: Params,
    rates_at: Callable[[int], Mapping[str, Tensor]],
    hypergrad_lrs: Mapping[str, Tensor] | float,
    x: Tensor,
    y: Tensor,
    rule: InnerRule,
    steps: int,
    *,
    mode: str = "func",
    create_graph: bool | None = None,
) -> Params:
    """Adapted weights after ``steps`` inner steps on ``(x, y)`` (one task, no task dimension).

    Args:
        loss_fn: ``loss(params, x, y)``, e.g. from :func:`make_loss`.
        init: initial weights by name.
        rates_at: rates of step ``t`` by name (the learned ``α``; for LSLR a different column
            per step, otherwise the same dict every step).
        hypergrad_lrs: learned ``β`` per name (0-d tensors) or one number.
        rule: the inner rule; ``rule.first_order`` drops the second-order terms.
        mode: ``"func"`` (vmap-able) or ``"autograd"`` (see :func:`support_grads`).
        create_graph: differentiate through the inner gradients (default: not
            ``rule.first_order``).
    """
    if steps < 1:
        raise ValueError(f"Invalid inner steps value: {steps}; expected an integer >= 1")
    if create_graph is None:
        create_graph = not rule.first_order
    names = list(init)
    beta = hypergrad_lrs
    if isinstance(hypergrad_lrs, Mapping):
        beta = [hypergrad_lrs[n] for n in names]
    state = init_state(init, rates_at(0), rule)
    for t in range(steps):
        if rule.per_step_rates:
            step_rates = rates_at(t)
            state = state._replace(rates=[step_rates[n] for n in names])
        grads = support_grads(loss_fn, state.params, x, y, mode=mode, create_graph=create_graph)
        state = inner_step(state, grads, rule, beta)
    return state.params
