"""Plumbing shared by metalr's optimizers: rate state, effective rates, checkpoint casting."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from metalr.functional._common import scalar_lr
from metalr.functional._controller import (
    CONTROLLER_SIZE,
    FAMILIES,
    initial_controller,
    settled_controller,
)
from metalr.functional._distributed import ShardReducer
from metalr.functional._hypergrad import clamp_rates, initial_rate
from metalr.functional._ray import initial_ray_state, ray_enabled
from metalr.functional._seek_constants import complete_saved_seek
from metalr.functional._signals import all_finite, rate_dtype
from metalr.functional._trail import TRAIL_KEY, initial_trail, trail_dtype
from metalr.functional._validation_state import observed
from metalr.functional.spike_guard import initial_spike_stats
from metalr.functional.validation import (
    VALIDATION_DEFAULTS,
    completed_validation_stats,
    initial_validation_stats,
    tracking_scale,
)
from metalr.optim._checkpoint import hooks_held, run_hooks
from metalr.optim._observing import ValidationObserving
from metalr.optim._spike import SpikeGuarded
from metalr.optim._state_keys import (
    CONTROLLER_KEY,
    FOLLOWS_VALIDATION,
    RATE_KEY,
    RAY_ANCHOR_KEY,
    RAY_KEY,
    REWIND_DUE_KEY,
    SPIKE_KEY,
    VALIDATION_KEY,
)
from metalr.optim._validation import check_group_options

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
    "spike_guard": None,
}


#: Per-parameter state kept in a dtype of metalr's own (the rate dtype, float32 for
#: half-precision parameters; the trail's; the rewind's bool flag), not the parameter's: torch's
#: load casts every state tensor of a floating parameter to the parameter's dtype.
_RATE_DTYPE_KEYS = (RATE_KEY, CONTROLLER_KEY, VALIDATION_KEY, SPIKE_KEY, TRAIL_KEY, REWIND_DUE_KEY,
                    RAY_KEY)  # fmt: skip


def _rate_state(key: str, value: Tensor, param: Tensor) -> Tensor:
    """A loaded state tensor on ``param``'s device in the dtype metalr keeps it in (``step``:
    float32; the rest: :func:`rate_dtype`), completed where the checkpoint predates entries."""
    if key == TRAIL_KEY:  # the long-horizon signal's trail: the direction's dtype (float32+)
        return value.to(device=param.device, dtype=trail_dtype(param)).clone()
    if key == REWIND_DUE_KEY:  # the rewind's pending flag stays a bool
        return value.to(device=param.device, dtype=torch.bool).clone()
    dtype = torch.float32 if key == "step" else rate_dtype(param)
    value = value.to(device=param.device, dtype=dtype).clone()
    if key == CONTROLLER_KEY and value.numel() < CONTROLLER_SIZE:
        # a checkpoint from before the controller's later entries: those start at 0
        value = torch.cat([value, value.new_zeros(CONTROLLER_SIZE - value.numel())])
    if key == VALIDATION_KEY:  # a checkpoint from before the hold: no loss trend yet
        value = completed_validation_stats(value)
    return value


class HypergradOptimizer(ValidationObserving, SpikeGuarded, Optimizer):
    """Base class: keeps one learned multiplier per group, tensor or element in ``state[p]``.

    The effective rate of a parameter is ``group['lr'] * state[p]['lr_multiplier']``, so torch's
    LR schedulers (which write ``group['lr']``) compose with the adaptation instead of erasing it.
    """

    #: Whose fitted seek constants are the defaults (``FAMILIES`` of
    #: :mod:`metalr.functional._controller`): Adam's unless a subclass says otherwise.
    seek_family = "adam"
    #: Whether the optimizer keeps Adam's moment estimates, which ``seek["moment_restart"]``
    #: restarts at the ramp's turn (AdamHD, AdamWHD); elsewhere that constant is refused.
    restarts_moments = False
    #: The additive rule's default β (None: the rule needs an explicit ``hypergrad_lr``).
    additive_default: float | None = None
    #: Param-group keys every checkpoint this optimizer loads has (its own, or its torch
    #: counterpart's): a checkpoint of another optimizer family is refused by name.
    checkpoint_keys: tuple[str, ...] = ()

    def _sync_groups(self) -> None:
        """Give groups added behind the optimizer's back their options before they are read
        (HyperLR: a group added to the wrapped optimizer directly); nothing here."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, with the group's own hypergradient options (``rule``, ``granularity``,
        ``hypergrad_lr``, ``lr_bounds``, ``seek``, ``validation``, ``spike_guard``) validated and
        completed like the constructor's (:func:`metalr.optim._validation.check_group_options`)."""
        resolved = check_group_options(
            param_group, self.defaults, self.additive_default, self.seek_family,
            moment_restart=self.restarts_moments,
        )  # fmt: skip
        super().add_param_group({**param_group, **resolved})

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            _flag_from_group(group, self.state)
            for key, value in HYPER_DEFAULTS.items():
                group.setdefault(key, value)
            group.setdefault("seek", dict(FAMILIES[self.seek_family][0]))
            group["seek"] = complete_saved_seek(group["seek"])  # constants added since it was saved
            group.setdefault("validation", dict(VALIDATION_DEFAULTS))
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not isinstance(p_state["step"], Tensor):
                    # torch < 1.12 saved step as a Python number; torch.optim.Adam converts it too.
                    p_state["step"] = torch.tensor(
                        float(p_state["step"]), dtype=torch.float32, device=p.device
                    )
            self._complete_group_state(group)

    def _complete_group_state(self, group: dict[str, Any]) -> None:
        """Complete the states of ``group`` that come from elsewhere (a checkpoint being
        loaded, an unpickled optimizer) with the entries a first step creates. A DCP checkpoint
        from before the flag, loaded into a template with ``allow_partial_load``, keeps the
        template's False: there the statistics' counts tell whether the group had observed."""
        params = [p for p in group["params"] if RATE_KEY in self.state.get(p, ())]
        for p in params:
            self._complete_state(p, group, self.state[p])
        if params and not self._follows_validation(group):
            stats = [self.state[p][VALIDATION_KEY] for p in params]
            for p, seen in zip(params, observed(stats)):
                self.state[p][FOLLOWS_VALIDATION] = seen

    def _rate(
        self, param: Tensor, group: dict[str, Any], state: dict[str, Any] | None = None
    ) -> Tensor:
        """The multiplier of ``param``, created on first use (lazy state initialization).
        ``state``: ``self.state[param]`` when the caller has it (one lookup less per tensor)."""
        state = self.state[param] if state is None else state
        rate = state.get(RATE_KEY)
        if rate is None:
            rate = state[RATE_KEY] = initial_rate(
                param, group["granularity"], initial_multiplier(group)
            )
            if group["rule"] == "seek":  # with the rate, so the state is created in one go
                self._controller(param, group)
        if FOLLOWS_VALIDATION not in state:  # first step, or state written without it
            self._complete_state(param, group, state)
        if RAY_KEY not in state and ray_enabled(group["validation"]):
            # θ_0 of the ray cosine: the parameter before this step moves it (its first step,
            # or the first after a checkpoint without the ray was loaded)
            state[RAY_ANCHOR_KEY] = param.detach().clone(memory_format=torch.preserve_format)
            state[RAY_KEY] = initial_ray_state(param, rate_dtype(param))
        return rate

    def _complete_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Create the entries later calls fill, at the parameter's first step: the flag that
        its group follows the validation signal (False), the validation statistics (no
        observation yet) and, at a guarded group's first parameter, the spike guard's (no loss
        yet). Created late, they were missing from the template ``torch.distributed.checkpoint``
        loads into (a fresh optimizer after one zero step), which then dropped them from a
        resumed run. State written without them (a checkpoint from before, a prior's
        multipliers written directly) is completed here; there the statistics' presence meant
        an observation."""
        if FOLLOWS_VALIDATION not in state:
            state[FOLLOWS_VALIDATION] = VALIDATION_KEY in state
        if VALIDATION_KEY not in state:
            state[VALIDATION_KEY] = initial_validation_stats(param, rate_dtype(param))
        if group.get("spike_guard") and param is group["params"][0] and SPIKE_KEY not in state:
            state[SPIKE_KEY] = initial_spike_stats(param.device, rate_dtype(param))

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
        """``controllers`` and ``seek`` for the rule of ``group`` (empty unless ``"seek"``), and
        ``trails`` with a long-horizon signal (``seek["horizon"] > 0``; created on first use,
        :mod:`metalr.functional._trail`).

        Once the group follows the validation signal the controller keeps ramping and turning
        on the training signal, tracks it with the weight ``validation["train_weight"]``
        (``seek["track"]``), and holds a noisy training signal's anneal by the larger of the
        seek set's ``noise_hold`` and ``validation["noise_hold"]`` (the validation signal is the
        brake then).
        """
        if group["rule"] != "seek":
            return {}
        seek = group["seek"]
        if self._follows_validation(group):
            validation = group["validation"]
            seek = {**seek, "track": validation["train_weight"]}
            hold = validation.get("noise_hold", 0.0)  # absent from checkpoints before it: 0
            seek["noise_hold"] = max(seek.get("noise_hold", 0.0), hold)
        controllers = []
        for p in params:
            controller = self.state[p].get(CONTROLLER_KEY)
            controllers.append(controller if controller is not None else self._controller(p, group))
        if seek.get("horizon", 0.0) <= 0:
            return {"controllers": controllers, "seek": seek}
        for p in params:
            if TRAIL_KEY not in self.state[p]:
                self.state[p][TRAIL_KEY] = initial_trail(p)
        trails = [self.state[p][TRAIL_KEY] for p in params]
        return {"controllers": controllers, "seek": seek, "trails": trails}

    def _train_hypergrad_lr(self, group: dict[str, Any]) -> Any:
        """β of the training signal: the group's, times ``validation['train_weight']`` for a
        ``"normalized"``/``"additive"`` group that follows the validation signal (the seek rule
        weighs its tracking phase instead, since its ramp still needs the training signal);
        for a seek group in a run of known length, times
        :func:`~metalr.functional.validation.tracking_scale` (``max(1, track_steps /
        ray_steps)``: a short run tracks faster)."""
        if group["rule"] != "seek" and self._follows_validation(group):
            weight = group["validation"]["train_weight"]
        elif group["rule"] == "seek":
            weight = tracking_scale(group.get("validation") or {})
        else:
            weight = 1.0
        beta = group["hypergrad_lr"]
        if weight == 1.0:
            return beta
        return [b * weight for b in beta] if isinstance(beta, (list, tuple)) else beta * weight

    def _set_shard_group(self, shard_group: Any, fused: bool | None) -> None:
        if isinstance(shard_group, str) and shard_group != "world":
            raise ValueError(
                f"Invalid shard_group: {shard_group!r}; expected a process group, 'world' (the "
                "default group) or None"
            )
        if shard_group is not None and fused:
            raise ValueError("shard_group is not supported with fused=True")
        self._shard_group = shard_group

    def _shard_reducer(self) -> ShardReducer | None:
        """All-reduces over the ranks that shard the state, or None (not pickled: set again)."""
        group = getattr(self, "_shard_group", None)
        if group is None:
            return None
        return ShardReducer(None if group == "world" else group)  # None: the default group

    def _grads_finite(self) -> Tensor | None:
        """With several param groups, one all-finite flag over every gradient of the step.

        A NaN/inf anywhere skips the whole step (as ``GradScaler`` does), not just its group.
        ``None`` for a single group, whose rule computes the flag for free from its inner products.
        With sharded state (``shard_group``) and several groups the flag is all-reduced (one
        collective a step), since each rank sees only its own gradients: a NaN in one rank's
        share skips every rank's step, as it would in one process.
        """
        shards = self._shard_reducer()
        if shards is not None and len(self.param_groups) > 1:  # the same on every rank
            return shards.all(self._local_grads_finite(shards.device))
        with_grads = sum(any(p.grad is not None for p in g["params"]) for g in self.param_groups)
        return self._local_grads_finite() if with_grads > 1 else None

    def _local_grads_finite(self, device: torch.device | None = None) -> Tensor:
        """Whether every gradient this rank holds is finite, on ``device`` (None: the
        gradients'; True with none, which needs a ``device``)."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return torch.ones((), dtype=torch.bool, device=device)
        finite = all_finite(grads)
        return finite if device is None else finite.to(device)

    @torch.no_grad()
    def effective_lrs(self) -> dict[Tensor, Tensor]:
        """Per-parameter effective rates ``lr · m`` (a 0-d tensor, or one per element).

        Rates are clamped to ``lr_bounds`` exactly as the next step would use them. Keys are the
        parameter tensors, as in ``optimizer.state``.
        """
        self._sync_groups()
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

    def state_dict(self) -> dict[str, Any]:
        """torch's, less the ``shard_group`` entry ZeroRedundancyOptimizer copies from its
        constructor arguments into the groups: a process group is wiring, not state, and
        cannot be pickled (ZeRO's ``consolidate_state_dict`` broadcasts the state dict)."""
        with hooks_held(self, "_optimizer_state_dict_post_hooks") as post_hooks:
            state_dict = super().state_dict()
        for group in state_dict["param_groups"]:  # torch's copies, not the live groups
            group.pop("shard_group", None)
        return run_hooks(self, state_dict, post_hooks)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, then cast rates to the rate dtype and device of their parameter.

        torch casts every floating state to the parameter's dtype; metalr's own state (rates,
        controllers, validation and spike-guard statistics) of fp16/bf16 parameters is kept in
        float32 instead (see :func:`metalr.functional._hypergrad.rate_dtype`), and ``step``
        counters live on the parameter's device so no step syncs with the host. The recast
        reads the state dict as the caller's load pre hooks left it and runs before their post
        hooks, so hooks have the last word, as with torch's optimizers.

        A checkpoint of the torch optimizer this one replaces (``torch.optim.Adam`` for
        :class:`~metalr.AdamHD`, ``AdamW`` for :class:`~metalr.AdamWHD`, ``SGD`` for
        :class:`~metalr.SGDHD`) loads too: its hyperparameters and moments are kept, the
        hypergradient options missing from it come from this optimizer's param groups (as
        constructed), and every multiplier starts at 1 (the seek rule tracks from there, with no
        new search from its ramp's start), so with ``hypergrad_lr=0`` training continues as the
        torch optimizer would. A checkpoint saved with ``amsgrad=True`` is refused (metalr has no
        AMSGrad), and so is one of another optimizer family (an SGD checkpoint into AdamHD).
        """
        state_dict = self._migrated(state_dict)
        captured: dict[str, Any] = {}

        def capture(_opt: Optimizer, loading: dict[str, Any]) -> None:
            # runs after the caller's pre hooks: what they changed is what loads
            captured["state"] = {
                pid: {k: v for k, v in s.items() if k in _RATE_DTYPE_KEYS or k == "step"}
                for pid, s in loading["state"].items()
            }
            captured["ids"] = [i for g in loading["param_groups"] for i in g["params"]]

        def recast(_opt: Optimizer) -> None:
            # runs before the caller's post hooks: what they change afterwards stays
            params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
            for pid, p in zip(captured["ids"], params):
                for key, value in captured["state"].get(pid, {}).items():
                    if isinstance(value, Tensor):
                        self.state[p][key] = _rate_state(key, value, p)

        pre = self.register_load_state_dict_pre_hook(capture)
        post = self.register_load_state_dict_post_hook(recast, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()
        self._arm_rewinds_from_state()  # a rewind an observation left for the next step

    def _migrated(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with the options a torch.optim checkpoint lacks filled from our groups.

        A group without ``hypergrad_lr`` (which every metalr group has) comes from torch.optim.
        metalr checkpoints that only lack flags added later are left to ``__setstate__``'s
        defaults, as torch does.
        """
        saved_groups = state_dict["param_groups"]
        for i, saved in enumerate(saved_groups):
            missing = [k for k in self.checkpoint_keys if k not in saved]
            if missing:
                name = type(self).__name__
                raise ValueError(
                    f"param group {i} of this checkpoint has no {', '.join(map(repr, missing))}: "
                    f"it is not a checkpoint of {name} or of "
                    f"torch.optim.{name.removesuffix('HD')}, which {name} loads"
                )
        if all("hypergrad_lr" in g for g in saved_groups):
            return state_dict
        if len(saved_groups) != len(self.param_groups):
            return state_dict  # torch's load raises its own error on the group count
        groups, states = [], dict(state_dict["state"])
        for saved, current in zip(saved_groups, self.param_groups):
            if saved.get("amsgrad", False):
                raise ValueError(
                    f"Cannot load a checkpoint saved with amsgrad=True into "
                    f"{type(self).__name__}, which has no AMSGrad variant; continue it with "
                    f"torch.optim.{type(self).__name__.removesuffix('HD')}(amsgrad=True) instead"
                )
            filled = {k: v for k, v in current.items() if k != "params" and k not in saved}
            group = {**saved, **filled}
            groups.append(group)
            for pid, p in zip(saved["params"], current["params"]):
                # every trained parameter continues at the checkpoint's lr, with moments or
                # without (torch's SGD without momentum keeps no per-parameter state)
                if p.requires_grad and RATE_KEY not in states.get(pid, {}):
                    states[pid] = {**states.get(pid, {}), **continuing_rate(p, group)}
        return {**state_dict, "state": states, "param_groups": groups}


def _flag_from_group(group: dict[str, Any], states: Mapping[Tensor, dict[str, Any]]) -> None:
    """A group saved with the flag as a group entry (``follows_validation``, the format of
    commit 60fae6b on 2026-12-05): its value goes to its parameters' states, and it leaves the
    group (there, the statistics' presence says nothing: they existed from the first step)."""
    if "follows_validation" not in group:
        return
    flag = bool(group.pop("follows_validation"))
    for p in group["params"]:
        if p in states:
            states[p][FOLLOWS_VALIDATION] = flag


def continuing_rate(param: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
    """The rate state of a parameter whose torch optimizer state is being loaded: multiplier 1
    (the checkpoint's ``lr`` as it was) and, for the seek rule, a settled controller that tracks
    from it, since moments already adapted to that rate need no new search from the ramp's start."""
    rate = initial_rate(param, group["granularity"], 1.0)
    if group["rule"] != "seek":
        return {RATE_KEY: rate}
    return {RATE_KEY: rate, CONTROLLER_KEY: settled_controller(rate, group["seek"])}


def initial_multiplier(group: dict[str, Any]) -> float:
    """A fresh multiplier's value: 1.0, or for an active ``"seek"`` rule the start of its ramp,

        m_0 = max(init_scale, init_floor / lr)        (init_floor / lr only while lr > 0)

    so that the effective rate starts at ``max(init_scale · lr, init_floor)``: below a sensible
    ``lr``, and never below ``init_floor`` however small the hint (``lr`` is read when the state
    is created: a tensor ``lr`` is read once, on the first step)."""
    hypergrad_lr = group.get("hypergrad_lr", 0)
    active = isinstance(hypergrad_lr, (Tensor, list, tuple)) or hypergrad_lr != 0
    if group.get("rule") != "seek" or not active:
        return 1.0
    start = float(group["seek"]["init_scale"])
    floor = float(group["seek"].get("init_floor", 0.0))  # absent from checkpoints before it
    if floor > 0:
        lr = group["lr"]
        lr = float(lr.detach() if isinstance(lr, Tensor) else lr)
        if lr > 0:
            start = max(start, floor / lr)
    return start


def check_sparse(param: Tensor, name: str) -> None:
    if param.grad is not None and param.grad.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients")
