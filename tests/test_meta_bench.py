"""Smoke test of the meta-learner benchmark (metalr.meta.benchmark): rows, output, agreement.

No timing assertions. The backends' meta-gradients (initial weights and ∂/∂log α) must agree on
one batch to 1e-6 — metalr vmap and loop always, higher and learn2learn MetaSGD when importable.
"""

from __future__ import annotations

import csv
import importlib.util

import pytest
import torch

from metalr.meta import benchmark as mb

HAVE_HIGHER = importlib.util.find_spec("higher") is not None
HAVE_L2L = importlib.util.find_spec("learn2learn") is not None
TINY = {"rounds": 2, "iterations": 1, "warmup": 1, "batch_size": 3, "shots": 4, "hidden": 8}


def _expected_backends() -> set[str]:
    names = {mb.VMAP, mb.LOOP}
    if HAVE_HIGHER:
        names |= {mb.HIGHER_SGD, mb.HIGHER_SGDHD}
    if HAVE_L2L and mb.learn2learn_status()[0]:
        names.add(mb.L2L)
    return names


@pytest.fixture(scope="module")
def result() -> mb.MetaBenchResult:
    threads = torch.get_num_threads()
    try:
        return mb.run_benchmark(steps=(1, 2), **TINY)
    finally:
        torch.set_num_threads(threads)


def test_every_backend_and_step_count_has_a_row(result):
    names = _expected_backends()
    assert {(r.backend, r.steps) for r in result.rows} == {(n, s) for n in names for s in (1, 2)}
    assert result.threads == 1
    assert result.reference == (mb.L2L if mb.L2L in names else mb.LOOP)
    for row in result.rows:
        assert len(row.rates) == 2 and all(x > 0 for x in row.rates), row.backend
        assert row.median > 0 and row.iqr >= 0 and row.ratio > 0
        if row.backend == row.reference:
            assert row.ratio == pytest.approx(1.0)
            assert row.grad_diff == 0.0
        # float32 at the benchmark's starting point: agreement up to rounding.
        assert row.grad_diff <= 1e-5 * max(1.0, row.grad_scale), row.backend
    if mb.L2L not in names:
        assert mb.L2L in result.skipped
        assert not any(r.goal for r in result.rows)
    else:
        assert {r.steps for r in result.rows if r.goal} == {1, 2}


@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradients_agree_across_backends(steps):
    torch.manual_seed(0)
    batch = mb.sinusoid_tasks(4, 5, torch.Generator().manual_seed(1), dtype=torch.float64)
    factories, _, _ = mb.available_backends()
    assert {mb.VMAP, mb.LOOP} <= set(factories)
    grads = {
        name: make(steps, mb.make_model(8, dtype=torch.float64)).meta_gradients(batch)
        for name, make in factories.items()
    }
    ref = grads[mb.LOOP]
    assert len(ref) == 12  # 3 layers x (weight, bias) x (init, log-rate)
    assert any(float(g.abs().max()) > 1e-3 for g in ref[6:]), "rate gradients all ~0"
    for name, gs in grads.items():
        assert len(gs) == len(ref), name
        for g, r in zip(gs, ref):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif(not HAVE_L2L, reason="learn2learn is not installed (benchmark-only extra)")
def test_learn2learn_row_is_the_reference(result):
    assert result.reference == mb.L2L
    assert "learn2learn" in result.versions


def test_steps_update_the_meta_parameters():
    batch = mb.sinusoid_tasks(3, 4, torch.Generator().manual_seed(2))
    factories, _, _ = mb.available_backends()
    for name, make in factories.items():
        runner = make(1, mb.make_model(8))
        before = [g.clone() for g in runner.meta_gradients(batch)]
        runner.step(batch)
        after = runner.meta_gradients(batch)
        assert any(not torch.equal(a, b) for a, b in zip(after, before)), name


def test_main_prints_and_writes_table(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = mb.main(
            ["--steps", "1", "--rounds", "2", "--iterations", "1", "--warmup", "0",
             "--batch-size", "2", "--shots", "3", "--backends", mb.VMAP, mb.LOOP, "--quiet",
             "--output", str(tmp_path / "bench_meta.md")]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    out = capsys.readouterr().out
    assert "threads: 1" in out and f"| {mb.VMAP} | 1 |" in out
    md = (tmp_path / "bench_meta.md").read_text()
    assert "| backend | inner steps | meta-tasks/s |" in md and "goal metalr vmap" in md
    with open(tmp_path / "bench_meta.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["backend"] for r in rows} == {mb.VMAP, mb.LOOP}
    assert all(float(r["meta_tasks_per_s"]) > 0 for r in rows)
    assert all(r["reference"] == mb.LOOP for r in rows)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backends"):
        mb.available_backends(["jax"])
