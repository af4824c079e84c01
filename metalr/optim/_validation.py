"""Argument checks shared by metalr's optimizers, worded like torch.optim's."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from metalr.functional._controller import FAMILIES, resolve_seek
from metalr.functional._hypergrad import DEFAULT_NORMALIZED_HYPERGRAD_LR
from metalr.functional._signals import GRANULARITIES, RULES
from metalr.functional.spike_guard import resolve_spike_guard
from metalr.functional.validation import (
    PLAIN_RULE_VALIDATION_DEFAULTS,
    SEEK_ONLY_VALIDATION_KEYS,
    resolve_validation,
)


def check_lr(lr: Any) -> None:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_nonnegative(name: str, value: float) -> None:
    if not 0.0 <= value:
        raise ValueError(f"Invalid {name} value: {value}")


def check_flag(name: str, value: object) -> bool:
    """A keyword flag that must be a real ``bool`` (a truthy string or tensor is refused)."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r}; expected True or False")  # noqa: TRY004
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {allowed}")


def resolve_hypergrad_lr(
    hypergrad_lr: float | None, rule: str, additive_default: float | None, family: str = "adam"
) -> float:
    """The rule's default when ``None`` (the seek rule's: the optimizer family's fitted β);
    otherwise a finite number >= 0."""
    if hypergrad_lr is None:
        if rule == "normalized":
            return DEFAULT_NORMALIZED_HYPERGRAD_LR
        if rule == "seek":
            return FAMILIES[family][1]
        if additive_default is None:
            raise ValueError(
                "Invalid hypergrad_lr value: None; rule='additive' needs an explicit "
                "hypergrad_lr >= 0 here (its scale depends on the wrapped optimizer)"
            )
        return additive_default
    if isinstance(hypergrad_lr, bool) or not isinstance(hypergrad_lr, (int, float)):
        raise ValueError(f"Invalid hypergrad_lr value: {hypergrad_lr!r}; expected a number >= 0")  # noqa: TRY004
    if not (0.0 <= hypergrad_lr < math.inf):
        raise ValueError(
            f"Invalid hypergrad_lr value: {hypergrad_lr}; expected a finite number >= 0"
        )
    return float(hypergrad_lr)


def check_lr_bounds(lr_bounds: Any) -> tuple[float, float]:
    """``(min, max)``: two numbers with ``0 <= min <= max`` and ``min`` finite (``max`` may be
    ``inf``); a string or a mapping is refused even when it iterates to two numbers."""
    message = (
        f"Invalid lr_bounds: {lr_bounds!r}; expected (min, max) with 0 <= min <= max, min finite"
    )
    if isinstance(lr_bounds, (str, bytes, Mapping)):
        raise ValueError(message)  # noqa: TRY004 (torch-style: a bad argument is a ValueError)
    try:
        lo, hi = (float(b) for b in lr_bounds)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not (0.0 <= lo <= hi) or math.isinf(lo):
        raise ValueError(message)
    return lo, hi


def check_mapping(name: str, value: Any) -> None:
    """``seek``/``validation``: None or a mapping of constants (named in the error otherwise)."""
    if value is not None and not isinstance(value, Mapping):
        raise ValueError(
            f"Invalid {name}: {value!r}; expected a dict of constants, e.g. {name}={{...}}, or None"
        )


def check_fused_flags(fused: bool | None, foreach: bool | None, differentiable: bool) -> None:
    """torch's rule: ``fused=True`` with ``foreach=True`` or ``differentiable=True`` is refused."""
    if fused and foreach:
        raise ValueError("Invalid flags: fused=True and foreach=True cannot be set together")
    if fused and differentiable:
        raise ValueError("Invalid flags: fused=True does not support differentiable=True")


def check_hyper_options(
    hypergrad_lr: float | None,
    granularity: str,
    rule: str,
    lr_bounds: Any,
    additive_default: float | None,
    seek: Mapping[str, float] | None = None,
    validation: Mapping[str, float] | None = None,
    family: str = "adam",
    spike_guard: bool | Mapping[str, float] | None = None,
    moment_restart: bool = False,
) -> dict[str, Any]:
    """Validate the hypergradient options and return them with defaults resolved (``family``:
    whose fitted seek constants are the defaults, ``"adam"`` or ``"sgd"``; ``moment_restart``:
    whether the optimizer has Adam's moment estimates to restart, ``seek["moment_restart"]``,
    refused with a ``ValueError`` where it has not).

    ``seek`` (constants of the ``"seek"`` rule overriding its fitted defaults) is stored in
    every group, completed; it is refused for the other rules, which do not read it.
    ``validation`` (constants of the validation signal, :mod:`metalr.functional.validation`)
    is stored the same way, for every rule, and so is ``spike_guard`` (None when off; the
    constants of :mod:`metalr.functional.spike_guard` when on).
    """
    check_choice("granularity", granularity, GRANULARITIES)
    check_choice("rule", rule, RULES)
    check_mapping("seek", seek)
    check_mapping("validation", validation)
    if seek is not None and rule != "seek":
        raise ValueError(f"Invalid seek: {dict(seek)!r}; only rule='seek' takes seek constants")
    resolved_seek = resolve_seek(seek, family)
    if not moment_restart and "moment_restart" not in (seek or {}):
        # the restart is on by default where Adam's moments exist; elsewhere it is off
        resolved_seek["moment_restart"] = resolved_seek["restart_match"] = 0.0
    if resolved_seek["moment_restart"] > 0 and not moment_restart:
        raise ValueError(
            f"Invalid seek['moment_restart']: {resolved_seek['moment_restart']!r}; it restarts "
            "Adam's moment estimates at the ramp's turn, which only AdamHD and AdamWHD keep "
            "(expected 0 here)"
        )
    if not resolved_seek["moment_restart"] > 0 and "restart_match" not in (seek or {}):
        resolved_seek["restart_match"] = 0.0  # the default match goes with the restart
    if resolved_seek["restart_match"] > 0 and not resolved_seek["moment_restart"] > 0:
        raise ValueError(
            f"Invalid seek['restart_match']: {resolved_seek['restart_match']!r}; it scales the "
            "rates at the moment restart, so it needs seek['moment_restart'] > 0 (expected 0 "
            "without it)"
        )
    return {
        "hypergrad_lr": resolve_hypergrad_lr(hypergrad_lr, rule, additive_default, family),
        "granularity": granularity,
        "rule": rule,
        "lr_bounds": check_lr_bounds(lr_bounds),
        "seek": resolved_seek,
        "validation": _validation_options(validation, rule, hypergrad_lr, additive_default),
        "spike_guard": resolve_spike_guard(spike_guard),
    }


#: The hypergradient options a param group may set for itself (``check_group_options``).
GROUP_HYPER_KEYS = ("hypergrad_lr", "granularity", "rule", "lr_bounds", "seek", "validation",
                    "spike_guard")  # fmt: skip


def check_group_options(
    group: Mapping[str, Any],
    defaults: Mapping[str, Any],
    additive_default: float | None,
    family: str = "adam",
    moment_restart: bool = False,
) -> dict[str, Any]:
    """The hypergradient options a param group names (``GROUP_HYPER_KEYS``), validated and
    completed as :func:`check_hyper_options` does for the constructor's; ``{}`` when it names
    none (the group then takes the optimizer's, as torch fills any default).

    A group's ``seek`` and ``validation`` override the optimizer's key by key; a group whose
    ``rule`` differs from the optimizer's starts from that rule's own defaults for
    ``hypergrad_lr``, ``seek`` and ``validation`` (the optimizer's were chosen for its rule);
    ``granularity``, ``lr_bounds`` and ``spike_guard`` are inherited either way. Bad values raise
    the constructor's ``ValueError``, naming the key.
    """
    given = {key: group[key] for key in GROUP_HYPER_KEYS if key in group}
    lagged = {"lagged": check_flag("lagged", group["lagged"])} if "lagged" in group else {}
    if not given:
        return lagged
    rule = given.get("rule", defaults["rule"])
    check_choice("rule", rule, RULES)
    same_rule = rule == defaults["rule"]
    seek = given.get("seek")
    check_mapping("seek", seek)
    check_mapping("validation", given.get("validation"))
    if rule == "seek" and same_rule:
        seek = {**defaults["seek"], **(seek or {})}
    validation = dict(given.get("validation") or {})
    if same_rule:  # the optimizer's resolved options, less the keys this rule refuses
        inherited = {key: value for key, value in defaults["validation"].items()
                     if rule == "seek" or key not in SEEK_ONLY_VALIDATION_KEYS}  # fmt: skip
        validation = {**inherited, **validation}
    return lagged | check_hyper_options(
        given.get("hypergrad_lr", defaults["hypergrad_lr"] if same_rule else None),
        given.get("granularity", defaults["granularity"]),
        rule,
        given.get("lr_bounds", defaults["lr_bounds"]),
        additive_default,
        seek,
        validation,
        family,
        spike_guard=given.get("spike_guard", defaults["spike_guard"]),
        moment_restart=moment_restart,
    )


def _validation_options(
    validation: Mapping[str, float] | None,
    rule: str,
    hypergrad_lr: float | None,
    additive_default: float | None,
) -> dict[str, float]:
    """The validation constants: :data:`VALIDATION_DEFAULTS` for the seek rule; the other rules
    default to their own update up and down (:data:`PLAIN_RULE_VALIDATION_DEFAULTS`), and the
    additive rule's β (in rate units) to the training one, since the scale-free default would
    be meaningless there."""
    options = dict(validation or {})
    if rule != "seek":
        ignored = sorted(SEEK_ONLY_VALIDATION_KEYS.intersection(options))
        if ignored:
            raise ValueError(
                f"Invalid validation: {ignored} are read by rule='seek' only; rule={rule!r} "
                "takes 'hypergrad_lr', 'climb' and 'train_weight'"
            )
        options = {**PLAIN_RULE_VALIDATION_DEFAULTS, **options}
    if rule == "additive" and "hypergrad_lr" not in (validation or {}):
        options["hypergrad_lr"] = resolve_hypergrad_lr(hypergrad_lr, rule, additive_default)
    return resolve_validation(options)
