"""The fused steps' controller bookkeeping, traced by ``torch.compile`` into one graph.

After a fused pass (C++ on the CPU, Triton on CUDA) the ``"seek"`` rule turns the pass's
per-tensor sums into new rates and controller vectors: the cosines, the ramp, the turn, the
running averages, the tie — about a hundred tensor ops on ``[n]`` vectors
(:func:`metalr.functional._controller.seek_update_stacked` and its helpers). Run op by op
they cost more than their arithmetic: ~0.4 ms a step on a CPU at 20 tensors, next to ~6 ms
for torch's fused Adam on 5M parameters, and on a GPU about a hundred kernel launches. Traced,
the same Python functions become one loop (C++ on the CPU, a Triton kernel on CUDA): ~70 µs on
the CPU. There is no second copy of the math: :func:`compiled` compiles the rule's own
functions.

The first call of each function compiles it (seconds; inductor keeps an on-disk cache for later
processes). New shapes or constants recompile once, then the changed sizes are traced as
dynamic. Where compiling fails (no C++ compiler for inductor's CPU code, an unsupported
platform) the function warns once and runs eagerly from then on, with the same values to
rounding. ``METALR_COMPILE_CONTROLLER=0`` in the environment keeps every call eager.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

#: Environment switch: "0" runs the bookkeeping eagerly (op by op).
ENV_SWITCH = "METALR_COMPILE_CONTROLLER"


def enabled() -> bool:
    """Whether the bookkeeping is compiled (``METALR_COMPILE_CONTROLLER`` is not ``"0"``)."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def compiled(fn: F) -> F:
    """``fn`` (pure, tensor ops only, no host sync) through ``torch.compile``, with ``fn`` itself
    as the fallback when compiling is switched off, fails, or is already under way (inside a
    caller's own ``torch.compile`` the call is traced inline)."""
    state: dict[str, Any] = {"compiled": None, "failed": False}

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if state["failed"] or not enabled() or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if state["compiled"] is None:
            state["compiled"] = torch.compile(fn, fullgraph=True, dynamic=False)
        try:
            return state["compiled"](*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any compiler failure: run eagerly instead
            state["failed"] = True
            warnings.warn(
                f"metalr: compiling {fn.__name__} failed ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); it runs eagerly from now on "
                f"(same values, slower; set {ENV_SWITCH}=0 to skip the attempt)",
                RuntimeWarning,
                stacklevel=2,
            )
            return fn(*args, **kwargs)

    run.eager = fn  # type: ignore[attr-defined]
    return run  # type: ignore[return-value]
