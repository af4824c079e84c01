"""Shared pytest setup: one intra-op thread (the CI box is small and shared)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# Make tests/_configs.py importable as ``_configs`` from every test module.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
