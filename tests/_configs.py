"""The conformance table: every metalr optimizer configuration, plus the shared test problems.

In the style of torch's ``common_optimizers.py`` (``OptimizerInfo``) and optax's shared test
harness: each :class:`OptimConfig` knows how to build its optimizer over some parameters, which
learning rate makes it converge on each problem, and which checks apply to it. Test modules
parametrize over :data:`CONFIGS` (or a filtered view) with the readable ``id`` of each entry.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

import metalr
from metalr.functional._validation_state import LEVEL, LOSS_BEST
from metalr.optim._state_keys import VALIDATION_KEY

GRANULARITIES = ("group", "tensor", "element")
RULES = ("normalized", "additive")

_UNSET: Any = object()


@dataclasses.dataclass(frozen=True, eq=False)
class OptimConfig:
    """One optimizer configuration of the table.

    ``family`` is the class name (``"SGDHD"``, ``"AdamHD"``, ``"AdamWHD"``, ``"HyperLR"``);
    ``variant`` names the options (``"momentum"``) or, for HyperLR, the wrapped optimizer.
    ``kwargs`` go to the metalr class (or to the wrapped optimizer for HyperLR). ``problems``
    maps a problem name (``"mlp"``, ``"quadratic"``, ``"rosenbrock"``) to ``(lr, additive β)``
    that converge there.
    """

    family: str
    variant: str
    granularity: str
    rule: str
    kwargs: dict[str, Any]
    problems: dict[str, tuple[float, float]]
    inner: type[torch.optim.Optimizer] | None = None

    @property
    def id(self) -> str:
        head = f"HyperLR({self.variant})" if self.is_wrapper else f"{self.family}-{self.variant}"
        return f"{head}-{self.granularity}-{self.rule}"

    @property
    def is_wrapper(self) -> bool:
        return self.family == "HyperLR"

    @property
    def has_foreach(self) -> bool:
        """HyperLR has no ``foreach`` flag of its own."""
        return not self.is_wrapper

    @property
    def inner_is_stateless(self) -> bool:
        """The update keeps no state a NaN could poison (only HyperLR around plain SGD)."""
        return self.is_wrapper and self.inner is torch.optim.SGD and not self.kwargs.get("momentum")

    @property
    def cls(self) -> type[torch.optim.Optimizer]:
        return getattr(metalr, self.family)

    def lr(self, problem: str = "mlp") -> float:
        return self.problems[problem][0]

    def hypergrad_lr(self, problem: str = "mlp") -> float:
        """0.02 for the normalized rule; the additive rule's β depends on the problem's scale."""
        return NORMALIZED_BETA if self.rule == "normalized" else self.problems[problem][1]

    def make(
        self,
        params: Any,
        *,
        problem: str = "mlp",
        lr: float | None = None,
        hypergrad_lr: float | None = _UNSET,
        lr_bounds: tuple[float, float] | None = None,
        foreach: bool | None = _UNSET,
        **extra: Any,
    ) -> torch.optim.Optimizer:
        """Build the optimizer over ``params`` (tensors or param-group dicts).

        ``lr`` and ``hypergrad_lr`` default to the config's values for ``problem``; ``extra``
        updates ``kwargs`` (for HyperLR they go to the wrapped optimizer, as do lr and foreach).
        """
        hyper: dict[str, Any] = {
            "hypergrad_lr": self.hypergrad_lr(problem) if hypergrad_lr is _UNSET else hypergrad_lr,
            "granularity": self.granularity,
            "rule": self.rule,
        }
        if lr_bounds is not None:
            hyper["lr_bounds"] = lr_bounds
        kwargs = {**self.kwargs, **extra}
        if foreach is not _UNSET:
            kwargs["foreach"] = foreach
        lr = self.lr(problem) if lr is None else lr
        if self.is_wrapper:
            assert self.inner is not None
            return metalr.HyperLR(self.inner(params, lr=lr, **kwargs), **hyper)
        return self.cls(params, lr=lr, **kwargs, **hyper)


NORMALIZED_BETA = 0.02

# Per problem: (lr, hypergrad_lr of the additive rule). The additive β is scale-dependent (it
# multiplies ⟨g, d⟩/lr), so it is sized per problem; on the MLP it is the table's value
# (SGD 1e-3 as in Baydin et al., Adam 1e-6). test_goes_downhill checks these converge.
# SGD's rates on Rosenbrock keep the multiplier's worst-case growth (e^{0.02·150} ≈ 20) stable.
_SGD = {"mlp": (0.1, 1e-3), "quadratic": (2e-3, 1e-6), "rosenbrock": (6e-5, 1e-9)}
_SGD_MOMENTUM = {"mlp": (0.05, 1e-3), "quadratic": (1e-3, 1e-8), "rosenbrock": (1e-4, 1e-9)}
_SGD_NESTEROV = {"mlp": (0.05, 1e-3), "quadratic": (1e-3, 1e-8), "rosenbrock": (5e-5, 1e-9)}
_ADAM = {"mlp": (0.01, 1e-6), "quadratic": (0.1, 1e-6), "rosenbrock": (0.3, 1e-6)}
_RMSPROP = {"mlp": (3e-3, 1e-6), "quadratic": (0.03, 1e-6), "rosenbrock": (0.1, 1e-6)}
_ADAGRAD = {"mlp": (0.05, 1e-5), "quadratic": (0.3, 1e-5), "rosenbrock": (0.1, 1e-5)}

NATIVE_VARIANTS: dict[str, list[tuple[str, dict[str, Any], dict[str, tuple[float, float]]]]] = {
    "SGDHD": [
        ("plain", {}, _SGD),
        ("momentum", {"momentum": 0.9}, _SGD_MOMENTUM),
        ("nesterov", {"momentum": 0.9, "nesterov": True}, _SGD_NESTEROV),
        ("wd", {"momentum": 0.5, "weight_decay": 1e-3}, _SGD),
    ],
    "AdamHD": [("default", {}, _ADAM)],
    "AdamWHD": [("default", {"weight_decay": 1e-2}, _ADAM)],
}

#: HyperLR's wrapped optimizers: name -> (class, kwargs, per-problem (lr, additive β)).
WRAPPED: dict[
    str, tuple[type[torch.optim.Optimizer], dict[str, Any], dict[str, tuple[float, float]]]
] = {
    "SGD": (torch.optim.SGD, {}, _SGD),
    "Adam": (torch.optim.Adam, {}, _ADAM),
    "RMSprop": (torch.optim.RMSprop, {}, _RMSPROP),
    "Adagrad": (torch.optim.Adagrad, {}, _ADAGRAD),
}


def _build_table() -> list[OptimConfig]:
    table = []
    for family, variants in NATIVE_VARIANTS.items():
        for variant, kwargs, problems in variants:
            for granularity in GRANULARITIES:
                for rule in RULES:
                    table.append(OptimConfig(family, variant, granularity, rule, kwargs, problems))
    for name, (inner, kwargs, problems) in WRAPPED.items():
        for granularity in GRANULARITIES:
            for rule in RULES:
                table.append(
                    OptimConfig("HyperLR", name, granularity, rule, kwargs, problems, inner)
                )
    return table


CONFIGS: list[OptimConfig] = _build_table()
NATIVE_CONFIGS = [c for c in CONFIGS if not c.is_wrapper]
WRAPPER_CONFIGS = [c for c in CONFIGS if c.is_wrapper]


def params_for(configs: Sequence[OptimConfig]) -> list[Any]:
    """``pytest.param`` entries with readable ids."""
    import pytest

    return [pytest.param(c, id=c.id) for c in configs]


def with_foreach(configs: Sequence[OptimConfig]) -> list[Any]:
    """(config, foreach) pairs: both code paths for native optimizers, HyperLR once."""
    import pytest

    out = []
    for c in configs:
        if c.has_foreach:
            out += [pytest.param(c, fe, id=f"{c.id}-foreach={fe}") for fe in (False, True)]
        else:
            out.append(pytest.param(c, None, id=c.id))
    return out


# ---------------------------------------------------------------------------------------------
# Problems. Each is a list of leaf tensors plus ``loss(params, step) -> Tensor`` so that copies
# of an optimizer (deepcopy, pickle, load_state_dict) can be driven over their own parameters.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Problem:
    params: list[Tensor]
    loss: Callable[[Sequence[Tensor], int], Tensor]

    def clone_params(self) -> list[Tensor]:
        return [p.detach().clone().requires_grad_() for p in self.params]


def mlp_problem(dtype: torch.dtype = torch.float64, seed: int = 0, batches: int = 4) -> Problem:
    """A tanh MLP (4 tensors) on random non-degenerate regression data, one minibatch per step."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(5, 3, generator=g, dtype=torch.float64) / math.sqrt(3)
    b1 = 0.1 * torch.randn(5, generator=g, dtype=torch.float64)
    w2 = torch.randn(2, 5, generator=g, dtype=torch.float64) / math.sqrt(5)
    b2 = 0.1 * torch.randn(2, generator=g, dtype=torch.float64)
    xs = torch.randn(batches, 8, 3, generator=g, dtype=torch.float64).to(dtype)
    ys = torch.randn(batches, 8, 2, generator=g, dtype=torch.float64).to(dtype)
    params = [t.to(dtype).requires_grad_() for t in (w1, b1, w2, b2)]

    def loss(ps: Sequence[Tensor], step: int = 0) -> Tensor:
        x, y = xs[step % batches], ys[step % batches]
        h = torch.tanh(x @ ps[0].T + ps[1])
        return ((h @ ps[2].T + ps[3] - y) ** 2).mean()

    return Problem(params, loss)


def param_groups(params: Sequence[Tensor], lr: float) -> list[dict[str, Any]]:
    """The MLP's four tensors as three param groups with learning rates lr, lr/2 and 2 lr."""
    return [
        {"params": list(params[:2])},
        {"params": [params[2]], "lr": lr * 0.5},
        {"params": [params[3]], "lr": lr * 2.0},
    ]


def quadratic_problem(seed: int = 0, dim: int = 10, condition: float = 100.0) -> Problem:
    """``0.5 (x - x*)ᵀ A (x - x*)`` with eigenvalues 1..condition, x split into two tensors."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(condition), dim, dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    x_star = torch.randn(dim, generator=g, dtype=torch.float64)
    x0 = x_star + torch.randn(dim, generator=g, dtype=torch.float64)
    split = dim * 3 // 5
    params = [x0[:split].clone().requires_grad_(), x0[split:].clone().requires_grad_()]

    def loss(ps: Sequence[Tensor], step: int = 0) -> Tensor:
        r = torch.cat(list(ps)) - x_star
        return 0.5 * r @ (a @ r)

    return Problem(params, loss)


def rosenbrock_problem() -> Problem:
    """2-D Rosenbrock from the classic start (-1.2, 1); minimum 0 at (1, 1)."""
    params = [torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)]

    def loss(ps: Sequence[Tensor], step: int = 0) -> Tensor:
        x, y = ps[0][0], ps[0][1]
        return (1 - x) ** 2 + 100 * (y - x**2) ** 2

    return Problem(params, loss)


def all_params(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def train(
    opt: torch.optim.Optimizer,
    loss: Callable[[Sequence[Tensor], int], Tensor],
    steps: int,
    start: int = 0,
    params: Sequence[Tensor] | None = None,
) -> list[float]:
    """``steps`` full optimizer steps on ``loss`` over ``params`` (default: the optimizer's)."""
    params = all_params(opt) if params is None else list(params)
    losses = []
    for k in range(start, start + steps):
        opt.zero_grad()
        value = loss(params, k)
        value.backward()
        opt.step()
        losses.append(value.item())
    return losses


def rates(opt: torch.optim.Optimizer, params: Sequence[Tensor] | None = None) -> list[Tensor]:
    """The learned multipliers ``state[p]['lr_multiplier']`` in parameter order."""
    params = all_params(opt) if params is None else params
    return [opt.state[p]["lr_multiplier"] for p in params]


def state_tensors(opt: torch.optim.Optimizer) -> list[tuple[int, str, Tensor]]:
    """Every tensor in ``opt.state`` as (param index, key, tensor), in parameter order."""
    out = []
    for i, p in enumerate(all_params(opt)):
        if p in opt.state:
            for key, value in sorted(opt.state[p].items()):
                if isinstance(value, Tensor):
                    out.append((i, key, value))
    return out


def same_state_value(a: object, b: object) -> bool:
    """Two values of an optimizer's per-parameter state are the same: tensors bit for bit
    (dtype included), anything else (``hd_follows_validation``, a bool) by ``==``."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype
            and torch.equal(a, b)
        )  # fmt: skip
    return a == b


def state_entry_is_sound(key: str, value: Tensor) -> bool:
    """Whether a state tensor holds no NaN and no infinity where none belongs. The validation
    statistics, created at the first step, say "no observation yet" with a best loss of +inf
    and no level (-inf): those two entries may hold exactly that value."""
    if key != VALIDATION_KEY:
        return bool(torch.isfinite(value).all())
    finite = torch.isfinite(value)
    finite[LOSS_BEST] |= value[LOSS_BEST] == math.inf
    finite[LEVEL] |= value[LEVEL] == -math.inf
    return bool(finite.all())


def snapshot(opt: torch.optim.Optimizer) -> dict[tuple[int, str], Tensor]:
    return {(i, k): v.detach().clone() for i, k, v in state_tensors(opt)}


# Shared by the conformance tests (test_conformance*.py)


def build(cfg: OptimConfig, problem: Problem | None = None, **kwargs: Any):
    """The MLP problem and ``cfg``'s optimizer over it, as three param groups."""
    problem = mlp_problem() if problem is None else problem
    lr = kwargs.get("lr") or cfg.lr()
    return problem, cfg.make(param_groups(problem.params, lr), **kwargs)


def assert_trees_equal(a: Any, b: Any, path: str = "root") -> None:
    """Structural equality with bit-exact tensors (for state dicts)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_trees_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_trees_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, path


def assert_all_equal(xs: list[Tensor], ys: list[Tensor]) -> None:
    assert len(xs) == len(ys)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        assert torch.equal(x, y), f"tensor {i} differs: max |Δ| = {(x - y).abs().max().item()}"


def same_tensors(xs: list[Tensor], ys: list[Tensor]) -> bool:
    return len(xs) == len(ys) and all(x is y for x, y in zip(xs, ys, strict=True))


def adapted(opt: torch.optim.Optimizer) -> bool:
    """Some multiplier moved away from 1 (the adaptation did something)."""
    return any(not torch.all(r == 1) for r in rates(opt))


def assert_same_trajectory(params_a, opt_a, params_b, opt_b, *, rtol: float, atol: float) -> None:
    """Two runs agree: parameters to ``(rtol, atol)``, multipliers to ``rtol``; and the first
    one's multipliers moved (the comparison exercised the adaptation)."""
    for x, y in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
    for x, y in zip(rates(opt_a), rates(opt_b), strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=0)
    assert adapted(opt_a)
