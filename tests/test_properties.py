"""Property tests (hypothesis) over shapes, dtypes, granularities, rules and hyperparameters.

For finite gradients: every parameter, rate and state tensor stays finite; every effective rate
lies in ``lr_bounds``; and two runs from the same seed are identical (``torch.equal``).
Gradients are drawn from a seeded generator (not from a loss), at scales from 1e-3 to 1e3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from _configs import state_entry_is_sound
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metalr
from metalr.optim._base import RATE_KEY

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
KINDS = ("SGDHD", "AdamHD", "AdamWHD", "HyperLR(SGD)", "HyperLR(Adam)")
SETTINGS = settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@dataclass(frozen=True)
class Case:
    kind: str
    dtype: str
    shapes: tuple[tuple[int, ...], ...]
    granularity: str
    rule: str
    lr: float
    hypergrad_lr: float
    lr_bounds: tuple[float, float]
    momentum: float
    nesterov: bool
    betas: tuple[float, float]
    grad_scale: float
    steps: int
    seed: int


@st.composite
def cases(draw: Any) -> Case:
    rule = draw(st.sampled_from(["normalized", "additive"]))
    lr = draw(st.floats(1e-4, 1.0))
    if rule == "normalized":
        beta = draw(st.sampled_from([0.0, 0.02, 0.1, 0.5]))
    else:
        beta = draw(st.sampled_from([0.0, 1e-6, 1e-4, 1e-2, 1.0]))
    bounds = draw(st.sampled_from(["default", "lower", "upper", "both", "above_lr", "below_lr"]))
    lo, hi = {
        "default": (0.0, math.inf),
        "lower": (0.5 * lr, math.inf),
        "upper": (0.0, 1.5 * lr),
        "both": (0.9 * lr, 1.1 * lr),
        "above_lr": (2.0 * lr, 4.0 * lr),  # the initial rate itself is out of bounds
        "below_lr": (0.1 * lr, 0.5 * lr),
    }[bounds]
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    shapes = draw(
        st.lists(
            st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3
        )
    )
    return Case(
        kind=draw(st.sampled_from(KINDS)),
        dtype=draw(st.sampled_from(list(DTYPES))),
        shapes=tuple(shapes),
        granularity=draw(st.sampled_from(["group", "tensor", "element"])),
        rule=rule,
        lr=lr,
        hypergrad_lr=beta,
        lr_bounds=(lo, hi),
        momentum=momentum,
        nesterov=momentum > 0 and draw(st.booleans()),
        betas=(draw(st.sampled_from([0.0, 0.5, 0.9])), draw(st.sampled_from([0.9, 0.999]))),
        grad_scale=draw(st.sampled_from([1e-3, 1.0, 1e3])),
        steps=draw(st.integers(2, 5)),
        seed=draw(st.integers(0, 2**16)),
    )


def _build(case: Case, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    hyper = {
        "granularity": case.granularity, "rule": case.rule, "lr_bounds": case.lr_bounds,
        "hypergrad_lr": case.hypergrad_lr,
    }  # fmt: skip
    if case.kind == "SGDHD":
        return metalr.SGDHD(
            params, lr=case.lr, momentum=case.momentum, nesterov=case.nesterov, **hyper
        )
    if case.kind in ("AdamHD", "AdamWHD"):
        cls = metalr.AdamHD if case.kind == "AdamHD" else metalr.AdamWHD
        return cls(params, lr=case.lr, betas=case.betas, **hyper)
    if case.kind == "HyperLR(SGD)":
        inner = torch.optim.SGD(params, lr=case.lr, momentum=case.momentum, nesterov=case.nesterov)
    else:
        inner = torch.optim.Adam(params, lr=case.lr, betas=case.betas)
    return metalr.HyperLR(inner, **hyper)


def _run(
    case: Case,
) -> tuple[list[torch.Tensor], torch.optim.Optimizer, list[dict[torch.Tensor, torch.Tensor]]]:
    """Train on seeded random gradients; return params, optimizer and the rates after each step."""
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(case.seed)
    params = [
        torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        for shape in case.shapes
    ]
    opt = _build(case, params)
    history = []
    for _ in range(case.steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * case.grad_scale).to(
                dtype
            )
        opt.step()
        history.append({p: r.clone() for p, r in opt.effective_lrs().items()})
    return params, opt, history


@SETTINGS
@given(cases())
def test_finite_inputs_give_finite_outputs(case: Case) -> None:
    params, opt, history = _run(case)
    for p in params:
        assert torch.isfinite(p).all()
        assert p.dtype == DTYPES[case.dtype]
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert state_entry_is_sound(key, value), key
    for rates in history:
        for p, rate in rates.items():
            assert torch.isfinite(rate).all()
            expected_dtype = torch.float32 if p.dtype == torch.bfloat16 else p.dtype
            assert opt.state[p][RATE_KEY].dtype == expected_dtype


@SETTINGS
@given(cases())
def test_effective_rates_stay_within_lr_bounds(case: Case) -> None:
    """FAILS while the additive rule can go negative under the default lower bound 0 (see
    ``test_additive_rule_default_bounds_never_negative``); every other case holds."""
    _, _, history = _run(case)
    lo, hi = case.lr_bounds
    slack = 1e-6  # the multiplier is clamped to bound / lr, then multiplied back by lr
    for rates in history:
        for rate in rates.values():
            r = rate.double()
            assert (r >= lo * (1 - slack)).all(), (r.min().item(), lo)
            assert (r <= hi * (1 + slack)).all(), (r.max().item(), hi)


@SETTINGS
@given(cases())
def test_same_seed_same_run(case: Case) -> None:
    params_a, opt_a, hist_a = _run(case)
    params_b, opt_b, hist_b = _run(case)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))
    for ra, rb in zip(hist_a, hist_b, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(ra.values(), rb.values(), strict=True))
    for pa, pb in zip(params_a, params_b, strict=True):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
@pytest.mark.parametrize("kind", ["SGDHD", "AdamHD"])
def test_additive_rule_default_bounds_never_negative(kind: str, granularity: str) -> None:
    """The default ``lr_bounds=(0, inf)`` must keep effective rates >= 0 (README: "rates are never
    negative or NaN").

    FAILS with metalr as of this test (library bug): ``clamp_rates`` in
    ``metalr/functional/_hypergrad.py`` skips a lower bound of 0 (``has_lo = lo > 0``), so the
    additive rule ``m ← m + β⟨g, d⟩/lr`` drives the multiplier negative when the gradient turns
    against the last step. Measured: SGDHD(lr=0.1, rule="additive", hypergrad_lr=10) reaches an
    effective rate of -19.2 on its third step; the optimizer then climbs the loss.
    """
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    cls = metalr.SGDHD if kind == "SGDHD" else metalr.AdamHD
    opt = cls([p], lr=0.1, rule="additive", hypergrad_lr=10.0, granularity=granularity)
    for i in range(6):
        # Gradients that alternate against the previous step: a large negative hypergradient.
        p.grad = torch.rand(5, dtype=torch.float64) * p.detach().sign() * (1 if i % 2 else -1) * 5
        opt.step()
        assert (opt.effective_lrs()[p] >= 0).all(), f"negative effective rate at step {i}"
