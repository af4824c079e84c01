"""Meta-parameters, positive by construction: initial weights, log-rates, raw ``hypergrad_lr``.

A learned rate is stored as its logarithm, so every value the optimizer of the meta-parameters
can reach is a valid rate (optax's meta-learning example does the same with a sigmoid)::

    α = exp(ρ)                           ρ = log α             (rates, any granularity)
    β = softplus(b) = log(1 + eᵇ)        b = log(eᵝ - 1)       (hypergrad_lr, default)
    β = exp(b)                           b = log β             (hypergrad_lr, "exp")

Shapes per parameter tensor ``θ`` (one entry per name of ``model.named_parameters()``):

=============== ================ =============================================
``rates``       ``ρ`` shape      meaning
=============== ================ =============================================
"element"       ``θ.shape``      Meta-SGD: one rate per weight
"tensor"        ``()``           one rate per tensor (per layer)
"step_tensor"   ``(inner_steps,)`` MAML++ LSLR: entry ``t`` is the rate of step t
"fixed"         ``()``           ``inner_lr`` itself, stored as a constant
=============== ================ =============================================

Example:
    >>> meta = MetaParameters(model, MetaConfig(rates="tensor", inner_lr=0.05))
    >>> meta.rates()["0.weight"]          # tensor(0.0500, grad_fn=<ExpBackward0>)
    >>> meta.learned_parameters()         # what the meta-optimizer updates
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalr.functional import rate_dtype
from metalr.meta.config import MetaConfig


def positive(raw: Tensor, transform: str) -> Tensor:
    """``softplus(raw)`` or ``exp(raw)``: a positive value from an unconstrained one."""
    return F.softplus(raw) if transform == "softplus" else torch.exp(raw)


def inverse_positive(value: float, transform: str) -> float:
    """The raw value that :func:`positive` maps to ``value`` (> 0)."""
    if value <= 0:
        raise ValueError(f"a learned positive value must start > 0, got {value}")
    if transform == "exp":
        return math.log(value)
    return value + math.log(-math.expm1(-value))  # log(e^v - 1) without overflow


def _key(name: str) -> str:
    """Parameter names contain dots, which ``nn.ParameterDict`` keys may not."""
    return name.replace(".", "-")


class MetaParameters(nn.Module):
    """The outer loop's parameters for one model under one :class:`MetaConfig`.

    Non-learned entries (``learn_init=False``, ``rates="fixed"``) are kept as parameters with
    ``requires_grad=False`` so ``state_dict()`` has the same keys either way; only
    :meth:`learned_parameters` goes to the meta-optimizer. Frozen parameters of the model
    (``requires_grad=False``) are not adapted; they stay in :attr:`frozen`. The initial weights
    are copies of the model's parameters unless ``share_init=True``.
    """

    def __init__(self, model: nn.Module, config: MetaConfig, *, share_init: bool = False) -> None:
        super().__init__()
        self.config = config
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameters that require grad")
        self.names = [n for n, _ in named]
        keys = [_key(n) for n in self.names]
        if len(set(keys)) != len(keys):
            raise ValueError(f"parameter names collide after replacing '.' by '-': {self.names}")
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        # Filled key by key: ParameterDict(dict) would sort the keys, and the order of
        # parameters() must follow the model's.
        self.init = nn.ParameterDict()
        for k, (_, p) in zip(keys, named):
            # share_init (the facade): the model's own Parameter objects are the initial weights.
            shared = share_init and config.learn_init
            self.init[k] = p if shared else nn.Parameter(p.detach().clone(), config.learn_init)
        learn_rates = config.rates != "fixed"
        start = math.log(config.inner_lr) if learn_rates else config.inner_lr
        self.log_rates = nn.ParameterDict()  # holds the rate itself (not its log) when fixed
        for k, (_, p) in zip(keys, named):
            shape = {"element": p.shape, "step_tensor": (config.inner_steps,)}.get(config.rates, ())
            value = torch.full(shape, start, dtype=rate_dtype(p), device=p.device)
            self.log_rates[k] = nn.Parameter(value, learn_rates)
        self.raw_hypergrad_lrs = nn.ParameterDict()
        if config.learn_hypergrad_lr:
            raw = inverse_positive(config.hypergrad_lr, config.hypergrad_transform)
            for k, (_, p) in zip(keys, named):
                value = torch.full((), raw, dtype=rate_dtype(p), device=p.device)
                self.raw_hypergrad_lrs[k] = nn.Parameter(value)

    def learned_parameters(self) -> list[nn.Parameter]:
        """Every tensor the meta-optimizer updates (``requires_grad=True``)."""
        return [p for p in self.parameters() if p.requires_grad]

    def init_params(self) -> dict[str, Tensor]:
        """Initial weights by parameter name (in the autograd graph when learned)."""
        return {n: self.init[_key(n)] for n in self.names}

    def rates(self, step: int = 0) -> dict[str, Tensor]:
        """Effective rates ``α`` used at inner step ``step`` (``exp`` of the log-rates)."""
        if self.config.rates == "fixed":
            return {n: self.log_rates[_key(n)] for n in self.names}
        if self.config.rates == "step_tensor":
            if not 0 <= step < self.config.inner_steps:
                raise ValueError(
                    f"rates='step_tensor' learned {self.config.inner_steps} inner step(s); "
                    f"there is no rate for step {step}"
                )
            return {n: self.log_rates[_key(n)][step].exp() for n in self.names}
        return {n: self.log_rates[_key(n)].exp() for n in self.names}

    def rate_table(self) -> dict[str, Tensor]:
        """Every step's rates: shape ``(inner_steps,)`` per name for ``step_tensor``, else ``rates()``."""
        if self.config.rates == "step_tensor":
            return {n: self.log_rates[_key(n)].exp() for n in self.names}
        return self.rates()

    def hypergrad_lrs(self) -> dict[str, Tensor] | None:
        """Learned positive ``hypergrad_lr`` per name, or ``None`` when not learned."""
        if not self.config.learn_hypergrad_lr:
            return None
        transform = self.config.hypergrad_transform
        return {n: positive(self.raw_hypergrad_lrs[_key(n)], transform) for n in self.names}
