"""``HyperLR``: hypergradient rate adaptation around any ``torch.optim.Optimizer``.

Like optax's ``mechanize`` or ``inject_hyperparams``: the wrapped optimizer proposes a
displacement ``u_t`` with its own rule and scheduled ``lr``; HyperLR applies ``m · u_t`` instead,
with ``m`` learned online from the hypergradient::

    d_{t-1} = -u_{t-1} / lr_{t-1}                 # the inner step's direction per unit rate
    m       ← rule(m, ⟨g_t, d_{t-1}⟩)              # metalr.functional._hypergrad, same as SGDHD
    θ_t     = θ_{t-1} + m · u_t

Around ``torch.optim.SGD`` this is exactly :class:`metalr.SGDHD`; around ``torch.optim.Adam``
(without weight decay) exactly :class:`metalr.AdamHD`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from metalr.functional._common import (
    as_real_list,
    broadcast_rate,
    commit_update,
    foreach_copy_,
    host_readable,
    mutable_view,
)
from metalr.functional._hypergrad import adapt_rates, rates_in_use
from metalr.optim import _validation as check
from metalr.optim._base import (
    HYPER_DEFAULTS,
    HypergradOptimizer,
    check_sparse,
    continuing_rate,
    scalar_lr,
)
from metalr.optim._checkpoint import (
    KEPT_WHOLE_KEY,
    WRAPPED_STATE_KEY,
    fold_wrapped_state,
    hooks_held,
    run_hooks,
    unfold_wrapped_state,
)
from metalr.optim._state_keys import CONTROLLER_KEY, RATE_KEY


class HyperLR(HypergradOptimizer):
    """Wrap any optimizer so that a learned multiplier on its update adapts online.

    Args:
        optimizer: the ``torch.optim.Optimizer`` to wrap (SGD, RMSprop, Adagrad, RAdam, Adamax,
            NAdam, a third-party optimizer, ...; not one whose ``step`` needs a closure, such
            as ``LBFGS``: a ValueError). HyperLR shares its ``param_groups``, so LR
            schedulers built on either object drive the same ``lr``. Its groups (and groups
            added later) may set their own ``rule``, ``granularity``, ``hypergrad_lr``,
            ``lr_bounds``, ``seek``, ``validation`` and ``spike_guard``, checked like the
            arguments below.
        hypergrad_lr: β of the rate update; ``None`` is the rule's default (seek: its fitted
            tracking step; normalized: 0.02). The additive rule has no default here because its
            scale depends on the inner optimizer.
        granularity: ``"group"``, ``"tensor"`` or ``"element"`` (default: "tensor").
        rule: ``"seek"`` (ramp to the scale, then track; see :class:`metalr.AdamHD`),
            ``"normalized"`` or ``"additive"`` (default: "seek").
        seek: constants of the seek rule overriding its fitted defaults: SGD-HD's
            (:data:`metalr.functional.SGD_SEEK_DEFAULTS`, β 0.0106) when ``optimizer`` is a
            ``torch.optim.SGD``, Adam-HD's otherwise (default: None).
        validation: constants of the validation signal (:meth:`observe_validation`) overriding
            its defaults (default: None).
        lr_bounds: ``(min, max)`` for every effective rate: each step applies
            ``clamp(lr × m, min, max)``; a multiplier the rule moves lands inside, one it does
            not move keeps its value (with ``hypergrad_lr=0`` a schedule that crosses a bound
            is only clamped at use; see the README) (default: (0, inf)).
        spike_guard: cut the rates before a step whose closure's loss spikes; see
            :class:`metalr.AdamHD` (default: None, off).

    To hand a run back to the bare optimizer, save ``hyper_lr.optimizer.state_dict()`` (the
    wrapped optimizer's own checkpoint): HyperLR's checkpoint keeps the wrapped state per
    parameter, under ``"wrapped"``, which the bare optimizer cannot read.

    State: per parameter the multiplier and one buffer (the previous direction, also used as
    the snapshot of the weights during the inner step), and under ``"wrapped"`` the inner
    optimizer's state of that parameter (the same dict as ``optimizer.state[p]``, linked at
    each step and load: code that replaces the entry, e.g. a device move that copies the
    state, or a load into the wrapped optimizer directly, unlinks it until the next step).
    ``state_dict()`` holds both per parameter, so ``torch.distributed.checkpoint`` carries both,
    flattened (``flatten_optimizer_state_dict=True``, which rebuilds the keys the live state
    has) or not. HyperLR is not an ``optimizer_class`` for ``ZeroRedundancyOptimizer`` (it wraps
    an optimizer; ZeRO's own load would bypass the wrapped state).

    Step hooks: the global ones (``torch.optim.optimizer.register_optimizer_step_pre_hook`` /
    ``post_hook``) run once per ``HyperLR.step()``, with the HyperLR as their optimizer, as they
    would around any torch optimizer; hooks registered on the wrapped optimizer itself still run
    around its inner step.

    A step with non-finite gradients leaves the weights and rates unchanged. On the CPU in eager
    mode the wrapped optimizer's step is skipped too; elsewhere (no host read) it steps on
    gradients whose non-finite entries were zeroed, so its state stays finite, and the next
    hypergradient is zero. ``GradScaler`` skips such steps entirely everywhere.

    Example:
        >>> base = torch.optim.RMSprop(model.parameters(), lr=1e-3)
        >>> optimizer = metalr.HyperLR(base)
        >>> scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=100)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        hypergrad_lr: float | None = None,
        *,
        granularity: str = "tensor",
        rule: str = "seek",
        seek: Mapping[str, float] | None = None,
        validation: Mapping[str, float] | None = None,
        lr_bounds: tuple[float, float] = (0.0, float("inf")),
        spike_guard: bool | Mapping[str, float] | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        if isinstance(optimizer, HypergradOptimizer):
            raise ValueError(  # noqa: TRY004
                f"{type(optimizer).__name__} already adapts its rates; wrap a plain optimizer"
            )
        if any("lr" not in g for g in optimizer.param_groups):
            raise ValueError("HyperLR needs an optimizer whose param groups have an 'lr' entry")
        if _step_needs_closure(optimizer):
            raise ValueError(
                f"HyperLR cannot wrap {type(optimizer).__name__}: its step() needs a closure (it "
                "re-evaluates the loss, e.g. a line search), so one step has no single "
                "displacement u_t = θ_t − θ_{t-1} for a rate to scale"
            )
        self.seek_family = _seek_family(optimizer)
        self._hyper = check.check_hyper_options(
            hypergrad_lr,
            granularity,
            rule,
            lr_bounds,
            None,
            seek,
            validation,
            self.seek_family,
            spike_guard=spike_guard,
        )
        self.optimizer = optimizer
        self._wrapping = True
        params = [p for g in optimizer.param_groups for p in g["params"]]
        # The wrapped defaults (momentum, betas, ...) let schedulers like OneCycleLR cycle them.
        super().__init__(params, {**HYPER_DEFAULTS, **optimizer.defaults, **self._hyper})
        self._wrapping = False
        self._share_groups()

    def _share_groups(self) -> None:
        """Share the wrapped optimizer's groups; a group that lacks HyperLR's options (the
        wrapped optimizer's own, or one added to it directly) gets them, its own checked."""
        self.param_groups = self.optimizer.param_groups
        options = {**HYPER_DEFAULTS, **self._hyper}
        for group in self.param_groups:
            # the flag's live key lets a flattened DCP load rebuild the saved one (DCP reads the
            # keys of the live groups)
            group.setdefault(KEPT_WHOLE_KEY, False)
            if options.keys() <= group.keys():
                continue
            group.update(check.check_group_options(group, options, None, self.seek_family))
            for key, value in options.items():
                group.setdefault(key, value)

    # a group added to the wrapped optimizer directly gets its options at the next step,
    # observation or summary (the base class calls this hook before reading the groups)
    _sync_groups = _share_groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (and so to HyperLR)."""
        if getattr(self, "_wrapping", False):
            return  # Optimizer.__init__ builds groups we replace by the wrapped ones
        resolved = check.check_group_options(param_group, self.defaults, None, self.seek_family)
        self.optimizer.add_param_group({**param_group, **resolved})
        self._share_groups()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["optimizer"] = self.optimizer
        state["_hyper"] = self._hyper
        state["seek_family"] = self.seek_family
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        loading = "optimizer" not in state  # load_state_dict passes only state and groups
        if not loading:  # unpickling
            self.optimizer = state.pop("optimizer")
            self._hyper = state.pop("_hyper")
            self.seek_family = state.pop("seek_family", None) or _seek_family(self.optimizer)
        super().__setstate__(state)
        self._wrapping = False
        if loading:
            # HyperLR's own loaded groups (after any load_state_dict pre hook) win over the
            # wrapped optimizer's copy of them, loaded just before.
            for inner, outer in zip(self.optimizer.param_groups, self.param_groups):
                inner.pop("follows_validation", None)  # 60fae6b's group flag, read by the base
                inner.update({k: v for k, v in outer.items() if k != "params"})
        self._share_groups()

    def __repr__(self) -> str:
        return f"HyperLR({self.optimizer!r}, {self._hyper})"

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Adapt the multipliers, let the wrapped optimizer step, then rescale its displacement."""
        self._sync_groups()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads_finite = self._grads_finite()
        self._guard_spike(loss, grads_finite)  # the closure's loss, or the one observe_loss left
        pending = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                check_sparse(p, "HyperLR")
            if not params:
                continue
            rates = [self._rate(p, group) for p in params]
            buffers = [self._buffer(p) for p in params]
            grads = [-p.grad if group.get("maximize", False) else p.grad for p in params]
            controller = self._controller_args(group, params)
            update = adapt_rates(
                rates, grads, buffers, lr=scalar_lr(group["lr"]),
                hypergrad_lr=self._train_hypergrad_lr(group), rule=group["rule"],
                granularity=group["granularity"],
                lr_bounds=group["lr_bounds"], grads_finite=grads_finite, **controller,
            )  # fmt: skip
            commit_update(rates, controller.get("controllers"), update, known_finite=False)
            finite = update.finite
            pending.append((group, params, rates, buffers, finite))
        if not pending:
            self._wrapped_step()
            return loss
        step_finite = torch.stack([f.to(pending[0][4].device) for *_, f in pending]).all()
        if host_readable(step_finite):
            if not bool(step_finite):  # CPU eager: skip the wrapped optimizer's step entirely
                return loss
        else:  # no host read: keep the wrapped optimizer's state finite (weights restored below)
            for _, params, *_ in pending:
                for p in params:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        for _, params, _, buffers, _ in pending:
            foreach_copy_(buffers, params)  # snapshot θ_{t-1}
        self._wrapped_step()
        self._link_wrapped_state(p for _, params, *_ in pending for p in params)
        if host_readable(step_finite):  # finite for sure: three in-place passes, no allocation
            for group, params, rates, snapshots, _ in pending:
                lr = scalar_lr(group["lr"])
                applied = rates_in_use(rates, lr, group["lr_bounds"])
                _rescale_in_place(params, applied, snapshots, lr)
            return loss
        for group, params, rates, snapshots, _ in pending:
            lr = scalar_lr(group["lr"])
            displacement = torch._foreach_sub(params, snapshots)  # u_t of the wrapped optimizer
            applied = rates_in_use(rates, lr, group["lr_bounds"])
            for p, rate, snap, u in zip(params, applied, snapshots, displacement):
                scaled = snap + rate.to(u.dtype) * u if not p.is_complex() else snap + rate * u
                # through views: torch.compile would drop a plain copy_ into a 0-d float64 tensor
                mutable_view(p).copy_(torch.where(step_finite, scaled, snap))
                direction = torch.where(step_finite, -u * _inverse(lr), torch.zeros_like(u))
                mutable_view(snap).copy_(direction)  # d_t, for the next hypergradient
        return loss

    def _last_directions(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        """The inner step's direction per unit rate, ``d_t = -u_t / lr_t`` (the buffer)."""
        return [self._buffer(p) for p in params]

    def _wrapped_step(self) -> None:
        """The wrapped optimizer's step with its own step hooks, without the global ones.

        torch runs the global step hooks around every ``Optimizer.step``; they already ran around
        this ``HyperLR.step``, so running them again for the inner step would fire them twice.
        """
        inner = self.optimizer
        hooked = type(inner).step
        raw = getattr(hooked, "__wrapped__", None)
        if not getattr(hooked, "hooked", False) or raw is None:  # step not patched by torch
            inner.step()
            return
        args: tuple[Any, ...] = (inner,)
        kwargs: dict[str, Any] = {}
        name = f"Optimizer.step#{type(inner).__name__}.step"
        with torch.autograd.profiler.record_function(name):
            for pre_hook in list(inner._optimizer_step_pre_hooks.values()):
                result = pre_hook(inner, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"{raw} must return None or a tuple of (new_args, new_kwargs), "
                            f"but got {result}."
                        )
                    args, kwargs = result
            raw(*args, **kwargs)
            inner._optimizer_step_code()
            for post_hook in list(inner._optimizer_step_post_hooks.values()):
                post_hook(inner, args, kwargs)

    def _link_wrapped_state(self, params: Any) -> None:
        """``state[p]["wrapped"]``: the wrapped optimizer's state of each of ``params`` (``{}``
        until it has one). The key is what ``torch.distributed.checkpoint`` reads: loading a
        flattened checkpoint, it rebuilds each parameter's entry from the live state's keys."""
        inner = self.optimizer.state
        for p in params:
            self.state[p][WRAPPED_STATE_KEY] = inner.get(p, {})  # (no defaultdict entry)

    def _buffer(self, param: Tensor) -> Tensor:
        state = self.state[param]
        if "prev_direction" not in state:  # Lazy state initialization
            state["prev_direction"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state["prev_direction"]

    def state_dict(self) -> dict[str, Any]:
        """HyperLR's state and param groups, with the wrapped optimizer's state inside them.

        Each parameter's entry holds HyperLR's own state and, under ``"wrapped"``, the wrapped
        optimizer's state for that parameter (``{}`` when it has none); the param groups are
        shared, so one list holds both optimizers' options. The checkpoint is then per
        parameter only, like torch's, and ``torch.distributed.checkpoint``'s
        ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` carry all of it (FSDP2
        included). A wrapped optimizer whose checkpoint has more than per-parameter state and
        param groups is saved whole under a top-level ``"wrapped"`` entry instead (the format of
        checkpoints from before 2026-12-05, which still load).

        State-dict post hooks registered on the HyperLR see (and may change) the whole
        checkpoint, the wrapped state included: they run after it is added.
        """
        with hooks_held(self, "_optimizer_state_dict_post_hooks") as post_hooks:
            state_dict = super().state_dict()
        fold_wrapped_state(state_dict, self.optimizer.state_dict())
        return run_hooks(self, state_dict, post_hooks)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a HyperLR checkpoint, or a checkpoint of the wrapped optimizer alone.

        Load pre hooks registered on the HyperLR see the whole checkpoint before anything
        loads. The wrapped optimizer's state is loaded first (from each parameter's
        ``"wrapped"`` entry, or from a top-level ``"wrapped"`` checkpoint of the older format);
        HyperLR's own ``param_groups`` then win over the copy saved with it. A plain checkpoint
        of the wrapped optimizer (e.g. of a ``torch.optim.Adam`` trained without HyperLR) loads
        into the wrapped optimizer; HyperLR's state starts afresh (options as constructed; the
        multipliers of trainable parameters at 1, the seek rule tracking from there).
        A HyperLR checkpoint that lost the wrapped optimizer's state (e.g. a flattened
        ``torch.distributed.checkpoint`` loaded into a HyperLR that never stepped, whose live
        state has no ``"wrapped"`` key to rebuild, or a wrapped checkpoint saved whole that went
        through DCP) is refused with a ``ValueError``.
        """
        state_dict = dict(state_dict)
        with hooks_held(self, "_optimizer_load_state_dict_pre_hooks") as pre_hooks:
            state_dict = dict(run_hooks(self, state_dict, pre_hooks))
            if "wrapped" not in state_dict:
                _refuse_split_whole_checkpoint(state_dict)
            state_dict["param_groups"] = [
                {k: v for k, v in g.items() if k != KEPT_WHOLE_KEY}
                for g in state_dict.get("param_groups", [])
            ]
            if "wrapped" in state_dict:  # the wrapped checkpoint whole, at the top level
                own, wrapped = state_dict, state_dict.pop("wrapped")
            else:
                unfolded = unfold_wrapped_state(state_dict)
                if unfolded is None:  # a checkpoint of the wrapped optimizer alone
                    _refuse_hyper_lr_state_without_wrapped(state_dict)
                    self.optimizer.load_state_dict(state_dict)
                    self.state.clear()
                    self._share_groups()
                    for group in self.param_groups:  # parameters continue at their lr
                        for p in group["params"]:
                            if p.requires_grad:
                                self.state[p].update(continuing_rate(p, group))
                    return
                own, wrapped = unfolded
            self.optimizer.load_state_dict(wrapped)
            super().load_state_dict(own)
            self._link_wrapped_state(list(self.state))


def _refuse_split_whole_checkpoint(state_dict: Mapping[str, Any]) -> None:
    """A checkpoint whose wrapped part was saved whole (its param groups say so:
    :data:`KEPT_WHOLE_KEY`) but that has no top-level ``"wrapped"`` lost that part on the way,
    e.g. through ``torch.distributed.checkpoint``: refused, rather than resuming the wrapped
    optimizer with part of its state."""
    if any(g.get(KEPT_WHOLE_KEY) for g in state_dict.get("param_groups", ())):
        raise ValueError(
            "Invalid state_dict: the wrapped optimizer's checkpoint held more than the state of "
            "HyperLR's parameters and param groups, so HyperLR saved it whole under a top-level "
            "'wrapped' entry, and this checkpoint has none (torch.distributed.checkpoint keeps "
            "only per-parameter state): save and load HyperLR.state_dict() with torch.save for "
            "this optimizer"
        )


def _refuse_hyper_lr_state_without_wrapped(state_dict: Mapping[str, Any]) -> None:
    """A checkpoint with HyperLR's own state in some parameter's entry but no wrapped state."""
    own = {RATE_KEY, CONTROLLER_KEY, "prev_direction"}
    states = state_dict.get("state", {})
    if any(own & set(s) for s in states.values() if isinstance(s, Mapping)):
        raise ValueError(
            "Invalid state_dict: a HyperLR checkpoint without the wrapped optimizer's state (no "
            "'wrapped' entry in any parameter's state, nor a top-level one); save it with "
            "HyperLR.state_dict() or torch.distributed.checkpoint's get_optimizer_state_dict; "
            "a flattened one (flatten_optimizer_state_dict=True) loads only into a HyperLR that "
            "has stepped (its live state's keys are what the loader rebuilds)"
        )


def _rescale_in_place(
    params: list[Tensor], rates: list[Tensor], snapshots: list[Tensor], lr: float | Tensor
) -> None:
    """θ ← θ_inner + (1 − m)·(−u) and buffer ← d = −u / lr, with u = θ_inner − θ_old."""
    torch._foreach_sub_(snapshots, params)  # −u (the snapshot held θ_old)
    p_r, neg_u = as_real_list(params), as_real_list(snapshots)
    one_minus = [broadcast_rate(1 - r, p).to(t.dtype) for r, p, t in zip(rates, params, p_r)]
    torch._foreach_addcmul_(p_r, neg_u, one_minus)
    torch._foreach_mul_(snapshots, _inverse(lr))


def _inverse(lr: float | Tensor) -> float | Tensor:
    if isinstance(lr, Tensor):
        return torch.where(lr > 0, 1.0 / lr, 0.0)
    return 1.0 / lr if lr > 0 else 0.0


def _seek_family(optimizer: Optimizer) -> str:
    """Whose fitted seek constants a wrapped optimizer reads: SGD-HD's for ``torch.optim.SGD``
    (with or without momentum), Adam-HD's for every other (measured: HyperLR(SGD, momentum 0.9)
    with Adam's constants 6/12 cells of the seed-3 check within 10% of best-of-grid SGD, with
    SGD-HD's 8/12)."""
    return "sgd" if isinstance(optimizer, torch.optim.SGD) else "adam"


def _step_needs_closure(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` takes a closure it cannot do without (``torch.optim.LBFGS``)."""
    try:
        parameters = inspect.signature(optimizer.step).parameters
    except (TypeError, ValueError):  # a builtin or C-implemented step: assume the usual contract
        return False
    closure = parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty
