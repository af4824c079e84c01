"""Smoke version of ``experiments/ab_cpu_kernels.py`` (paired A/B of the fused CPU step against
another revision's kernels): HEAD's sources against the checkout, with the base build replaced by
the checkout's own extension (CI builds it once in setup; a second build would cost ~80 s)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from metalr.functional import _cpu_kernels

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

pytestmark = pytest.mark.compile


def test_ab_harness_times_both_builds_and_checks_their_values(monkeypatch, capsys):
    if _cpu_kernels.load() is None:
        pytest.skip("no C++ compiler: there is no kernel to compare")
    git = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=EXPERIMENTS, capture_output=True, check=False
    )
    if git.returncode:
        pytest.skip("not a git checkout")
    import ab_cpu_kernels
    from torch.utils import cpp_extension

    built = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: built.append(kw) or _cpu_kernels.load())
    for mode in ("exact", "lagged"):
        code = ab_cpu_kernels.main(
            ["--base", "HEAD", "--mode", mode, "--pairs", "3", "--params", "4000", "--tensors", "4"]
        )
        out = capsys.readouterr().out
        assert code == 0 and "same parameters and rates: True" in out
        assert "today ÷ base" in out and f"mode {mode}" in out
    assert [Path(s).name for s in built[0]["sources"]] == ["hd_step.cpp", "hd_element.cpp"]
    assert sys.modules["metalr.functional._cpu_kernels"] is _cpu_kernels  # restored
