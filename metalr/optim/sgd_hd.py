"""``SGDHD``: drop-in ``torch.optim.SGD`` (momentum, Nesterov) that adapts its own rates."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT, _use_grad_for_differentiable

from metalr.functional._sgd_common import previous_directions, stores_prev_direction
from metalr.functional.sgd_rule import sgd_hd
from metalr.optim import _validation as check
from metalr.optim._base import HypergradOptimizer, check_sparse, scalar_lr

#: Baydin et al. (2018) use β = 1e-3 for SGD-HD and SGDN-HD with the additive rule.
ADDITIVE_DEFAULT_HYPERGRAD_LR = 1e-3


class SGDHD(HypergradOptimizer):
    r"""SGD (optionally with momentum or Nesterov) with hypergradient-adapted rates (SGD-HD).

    The update (see :mod:`metalr.functional.sgd_rule`)::

        m   ← rule(m, ⟨g_t, d_{t-1}⟩)           # learned multiplier(s)
        d_t = g_t | b_t | g_t + μ b_t           # plain / momentum / Nesterov, b as torch.optim.SGD
        θ_t = θ_{t-1} - lr_t · m · d_t

    Args:
        params: iterable of parameters or dicts defining parameter groups; a group may set
            its own ``rule``, ``granularity``, ``hypergrad_lr``, ``lr_bounds``, ``seek``,
            ``validation`` and ``spike_guard``, checked like the arguments below (its ``seek``
            and ``validation`` override these key by key).
        lr: scheduled learning rate; the effective rate is ``lr × multiplier`` (default: 1e-3).
        momentum: momentum factor (default: 0).
        dampening: dampening for momentum (default: 0).
        weight_decay: L2 penalty added to the gradient (default: 0).
        nesterov: Nesterov momentum (default: False).
        hypergrad_lr: β of the rate update; ``None`` picks the rule's default
            (seek: its fitted tracking step, ``DEFAULT_SGD_SEEK_HYPERGRAD_LR``; normalized: 0.02; additive: 1e-3 as in the paper);
            0 turns the adaptation off (default: None).
        granularity: ``"group"``, ``"tensor"`` or ``"element"`` (default: "tensor"; see
            :class:`metalr.AdamHD` for why).
        rule: ``"seek"`` (ramp to the scale, then track; see :class:`metalr.AdamHD`),
            ``"normalized"`` (scale-free, positive) or ``"additive"`` (the paper's)
            (default: "seek").
        seek: constants of the seek rule overriding its fitted defaults, SGD-HD's own
            (``SGD_SEEK_DEFAULTS``, fitted against SGD with momentum 0.9) (default: None).
        validation: constants of the validation signal (:meth:`observe_validation`) overriding
            its defaults (default: None).
        lr_bounds: ``(min, max)`` for every effective rate: each step applies
            ``clamp(lr × m, min, max)``; a multiplier the rule moves lands inside, one it does
            not move keeps its value (with ``hypergrad_lr=0`` a schedule that crosses a bound
            is only clamped at use; see the README) (default: (0, inf)).
        maximize: maximize the objective instead of minimizing (default: False).
        foreach: use the multi-tensor implementation (default: None, i.e. unless differentiable).
        fused: hand-written kernels at group/tensor granularity (CUDA: Triton, lagged or
            exact; CPU: C++, lagged steps), else one ``torch.compile``'d graph (``lr`` and a
            non-zero momentum enter it as tensors: schedulers do not recompile it); see
            :class:`metalr.AdamHD` (default: None: on CUDA the Triton kernels where they
            apply and ``foreach`` is not set, elsewhere off).
        differentiable: keep weights and rates in the autograd graph (default: False).
        lagged: apply the rate computed from step t's hypergradient from step t+1 (one pass
            over the state instead of two; a non-finite gradient element is skipped per element;
            see :mod:`metalr.functional.sgd_rule`) (default: False).
        shard_group: the group of ranks sharding the optimizer state (ZeRO); see
            :class:`metalr.AdamHD` (default: None).
        spike_guard: cut the rates before a step whose closure's loss spikes; see
            :class:`metalr.AdamHD` (default: None, off).

    State: ``momentum_buffer`` as torch.optim.SGD when ``momentum > 0``; plain SGD and Nesterov
    also keep the previous direction (``prev_direction``) because the hypergradient needs it.

    Example:
        >>> optimizer = metalr.SGDHD(model.parameters(), lr=0.1, momentum=0.9)
        >>> scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    """

    #: Whose fitted seek constants are this optimizer's defaults (``FAMILIES`` of
    #: :mod:`metalr.functional._controller`).
    seek_family = "sgd"
    checkpoint_keys = ("momentum", "dampening")
    additive_default = ADDITIVE_DEFAULT_HYPERGRAD_LR

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        hypergrad_lr: float | None = None,
        *,
        granularity: str = "tensor",
        rule: str = "seek",
        seek: Mapping[str, float] | None = None,
        validation: Mapping[str, float] | None = None,
        lr_bounds: tuple[float, float] = (0.0, float("inf")),
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
        shard_group: Any = None,
        lagged: bool = False,
        spike_guard: bool | Mapping[str, float] | None = None,
    ) -> None:
        check.check_lr(lr)
        check.check_nonnegative("momentum", momentum)
        check.check_nonnegative("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check.check_fused_flags(fused, foreach, differentiable)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            differentiable=differentiable,
            lagged=check.check_flag("lagged", lagged),
            **check.check_hyper_options(
                hypergrad_lr,
                granularity,
                rule,
                lr_bounds,
                ADDITIVE_DEFAULT_HYPERGRAD_LR,
                seek,
                validation,
                family=self.seek_family,
                spike_guard=spike_guard,
            ),
        )
        super().__init__(params, defaults)
        self._set_shard_group(shard_group, fused)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        bufs: list[Tensor | None],
        dirs: list[Tensor | None],
        rates: list[Tensor],
    ) -> bool:
        """Fill the lists in place (torch's convention, which torch.compile special-cases)."""
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            check_sparse(p, type(self).__name__)
            state = self.state[p]
            params.append(p)
            grads.append(p.grad)
            bufs.append(state.get("momentum_buffer"))
            dirs.append(state.get("prev_direction"))
            rates.append(self._rate(p, group, state))
            has_complex |= p.is_complex()
        return has_complex

    def _last_directions(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        """The direction of the last step: the momentum buffer, or the stored one."""
        bufs = [self.state.get(p, {}).get("momentum_buffer") for p in params]
        dirs = [self.state.get(p, {}).get("prev_direction") for p in params]
        return previous_directions(params, bufs, dirs, group["momentum"], group["nesterov"])

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads_finite = self._grads_finite()
        self._guard_spike(loss, grads_finite)  # the closure's loss, or the one observe_loss left
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor | None] = []
            dirs: list[Tensor | None] = []
            rates: list[Tensor] = []
            self._init_group(group, params, grads, bufs, dirs, rates)
            new = sgd_hd(
                params, grads, bufs, dirs, rates,
                lr=scalar_lr(group["lr"]), momentum=group["momentum"], dampening=group["dampening"],
                weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                hypergrad_lr=self._train_hypergrad_lr(group), rule=group["rule"],
                granularity=group["granularity"], lr_bounds=group["lr_bounds"],
                maximize=group["maximize"], foreach=group["foreach"], fused=group["fused"],
                differentiable=group["differentiable"], lagged=group["lagged"],
                grads_finite=grads_finite,
                shards=self._shard_reducer(), **self._controller_args(group, params),
            )  # fmt: skip
            keep_dir = stores_prev_direction(group["momentum"], group["nesterov"])
            for p, buf, d in zip(params, new.momentum_buffers, new.prev_directions):
                if group["momentum"] != 0:
                    self.state[p]["momentum_buffer"] = buf
                if keep_dir:
                    self.state[p]["prev_direction"] = d
        return loss
