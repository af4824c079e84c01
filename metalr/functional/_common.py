"""Small tensor helpers shared by the update rules (complex views, safe sqrt, write-back) and the
validation of a rule's named constants."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from metalr.functional._hypergrad import RateUpdate


def as_real_list(ts: Sequence[Tensor]) -> list[Tensor]:
    """Real views of tensors (complex ones gain a trailing dimension of 2), like torch.optim."""
    return [torch.view_as_real(t) if t.is_complex() else t for t in ts]


def from_real(t: Tensor, like: Tensor) -> Tensor:
    """Undo :func:`as_real_list` for ``t`` computed from ``like``'s real view, in its dtype."""
    if like.is_complex():
        return torch.view_as_complex(t.to(like.real.dtype).contiguous())
    return t.to(like.dtype)


def broadcast_rate(rate: Tensor, param: Tensor) -> Tensor:
    """A per-element rate shaped for the real view of a complex parameter."""
    return rate.unsqueeze(-1) if rate.dim() > 0 and param.is_complex() else rate


def pow_tensor(base: float, exponent: Tensor) -> Tensor:
    """``base ** exponent`` with the base as a tensor: under torch.compile a Python float base
    becomes a symbolic float when schedulers change betas (OneCycleLR), and ``float ** tensor``
    with a symbolic base computed wrong results on torch 2.13."""
    if torch.compiler.is_compiling():  # as_tensor specializes the float: correct values
        base_t = torch.as_tensor(base, dtype=exponent.dtype, device=exponent.device)
    else:  # a fill kernel, no host-to-device copy: capturable in a CUDA graph
        base_t = torch.full((), base, dtype=exponent.dtype, device=exponent.device)
    return torch.pow(base_t, exponent)


def negate_if(grads: Sequence[Tensor], flag: bool) -> list[Tensor]:
    return [-g for g in grads] if flag else list(grads)


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose derivative at 0 is 0 instead of inf (so no 0·inf = NaN)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


def select(keep: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where the 0-d flag ``keep`` is true, else ``old`` (a skipped step)."""
    return torch.where(keep, new, old)


def element_keep(grad: Tensor, grads_finite: Tensor | None) -> Tensor:
    """Lagged mode's per-element skip: true where ``grad`` (its real view) is finite, and
    ``grads_finite`` (the other param groups' flag) holds."""
    ok = torch.isfinite(as_real_list([grad])[0])
    return ok if grads_finite is None else ok & grads_finite.to(ok.device)


def tracks_grad(*values: object) -> bool:
    """Whether autograd would record a step over ``values`` (tensors, or lists, tuples and dicts
    of them; anything else is ignored): grad mode is on and some tensor requires grad."""
    if not torch.is_grad_enabled():
        return False
    stack = list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, Tensor):
            if v.requires_grad:
                return True
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return False


def step_written_back(
    step: Callable[..., Any], state: NamedTuple, grads: Sequence[Tensor], hyper: dict[str, Any]
) -> Any:
    """``step(state[0], grads, *state[1:], **hyper)`` (a rule's pure step) with its result
    copied into ``state``'s tensors, the controllers and the trails (:func:`write_back`), and
    returned (without the controllers and trails). Under autograd (:func:`tracks_grad`) the step reads clones of
    them: the graph then saves the clones, whose versions never change, not the state the
    write-back bumps (torch's differentiable Adam clones ``exp_avg`` for the same reason)."""
    controllers, trails = hyper.get("controllers"), hyper.get("trails")
    read = state
    if tracks_grad(state, grads, hyper):
        read = type(state)(*(_clones(values) for values in state))
        if controllers is not None:
            hyper = {**hyper, "controllers": _clones(controllers)}
        if trails is not None:
            hyper = {**hyper, "trails": _clones(trails)}
    new = step(read[0], grads, *read[1:], **hyper)
    if trails is not None:
        new, new_controllers, new_trails = new
        write_back((controllers, trails), (new_controllers, new_trails))
    elif controllers is not None:
        new, new_controllers = new
        write_back((controllers,), (new_controllers,))
    write_back(state, new)
    return new


def _clones(values: Sequence[Tensor | None]) -> list[Tensor | None]:
    return [t.clone() if t is not None else None for t in values]


def mutable_view(t: Tensor) -> Tensor:
    """``t``, or a one-element view of it when it is 0-d: the tensor to write a state update into
    in place. Under torch.compile, torch 2.13 (CPU) drops an in-place op on a 0-d float64 graph
    input that the graph does not return (a float64 model's 0-d rates, or a 0-d parameter and its
    buffers); through a view the write reaches the input."""
    return t.view(1) if t.dim() == 0 else t


def write_back(dst: NamedTuple, src: NamedTuple) -> None:
    """Copy every tensor of ``src`` into the matching tensor of ``dst`` in place (through
    :func:`mutable_view`: a float64 model's 0-d rates would be lost under torch.compile)."""
    for dst_list, src_list in zip(dst, src):
        for d, s in zip(dst_list, src_list):
            if d is not None and s is not None and d is not s:
                mutable_view(d).copy_(s)


def default_foreach(params: Sequence[Tensor], differentiable: bool) -> bool:
    """Multi-tensor path unless differentiable, scripting, or a tensor subclass is present."""
    if differentiable or torch.jit.is_scripting():
        return False
    return all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in params)


def host_readable(t: Tensor) -> bool:
    """True when reading ``t`` on the host is free: a CPU tensor outside ``torch.compile``."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def full_value(t: Tensor) -> Tensor:
    """A reduction over a sharded ``DTensor`` (FSDP2) as a plain tensor, all-reduced over ranks."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(t, dtensor):
        return t.full_tensor()
    return t


def sharded_context(params: Sequence[Tensor]) -> contextlib.AbstractContextManager:
    """With ``DTensor`` parameters (FSDP2), let plain scalar rates mix with them as replicated."""
    dtensor = _dtensor_type()
    if dtensor is not None and any(isinstance(p, dtensor) for p in params):
        from torch.distributed.tensor.experimental import implicit_replication

        return implicit_replication()
    return contextlib.nullcontext()


def commit_rates(
    rates: list[Tensor], new_rates: list[Tensor], finite: Tensor, known_finite: bool
) -> None:
    """Write new multipliers in place; where the step is skipped (``finite`` false) keep the old.

    ``known_finite``: the caller already read the flag on the host and it was true.
    """
    values = (
        new_rates if known_finite else [torch.where(finite, n, r) for n, r in zip(new_rates, rates)]
    )
    foreach_copy_(rates, values)


def foreach_copy_(targets: list[Tensor], values: list[Tensor]) -> None:
    """``torch._foreach_copy_``, one copy at a time where a target is a DTensor (FSDP2), which
    has no sharding rule for the foreach copy."""
    dtensor = _dtensor_type()
    if dtensor is not None and any(isinstance(t, dtensor) for t in targets):
        for t, v in zip(targets, values):
            t.copy_(v)
    else:
        torch._foreach_copy_(targets, values)


def commit_update(
    rates: list[Tensor],
    controllers: Sequence[Tensor] | None,
    update: RateUpdate,
    known_finite: bool,
) -> None:
    """:func:`commit_rates` for an ``adapt_rates`` result (a ``RateUpdate``): the rates and, for
    the ``"seek"`` rule, its controller vectors and trails (both already gated by the flag)."""
    new_rates, finite, new_controllers = update[0], update[1], update[2]
    commit_rates(rates, new_rates, finite, known_finite)
    if controllers:  # a list of their own: rates may be sharded (DTensor), controllers never are
        commit_rates(list(controllers), new_controllers, finite, known_finite=True)  # gated
    if update.trails is not None:  # the long-horizon signal's (gated)
        for old, new in zip(update.trail_state, update.trails):
            if old is not new:
                old.copy_(new)


def torch_fused_kernel_applies(
    kernel: str, params: Sequence[Tensor], rates: Sequence[Tensor]
) -> bool:
    """torch's fused ``kernel`` (``_fused_adam_``/``_fused_sgd_``) can do the update: one scalar
    rate per tensor, real floats, eager mode."""
    return (
        hasattr(torch, kernel)
        and not torch.compiler.is_compiling()  # no fake kernel: inductor fuses the step itself
        and all(r.dim() == 0 for r in rates)
        and all(
            # The kernels' tensor-lr dtype rules differ by device (CUDA wants float32, the CPU
            # the parameter's dtype, half types misread it): use them where they agree with us.
            (p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64))
            or (p.device.type == "cuda" and p.dtype == torch.float32)
            for p in params
        )
    )


#: Constants that are decays: they must stay below 1.
_DECAYS = (
    "turn_decay", "signal_decay", "signal_sq_decay", "decay", "far_decay", "vanish_decay",
    "loss_decay",
)  # fmt: skip


def real_number(value: object) -> float | None:
    """``value`` as a float if it is one real number: a Python, NumPy or ``Decimal`` number, a
    one-element tensor or array, or a string that spells a number (YAML 1.1 reads ``1e-3`` as
    one); else None (a bool, None, a word, a vector: refused by the caller with the key and its
    range)."""
    if isinstance(value, (bool, complex)) or value is None or type(value).__name__ == "bool_":
        return None
    if isinstance(value, Tensor):
        return float(value) if value.numel() == 1 and not value.is_complex() else None
    try:
        return float(value)  # numbers, NumPy scalars and one-element arrays, numeric strings
    except (TypeError, ValueError):
        return None


def resolve_constants(
    kind: str,
    defaults: Mapping[str, float],
    bounds: Mapping[str, tuple[float, float, bool]],
    given: Mapping[str, float] | None,
    *,
    finite: bool = False,
) -> dict[str, float]:
    """``defaults`` overridden by ``given``, each value checked against ``bounds[key] = (low,
    high, low is exclusive)`` (decays also below 1; ``finite``: no infinity either). Raises
    ``ValueError`` naming ``kind[key]`` and its range; unknown keys are refused."""
    out = dict(defaults)
    for key, value in (given or {}).items():
        if key not in defaults:
            raise ValueError(f"Invalid {kind} key: {key!r}; expected one of {sorted(defaults)}")
        lo, hi, open_lo = bounds[key]
        v = real_number(value)
        ok = v is not None and (lo < v if open_lo else lo <= v) and v <= hi and not math.isnan(v)
        if ok and key in _DECAYS:
            ok = v < 1.0
        if ok and finite:
            ok = not math.isinf(v)
        if not ok:
            bracket = "(" if open_lo else "["
            close = ")" if key in _DECAYS else "]"
            raise ValueError(
                f"Invalid {kind}[{key!r}] value: {value!r}; expected a number in "
                f"{bracket}{lo}, {hi}{close}"
            )
        out[key] = v
    return out


def scalar_lr(lr: float | Tensor) -> float | Tensor:
    """``group['lr']`` as the update rules take it: a number or a 0-d tensor.

    Like torch.optim, metalr accepts a one-element tensor ``lr`` of any shape (``[1]``,
    ``[1, 1]``); the rules read it through a 0-d view so it broadcasts as a scalar (and stays in
    the autograd graph when it requires grad).
    """
    if isinstance(lr, Tensor) and lr.dim() > 0:
        return lr.reshape(())
    return lr
