"""The public surface: ``__all__`` lists are importable, sorted, unique and documented."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from types import ModuleType

import pytest
import torch

import metalr

MODULES = ["metalr", "metalr.functional", "metalr.meta", "metalr.optim", "metalr.tasks"]


def _module(name: str) -> ModuleType:
    return importlib.import_module(name)


def _public(name: str) -> list[tuple[str, object]]:
    module = _module(name)
    return [(n, getattr(module, n)) for n in module.__all__]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_import(name: str) -> None:
    module = _module(name)
    assert module.__all__, "empty __all__"
    for public in module.__all__:
        assert hasattr(module, public), f"{name}.{public} is in __all__ but missing"


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_without_duplicates(name: str) -> None:
    names = list(_module(name).__all__)
    assert len(names) == len(set(names)), "duplicates in __all__"
    assert names == sorted(names), f"{name}.__all__ is not in sorted order: {sorted(names)}"


def test_top_level_classes_are_the_optim_classes() -> None:
    for public in metalr.optim.__all__:
        assert getattr(metalr, public) is getattr(metalr.optim, public)
    assert metalr.functional is _module("metalr.functional")


@pytest.mark.parametrize("name", ["metalr", "metalr.optim"])
def test_public_classes_are_optimizers(name: str) -> None:
    classes = [
        obj
        for _, obj in _public(name)
        if inspect.isclass(obj) and obj.__module__.startswith("metalr.optim")
    ]
    assert {c.__name__ for c in classes} == {"AdamHD", "AdamWHD", "HyperLR", "SGDHD"}
    for cls in classes:
        assert issubclass(cls, torch.optim.Optimizer), cls


@pytest.mark.parametrize("name", MODULES)
def test_public_classes_and_functions_have_docstrings(name: str) -> None:
    assert (_module(name).__doc__ or "").strip(), f"{name} has no module docstring"
    undocumented = []
    for public, obj in _public(name):
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not (obj.__doc__ or "").strip():
            undocumented.append(public)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not inspect.isfunction(member):
                    continue
                if not (inspect.getdoc(getattr(obj, attr)) or "").strip():
                    undocumented.append(f"{public}.{attr}")
    assert not undocumented, f"missing docstrings: {undocumented}"


def test_optimizer_methods_documented() -> None:
    """The methods users call on every optimizer (including inherited metalr ones)."""
    for cls in (metalr.SGDHD, metalr.AdamHD, metalr.AdamWHD, metalr.HyperLR):
        for attr in ("step", "effective_lrs", "lr_summary", "state_dict", "load_state_dict"):
            assert (inspect.getdoc(getattr(cls, attr)) or "").strip(), f"{cls.__name__}.{attr}"


def test_version_matches_the_distribution() -> None:
    assert isinstance(metalr.__version__, str)
    assert metalr.__version__ == importlib.metadata.version("metalr")
