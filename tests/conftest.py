"""Shared pytest setup: one intra-op thread (the CI box is small and shared)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Make tests/_configs.py importable as ``_configs`` from every test module.
sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU, Triton's interpreter runs metalr's Triton kernels on CPU tensors
# (tests/test_triton_kernels.py). It must be on before triton is first imported (its own
# jit'd helpers, e.g. tl.sum, are built at import), so it is set here, for the whole session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
