"""Per-tensor optimizer state held as the rows of one buffer, for multi-tensor kernels.

A fused step reads one multiplier (and one step count, and one controller vector) per parameter
tensor. Kept as separate tensors, every step would stack them into a vector for the kernel and
unbind and copy the results back: a few hundred small operations and launches for a model of
~150 tensors, several milliseconds of host time on a GPU — more than the kernel itself.

:func:`rows_of` instead moves the tensors of such a list, once, into one buffer ``[n, *shape]``
with :meth:`torch.Tensor.set_`: each state tensor stays the same Python object (the one in
``optimizer.state``, ``state_dict()`` and any reference a user holds) and now *is* row ``i`` of
the buffer. The kernels then read and write the buffer directly, and every other path (eager
steps, ``effective_lrs()``, checkpoints) sees the same values through the tensors.

The buffer is found again by the identities of the tensors (the cache holds them, so an identity
cannot be reused while its entry lives). When a list changes (``load_state_dict`` puts new
tensors in the state; a parameter without a gradient leaves a step's list shorter) the new list
is moved into a new buffer, and a list whose tensors moved elsewhere is moved again when it next
comes. Under CUDA-graph capture nothing is moved (``None``: callers take their list path); a
graph captured after the warm-up steps reads the buffer that the warm-up made.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

#: (identities of the tensors) -> (the tensors, their buffer). Bounded: an optimizer that went
#: away leaves its small state alive only until 64 newer lists have been seen.
_ROWS: OrderedDict[tuple[int, ...], tuple[list[Tensor], Tensor]] = OrderedDict()
#: identity of a moved tensor -> the key of the entry whose buffer holds it. A tensor moved into
#: a new buffer (another list holding it: a parameter without a gradient on some steps makes the
#: lists differ) invalidates the entry of its old one.
_OWNER: dict[int, tuple[int, ...]] = {}
_LIMIT = 64


def _forget(key: tuple[int, ...]) -> None:
    tensors, _ = _ROWS.pop(key)
    for t in tensors:
        if _OWNER.get(id(t)) == key:
            del _OWNER[id(t)]


def rows_of(tensors: Sequence[Tensor]) -> Tensor | None:
    """The buffer ``[n, *shape]`` whose row ``i`` is ``tensors[i]`` (moving them into one the
    first time), or None where they cannot share one: different shapes, dtypes or devices,
    tensors that require grad, subclasses, or a CUDA graph being captured."""
    key = tuple(map(id, tensors))
    found = _ROWS.get(key)
    if found is not None:
        _ROWS.move_to_end(key)
        return found[1]
    if not tensors:
        return None
    first = tensors[0]
    if any(
        type(t) is not Tensor
        or t.requires_grad
        or t.shape != first.shape
        or t.dtype != first.dtype
        or t.device != first.device
        for t in tensors
    ):
        return None
    if first.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    for old_key in {_OWNER[k] for k in key if k in _OWNER}:
        _forget(old_key)  # its buffer no longer holds all of its tensors
    with torch.no_grad():
        buffer = torch.stack([t.detach() for t in tensors])
        storage, row = buffer.untyped_storage(), first.numel()
        strides = buffer.stride()[1:]
        for i, t in enumerate(tensors):
            t.set_(storage, i * row, t.shape, strides)
    _ROWS[key] = (list(tensors), buffer)
    _OWNER.update(dict.fromkeys(key, key))
    if len(_ROWS) > _LIMIT:
        _forget(next(iter(_ROWS)))
    return buffer


def rows_or_stack(
    tensors: Sequence[Tensor],
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, bool]:
    """``(rows, shared)``: the tensors' own buffer (:func:`rows_of`; ``shared`` True: writing
    it writes them) where they have one (on ``device``, if given), else a stacked copy (converted
    to ``device``/``dtype`` where given; False)."""
    buf = rows_of(tensors)
    if buf is not None and (device is None or buf.device == device):
        return buf, True
    return torch.stack([t.to(device=device, dtype=dtype) for t in tensors]), False


def write_rows(tensors: Sequence[Tensor], rows: tuple[Tensor, bool], new: Tensor) -> None:
    """Write ``new`` (``[n, ...]``) into ``tensors``: one copy into their buffer where ``rows``
    (:func:`rows_or_stack`) is it, else row by row."""
    buf, shared = rows
    if shared:
        buf.copy_(new)
    else:
        torch._foreach_copy_(list(tensors), list(new.unbind(0)))


def zero_marked(tensors: Sequence[Tensor], mask: Tensor) -> None:
    """Zero the tensors that ``mask`` (``[n]`` bool) marks, on the device (no host read): one
    multiply per tensor by its 0/1 flag."""
    keep = (~mask).unbind(0)
    torch._foreach_mul_(list(tensors), [k.to(t.dtype) for k, t in zip(keep, tensors)])


def zero_rows(tensors: Sequence[Tensor], rows: tuple[Tensor, bool], mask: Tensor) -> None:
    """:func:`zero_marked` for tensors (step counters) that may be rows of one buffer: then one
    op on the buffer."""
    buf, shared = rows
    if shared:
        buf.mul_((~mask).to(buf.dtype))
    else:
        zero_marked(tensors, mask)


def add_to_rows(
    tensors: Sequence[Tensor], rows: tuple[Tensor, bool], increment: float | Tensor
) -> None:
    """Add ``increment`` to every tensor (the step counters): in one op where ``rows``
    (:func:`rows_or_stack`) is their buffer, else one by one through the list overload, which
    does not read a 0-d tensor ``increment`` on the host (a sync, illegal under CUDA-graph
    capture)."""
    buf, shared = rows
    if shared:
        buf.add_(increment)
    else:
        torch._foreach_add_(list(tensors), [increment] * len(tensors))
