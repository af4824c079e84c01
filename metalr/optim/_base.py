"""Plumbing shared by metalr's optimizers: rate state, effective rates, checkpoint casting."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from metalr.functional._controller import SEEK_DEFAULTS, initial_controller
from metalr.functional._distributed import ShardReducer
from metalr.functional._hypergrad import all_finite, clamp_rates, initial_rate, rate_dtype

#: Key of the learned multiplier in ``optimizer.state[p]``.
RATE_KEY = "lr_multiplier"
#: Key of the ``"seek"`` rule's controller vector in ``optimizer.state[p]``.
CONTROLLER_KEY = "hd_controller"

#: Defaults for flags added after the first release; ``__setstate__`` fills them into old groups.
HYPER_DEFAULTS: dict[str, Any] = {
    "granularity": "tensor",
    "rule": "normalized",
    "lr_bounds": (0.0, float("inf")),
    "maximize": False,
    "foreach": None,
    "fused": None,
    "differentiable": False,
    "lagged": False,
}


class HypergradOptimizer(Optimizer):
    """Base class: keeps one learned multiplier per group, tensor or element in ``state[p]``.

    The effective rate of a parameter is ``group['lr'] * state[p]['lr_multiplier']``, so torch's
    LR schedulers (which write ``group['lr']``) compose with the adaptation instead of erasing it.
    """

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in HYPER_DEFAULTS.items():
                group.setdefault(key, value)
            group.setdefault("seek", dict(SEEK_DEFAULTS))
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not isinstance(p_state["step"], Tensor):
                    # torch < 1.12 saved step as a Python number; torch.optim.Adam converts it too.
                    p_state["step"] = torch.tensor(
                        float(p_state["step"]), dtype=torch.float32, device=p.device
                    )

    def _rate(self, param: Tensor, group: dict[str, Any]) -> Tensor:
        """The multiplier of ``param``, created on first use (lazy state initialization)."""
        state = self.state[param]
        if RATE_KEY not in state:
            state[RATE_KEY] = initial_rate(param, group["granularity"], initial_multiplier(group))
            if group["rule"] == "seek":  # with the rate, so the state is created in one go
                self._controller(param, group)
        return state[RATE_KEY]

    def _controller(self, param: Tensor, group: dict[str, Any]) -> Tensor:
        """The seek rule's controller vector of ``param``, created on first use (in the rate
        dtype, on the parameter's device: :func:`metalr.functional._controller.initial_controller`)."""
        state = self.state[param]
        if CONTROLLER_KEY not in state:
            state[CONTROLLER_KEY] = initial_controller(param, rate_dtype(param), group["seek"])
        return state[CONTROLLER_KEY]

    def _group_rates(self, group: dict[str, Any]) -> list[tuple[Tensor, Tensor]]:
        """(param, multiplier) pairs; parameters not stepped yet read their initial multiplier
        without creating state."""
        pairs = []
        for p in group["params"]:
            rate = self.state[p].get(RATE_KEY) if p in self.state else None
            if rate is None:
                rate = initial_rate(p, group["granularity"], initial_multiplier(group))
            pairs.append((p, rate))
        return pairs

    def _controller_args(self, group: dict[str, Any], params: list[Tensor]) -> dict[str, Any]:
        """``controllers`` and ``seek`` for the rule of ``group`` (empty unless ``"seek"``)."""
        if group["rule"] != "seek":
            return {}
        return {"controllers": [self._controller(p, group) for p in params], "seek": group["seek"]}

    def _set_shard_group(self, shard_group: Any, fused: bool | None) -> None:
        if shard_group is not None and fused:
            raise ValueError("shard_group is not supported with fused=True")
        self._shard_group = shard_group

    def _shard_reducer(self) -> ShardReducer | None:
        """All-reduces over the ranks that shard the state, or None (not pickled: set again)."""
        group = getattr(self, "_shard_group", None)
        return ShardReducer(group) if group is not None else None

    def _grads_finite(self) -> Tensor | None:
        """With several param groups, one all-finite flag over every gradient of the step.

        A NaN/inf anywhere skips the whole step (as ``GradScaler`` does), not just its group.
        ``None`` for a single group, whose rule computes the flag for free from its inner products.
        """
        groups = [g for g in self.param_groups if any(p.grad is not None for p in g["params"])]
        if len(groups) < 2:
            return None
        grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
        return all_finite(grads)

    @torch.no_grad()
    def effective_lrs(self) -> dict[Tensor, Tensor]:
        """Per-parameter effective rates ``lr · m`` (a 0-d tensor, or one per element).

        Rates are clamped to ``lr_bounds`` exactly as the next step would use them. Keys are the
        parameter tensors, as in ``optimizer.state``.
        """
        rates: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            lr = scalar_lr(group["lr"])
            for p, rate in self._group_rates(group):
                rates[p] = clamp_rates(rate, lr, group["lr_bounds"]) * lr
        return rates

    @torch.no_grad()
    def lr_summary(self) -> list[dict[str, float]]:
        """Min, mean and max effective rate of each param group, as Python floats (for loggers).

        This reads values back to the host, so call it when logging, not inside the step.
        """
        summaries = []
        eff = self.effective_lrs()
        for group in self.param_groups:
            values = [eff[p].reshape(-1).double().cpu() for p in group["params"]]
            flat = torch.cat(values) if values else torch.zeros(1, dtype=torch.float64)
            summaries.append(
                {"min": flat.min().item(), "mean": flat.mean().item(), "max": flat.max().item()}
            )
        return summaries

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, then cast rates to the rate dtype and device of their parameter.

        torch casts every floating state to the parameter's dtype; rates of fp16/bf16 parameters
        are kept in float32 instead (see :func:`metalr.functional._hypergrad.rate_dtype`), and
        ``step`` counters live on the parameter's device so no step syncs with the host.

        A checkpoint of the torch optimizer this one replaces (``torch.optim.Adam`` for
        :class:`~metalr.AdamHD`, ``AdamW`` for :class:`~metalr.AdamWHD`, ``SGD`` for
        :class:`~metalr.SGDHD`) loads too: its hyperparameters and moments are kept, the
        hypergradient options missing from it come from this optimizer's param groups (as
        constructed), and every multiplier starts at 1, so with ``hypergrad_lr=0`` training
        continues as the torch optimizer would. A checkpoint saved with ``amsgrad=True`` is
        refused (metalr has no AMSGrad).
        """
        state_dict = self._migrated(state_dict)
        saved = {
            pid: {k: v for k, v in s.items() if k in (RATE_KEY, CONTROLLER_KEY, "step")}
            for pid, s in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            for key, value in saved.get(pid, {}).items():
                if not isinstance(value, Tensor):
                    continue
                dtype = torch.float32 if key == "step" else rate_dtype(p)
                self.state[p][key] = value.to(device=p.device, dtype=dtype).clone()

    def _migrated(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with the options a torch.optim checkpoint lacks filled from our groups.

        A group without ``hypergrad_lr`` (which every metalr group has) comes from torch.optim.
        metalr checkpoints that only lack flags added later are left to ``__setstate__``'s
        defaults, as torch does.
        """
        saved_groups = state_dict["param_groups"]
        if all("hypergrad_lr" in g for g in saved_groups):
            return state_dict
        if len(saved_groups) != len(self.param_groups):
            return state_dict  # torch's load raises its own error on the group count
        groups = []
        for saved, current in zip(saved_groups, self.param_groups):
            if saved.get("amsgrad", False):
                raise ValueError(
                    f"Cannot load a checkpoint saved with amsgrad=True into "
                    f"{type(self).__name__}, which has no AMSGrad variant; continue it with "
                    f"torch.optim.{type(self).__name__.removesuffix('HD')}(amsgrad=True) instead"
                )
            filled = {k: v for k, v in current.items() if k != "params" and k not in saved}
            groups.append({**saved, **filled})
        return {**state_dict, "param_groups": groups}


def initial_multiplier(group: dict[str, Any]) -> float:
    """A fresh multiplier's value: ``seek['init_scale']`` for an active ``"seek"`` rule (its
    ramp starts below the given lr), else 1.0."""
    hypergrad_lr = group.get("hypergrad_lr", 0)
    active = isinstance(hypergrad_lr, (Tensor, list, tuple)) or hypergrad_lr != 0
    if group.get("rule") == "seek" and active:
        return float(group["seek"]["init_scale"])
    return 1.0


def scalar_lr(lr: float | Tensor) -> float | Tensor:
    """``group['lr']`` as the update rules take it: a number or a 0-d tensor.

    Like torch.optim, metalr accepts a one-element tensor ``lr`` of any shape (``[1]``,
    ``[1, 1]``); the rules read it through a 0-d view so it broadcasts as a scalar (and stays in
    the autograd graph when it requires grad).
    """
    if isinstance(lr, Tensor) and lr.dim() > 0:
        return lr.reshape(())
    return lr


def check_sparse(param: Tensor, name: str) -> None:
    if param.grad is not None and param.grad.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients")
