"""``MetaConfig``: every option of the meta-learner, validated once, in one place.

The inner loop adapts a model to one task with one of metalr's update rules; the outer loop
learns what the inner loop starts from::

    inner_rule   "sgd"      θ ← θ - α ⊙ ∇L_support(θ)            (MAML, Meta-SGD, MAML++ LSLR)
                 "sgd_hd"   SGD-HD: α itself adapts by hypergradient inside the loop
                 "adam_hd"  Adam-HD: Adam direction, α adapts by hypergradient
    rates        "element"  one learned α per weight (Meta-SGD, Li et al. 2017)
                 "tensor"   one learned α per parameter tensor (per layer)
                 "step_tensor"  a learned α per inner step and tensor (MAML++ LSLR,
                            Antoniou et al. 2019); only with inner_rule "sgd"
                 "fixed"    α = inner_lr, not learned (plain MAML, Finn et al. 2017)

Example:
    >>> cfg = MetaConfig(inner_rule="sgd", rates="element", inner_steps=1, inner_lr=0.01)
    >>> MetaConfig(rates="layer")
    Traceback (most recent call last):
    ValueError: Invalid rates: 'layer'; expected one of 'element', 'tensor', 'step_tensor', 'fixed'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

INNER_RULES = ("sgd", "sgd_hd", "adam_hd")
RATE_KINDS = ("element", "tensor", "step_tensor", "fixed")
ALGORITHMS = ("maml", "reptile")
BACKENDS = ("vmap", "loop")
HYPERGRAD_RULES = ("normalized", "additive")
HYPERGRAD_GRANULARITIES = ("tensor", "group")
HYPERGRAD_TRANSFORMS = ("softplus", "exp")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {allowed}")


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Invalid {name} value: {value!r}; expected a finite number {bound}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r}; expected True or False")  # noqa: TRY004


@dataclass
class MetaConfig:
    """Options of :class:`metalr.meta.MetaLearner` (validated in ``__post_init__``).

    Args:
        inner_rule: ``"sgd"``, ``"sgd_hd"`` or ``"adam_hd"`` (default: "sgd").
        rates: ``"element"``, ``"tensor"``, ``"step_tensor"`` or ``"fixed"`` (default: "element").
        learn_init: learn the initial weights, as MAML does (default: True).
        learn_hypergrad_lr: learn one ``hypergrad_lr`` per tensor for ``sgd_hd``/``adam_hd``;
            ``None`` means yes for those rules with ``algorithm="maml"`` (default: None).
        inner_steps: unrolled inner steps per task, >= 1 (default: 1).
        inner_lr: initial value of every learned rate, or the fixed rate (default: 0.01).
        first_order: first-order MAML (FOMAML): inner gradients are constants (default: False).
        algorithm: ``"maml"`` (differentiate through the inner loop) or ``"reptile"``
            (first-order; move the initial weights towards the adapted ones) (default: "maml").
        meta_lr: Adam's learning rate for the meta-parameters (default: 1e-3).
        meta_batch_size: tasks per meta-step when sampling with ``fit`` (default: 25).
        meta_grad_clip: max global norm of the meta-gradient; ``None`` disables. With 5 inner
            steps unclipped learned rates diverged to NaN (``/work/shared/ENV.md``) (default: 1.0).
        backend: ``"vmap"`` (vectorise the task batch) or ``"loop"`` (one task at a time; needed
            for modules that mutate buffers, e.g. BatchNorm in train mode) (default: "vmap").
        hypergrad_lr: initial ``hypergrad_lr`` of ``sgd_hd``/``adam_hd`` (default: 0.02).
        hypergrad_rule: ``"normalized"`` or ``"additive"`` (default: "normalized").
        hypergrad_granularity: granularity of the in-loop rate adaptation when rates are one per
            tensor: ``"tensor"`` or ``"group"``; element rates always adapt per element
            (default: "tensor").
        hypergrad_transform: how the learned ``hypergrad_lr`` is kept positive, ``"softplus"`` or
            ``"exp"`` (default: "softplus").
        lr_bounds: ``(min, max)`` for every effective rate inside the rule (default: (0, inf)).
        adam_betas: Adam's betas for ``adam_hd`` (default: (0.9, 0.999)).
        adam_eps: Adam's eps for ``adam_hd`` (default: 1e-8).
        reptile_step_size: Reptile's interpolation ε in ``θ ← θ + ε(φ̄ - θ)`` (default: 0.1).
        seed: seed of the learner's task-sampling generator (default: 0).
    """

    inner_rule: str = "sgd"
    rates: str = "element"
    learn_init: bool = True
    learn_hypergrad_lr: bool | None = None
    inner_steps: int = 1
    inner_lr: float = 0.01
    first_order: bool = False
    algorithm: str = "maml"
    meta_lr: float = 1e-3
    meta_batch_size: int = 25
    meta_grad_clip: float | None = 1.0
    backend: str = "vmap"
    hypergrad_lr: float = 0.02
    hypergrad_rule: str = "normalized"
    hypergrad_granularity: str = "tensor"
    hypergrad_transform: str = "softplus"
    lr_bounds: tuple[float, float] = (0.0, math.inf)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    reptile_step_size: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("inner_rule", self.inner_rule, INNER_RULES)
        _choice("rates", self.rates, RATE_KINDS)
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("backend", self.backend, BACKENDS)
        _choice("hypergrad_rule", self.hypergrad_rule, HYPERGRAD_RULES)
        _choice("hypergrad_granularity", self.hypergrad_granularity, HYPERGRAD_GRANULARITIES)
        _choice("hypergrad_transform", self.hypergrad_transform, HYPERGRAD_TRANSFORMS)
        for name in ("learn_init", "first_order"):
            _flag(name, getattr(self, name))
        for name, low in (("inner_steps", 1), ("meta_batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Invalid {name} value: {value!r}; expected an integer >= {low}")
        _positive("inner_lr", self.inner_lr)
        _positive("meta_lr", self.meta_lr)
        _positive("adam_eps", self.adam_eps)
        _positive("reptile_step_size", self.reptile_step_size)
        if self.meta_grad_clip is not None:
            _positive("meta_grad_clip", self.meta_grad_clip)
        self._check_pairs()
        self._check_combinations()

    def _check_pairs(self) -> None:
        try:
            lo, hi = (float(b) for b in self.lr_bounds)
        except (TypeError, ValueError):
            lo, hi = -1.0, -2.0
        if not 0.0 <= lo <= hi:
            raise ValueError(
                f"Invalid lr_bounds: {self.lr_bounds!r}; expected (min, max) with 0 <= min <= max"
            )
        self.lr_bounds = (lo, hi)
        try:
            b1, b2 = (float(b) for b in self.adam_betas)
        except (TypeError, ValueError):
            b1, b2 = -1.0, -1.0
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(
                f"Invalid adam_betas: {self.adam_betas!r}; expected two numbers in [0, 1)"
            )
        self.adam_betas = (b1, b2)

    def _check_combinations(self) -> None:
        adaptive = self.inner_rule != "sgd"
        if self.learn_hypergrad_lr is None:
            self.learn_hypergrad_lr = adaptive and self.algorithm == "maml"
        _flag("learn_hypergrad_lr", self.learn_hypergrad_lr)
        if self.learn_hypergrad_lr and not adaptive:
            raise ValueError(
                "Invalid learn_hypergrad_lr value: True; inner_rule='sgd' has no hypergrad_lr "
                "(use inner_rule='sgd_hd' or 'adam_hd')"
            )
        _positive("hypergrad_lr", self.hypergrad_lr, allow_zero=not self.learn_hypergrad_lr)
        if self.rates == "step_tensor" and adaptive:
            raise ValueError(
                f"Invalid rates: 'step_tensor' needs inner_rule='sgd' (got {self.inner_rule!r}): "
                "a per-step table and in-loop adaptation would both set the step's rate"
            )
        if self.algorithm == "reptile":
            if not self.learn_init:
                raise ValueError(
                    "Invalid learn_init value: False; Reptile learns the initial weights"
                )
            if self.rates != "fixed" or self.learn_hypergrad_lr:
                raise ValueError(
                    "Invalid rates for algorithm='reptile': Reptile is first-order and learns only "
                    "initial weights; use rates='fixed' (and learn_hypergrad_lr=False)"
                )
        elif not (self.learn_init or self.rates != "fixed" or self.learn_hypergrad_lr):
            raise ValueError(
                "Nothing to learn: learn_init=False, rates='fixed' and learn_hypergrad_lr=False"
            )

    @property
    def rule_granularity(self) -> str:
        """The granularity the inner update rule runs at (``"element"`` for element rates)."""
        return "element" if self.rates == "element" else self.hypergrad_granularity

    @property
    def exported_granularity(self) -> str:
        """Granularity of an exported :class:`~metalr.meta.LRPrior` (``"element"``/``"tensor"``)."""
        return "element" if self.rates == "element" else "tensor"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists, ``inf`` becomes the string ``"inf"``)."""

        def plain(v: Any) -> Any:
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            if isinstance(v, float) and math.isinf(v):
                return "inf" if v > 0 else "-inf"
            return v

        return {k: plain(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaConfig:
        """Inverse of :meth:`to_dict`; an unknown key raises ``ValueError``."""
        if not isinstance(data, Mapping):
            raise TypeError(f"MetaConfig.from_dict needs a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown MetaConfig option(s): {', '.join(unknown)}")

        def real(v: Any) -> Any:
            if isinstance(v, list):
                return tuple(real(x) for x in v)
            if v in ("inf", "-inf"):
                return float(v)
            return v

        return cls(**{k: real(v) for k, v in data.items()})
