"""How HyperLR's checkpoint holds the wrapped optimizer's state, and the state-dict hooks.

``torch.distributed.checkpoint`` (DCP) keeps only ``state`` (per parameter) and
``param_groups`` of an optimizer's state dict, and loads a checkpoint *into a template*: the
state dict of a fresh optimizer after one zero step. So HyperLR folds the wrapped optimizer's
state into each parameter's entry under ``"wrapped"`` (:func:`fold_wrapped_state`), and
metalr's optimizers create every state entry at the parameter's first step (validation and
loss-spike statistics included: ``HypergradOptimizer._complete_state``), so the
template has a slot for each.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch.optim import Optimizer

#: Key of the wrapped optimizer's state inside each parameter's entry of a HyperLR checkpoint.
WRAPPED_STATE_KEY = "wrapped"
#: Param-group flag of a HyperLR checkpoint whose wrapped part is kept whole, at the top level
#: (the param groups travel wherever the state does: a load can tell that part went missing).
KEPT_WHOLE_KEY = "hd_wrapped_kept_whole"


def fold_wrapped_state(own: dict[str, Any], wrapped: Mapping[str, Any]) -> None:
    """Put ``wrapped``'s state for each parameter into that parameter's entry of ``own`` (under
    :data:`WRAPPED_STATE_KEY`, ``{}`` where it has none: both checkpoints index the parameters
    alike, the groups being shared). A wrapped checkpoint with more than per-parameter state and
    param groups is kept whole under a top-level ``"wrapped"`` instead (the older format)."""
    indices = {i for group in own["param_groups"] for i in group["params"]}
    states = wrapped.get("state", {})
    whole = kept_whole(wrapped, indices)
    own["param_groups"] = [{**g, KEPT_WHOLE_KEY: whole} for g in own["param_groups"]]
    if whole:
        own["wrapped"] = wrapped
        # the entries are the live dicts, whose "wrapped" links the wrapped optimizer's state:
        # left there, a loader that keeps only per-parameter state (DCP) would take part of it
        own["state"] = {
            index: {k: v for k, v in entry.items() if k != WRAPPED_STATE_KEY}
            for index, entry in own["state"].items()
        }
        return
    for index in set(states) | set(own["state"]):  # new entries: torch's are the live ones
        own["state"][index] = {
            **own["state"].get(index, {}),
            WRAPPED_STATE_KEY: states.get(index, {}),
        }


def kept_whole(wrapped: Mapping[str, Any], indices: set[int]) -> bool:
    """Whether :func:`fold_wrapped_state` keeps the wrapped checkpoint whole, under a top-level
    ``"wrapped"``: it holds more than per-parameter state and param groups, or state of
    parameters outside ``indices`` (those of HyperLR's groups). Such a checkpoint cannot travel
    through ``torch.distributed.checkpoint``, which keeps only the per-parameter part."""
    states = wrapped.get("state", {})
    return set(wrapped) != {"state", "param_groups"} or not set(states) <= indices


def unfold_wrapped_state(
    state_dict: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Split a checkpoint of :func:`fold_wrapped_state`'s format into HyperLR's part and the
    wrapped optimizer's, or None when no parameter's entry holds the wrapped state."""
    entries = {i: s for i, s in state_dict.get("state", {}).items() if isinstance(s, Mapping)}
    if not any(WRAPPED_STATE_KEY in s for s in entries.values()):
        return None
    own_states, wrapped_states = {}, {}
    for index, entry in entries.items():
        own = {k: v for k, v in entry.items() if k != WRAPPED_STATE_KEY}
        if own:
            own_states[index] = own
        if entry.get(WRAPPED_STATE_KEY):
            wrapped_states[index] = entry[WRAPPED_STATE_KEY]
    groups = state_dict["param_groups"]
    return {**state_dict, "state": own_states}, {"state": wrapped_states, "param_groups": groups}


@contextlib.contextmanager
def hooks_held(optimizer: Optimizer, attribute: str) -> Iterator[list[Callable[..., Any]]]:
    """Hold back the hooks in ``optimizer.<attribute>`` (torch's ordered dict of them) for the
    block, which gets them as a list to run itself: HyperLR runs its state-dict hooks around
    the whole checkpoint, the wrapped optimizer's state included, not around torch's part of it.
    Hooks registered inside the block (metalr's own, for the load) run there as usual."""
    held = getattr(optimizer, attribute)
    setattr(optimizer, attribute, OrderedDict())
    try:
        yield list(held.values())
    finally:
        setattr(optimizer, attribute, held)


def run_hooks(
    optimizer: Optimizer, state_dict: dict[str, Any], hooks: list[Callable[..., Any]]
) -> dict[str, Any]:
    """``state_dict`` after held state-dict hooks (save post hooks, load pre hooks), in order;
    each may return a replacement."""
    for hook in hooks:
        result = hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    return state_dict
