"""``AdamHD`` / ``AdamWHD``: drop-in ``torch.optim.Adam`` / ``AdamW`` that adapt their own rates."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT, _use_grad_for_differentiable

from metalr.functional._signals import as_real
from metalr.functional.adam_rule import adam_direction, adam_hd, direction_dtype
from metalr.optim import _validation as check
from metalr.optim._base import HypergradOptimizer, check_sparse, scalar_lr

#: Baydin et al. (2018) use β = 1e-7 for Adam-HD with the additive rule.
ADDITIVE_DEFAULT_HYPERGRAD_LR = 1e-7


class AdamHD(HypergradOptimizer):
    r"""Adam whose learning rates adapt online by hypergradient descent (Adam-HD).

    The update (see :mod:`metalr.functional.adam_rule` for the full derivation)::

        m  ← rule(m, ⟨g_t, m̂_{t-1}/(√v̂_{t-1}+ε)⟩)          # learned multiplier(s)
        θ_t = θ_{t-1} - lr_t · m · m̂_t / (√v̂_t + ε)

    ``rule="seek"`` (default) treats ``lr`` as a hint: the multipliers start at
    ``seek['init_scale']`` and ramp up geometrically until successive steps stop agreeing (the
    group cosine turns), back off, then track a normalised hypergradient signal
    (:mod:`metalr.functional._controller` has the equations and the fitted constants).
    ``rule="normalized"`` updates ``log m`` by ``hypergrad_lr`` times the cosine between the
    gradient and the previous Adam direction (the default before issue 10).
    ``rule="additive"`` is the paper's ``α ← α + β⟨g, d⟩``.

    Args:
        params: iterable of parameters or dicts defining parameter groups; a group may set
            its own ``rule``, ``granularity``, ``hypergrad_lr``, ``lr_bounds``, ``seek``,
            ``validation`` and ``spike_guard``, checked like the arguments below (its ``seek``
            and ``validation`` override these key by key).
        lr: scheduled learning rate; the effective rate is ``lr × multiplier`` (default: 1e-3).
        betas: coefficients of the running averages of the gradient and its square
            (default: (0.9, 0.999)).
        eps: term added to the denominator (default: 1e-8).
        weight_decay: L2 penalty added to the gradient, or decoupled decay for AdamW
            (default: 0).
        hypergrad_lr: β of the rate update; ``None`` picks the rule's default (seek: the
            fitted ``DEFAULT_SEEK_HYPERGRAD_LR``, its tracking step; normalized: 0.02, chosen by
            ``experiments/choose_hypergrad_lr.py``; additive: 1e-7 as in the paper); 0 turns the
            adaptation off (default: None).
        decoupled_weight_decay: AdamW-style decay ``θ ← θ(1 - lr·λ)``, following the scheduled
            ``lr`` but not the learned multiplier (default: False).
        granularity: ``"group"``, ``"tensor"`` or ``"element"``: one rate per param group, per
            parameter tensor, or per element (Meta-SGD style, one extra buffer). ``"tensor"`` is
            the default: layers differ in scale, and one rate each needs no extra memory and
            averages the hypergradient over many elements, so it is far less noisy than
            per-element rates (default: "tensor").
        rule: ``"seek"``, ``"normalized"`` or ``"additive"`` (default: "seek").
        seek: constants of the seek rule overriding its fitted defaults, e.g.
            ``{"init_scale": 0.01}``, or ``{"horizon": 0.95}`` for the long-horizon tracking
            signal (one more buffer per parameter; :mod:`metalr.functional._trail`), or
            ``{"moment_restart": 0}`` to keep Adam's moments at the ramp's first turn (by
            default they restart there and the rate is matched to the turn's step size,
            :mod:`metalr.functional._moment_restart`; ``{"restart_match": 0}`` restarts
            without the match) (default: None).
        validation: constants of the validation signal (used once :meth:`observe_validation`
            is called) overriding its defaults, e.g. ``{"hypergrad_lr": 0.05}``; see
            :mod:`metalr.functional.validation` (default: None).
        lr_bounds: ``(min, max)`` for every effective rate: each step applies
            ``clamp(lr × m, min, max)``; a multiplier the rule moves lands inside, one it does
            not move keeps its value (with ``hypergrad_lr=0`` a schedule that crosses a bound
            is only clamped at use; see the README) (default: (0, inf)).
        maximize: maximize the objective instead of minimizing (default: False).
        foreach: use the multi-tensor implementation; ``None`` picks it unless
            ``differentiable`` (default: None).
        fused: run the step as hand-written kernels at group/tensor granularity (CUDA: Triton,
            all tensors in one launch; CPU: C++ built on first use, tens of seconds once per
            machine), one pass with ``lagged=True`` and two without; at element granularity
            on the CPU the exact step is one C++ pass after a scan of the gradients; otherwise
            (element granularity on CUDA or lagged, float64 on CUDA, half precision on CPU) one
            ``torch.compile``'d graph (``lr`` and β1 enter it as tensors: schedulers that
            change them do not recompile it). ``None`` (the default): on CUDA the Triton
            kernels wherever they apply and ``foreach`` is not set (the eager path launches ~20
            small kernels per tensor: 60 ms of host time per step for a 149-tensor GPT on an H200,
            against 1.4 ms), with a warning and the eager path if they fail on first use;
            elsewhere off (``METALR_DEFAULT_FUSED=0`` turns the CUDA default off).
        differentiable: run the step under autograd so weights and rates stay in the graph
            (single-tensor path) (default: False).
        lagged: apply the rate computed from step t's hypergradient from step t+1 (one pass
            over the state instead of two; a non-finite gradient element is skipped per element;
            see :mod:`metalr.functional.adam_rule`) (default: False).
        shard_group: when optimizer state is sharded across ranks (``ZeroRedundancyOptimizer``
            passes it through), the process group whose ranks share each param group: the
            skip decision and group-granularity sums are all-reduced over it; ``"world"`` for
            the default group (ZeRO keeps its arguments in its param groups, so with a process
            group object its ``state_dict()`` cannot be pickled; with ``"world"`` it can)
            (default: None).
        spike_guard: when ``step(closure)`` returns the loss, cut the rates (and end a seek
            ramp) before a step whose loss jumps above its running mean by ``sigmas`` running
            standard deviations; ``True`` for the defaults, a dict to override them, e.g.
            ``{"sigmas": 3.0, "cut": 0.5}``; see :mod:`metalr.functional.spike_guard`
            (default: None, off).
        amsgrad, capturable: accepted for drop-in compatibility with ``torch.optim.Adam``
            keyword arguments; only ``False`` (there is no AMSGrad variant and no CUDA-graph
            capture; the step needs no host sync anyway) (default: False).

    Example:
        >>> model = torch.nn.Linear(10, 1)
        >>> optimizer = metalr.AdamHD(model.parameters(), lr=1e-3)   # was torch.optim.Adam
        >>> loss = model(torch.randn(8, 10)).pow(2).mean()
        >>> loss.backward()
        >>> optimizer.step()
        >>> optimizer.lr_summary()   # [{'min': ..., 'mean': ..., 'max': ...}]

    A step whose gradients contain NaN/inf is skipped entirely (weights, moments, step count and
    rates are left as they were), without reading the flag back to the host.
    """

    #: The additive rule's default β (Adam's step is in parameter units, so a small one).
    additive_default = ADDITIVE_DEFAULT_HYPERGRAD_LR
    restarts_moments = True
    checkpoint_keys = ("betas",)

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        hypergrad_lr: float | None = None,
        *,
        decoupled_weight_decay: bool = False,
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
        amsgrad: bool = False,
        capturable: bool = False,
    ) -> None:
        check.check_lr(lr)
        if check.check_flag("amsgrad", amsgrad):
            raise ValueError("Invalid amsgrad value: True; metalr's Adam has no AMSGrad variant")
        if check.check_flag("capturable", capturable):
            raise ValueError(
                "Invalid capturable value: True; CUDA-graph capture of the step is not supported "
                "(the step already runs without a host sync)"
            )
        check.check_fused_flags(fused, foreach, differentiable)
        check.check_nonnegative("epsilon", eps)
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        check.check_nonnegative("weight_decay", weight_decay)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
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
                spike_guard=spike_guard,
                moment_restart=self.restarts_moments,
            ),
        )
        super().__init__(params, defaults)
        self._set_shard_group(shard_group, fused)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", isinstance(self, AdamWHD))

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        rates: list[Tensor],
        steps: list[Tensor],
    ) -> bool:
        """Fill the lists in place (torch's convention, which torch.compile special-cases)."""
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            check_sparse(p, type(self).__name__)
            state = self.state[p]
            if "step" not in state:  # Lazy state initialization
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            rates.append(self._rate(p, group, state))
            steps.append(state["step"])
            has_complex |= p.is_complex()
        return has_complex

    def _last_directions(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        """The Adam direction of the last step, ``m̂_t/(√v̂_t+ε)``, recomputed from the moments
        (real view for complex parameters); without autograd into a fresh buffer (the pure
        function's in-place face: the same bits, a third of the passes' allocations)."""
        beta1, beta2 = group["betas"]
        in_place = not torch.is_grad_enabled()
        out = []
        for p in params:
            state = self.state.get(p, {})
            if "exp_avg" not in state:
                out.append(torch.zeros_like(as_real(p)))
                continue
            m, v = as_real(state["exp_avg"]), as_real(state["exp_avg_sq"])
            buffer = torch.empty_like(m, dtype=direction_dtype(m)) if in_place else None
            out.append(adam_direction(m, v, state["step"], beta1, beta2, group["eps"], out=buffer))
        return out

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
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            rates: list[Tensor] = []
            steps: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, rates, steps)
            beta1, beta2 = group["betas"]
            adam_hd(
                params, grads, exp_avgs, exp_avg_sqs, rates, steps,
                lr=scalar_lr(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                hypergrad_lr=self._train_hypergrad_lr(group), rule=group["rule"],
                granularity=group["granularity"], lr_bounds=group["lr_bounds"],
                maximize=group["maximize"], foreach=group["foreach"], fused=group["fused"],
                differentiable=group["differentiable"], lagged=group["lagged"],
                grads_finite=grads_finite,
                shards=self._shard_reducer(), **self._controller_args(group, params),
            )  # fmt: skip
        return loss


class AdamWHD(AdamHD):
    """:class:`AdamHD` with decoupled weight decay (drop-in for ``torch.optim.AdamW``).

    Defaults follow ``torch.optim.AdamW`` (``weight_decay=1e-2``). The decay ``θ ← θ(1 - lr·λ)``
    follows the scheduled ``lr``, not the learned multiplier.

    Example:
        >>> optimizer = metalr.AdamWHD(model.parameters(), lr=1e-3, weight_decay=1e-2)
    """

    def __init__(
        self,
        params: ParamsT | Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        hypergrad_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("decoupled_weight_decay", True) is not True:
            raise ValueError("AdamWHD always uses decoupled weight decay; use AdamHD otherwise")
        super().__init__(
            params, lr, betas, eps, weight_decay, hypergrad_lr,
            decoupled_weight_decay=True, **kwargs,
        )  # fmt: skip
