"""The fused steps' seek bookkeeping traced by torch.compile (``metalr.functional._compiled``):
the same values as the eager functions it compiles, one graph, a fallback, a switch."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from metalr.functional import _compiled
from metalr.functional._controller import CEILING, RAMP, initial_controller, resolve_seek
from metalr.functional._cpu_element import _element_controllers
from metalr.functional._from_sums import seek_from_sums_stacked
from metalr.functional._tie import tie_list, tie_vector

SEEK = resolve_seek(None)
# the gradient gate closes often; the noise hold acts while it is open
GATED = resolve_seek({"vanish": 0.9, "vanish_decay": 0.5, "noise_hold": 1.5})
SIZES = (300, 20, 5000, 90, 7)


def _sums(t: int, n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Per-tensor ``[Σ g·d, Σ g², Σ d²]`` of a run: no direction yet at step 0, agreeing steps
    (the ramp), then disagreeing ones (the turn), a NaN step at 15, noise after."""
    g2 = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    d2 = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5 if t > 0 else torch.zeros(n)
    level = (
        0.9 if t < 8 else (-0.4 if t < 12 else 0.2 * (torch.rand(1, generator=gen).item() - 0.5))
    )
    cos = level + 0.05 * (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5)
    dots = cos * (g2 * d2).sqrt()
    if t == 15:
        dots[1] = float("nan")
    return torch.stack([dots, g2, d2], dim=1).to(dtype)


def _tensor_run(fn, dtype: torch.dtype, granularity: str, steps: int = 30, seek=SEEK):
    gen = torch.Generator().manual_seed(11)
    n = len(SIZES)
    rates = torch.full((n,), 0.5, dtype=dtype)
    ctrl = torch.stack([initial_controller(rates[0], dtype, seek) for _ in range(n)])
    history = []
    for t in range(steps):
        sums = _sums(t, n, gen, dtype)
        grads_finite = torch.tensor(t != 20)  # the optimizer's own flag skips step 20
        rates, ctrl, finite = fn(
            rates, ctrl, sums, grads_finite, 0.05, sizes=SIZES, seek=seek, granularity=granularity
        )
        assert bool(finite) == (t not in (15, 20))
        history.append(torch.cat([rates, ctrl.flatten()]))
    return torch.stack(history), ctrl


def _element_run(fn, dtype: torch.dtype, steps: int = 30):
    gen = torch.Generator().manual_seed(12)
    n = len(SIZES)
    ctrl = torch.stack([initial_controller(torch.zeros(()), dtype, SEEK) for _ in range(n)])
    history = []
    for t in range(steps):
        sums = _sums(t, n, gen, torch.float64)
        extra = torch.stack(
            [torch.rand(n, generator=gen, dtype=torch.float64) * torch.tensor(SIZES) * 0.5,
             torch.rand(n, generator=gen, dtype=torch.float64) + 1.0], dim=1,
        )  # fmt: skip
        ctrl, active = fn(torch.cat([sums, extra], dim=1), ctrl, 0.05, sizes=SIZES, seek=SEEK)
        history.append(torch.cat([ctrl.flatten(), active.reshape(1).to(dtype)]))
    return torch.stack(history), ctrl


@pytest.mark.parametrize("seek", [SEEK, GATED], ids=["defaults", "gradient-gate"])
@pytest.mark.parametrize("granularity", ["tensor", "group"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_bookkeeping_equals_the_eager_functions(granularity, dtype, seek):
    """Through the ramp, the turn, tracking, an inactive first step, a NaN step and a step the
    optimizer's flag skips: the compiled
    graph gives the eager functions' values (to rounding: inductor's exp/log), one graph, no
    recompiles over the run."""
    torch._dynamo.reset()
    counters.clear()
    compiled, _ = _tensor_run(seek_from_sums_stacked, dtype, granularity, seek=seek)
    eager, eager_ctrl = _tensor_run(seek_from_sums_stacked.eager, dtype, granularity, seek=seek)
    assert counters["stats"]["unique_graphs"] == 1
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)
    # the run did go through the ramp and the turn
    assert bool((eager_ctrl[:, RAMP] == 0).all()) and bool(
        torch.isfinite(eager_ctrl[:, CEILING]).all()
    )
    assert not torch.equal(eager[1, : len(SIZES)], eager[-1, : len(SIZES)])
    for skipped in (15, 20):  # nothing moved at the skipped steps
        assert torch.equal(eager[skipped], eager[skipped - 1])


def test_compiled_element_bookkeeping_equals_the_eager_function():
    torch._dynamo.reset()
    counters.clear()
    compiled, _ = _element_run(_element_controllers, torch.float64)
    eager, ctrl = _element_run(_element_controllers.eager, torch.float64)
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    assert bool((ctrl[:, RAMP] == 0).all())  # the turn happened
    assert float(eager[0, -1]) == 0.0 and float(eager[5, -1]) == 1.0  # inactive, then active


def test_switch_keeps_every_call_eager(monkeypatch):
    monkeypatch.setenv(_compiled.ENV_SWITCH, "0")
    assert not _compiled.enabled()
    torch._dynamo.reset()
    counters.clear()
    switched, _ = _tensor_run(seek_from_sums_stacked, torch.float64, "tensor", steps=12)
    assert counters["stats"]["unique_graphs"] == 0
    eager, _ = _tensor_run(seek_from_sums_stacked.eager, torch.float64, "tensor", steps=12)
    assert torch.equal(switched, eager)


def test_a_failed_compile_warns_once_and_runs_eagerly(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(_compiled.torch, "compile", broken_compile)

    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    wrapped = _compiled.compiled(double)
    with pytest.warns(RuntimeWarning, match=r"compiling double failed \(RuntimeError: no C\+\+"):
        assert torch.equal(wrapped(torch.ones(3)), torch.full((3,), 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt
        assert torch.equal(wrapped(torch.arange(3.0)), torch.tensor([0.0, 2.0, 4.0]))
    assert wrapped.eager is double


def test_vector_tie_equals_the_list_tie_bit_for_bit():
    """The stacked tie (one clamp of the vector) sums its centre in the list tie's order: the same
    values bit for bit, so eager steps reproduce records written before it existed."""
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float64):
        for _ in range(50):
            logs = (torch.randn(len(SIZES), generator=gen, dtype=torch.float64) * 3).to(dtype)
            tied = tie_vector(logs, SIZES, 4.0)
            assert torch.equal(tied, torch.stack(tie_list(list(logs.unbind(0)), SIZES, 4.0)))
    assert float(tied.max() - tied.min()) <= 2 * torch.log(torch.tensor(4.0)).item() + 1e-6
    assert not torch.equal(tied, logs)  # the clamp did bind
    assert torch.equal(tie_vector(logs, SIZES, float("inf")), logs)


def test_configurations_past_the_recompile_limit_run_eagerly_the_rest_stay_compiled():
    """Each set of constants is its own graph; past dynamo's recompile_limit the new sets run
    eagerly (one warning), and the sets already compiled keep their graphs."""
    limit = torch._dynamo.config.recompile_limit

    def scaled(x: torch.Tensor, constants: dict) -> torch.Tensor:
        return x * constants["a"] + 1

    wrapped = _compiled.compiled(scaled)
    torch._dynamo.reset()
    counters.clear()
    x = torch.arange(4.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [wrapped(x, {"a": float(i)}) for i in range(limit + 3)]
    for i, out in enumerate(outputs):
        assert torch.equal(out, x * i + 1)
    assert sum("more configurations" in str(w.message) for w in caught) == 1
    assert counters["stats"]["unique_graphs"] == limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(wrapped(x, {"a": 2.0}), x * 2 + 1)  # still its compiled graph
    assert counters["stats"]["unique_graphs"] == limit
