"""The ``fused=True`` path: hand-written kernels where they apply, else a rule's single-tensor
step compiled by ``torch.compile``.

:func:`kernel_backend` picks the kernels: Triton on CUDA (:mod:`metalr.functional._triton_kernels`,
one launch for the lagged step, two for the exact one), C++ on the CPU
(:mod:`metalr.functional._cpu_kernels`), both for group/tensor granularity, and C++ for the exact
Adam-HD step at element granularity on the CPU. Other element-granularity steps, half precision
on the CPU, float64 on CUDA and sharded state use the compiled step below.

Inductor turns the pure step into two loops per tensor (one reduction for the hypergradient,
one elementwise update), C++/OpenMP on CPU and Triton on GPU. The first call compiles
(20-45 s on a 2-core CPU); later calls reuse the graph while shapes and dtypes stay the same.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


@functools.cache
def compiled(fn: Callable[..., object]) -> Callable[..., object]:
    """``torch.compile(fn)``, built once per function, for in-place steps over lists of tensors.

    ``combo_kernels`` lets inductor launch the per-tensor loops of all parameters together
    (measured on an H100 at 100M parameters: AdamHD tensor 2.01× → 1.71× fused Adam, element
    1.93× → 1.39×; see ``experiments/results/``).

    0-d CPU tensors in the list arguments (the rates at group/tensor granularity, Adam's step
    counters, 0-d parameters) are not written inside the graph: torch 2.13's compile silently
    dropped in-place writes to 0-d float64 CPU inputs, so float64 rates never adapted. The
    graph writes into clones of them instead and returns the clones, which are copied back
    after it (a few scalar copies per step).
    """
    step = torch.compile(_with_scalars_returned(fn), dynamic=False, options={"combo_kernels": True})

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> object:
        result, new_scalars = step(*args, **kwargs)
        targets = _cpu_scalars(args)
        if targets:
            torch._foreach_copy_(targets, new_scalars)
        return result

    return run


def _is_cpu_scalar(t: object) -> bool:
    return isinstance(t, Tensor) and t.dim() == 0 and t.device.type == "cpu"


def _cpu_scalars(args: Sequence[Any]) -> list[Tensor]:
    """The 0-d CPU tensors of the list arguments, in order."""
    return [t for arg in args if isinstance(arg, list) for t in arg if _is_cpu_scalar(t)]


def _with_scalars_returned(fn: Callable[..., object]) -> Callable[..., tuple[object, list]]:
    """``fn`` run on clones of the 0-d CPU tensors of its list arguments; returns the clones."""

    @functools.wraps(fn)
    def step(*args: Any, **kwargs: Any) -> tuple[object, list[Tensor]]:
        clones: list[Tensor] = []

        def substitute(t: Any) -> Any:
            if not _is_cpu_scalar(t):
                return t
            clones.append(t.clone())
            return clones[-1]

        args = tuple([substitute(t) for t in a] if isinstance(a, list) else a for a in args)
        return fn(*args, **kwargs), clones

    return step


def kernel_backend(params: Sequence[Tensor], rates: Sequence[Tensor], hyper: dict) -> Any | None:
    """The module whose ``adam_hd_step`` / ``sgd_hd_step`` takes this fused step, or None.

    Their steps return False (having changed nothing) when they decline at run time (no C++
    compiler, buffers not created yet): the caller then takes the eager path. A step with trails
    (``seek["horizon"] > 0``) has no kernel: ``fused=True`` compiles the pure step instead.
    """
    if not params or hyper.get("trails") is not None:  # the long-horizon signal: eager/compiled
        return None
    if params[0].device.type == "cuda":
        try:
            from metalr.functional import _triton_kernels
        except ImportError:  # pragma: no cover - torch's CUDA builds ship triton
            return None
        return _triton_kernels if _triton_kernels.applies(params, rates, **hyper) else None
    from metalr.functional import _cpu_kernels

    return _cpu_kernels if _cpu_kernels.applies(params, rates, **hyper) else None


#: Device types where ``fused=None`` (the default) takes the kernels: CUDA, where the eager
#: multi-tensor path launches ~20 small kernels per parameter tensor (measured on an H200 for a
#: 149-tensor GPT: 2,956 launches and 60 ms of host time per step, against 8 launches and 1 ms
#: for torch's fused AdamW). The CPU's C++ kernels are built on first use (tens of seconds once
#: per machine), so there they stay opt-in (``fused=True``).
AUTO_FUSED_DEVICES = frozenset({"cuda"})
#: Whether the default path has run the kernels once / given up on them (see below).
_AUTO = {"ran": False, "failed": False}


def run_default_kernels(
    params: Sequence[Tensor],
    rates: Sequence[Tensor],
    hyper: dict,
    foreach: bool | None,
    differentiable: bool,
    call: Callable[[Any], bool],
) -> bool:
    """``fused=None``: take the step through the kernels (``call(backend)``) where they apply
    and the caller chose no path (``foreach`` unset, not ``differentiable``); returns whether
    the step was taken. ``METALR_DEFAULT_FUSED=0`` turns this off.

    If the kernels fail before they have ever run in this process (a GPU or driver that Triton
    cannot compile for), one warning says so and the default path is eager from then on; the
    kernels write nothing before they are compiled, so the step is not applied twice. After
    one successful run their errors propagate (``fused=True`` always propagates them).
    """
    if (
        _AUTO["failed"]
        or foreach is not None
        or differentiable
        or not params
        or params[0].device.type not in AUTO_FUSED_DEVICES
        or os.environ.get("METALR_DEFAULT_FUSED", "1") == "0"
    ):
        return False
    backend = kernel_backend(params, rates, hyper)
    if backend is None:
        return False
    if _AUTO["ran"]:
        return call(backend)
    try:
        taken = call(backend)
    except Exception as err:  # noqa: BLE001 - any failure before a first success: eager instead
        _AUTO["failed"] = True
        warnings.warn(
            f"metalr: the fused kernels failed on first use ({type(err).__name__}: {err}); "
            "steps with fused=None take the eager path from now on (fused=True shows the error)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _AUTO["ran"] = taken
    return taken


def _fused_devices() -> list[str]:
    """The device types torch's own ``fused=True`` optimizers accept."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # pragma: no cover - private helper moved
        return ["cpu", "cuda", "mps", "xpu"]
    return _get_fused_kernels_supported_devices()


def check_fused_supported(params: Sequence[Tensor], name: str) -> None:
    """Raise (as torch.optim does) for tensors the compiled step cannot run on."""
    devices = _fused_devices()
    for p in params:
        if not p.is_floating_point() or type(p) not in (torch.Tensor, torch.nn.Parameter):
            raise RuntimeError(
                f"{name}(fused=True) requires real floating-point plain tensors, got {p.dtype} "
                f"{type(p).__name__}"
            )
        if p.device.type not in devices:
            raise RuntimeError(
                f"{name}(fused=True) requires all the params to be floating point Tensors of "
                f"supported devices: {devices} but {p.dtype} and {p.device.type}"
            )


def as_lr_tensor(lr: float | Tensor, rates: Sequence[Tensor]) -> float | Tensor:
    """``lr`` as a 0-d tensor beside the rates, so schedulers changing it do not recompile."""
    if not rates:
        return lr
    return torch.as_tensor(lr, dtype=rates[0].dtype).to(rates[0].device, non_blocking=True)
