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
processes). Shapes and constants are specialised (``dynamic=False``: the constants steer Python
branches of the rule); a scheduler changing ``lr`` does not recompile (``lr`` is applied
outside). Each set of constants, sizes and dtypes is its own graph; past dynamo's
``recompile_limit`` (8) new sets run eagerly (one warning) and the compiled ones stay compiled.
Where compiling fails (no C++ compiler for inductor's CPU code, an unsupported platform) the
function warns once and runs eagerly from then on, with the same values to rounding.
``METALR_COMPILE_CONTROLLER=0`` in the environment keeps every call eager.
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

#: Inductor options of these graphs: no size/stride asserts in the generated call (the shapes
#: are specialised, ``dynamic=False``, and dynamo's guards already check every input's sizes
#: and strides). With cold caches, after a kernel pass, the call measured ~40-80 µs less of
#: ~390-460 µs (20 tensors, CPU, three alternating runs).
_OPTIONS = {"size_asserts": False}

try:  # raised (fullgraph=True) when a call needs more graphs than dynamo's recompile_limit
    from torch._dynamo.exc import FailOnRecompileLimitHit as _RECOMPILE_LIMIT
except ImportError:  # pragma: no cover - older/newer torch: treated as any compiler failure
    _RECOMPILE_LIMIT = ()  # type: ignore[assignment]


def _recompile_limit() -> object:
    import torch._dynamo.config

    return getattr(torch._dynamo.config, "recompile_limit", "its limit")


def enabled() -> bool:
    """Whether the bookkeeping is compiled (``METALR_COMPILE_CONTROLLER`` is not ``"0"``)."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def compiled(fn: F) -> F:
    """``fn`` (pure, tensor ops only, no host sync) through ``torch.compile``, with ``fn`` itself
    as the fallback when compiling is switched off, fails, or is already under way (inside a
    caller's own ``torch.compile`` the call is traced inline)."""
    state: dict[str, Any] = {"compiled": None, "failed": False, "limit_warned": False}

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if state["failed"] or not enabled() or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if state["compiled"] is None:
            state["compiled"] = torch.compile(fn, fullgraph=True, dynamic=False, options=_OPTIONS)
        try:
            return state["compiled"](*args, **kwargs)
        except _RECOMPILE_LIMIT:  # more configurations than dynamo keeps: this one runs eagerly
            if not state["limit_warned"]:
                state["limit_warned"] = True
                warnings.warn(
                    f"metalr: {fn.__name__} met more configurations (constants, sizes, dtypes) "
                    f"than torch._dynamo keeps compiled ({_recompile_limit()}); new ones run "
                    "eagerly (same values, slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return fn(*args, **kwargs)
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
