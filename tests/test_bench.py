"""Smoke test of the step benchmark (metalr.bench): every row, sane times, state-byte ratios.

No timing assertions: only that the benchmark runs and measures the right things.
"""

from __future__ import annotations

import csv

import pytest
import torch

from metalr import SGDHD, AdamHD, bench
from metalr.functional._controller import CONTROLLER_SIZE
from metalr.functional._validation_state import VALIDATION_SIZE

TINY = 20_000
STATE_SLACK = 0.01

EXPECTED_ROWS = {
    "torch SGD(momentum, foreach)",
    "torch Adam (foreach)",
    "SGDHD tensor",
    "AdamHD group",
    "AdamHD tensor",
    "AdamHD element",
    "AdamHD tensor additive",
    "AdamHD tensor normalized",
    "AdamHD tensor no restart",
    "AdamHD tensor (restart ÷ none)",
    "AdamHD tensor (seek ÷ normalized)",
    "SGDHD tensor normalized",
    "SGDHD tensor (seek ÷ normalized)",
    "AdamHD tensor foreach=False",
    "SGDHD tensor foreach=False",
    "HyperLR(torch SGD momentum) tensor",
}


def _expected_names(device: torch.device) -> set[str]:
    names = set(EXPECTED_ROWS)
    if bench._torch_fused_ok(torch.optim.Adam, device):
        names |= {"torch Adam (fused)", "HyperLR(torch Adam fused) tensor"}
    else:
        names.add("HyperLR(torch Adam foreach) tensor")
    if bench._torch_fused_ok(torch.optim.SGD, device, lr=0.1, momentum=0.9):
        names.add("torch SGD(momentum, fused)")
    return names


@pytest.fixture(scope="module")
def result() -> bench.BenchResult:
    threads = torch.get_num_threads()
    try:
        return bench.run_benchmark(TINY, repeats=2, warmup=1, fused=False)
    finally:
        torch.set_num_threads(threads)


def test_every_row_with_positive_times(result):
    assert {r.name for r in result.rows} == _expected_names(torch.device("cpu"))
    assert not result.skipped
    assert result.threads == 1
    assert abs(result.params - TINY) / TINY < 0.05 and result.tensors == 20
    for row in result.rows:
        assert len(row.times_ms) == 2 and all(t > 0 for t in row.times_ms), row.name
        assert row.median_ms > 0 and row.iqr_ms >= 0 and row.ratio > 0, row.name
        if row.name == row.reference:
            assert row.ratio == pytest.approx(1.0)


def test_shapes_mix_matrices_and_vectors():
    shapes = bench.make_shapes(5_000_000, 20)
    assert len(shapes) == 20
    assert {len(s) for s in shapes} == {1, 2}
    total = sum(torch.Size(s).numel() for s in shapes)
    assert abs(total - 5_000_000) / 5_000_000 < 0.01


def test_state_bytes_match_torch(result):
    adam = next(r for r in result.rows if r.name == r.reference and r.family == "adam")
    sgd = result.row(bench.SGD_REF)
    param_bytes = adam.param_bytes
    # torch Adam: two moments and a scalar step per tensor; SGD: one momentum buffer.
    assert adam.state_ratio == pytest.approx(2.0, rel=STATE_SLACK)
    assert sgd.state_ratio == pytest.approx(1.0, rel=STATE_SLACK)
    # Group/tensor granularity adds O(tensors), not O(parameters): one float32 rate per tensor,
    # for the default "seek" rule one controller vector (CONTROLLER_SIZE float32 scalars), and
    # for every rule the validation statistics (VALIDATION_SIZE float32 scalars).
    n_tensors = len(bench.make_shapes(TINY))
    seek_extra = n_tensors * (1 + CONTROLLER_SIZE + VALIDATION_SIZE) * 4
    for name, extra in (("AdamHD group", seek_extra), ("AdamHD tensor", seek_extra),
                        ("AdamHD tensor additive", n_tensors * (1 + VALIDATION_SIZE) * 4)):  # fmt: skip
        row = result.row(name)
        assert row.state_bytes - adam.state_bytes == extra, name
        assert row.state_ok, name
    # Element granularity adds exactly one parameter-sized buffer (its rates) and, per tensor,
    # the seek controller and the validation statistics.
    element = result.row("AdamHD element")
    per_tensor = n_tensors * (CONTROLLER_SIZE + VALIDATION_SIZE) * 4
    assert element.state_bytes - adam.state_bytes == param_bytes + per_tensor
    assert element.state_ok
    assert result.row("SGDHD tensor").state_bytes - sgd.state_bytes == seek_extra
    # HyperLR counts the wrapped optimizer's state plus its own direction buffer and the same
    # per-tensor entries as the native optimizers.
    hyper = next(r for r in result.rows if r.name.startswith("HyperLR(torch Adam"))
    assert hyper.state_bytes - adam.state_bytes == param_bytes + seek_extra
    hyper_sgd = result.row("HyperLR(torch SGD momentum) tensor")
    assert hyper_sgd.state_bytes - sgd.state_bytes == param_bytes + seek_extra


def test_hypergradient_paths_ran(result):
    for row in result.rows:
        if row.name.startswith(("AdamHD", "SGDHD", "HyperLR")):
            assert row.multiplier is not None, row.name
            lo, hi = row.multiplier
            assert (lo, hi) != (1.0, 1.0), f"{row.name}: rates never moved"


def test_main_prints_and_writes_table(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = bench.main(
            ["--params", "5000", "--repeats", "2", "--warmup", "1", "--no-fused", "--quiet",
             "--only", "AdamHD tensor", "--output", str(tmp_path / "bench")]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    out = capsys.readouterr().out
    assert "torch " in out and "threads: 1" in out and "| AdamHD tensor |" in out
    md = (tmp_path / "bench.md").read_text()
    assert "| optimizer | median ms |" in md
    with open(tmp_path / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["optimizer"] for r in rows} >= {"AdamHD tensor", bench.ADAM_REF, bench.SGD_REF}
    assert all(float(r["median_ms"]) > 0 for r in rows)


@pytest.mark.compile
@pytest.mark.skipif(
    not (bench.supports_fused(AdamHD) or bench.supports_fused(SGDHD)),
    reason="metalr optimizers have no fused= keyword yet",
)
def test_fused_rows():
    threads = torch.get_num_threads()
    try:
        result = bench.run_benchmark(TINY, repeats=2, warmup=2, fused=True, only=["fused"])
    finally:
        torch.set_num_threads(threads)
    fused = [r for r in result.rows if r.name.startswith(("AdamHD", "SGDHD"))]
    assert fused, result.skipped
    lagged = {
        "AdamHD tensor fused lagged",
        "AdamHD group fused lagged",
        "SGDHD tensor fused lagged",
    }
    assert lagged <= {r.name for r in fused}, result.skipped
    for row in fused:
        assert all(t > 0 for t in row.times_ms), row.name
        assert row.state_ok, (row.name, row.state_ratio)


def test_fused_rows_carry_issue_12_goals(monkeypatch):
    """The kernels' rows are judged by issue 12's table: exact ≤ 1.6× (CPU) / 1.5× (CUDA),
    element ≤ 1.4× / 1.3×, lagged ≤ 1.3× / 1.1×; the default (foreach) rows keep ≤ 1.3× / 1.15×."""
    from metalr import bench_specs

    # the rows only (no CUDA here): torch's fused optimizers taken as available on both devices
    monkeypatch.setattr(bench_specs, "_torch_fused_ok", lambda *a, **kw: True)

    for device, exact, element, lagged, default in (
        ("cpu", 1.60, 1.40, 1.30, 1.30),
        ("cuda", 1.50, 1.30, 1.10, 1.15),
    ):
        specs = {s.name: s for s in bench_specs.make_specs(torch.device(device), fused=True)}
        if "AdamHD tensor fused" not in specs:
            continue  # no fused rows where the optimizers lack fused=
        assert specs["AdamHD tensor fused"].time_goal == exact
        assert specs["AdamHD group fused"].time_goal == exact
        assert specs["AdamHD element fused"].time_goal == element
        assert specs["AdamHD tensor fused lagged"].time_goal == lagged
        assert specs["AdamHD tensor"].time_goal == default
