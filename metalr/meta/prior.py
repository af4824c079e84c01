"""``LRPrior``: meta-learned rates handed to metalr's drop-in optimizers.

A prior holds, per parameter name, the effective rate ``α`` the meta-learner's inner loop starts
from (shape ``()`` at tensor granularity, the parameter's shape at element granularity), and
optionally the learned ``hypergrad_lr`` per tensor and the learned initial weights.

The inner loop runs the optimizers' own update rules with ``lr = base_lr = 1``, so the learned
rate is the multiplier itself. :func:`load_prior` writes ``optimizer.state[p]['lr_multiplier'] =
α / group['lr']``; with ``set_lr=True`` it first sets ``group['lr'] = base_lr`` so the
optimizer's first step equals the meta-learner's first inner step bit for bit on the
single-tensor path (``foreach=False``, which runs the same pure step; the ``foreach`` path
agrees to rounding)::

    prior = learner.export_prior()
    prior.save("sinusoid.prior")
    prior = LRPrior.load("sinusoid.prior")
    optimizer = metalr.SGDHD(param_groups_from_prior(model, prior), granularity="element")
    load_prior(optimizer, model, prior)                    # rates and hypergrad_lr per tensor

The optimizers take one ``hypergrad_lr`` per param group, so a prior with a learned
``hypergrad_lr`` per tensor needs one group per parameter: :func:`param_groups_from_prior`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metalr.functional import rate_dtype
from metalr.functional._controller import settled_controller
from metalr.meta.config import INNER_RULES, MetaConfig
from metalr.meta.parametrize import MetaParameters
from metalr.meta.results import _atomic
from metalr.optim import SGDHD, AdamHD
from metalr.optim._base import CONTROLLER_KEY, RATE_KEY, HypergradOptimizer

FORMAT = "metalr.LRPrior/1"
_FIELDS = ("rates", "hypergrad_lrs", "init_weights", "rate_schedule")


@dataclass
class LRPrior:
    """Meta-learned per-parameter rates (and optionally ``hypergrad_lr``, initial weights).

    Args:
        rates: effective rate per parameter name (``()`` or the parameter's shape).
        granularity: ``"tensor"`` or ``"element"``; must match the optimizer's.
        inner_rule: the rule the rates were learned with (``"sgd"``, ``"sgd_hd"``, ``"adam_hd"``).
        base_lr: the ``lr`` the rates are relative to (the inner loop uses 1.0) (default: 1.0).
        hypergrad_lrs: ``hypergrad_lr`` per name (0-d), for ``sgd_hd``/``adam_hd`` (default: None).
        hypergrad_rule: ``"normalized"`` or ``"additive"`` (default: "normalized").
        init_weights: learned initial weights per name (default: None).
        rate_schedule: MAML++ LSLR table, shape ``(inner_steps,)`` per name; ``rates`` is its
            first column (default: None).
        provenance: config, metalr and torch versions, creation time (default: {}).
    """

    rates: dict[str, Tensor]
    granularity: str
    inner_rule: str
    base_lr: float = 1.0
    hypergrad_lrs: dict[str, Tensor] | None = None
    hypergrad_rule: str = "normalized"
    init_weights: dict[str, Tensor] | None = None
    rate_schedule: dict[str, Tensor] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.granularity not in ("tensor", "element"):
            raise ValueError(
                f"Invalid granularity: {self.granularity!r}; expected one of 'tensor', 'element'"
            )
        if self.inner_rule not in INNER_RULES:
            raise ValueError(
                f"Invalid inner_rule: {self.inner_rule!r}; expected one of {INNER_RULES}"
            )
        if not self.base_lr > 0:
            raise ValueError(f"Invalid base_lr value: {self.base_lr}; expected > 0")
        for name, rate in self.rates.items():
            if not isinstance(rate, Tensor) or (self.granularity == "tensor" and rate.dim() != 0):
                raise ValueError(f"rate of {name!r} must be a 0-d tensor at tensor granularity")
            if not bool(torch.all(rate > 0)):
                raise ValueError(f"rate of {name!r} must be positive")

    def __repr__(self) -> str:
        """A one-line summary (not every tensor): how many rates, their range, what else.

        Example::

            print(LRPrior({"w": torch.tensor(0.01), "b": torch.tensor(0.02)}, "tensor", "sgd"))
            # LRPrior(2 tensors, 2 rates, granularity='tensor', inner_rule='sgd', base_lr=1,
            #         rates in [0.01, 0.02], hypergrad_lr: no, init_weights: no)
        """
        values = [r.detach().reshape(-1).double().cpu() for r in self.rates.values()]
        flat = torch.cat(values) if values else torch.zeros(0)
        span = f"[{flat.min():.4g}, {flat.max():.4g}]" if flat.numel() else "[]"
        if self.hypergrad_lrs:
            betas = torch.stack([b.detach().double().cpu().reshape(()) for b in
                                 self.hypergrad_lrs.values()])  # fmt: skip
            hyper = f"[{betas.min():.4g}, {betas.max():.4g}] ({self.hypergrad_rule})"
        else:
            hyper = "no"
        parts = [
            f"{len(self.rates)} tensor{'s' * (len(self.rates) != 1)}",
            f"{flat.numel()} rate{'s' * (flat.numel() != 1)}",
            f"granularity={self.granularity!r}",
            f"inner_rule={self.inner_rule!r}",
            f"base_lr={self.base_lr:g}",
            f"rates in {span}",
            f"hypergrad_lr: {hyper}",
            f"init_weights: {'yes' if self.init_weights is not None else 'no'}",
        ]
        if self.rate_schedule is not None:
            steps = {int(t.shape[0]) for t in self.rate_schedule.values() if t.dim()}
            parts.append(f"rate_schedule: {', '.join(map(str, sorted(steps))) or '?'} steps")
        return f"LRPrior({', '.join(parts)})"

    def save(self, path: str | Path, *, format: str | None = None) -> None:
        """Write to ``path``: safetensors if installed (``format=None``), else ``torch.save``
        of plain tensors and a JSON string, loadable with ``torch.load(weights_only=True)``.

        The file is written atomically (a temporary file beside it, then ``os.replace``) with
        the usual permissions of a new file (``0o666`` less the umask: ``0o644`` under umask
        ``022``)::

            prior.save("sinusoid.safetensors")
        """
        if format is None:
            format = "safetensors" if importlib.util.find_spec("safetensors") else "torch"
        if format not in ("safetensors", "torch"):
            raise ValueError(f"Invalid format: {format!r}; expected 'safetensors' or 'torch'")
        tensors = {
            f"{kind}/{name}": t.detach().cpu().contiguous().clone()
            for kind in _FIELDS
            for name, t in (getattr(self, kind) or {}).items()
        }
        meta = {
            "format": FORMAT,
            "granularity": self.granularity,
            "inner_rule": self.inner_rule,
            "base_lr": self.base_lr,
            "hypergrad_rule": self.hypergrad_rule,
            "present": [k for k in _FIELDS if getattr(self, k) is not None],
            "provenance": self.provenance,
        }
        if format == "safetensors":
            from safetensors.torch import save as to_bytes

            data = to_bytes(tensors, metadata={"metalr": json.dumps(meta)})
            _atomic(path, lambda f: f.write(data), "wb")
        else:
            _atomic(
                path,
                lambda f: torch.save({"metadata": json.dumps(meta), "tensors": tensors}, f),
                "wb",
            )

    @classmethod
    def load(cls, path: str | Path) -> LRPrior:
        """Read a prior written by :meth:`save` (either format; no pickled code is executed).
        A file that is not one raises ``ValueError`` naming it."""
        with open(path, "rb") as f:
            magic = f.read(2)
        try:
            if magic == b"PK":  # torch.save's zip container
                blob = torch.load(path, map_location="cpu", weights_only=True)
                meta, tensors = json.loads(blob["metadata"]), blob["tensors"]
            else:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    meta = json.loads(f.metadata()["metalr"])
                    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        except Exception as exc:  # truncated, foreign or metadata-less files: many kinds
            raise ValueError(f"{path} is not a readable metalr LRPrior ({exc!r:.200})") from exc
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a metalr LRPrior (format {meta.get('format')!r})")
        parts: dict[str, dict[str, Tensor] | None] = {
            k: ({} if k in meta["present"] else None) for k in _FIELDS
        }
        for key, t in tensors.items():
            kind, name = key.split("/", 1)
            parts[kind][name] = t  # type: ignore[index]
        return cls(
            granularity=meta["granularity"], inner_rule=meta["inner_rule"],
            base_lr=meta["base_lr"], hypergrad_rule=meta["hypergrad_rule"],
            provenance=meta["provenance"], **parts,  # type: ignore[arg-type]
        )  # fmt: skip


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def prior_from_meta(meta: MetaParameters, config: MetaConfig) -> LRPrior:
    """Build an :class:`LRPrior` from meta-parameters (what ``MetaLearner.export_prior`` calls)."""

    def detached(d: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
        return None if d is None else {n: t.detach().clone() for n, t in d.items()}

    hypergrad = detached(meta.hypergrad_lrs())
    if hypergrad is None and config.inner_rule != "sgd":
        rates = meta.rates()
        hypergrad = {n: torch.tensor(config.hypergrad_lr, dtype=r.dtype) for n, r in rates.items()}
    return LRPrior(
        rates=detached(meta.rates(0)),  # type: ignore[arg-type]
        granularity=config.exported_granularity,
        inner_rule=config.inner_rule,
        base_lr=1.0,
        hypergrad_lrs=hypergrad,
        hypergrad_rule=config.hypergrad_rule,
        init_weights=detached(meta.init_params()) if config.learn_init else None,
        rate_schedule=detached(meta.rate_table()) if config.rates == "step_tensor" else None,
        provenance={
            "config": config.to_dict(),
            "metalr_version": _version("metalr"),
            "torch_version": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        },
    )


def _floats(value: Any) -> tuple[float, ...]:
    """A number or a sequence of numbers as a tuple of floats (``"inf"`` read as inf)."""
    return tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else (float(value),)


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def param_groups_from_prior(
    model: nn.Module, prior: LRPrior, **group_options: Any
) -> list[dict[str, Any]]:
    """One param group per trainable parameter, carrying its learned ``hypergrad_lr`` (and the
    rule it was learned for, when the prior has one).

    Pass the result to the optimizer's constructor, then call :func:`load_prior`::

        optimizer = metalr.AdamHD(param_groups_from_prior(model, prior), granularity="tensor")
        load_prior(optimizer, model, prior)

    ``group_options`` (e.g. ``weight_decay=0.0``) are added to every group, after the inner
    loop's own constants the prior records (:func:`inner_constants`: Adam's ``betas`` and
    ``eps`` for ``adam_hd``, ``lr_bounds``), so the optimizer steps as the learned inner loop did.
    """
    groups = []
    constants = inner_constants(prior)
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
    """The learned inner loop's optimizer constants, as param-group options: ``betas`` and
    ``eps`` (``adam_hd``) and ``lr_bounds`` (the hypergradient rules), read from the config in
    ``prior.provenance`` (``{}`` for a prior saved without one)."""
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
    named = _trainable(model)
    unknown = sorted(set(prior.rates) - set(named))
    if unknown:
        raise ValueError(f"prior has rates for parameter(s) not in the model: {unknown}")
    _check_compatible(optimizer, prior)
    config = prior.provenance.get("config") or {}
    if prior.inner_rule != "sgd" and config.get("hypergrad_granularity") == "group":
        warnings.warn(
            "this prior's inner loop adapted its per-tensor rates from one signal over the whole "
            "model (hypergrad_granularity='group'); the optimizer adapts each tensor's rate from "
            "its own, so it matches the learned inner loop at the first step only",
            stacklevel=2,
        )
    names = {p: n for n, p in named.items()}
    for i, group in enumerate(optimizer.param_groups):
        if set_lr:
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(prior.base_lr)
            else:
                group["lr"] = prior.base_lr
        lr = group["lr"]
        if not lr > 0:
            raise ValueError(f"param group {i} has lr={lr}; rates are relative to a positive lr")
        group_names = []
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
            rate = rate.to(device=p.device, dtype=rate_dtype(p))
            optimizer.state[p][RATE_KEY] = (
                rate / lr.to(rate) if isinstance(lr, Tensor) else rate / lr
            ).clone()
            if group["rule"] == "seek":  # the prior is the rate: track it, do not search again
                optimizer.state[p][CONTROLLER_KEY] = settled_controller(
                    optimizer.state[p][RATE_KEY], group["seek"]
                )
            group_names.append(name)
        if prior.hypergrad_lrs is not None and group_names:
            betas = [prior.hypergrad_lrs[n] for n in group_names]
            if any(not torch.equal(b, betas[0]) for b in betas[1:]):
                raise ValueError(
                    f"parameters {group_names} share param group {i} but have different learned "
                    "hypergrad_lr; build the optimizer with "
                    "metalr.meta.param_groups_from_prior(model, prior)"
                )
            group["hypergrad_lr"] = float(betas[0])
    if load_weights:
        if prior.init_weights is None:
            raise ValueError("prior has no initial weights (learned with learn_init=False)")
        with torch.no_grad():
            for name, p in named.items():
                if name not in prior.init_weights:
                    raise ValueError(f"prior has no initial weights for parameter {name!r}")
                w = prior.init_weights[name]
                if w.shape != p.shape:
                    raise ValueError(
                        f"prior weights for {name!r} have shape {tuple(w.shape)}, expected "
                        f"{tuple(p.shape)}"
                    )
                p.copy_(w)
