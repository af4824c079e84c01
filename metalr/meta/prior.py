"""``LRPrior``: meta-learned rates handed to metalr's drop-in optimizers.

A prior holds, per parameter name, the effective rate ``α`` the meta-learner's inner loop starts
from (shape ``()`` at tensor granularity, the parameter's shape at element granularity), and
optionally the learned ``hypergrad_lr`` per tensor and the learned initial weights.

The inner loop runs the optimizers' own update rules with ``lr = base_lr = 1``, so the learned
rate is the multiplier itself. :func:`~metalr.meta.handoff.load_prior` writes
``optimizer.state[p]['lr_multiplier'] = α / group['lr']``; with ``set_lr=True`` it first sets ``group['lr'] = base_lr`` so the
optimizer's first step equals the meta-learner's first inner step bit for bit on the
single-tensor path (``foreach=False``, which runs the same pure step; the ``foreach`` path
agrees to rounding)::

    prior = learner.export_prior()
    prior.save("sinusoid.prior")
    prior = LRPrior.load("sinusoid.prior")
    optimizer = metalr.SGDHD(param_groups_from_prior(model, prior), granularity="element")
    load_prior(optimizer, model, prior)                    # rates and hypergrad_lr per tensor

The optimizers take one ``hypergrad_lr`` per param group, so a prior with a learned
``hypergrad_lr`` per tensor needs one group per parameter:
:func:`~metalr.meta.handoff.param_groups_from_prior`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metalr.functional._common import real_number
from metalr.meta.config import HYPERGRAD_RULES, INNER_RULES, MetaConfig
from metalr.meta.parametrize import MetaParameters
from metalr.meta.results import _atomic

FORMAT = "metalr.LRPrior/1"
_FIELDS = ("rates", "hypergrad_lrs", "init_weights", "rate_schedule")


def _named_tensors(
    field_name: str, value: Any, same_names: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """``value`` checked to be a dict of name → tensor (and, with ``same_names``, to name
    exactly those parameters)."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()
    ):
        raise TypeError(f"{field_name} must be a dict of parameter name -> tensor")
    if same_names is not None and set(value) != set(same_names):
        missing, extra = sorted(set(same_names) - set(value)), sorted(set(value) - set(same_names))
        raise ValueError(
            f"{field_name} must name the parameters the rates name: missing {missing}, "
            f"extra {extra}"
        )
    return value


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
        if self.hypergrad_rule not in HYPERGRAD_RULES:
            raise ValueError(
                f"Invalid hypergrad_rule: {self.hypergrad_rule!r}; expected one of "
                f"{HYPERGRAD_RULES}"
            )
        self.base_lr = _real("base_lr", self.base_lr)
        if not 0 < self.base_lr < math.inf:
            raise ValueError(f"Invalid base_lr value: {self.base_lr}; expected a finite value > 0")
        for name, rate in _named_tensors("rates", self.rates).items():
            if self.granularity == "tensor" and rate.dim() != 0:
                raise ValueError(f"rate of {name!r} must be a 0-d tensor at tensor granularity")
            if not bool(torch.all((rate > 0) & torch.isfinite(rate))):
                raise ValueError(f"rate of {name!r} must be positive and finite")
        if self.hypergrad_lrs is not None:
            betas = _named_tensors("hypergrad_lrs", self.hypergrad_lrs, same_names=self.rates)
            for name, beta in betas.items():
                if beta.numel() != 1 or not (0 <= float(beta) < math.inf):
                    raise ValueError(
                        f"hypergrad_lr of {name!r} must be one finite value >= 0, got "
                        f"{beta.detach().reshape(-1)[:4].tolist()}"
                    )
        if self.rate_schedule is not None:
            if self.granularity != "tensor":
                raise ValueError(
                    "rate_schedule (per-step rates, MAML++ LSLR) needs granularity='tensor'"
                )
            table = _named_tensors("rate_schedule", self.rate_schedule, same_names=self.rates)
            for name, rates in table.items():
                if (
                    rates.dim() != 1
                    or not len(rates)
                    or not bool(torch.all((rates > 0) & torch.isfinite(rates)))
                ):
                    raise ValueError(
                        f"rate_schedule of {name!r} must be a 1-d tensor of positive, finite "
                        f"rates (one per inner step), got shape {tuple(rates.shape)}"
                    )
        if self.init_weights is not None:
            weights = _named_tensors("init_weights", self.init_weights)
            unknown = sorted(set(weights) - set(self.rates))
            if unknown:
                raise ValueError(f"init_weights has parameter(s) with no rate: {unknown}")

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


def _real(name: str, value: Any) -> float:
    """A real scalar (a Python or NumPy number, a one-element tensor) as a float; ``TypeError``
    naming ``name`` otherwise."""
    v = real_number(value)
    if v is None:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return v


_MOVED_TO_HANDOFF = ("inner_constants", "load_prior", "load_step_rates", "param_groups_from_prior")


def __getattr__(name: str) -> Any:
    """The hand-off functions, moved to :mod:`metalr.meta.handoff`, still import from here."""
    if name in _MOVED_TO_HANDOFF:
        from metalr.meta import handoff

        return getattr(handoff, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
