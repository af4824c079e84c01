"""Handing an :class:`~metalr.meta.prior.LRPrior` to metalr's drop-in optimizers.

:func:`param_groups_from_prior` builds one param group per parameter with the learned
``hypergrad_lr`` and the inner loop's constants; :func:`load_prior` writes the learned rates
(``optimizer.state[p]['lr_multiplier'] = α / group['lr']``), ``hypergrad_lr`` and optionally the
initial weights, checking everything before it writes anything; :func:`load_step_rates` writes
a MAML++ LSLR prior's rates of one inner step::

    optimizer = metalr.SGDHD(param_groups_from_prior(model, prior), granularity="element")
    load_prior(optimizer, model, prior, load_weights=True)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metalr.functional import rate_dtype
from metalr.functional._controller import settled_controller
from metalr.meta.prior import LRPrior
from metalr.optim import SGDHD, AdamHD
from metalr.optim._base import CONTROLLER_KEY, RATE_KEY, HypergradOptimizer

#: The start of the warning :func:`load_prior` gives for a prior with per-step rates.
STEP_RATES_WARNING = "this prior has per-step rates (MAML++ LSLR)"


def _floats(value: Any) -> tuple[float, ...]:
    """A number or a sequence of numbers as a tuple of floats (``"inf"`` read as inf)."""
    return tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else (float(value),)


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def param_groups_from_prior(
    model: nn.Module, prior: LRPrior, *, fixed_rates: bool = True, **group_options: Any
) -> list[dict[str, Any]]:
    """One param group per trainable parameter, carrying its learned ``hypergrad_lr`` (and the
    rule it was learned for, when the prior has one).

    Pass the result to the optimizer's constructor, then call :func:`load_prior`::

        optimizer = metalr.AdamHD(param_groups_from_prior(model, prior), granularity="tensor")
        load_prior(optimizer, model, prior)

    ``group_options`` (e.g. ``weight_decay=0.0``) are added to every group, after the inner
    loop's own constants the prior records (:func:`inner_constants`: Adam's ``betas`` and
    ``eps`` for ``adam_hd``, ``lr_bounds`` for the hypergradient rules), so the optimizer steps
    as the learned inner loop did.

    A prior learned with fixed rates (``inner_rule="sgd"``: MAML, Meta-SGD, LSLR) keeps them
    fixed (``fixed_rates=True``, the default): its groups get ``hypergrad_lr=0.0``,
    ``rule="additive"`` (a rate move of exactly 0) and the inner loop's ``lr_bounds``, so the
    optimizer follows the inner loop at every step. With ``fixed_rates=False`` (or an optimizer
    built without these groups) the optimizer's own rule adapts the rates from the prior (the
    prior as the start of online adaptation).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_prior_type(prior)
    groups = []
    constants = inner_constants(prior)
    if prior.inner_rule == "sgd" and fixed_rates:
        config = prior.provenance.get("config") or {}
        constants.update(hypergrad_lr=0.0, rule="additive")
        if "lr_bounds" in config:  # the fixed rates were clamped at use
            constants["lr_bounds"] = _floats(config["lr_bounds"])
    for name, p in _trainable(model).items():
        if name not in prior.rates:
            raise ValueError(f"prior has no rate for parameter {name!r}")
        group = {"params": [p], "lr": prior.base_lr, **constants, **group_options}
        if prior.hypergrad_lrs is not None:  # learned for its rule: the group keeps that rule
            group["hypergrad_lr"] = float(prior.hypergrad_lrs[name])
            group.setdefault("rule", prior.hypergrad_rule)
        groups.append(group)
    return groups


def inner_constants(prior: LRPrior) -> dict[str, Any]:
    """The learned inner loop's optimizer constants that :func:`load_prior` checks, as
    param-group options: ``betas`` and ``eps`` (``adam_hd``) and ``lr_bounds`` (the
    hypergradient rules), read from the config in ``prior.provenance`` (``{}`` for a prior
    saved without one). A fixed-rate prior's bounds are :func:`param_groups_from_prior`'s
    (an optimizer that adapts its rates from the prior chooses its own)."""
    config = prior.provenance.get("config") or {}
    out: dict[str, Any] = {}
    if prior.inner_rule == "adam_hd":
        if "adam_betas" in config:
            out["betas"] = _floats(config["adam_betas"])
        if "adam_eps" in config:
            out["eps"] = float(config["adam_eps"])
    if prior.inner_rule != "sgd" and "lr_bounds" in config:
        out["lr_bounds"] = _floats(config["lr_bounds"])  # the config's "inf" -> inf
    return out


def _check_prior_type(prior: Any) -> None:
    if not isinstance(prior, LRPrior):
        hint = "; read a file with LRPrior.load(path)" if isinstance(prior, (str, Path)) else ""
        raise TypeError(f"prior must be an LRPrior, got {type(prior).__name__}{hint}")


def _check_compatible(optimizer: HypergradOptimizer, prior: LRPrior) -> None:
    expected = {"adam_hd": AdamHD, "sgd": SGDHD, "sgd_hd": SGDHD}[prior.inner_rule]
    if isinstance(optimizer, (SGDHD, AdamHD)) and not isinstance(optimizer, expected):
        raise ValueError(  # noqa: TRY004 - a value mismatch between prior and optimizer
            f"prior learned with inner_rule={prior.inner_rule!r} holds rates for "
            f"{expected.__name__}, not {type(optimizer).__name__}"
        )
    constants = inner_constants(prior)
    for i, group in enumerate(optimizer.param_groups):
        if group["granularity"] != prior.granularity:
            raise ValueError(
                f"prior has {prior.granularity!r} rates but param group {i} uses "
                f"granularity={group['granularity']!r}; build the optimizer with "
                f"granularity={prior.granularity!r}"
            )
        for key, value in constants.items():
            if key in group and _floats(group[key]) != _floats(value):
                raise ValueError(
                    f"prior was learned with {key}={value!r} but param group {i} uses "
                    f"{key}={group[key]!r}; build the groups with param_groups_from_prior, or "
                    f"pass {key}={value!r}"
                )
        if prior.hypergrad_lrs is not None and group["rule"] != prior.hypergrad_rule:
            raise ValueError(
                f"prior's hypergrad_lr was learned for rule={prior.hypergrad_rule!r} but param "
                f"group {i} uses rule={group['rule']!r}"
            )


def load_prior(
    optimizer: HypergradOptimizer,
    model: nn.Module,
    prior: LRPrior,
    *,
    set_lr: bool = True,
    load_weights: bool = False,
) -> None:
    """Write a prior's rates (and ``hypergrad_lr``) into a metalr optimizer, matched by name.

    Args:
        optimizer: :class:`metalr.SGDHD`, :class:`metalr.AdamHD` or :class:`metalr.HyperLR`
            over (some of) ``model``'s parameters, with the prior's granularity.
        model: the module whose ``named_parameters()`` names the optimizer's parameters.
        prior: the :class:`LRPrior`.
        set_lr: set every ``group['lr']`` to ``prior.base_lr`` first, so the multipliers are
            the learned rates exactly; otherwise multipliers are ``rate / group['lr']``, which
            keeps a scheduler's ``lr`` but rounds (default: True).
        load_weights: also copy ``prior.init_weights`` into the model (default: False).

    Raises:
        ValueError: a parameter without a rate, a mis-shaped rate, a granularity or rule
            mismatch, or different learned ``hypergrad_lr`` within one param group.
    """
    if not isinstance(optimizer, HypergradOptimizer):
        raise TypeError(
            f"{type(optimizer).__name__} is not a metalr optimizer (SGDHD, AdamHD, HyperLR)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_prior_type(prior)
    named = _trainable(model)
    unknown = sorted(set(prior.rates) - set(named))
    if unknown:
        raise ValueError(f"prior has rates for parameter(s) not in the model: {unknown}")
    _check_compatible(optimizer, prior)
    # everything is checked before anything is written: a refused prior changes nothing
    plan = _rates_by_group(optimizer, named, prior, set_lr)
    weights = _initial_weights(optimizer, named, prior) if load_weights else {}
    _warn_partial_match(prior)
    for group, entries in zip(optimizer.param_groups, plan):
        if set_lr:
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(prior.base_lr)
            else:
                group["lr"] = prior.base_lr
        for p, _, rate in entries:
            _write_rate(optimizer, group, p, rate)
        if prior.hypergrad_lrs is not None and entries:  # one β per group: checked in the plan
            group["hypergrad_lr"] = float(prior.hypergrad_lrs[entries[0][1]])
    with torch.no_grad():
        for p, w in weights.items():
            p.copy_(w)


def load_step_rates(
    optimizer: HypergradOptimizer, model: nn.Module, prior: LRPrior, step: int
) -> None:
    """Write inner step ``step``'s rates of a MAML++ LSLR prior (``prior.rate_schedule``, one
    rate per tensor and step) into ``optimizer``, as :func:`load_prior` writes the first step's.
    Call it before each step to adapt as the learned inner loop did::

        load_prior(optimizer, model, prior, load_weights=True)
        for t in range(steps):
            load_step_rates(optimizer, model, prior, t)
            optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
    """
    _check_prior_type(prior)
    if prior.rate_schedule is None:
        raise ValueError("prior has no rate_schedule (it was not learned with rates='step_tensor')")
    length = min((len(t) for t in prior.rate_schedule.values()), default=0)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < length:
        raise ValueError(f"Invalid step value: {step!r}; expected an integer in [0, {length})")
    named = _trainable(model)
    column = {name: rates[step] for name, rates in prior.rate_schedule.items()}
    stepped = LRPrior(column, prior.granularity, prior.inner_rule, prior.base_lr)
    plan = _rates_by_group(optimizer, named, stepped, set_lr=False)
    for group, entries in zip(optimizer.param_groups, plan):
        for p, _, rate in entries:
            _write_rate(optimizer, group, p, rate)


def _rates_by_group(
    optimizer: HypergradOptimizer, named: dict[str, Tensor], prior: LRPrior, set_lr: bool
) -> list[list[tuple[Tensor, str, Tensor]]]:
    """Per param group, ``(parameter, name, rate)`` to write, every one checked (name, shape,
    the group's lr and its learned ``hypergrad_lr``) without writing anything."""
    names = {p: n for n, p in named.items()}
    plan = []
    for i, group in enumerate(optimizer.param_groups):
        lr = prior.base_lr if set_lr else group["lr"]
        if not lr > 0:
            raise ValueError(f"param group {i} has lr={lr}; rates are relative to a positive lr")
        entries = []
        for p in group["params"]:
            if p not in names:
                raise ValueError(
                    f"param group {i} holds a parameter of shape {tuple(p.shape)} that is not a "
                    "trainable parameter of the model"
                )
            name = names[p]
            if name not in prior.rates:
                raise ValueError(f"prior has no rate for parameter {name!r}")
            rate = prior.rates[name]
            shape = tuple(p.shape) if prior.granularity == "element" else ()
            if tuple(rate.shape) != shape:
                raise ValueError(
                    f"prior rate for parameter {name!r} has shape {tuple(rate.shape)}, "
                    f"expected {shape}"
                )
            entries.append((p, name, rate))
        group_names = [name for _, name, _ in entries]
        if prior.hypergrad_lrs is not None and group_names:
            betas = [prior.hypergrad_lrs[n] for n in group_names]
            if any(not torch.equal(b, betas[0]) for b in betas[1:]):
                raise ValueError(
                    f"parameters {group_names} share param group {i} but have different learned "
                    "hypergrad_lr; build the optimizer with "
                    "metalr.meta.param_groups_from_prior(model, prior)"
                )
        plan.append(entries)
    return plan


def _initial_weights(
    optimizer: HypergradOptimizer, named: dict[str, Tensor], prior: LRPrior
) -> dict[Tensor, Tensor]:
    """The prior's initial weights to copy, checked: required for every parameter the optimizer
    holds, copied too for the model's other trainable parameters the prior has them for."""
    if prior.init_weights is None:
        raise ValueError("prior has no initial weights (learned with learn_init=False)")
    held = {p for group in optimizer.param_groups for p in group["params"]}
    out = {}
    for name, p in named.items():
        if name not in prior.init_weights:
            if p in held:
                raise ValueError(f"prior has no initial weights for parameter {name!r}")
            continue
        w = prior.init_weights[name]
        if w.shape != p.shape:
            raise ValueError(
                f"prior weights for {name!r} have shape {tuple(w.shape)}, expected {tuple(p.shape)}"
            )
        out[p] = w
    return out


def _warn_partial_match(prior: LRPrior) -> None:
    """Warn when the optimizer can follow the learned inner loop at its first step only."""
    config = prior.provenance.get("config") or {}
    if prior.inner_rule != "sgd" and config.get("hypergrad_granularity") == "group":
        warnings.warn(
            "this prior's inner loop adapted its per-tensor rates from one signal over the whole "
            "model (hypergrad_granularity='group'); the optimizer adapts each tensor's rate from "
            "its own, so it matches the learned inner loop at the first step only",
            stacklevel=3,
        )
    if prior.rate_schedule is not None and any(
        bool((t != t[:1]).any()) for t in prior.rate_schedule.values()
    ):
        warnings.warn(
            STEP_RATES_WARNING + "; load_prior writes the first step's rates: call "
            "metalr.meta.load_step_rates(optimizer, model, prior, t) before step t to follow it",
            stacklevel=3,
        )


def _write_rate(
    optimizer: HypergradOptimizer, group: dict[str, Any], p: Tensor, rate: Tensor
) -> None:
    """``optimizer.state[p]``'s multiplier ← ``rate / group['lr']`` (a settled controller for the
    seek rule: the prior is the rate, tracked, not searched for again)."""
    lr = group["lr"]
    rate = rate.to(device=p.device, dtype=rate_dtype(p))
    optimizer.state[p][RATE_KEY] = (
        rate / lr.to(rate) if isinstance(lr, Tensor) else rate / lr
    ).clone()
    if group["rule"] == "seek":
        optimizer.state[p][CONTROLLER_KEY] = settled_controller(
            optimizer.state[p][RATE_KEY], group["seek"]
        )
