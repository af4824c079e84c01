"""``observe_validation``'s plumbing for metalr's optimizers (the math:
:mod:`metalr.functional.validation`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metalr.functional._common import commit_rates, host_readable, scalar_lr
from metalr.functional._distributed import ShardReducer, average_over_ranks
from metalr.functional._rate_moves import log_level
from metalr.functional._ray import (
    DONE,
    gradient_fall,
    ray_capped,
    ray_cosine,
    ray_decision,
    ray_enabled,
    ray_sums,
    steps_taken,
    upgraded_ray_state,
)
from metalr.functional._signals import all_finite
from metalr.functional._validation_state import Rewind, kept_snapshots, restored
from metalr.functional.validation import validation_adapt_rates
from metalr.optim._state_keys import (
    FOLLOWS_VALIDATION,
    RATE_KEY,
    RAY_ANCHOR_KEY,
    RAY_KEY,
    REWIND_DUE_KEY,
    SNAPSHOT_KEY,
    VALIDATION_KEY,
)

#: A param group's parameters that a validation loss has a gradient for (``requires_grad``).
_ObservedGroups = list[tuple[dict[str, Any], list[Tensor]]]


class ValidationObserving:
    """Mixin of :class:`metalr.optim._base.HypergradOptimizer`: the validation signal
    (``observe_validation``). It reads ``param_groups``, ``state``, ``_rate``,
    ``_controller_args``, ``_shard_group`` and ``_shard_reducer`` of the optimizer it is mixed
    into, and its ``_last_directions``."""

    param_groups: list[dict[str, Any]]
    state: Any

    def _follows_validation(self, group: dict[str, Any]) -> bool:
        """Whether ``group`` has observed a finite validation loss (its rates follow that
        signal from then on): whether any of its parameters has the flag."""
        return any(self.state.get(p, {}).get(FOLLOWS_VALIDATION, False) for p in group["params"])

    def _last_directions(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        """The direction ``d_t`` of each parameter's last step (zeros before the first)."""
        raise NotImplementedError

    def observe_validation(
        self,
        loss: Tensor | Callable[[], Tensor],
        *,
        scaler: Any = None,
        process_group: Any = "auto",
        hypergradient: bool = True,
    ) -> Tensor:
        r"""Move the rates by the hypergradient of a validation loss; ``.grad`` is not touched.

        Call it every ``k`` training steps (after ``step()``; a group none of whose parameters
        has stepped is not observed) with the loss of a validation minibatch, computed with
        autograd on (a tensor, or a closure returning one) and in eval mode (see the example).
        From the
        first call on, the param groups' rates follow the validation signal
        ``∂L_val(θ_t)/∂α_t = -⟨∇L_val(θ_t), d_t⟩`` at each call, beside the training one
        scaled by ``validation['train_weight']`` (default 1; 0: instead of it;
        :mod:`metalr.functional.validation` has the equations; the seek rule's ramp still runs
        on the training signal). With ``validation={"rewind": r}`` (seek rule, opt-in) the
        parameters themselves go back towards those of the best observation when the hold's cut
        fires (at the end of the next ``step()``); with ``validation={"ray_steps": T}`` (the
        run's step budget; opt-in) the cosine between the validation gradient and the travel
        since the first step caps the rates once, early, if it says the run has travelled too
        far (:mod:`metalr.functional._ray`). A non-finite loss or gradient changes nothing
        (a group's first observation reads one flag on the host for that: only a finite one
        switches the group to the validation signal; later observations stay on the device,
        except that a ``scaler``'s ``get_scale()`` reads its scale on the host, and that with
        sharded optimizer state every observation reads one flag per group, all-reduced over
        the ranks, so that every rank runs the same collectives).

        With ``hypergradient=False`` the call observes the loss alone: no backward, no
        validation gradient; the seek rule's hold (a settled rate kept while the loss improves,
        cut once it has stopped) and the rewind read it, the validation signal does not move the
        rates. That is what a validation *pass* feeds: the loss of the whole validation set (or
        a fixed subset), computed under ``torch.no_grad()`` as for ``ReduceLROnPlateau`` — a
        forward pass is all it costs, and a loss measured on the same examples each time has no
        sampling noise to mistake for a trend.

        Args:
            loss: the validation loss (0-d tensor requiring grad), or a closure computing it.
            scaler: a ``torch.amp.GradScaler`` to backpropagate a scaled loss (fp16 autocast);
                the gradient is unscaled before use (default: None).
            process_group: ``"auto"`` averages the validation gradient over the default process
                group when ``torch.distributed`` is initialized with more than one rank (as DDP
                averages the training one); a process group to use that one; ``None`` for no
                averaging (default: "auto"). Compute the loss without DDP's gradient hooks:
                on ``ddp_model.module`` or inside ``ddp_model.no_sync()``. With sharded state
                (``shard_group``, e.g. ``ZeroRedundancyOptimizer``) pass ``None`` and the same
                validation batch on every rank.
            hypergradient: False to observe the loss alone (a tensor of one element, with or
                without grad, a Python number, or a closure, called under ``no_grad``): the
                seek rule's hold and rewind act on it, nothing is backpropagated (default:
                True). Every param group needs ``rule="seek"`` and the hold
                (``validation["hold"] > 0``, the default).

        Returns:
            the validation loss, detached.

        Example:
            >>> optimizer.step()
            >>> if step % 20 == 0:  # the recommended frequency (RECOMMENDED_EVERY)
            ...     xv, yv = next(val_batches)
            ...     model.eval()  # no dropout; BatchNorm's running statistics left alone
            ...     optimizer.observe_validation(F.cross_entropy(model(xv), yv))
            ...     model.train()
            >>> # or: the whole validation set's loss, forward only
            >>> with torch.no_grad():
            ...     val_loss = F.cross_entropy(model(x_val), y_val)
            >>> optimizer.observe_validation(val_loss, hypergradient=False)
        """
        self._sync_groups()
        if not hypergradient:
            return self._observe_loss_alone(loss, scaler, process_group)
        if callable(loss) and not isinstance(loss, Tensor):
            with torch.enable_grad():
                loss = loss()
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError(
                "Invalid loss for observe_validation: expected a one-element tensor that "
                f"requires grad (the validation loss computed with autograd on), got {loss!r}; "
                "hypergradient=False observes a loss without its gradient"
            )
        groups = self._trainable_groups()
        params = [p for _, ps in groups for p in ps]
        _refuse_dtensor(params)
        shards = self._shard_reducer()
        if shards is not None and process_group is not None:
            raise ValueError(
                "observe_validation with sharded optimizer state (shard_group, e.g. "
                "ZeroRedundancyOptimizer): each rank holds other parameters, so their validation "
                "gradients cannot be averaged; pass process_group=None and the same validation "
                "batch on every rank"
            )
        grads: list[Tensor] = []
        if params:  # (a rank of sharded state may hold none: it still joins the collectives)
            target = scaler.scale(loss) if scaler is not None else loss
            raw = torch.autograd.grad(target.reshape(()), params, allow_unused=True)
            if shards is None and all(g is None for g in raw):
                raise ValueError(
                    "Invalid loss for observe_validation: it depends on none of the parameters "
                    "this optimizer trains (computed with another model, or detached?)"
                )
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw)]
            if scaler is not None:
                torch._foreach_mul_(grads, 1.0 / scaler.get_scale())
        value = loss.detach().reshape(()).clone()
        average_over_ranks(grads + [value], process_group)  # the hold reads the mean loss
        per_group = []
        start = 0
        for _, ps in groups:
            per_group.append(grads[start : start + len(ps)])
            start += len(ps)
        self._observe_groups(groups, per_group, value, shards)
        return loss.detach()

    def _observe_loss_alone(self, loss: Any, scaler: Any, process_group: Any) -> Tensor:
        """``observe_validation(loss, hypergradient=False)``: the hold and the rewind read the
        loss; no gradient is computed (see :meth:`observe_validation`)."""
        if scaler is not None:
            raise ValueError(
                "Invalid scaler for observe_validation(hypergradient=False): a scaler scales a "
                "loss to backpropagate, and the loss alone is not; pass the unscaled loss"
            )
        if callable(loss) and not isinstance(loss, Tensor):
            with torch.no_grad():
                loss = loss()
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            loss = torch.tensor(float(loss), dtype=torch.float64)
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            raise ValueError(
                "Invalid loss for observe_validation(hypergradient=False): expected a "
                f"one-element tensor or a number, got {loss!r}"
            )
        groups = self._trainable_groups()
        for index, (group, _) in enumerate(groups):
            hold = group["validation"].get("hold", 0.0)
            if group["rule"] != "seek" or hold <= 0:
                raise ValueError(
                    f"Invalid param group {index} for observe_validation(hypergradient=False): "
                    "the loss alone moves rates through the seek rule's hold; the group has "
                    f"rule={group['rule']!r}, validation['hold']={hold} (needs 'seek' and > 0)"
                )
        params = [p for _, ps in groups for p in ps]
        _refuse_dtensor(params)
        shards = self._shard_reducer()
        device = params[0].device if params else (shards.device if shards else loss.device)
        value = loss.detach().reshape(()).to(device).clone()
        average_over_ranks([value], process_group)
        self._observe_groups(groups, None, value, shards)
        return value

    def _trainable_groups(self) -> _ObservedGroups:
        """Each param group with its parameters that require grad (what an observation moves)."""
        return [(g, [p for p in g["params"] if p.requires_grad]) for g in self.param_groups]

    def _observe_groups(
        self,
        groups: _ObservedGroups,
        grads: list[list[Tensor]] | None,
        value: Tensor,
        shards: ShardReducer | None,
    ) -> None:
        """Apply one observation (``value``: the loss, averaged over the ranks) to the groups
        it moves: each group's validation gradients in ``grads``, or None for the loss alone.
        A rank holding none of a group's trainable parameters joins its collectives."""
        loss_only = grads is None
        per_group = [[] for _ in groups] if grads is None else grads
        observing = self._groups_to_observe(groups, per_group, value, shards)
        finite = torch.isfinite(value)
        with torch.no_grad():
            for (group, ps), group_grads, observe in zip(groups, per_group, observing):
                if not observe:
                    continue
                if ps:
                    observed = None if loss_only else group_grads
                    self._observe_group(group, ps, observed, finite, value, shards)
                else:  # sharded: this rank holds none of the group's trainable parameters
                    self._mark_following(group)
                    shards.participate_validation(group["granularity"], group["rule"], loss_only,
                                                  ray=ray_enabled(group["validation"]))  # fmt: skip

    def _groups_to_observe(
        self,
        groups: _ObservedGroups,
        grads: list[list[Tensor]],
        loss: Tensor,
        shards: ShardReducer | None,
    ) -> list[bool]:
        """Which groups this observation moves: those with a stepped parameter that follow
        the validation signal, or whose first observation is finite (loss and gradients; one
        host read each, the first time only). With sharded state the ranks decide together, in
        one all-reduce and one host read: a group moves if some rank holds a stepped
        parameter of it and no rank vetoes it (a rank holding none cannot veto; one whose
        shard of the gradient is not finite vetoes it for every rank, as the whole gradient
        would in one process)."""
        # a group none of whose parameters has been stepped has no last direction to read: an
        # observation before the first step (a prior's rates loaded, say) is none of it
        stepped = [any(_stepped(self.state.get(p, {})) for p in ps) for _, ps in groups]
        if shards is None:
            return [
                moved and (self._follows_validation(g) or bool(all_finite([loss, *gs])))
                for (g, _), gs, moved in zip(groups, grads, stepped)
            ]
        device = shards.device
        yes = torch.ones((), dtype=torch.bool, device=device)
        agree = [
            yes if not moved or self._follows_validation(g) else all_finite([loss, *gs]).to(device)
            for (g, _), gs, moved in zip(groups, grads, stepped)
        ]
        holds_none = [~yes if moved else yes for moved in stepped]
        decided = shards.all(torch.stack(agree + holds_none))  # MIN: "all agree", "none holds"
        n = len(groups)
        return (decided[:n] & ~decided[n:]).tolist()

    def _mark_following(self, group: dict[str, Any]) -> None:
        """Flag that ``group`` follows the validation signal on every parameter that has state,
        frozen ones included: under sharded state a rank whose parameters of the group are all
        frozen at an observation must still follow it afterwards, as one process would (where
        the group's other parameters carry the flag). Parameters without state (never stepped)
        get none: a state entry for them would be missing from a fresh optimizer's, the
        template ``torch.distributed.checkpoint`` loads into."""
        for p in group["params"]:
            state = self.state.get(p)
            if state is not None and RATE_KEY in state:
                state[FOLLOWS_VALIDATION] = True

    def _observe_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor] | None,
        finite: Tensor,
        loss: Tensor,
        shards: ShardReducer | None,
    ) -> None:
        """One group's observation (``grads`` None: the loss alone)."""
        rates = [self._rate(p, group) for p in params]  # completes each state
        self._mark_following(group)
        stats = [self.state[p][VALIDATION_KEY] for p in params]
        if grads is not None and group.get("maximize", False):
            grads = [-g for g in grads]
        directions = self._last_directions(group, params)
        args = self._controller_args(group, params)
        update = validation_adapt_rates(
            rates, stats, grads, directions, lr=scalar_lr(group["lr"]), rule=group["rule"],
            granularity=group["granularity"], lr_bounds=group["lr_bounds"],
            options=group["validation"], controllers=args.get("controllers"),
            seek=args.get("seek"), grads_finite=finite, shards=shards, loss=loss,
        )  # fmt: skip
        commit_rates(rates, update.rates, update.finite, known_finite=False)
        torch._foreach_copy_(stats, update.stats)  # already gated by the flag
        if update.rewind is not None:
            self._rewind(params, update.rewind)
        if grads is not None and ray_enabled(group["validation"]):
            self._ray_ceiling(group, params, rates, grads, update.finite, shards)

    def _ray_ceiling(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        rates: list[Tensor],
        grads: list[Tensor],
        finite: Tensor,
        shards: ShardReducer | None,
    ) -> None:
        """The ray ceiling's half of an observation (``validation={"ray_steps": T}``; the math:
        :mod:`metalr.functional._ray`): the group's ray cosine, then at most once a ceiling on
        its rates and a rewind of its parameters. On the device, no host read; with its state
        on the CPU, where reading a flag costs no synchronisation, it skips the work whose
        result would be its input (a rule that has acted, a look that does not act), the
        same bit for bit."""
        states = [self.state[p] for p in params]  # completed by _rate: the anchor is there
        if shards is None and _ray_finished([s[RAY_KEY] for s in states]):
            return  # acted: the rule would return its input, bit for bit
        for state in states:  # a checkpoint's state from before the clock: padded once
            state[RAY_KEY] = upgraded_ray_state(state[RAY_KEY])
        sums = ray_sums(grads, params, [s[RAY_ANCHOR_KEY] for s in states])
        controllers = [self._controller(p, group) for p in params]
        # the group's step and its largest log multiplier (the ray's clock reads both) and its
        # gradient norm's fall from the peak (its gate)
        levels = torch.stack([log_level(r, group["granularity"]).to(torch.float64)
                              for r in rates])  # fmt: skip
        clock = torch.stack([
            steps_taken(controllers).to(torch.float64),
            levels.amax(),
            gradient_fall(controllers).to(torch.float64),
        ])  # fmt: skip
        if shards is not None:  # every rank decides on the same cosine, step, level and fall
            sums = shards.sum(sums.to(shards.device))
            clock = shards.maximum(clock.to(shards.device))
        rays = [s[RAY_KEY] for s in states]
        decision = ray_decision(
            rates, controllers, rays, ray_cosine(sums), finite, options=group["validation"],
            granularity=group["granularity"], steps=clock[0], level=clock[1], fall=clock[2],
            levels=levels,
        )  # fmt: skip
        torch._foreach_copy_(rays, decision.ray)
        if not _known_false(decision.act):  # (on CPU state a look that does not act skips it)
            stats = [s[VALIDATION_KEY] for s in states]
            new_rates, new_controllers, new_stats = ray_capped(
                rates, controllers, stats, decision.act, decision.cap, seek=group["seek"]
            )
            torch._foreach_copy_(rates, new_rates)
            torch._foreach_copy_(controllers, new_controllers)
            torch._foreach_copy_(stats, new_stats)
        self._rewind(params, decision.rewind, pending=True)

    def _rewind(self, params: list[Tensor], rewind: Rewind, pending: bool = False) -> None:
        """The rewind's half at the observation (``validation={"rewind": r}``): a new best
        becomes the snapshot now, and a cut leaves each parameter a flag that the next
        ``step()`` reads at its end (:meth:`apply_due_rewinds`, which reads ``r``); ``pending``
        (the ray ceiling's) ors the flags into those already due instead of replacing them, so
        that a second look before that step cannot cancel the rewind. On the device, no host
        read (``pending`` on the CPU: a look that keeps nothing and flags nothing returns once
        the state's entries exist)."""
        for p, due in zip(params, rewind.restore.unbind(0)):
            state = self.state[p]
            if SNAPSHOT_KEY not in state:  # the first observation (or a checkpoint without it)
                state[SNAPSHOT_KEY] = p.detach().clone(memory_format=torch.preserve_format)
            if REWIND_DUE_KEY not in state:  # created once, then written in place: the state
                # keeps its layout (a compiled step does not recompile at each observation)
                state[REWIND_DUE_KEY] = torch.zeros((), dtype=torch.bool, device=due.device)
        if pending and _known_false(rewind.keep) and _known_false(rewind.restore):
            return  # nothing kept, nothing due: the selects below would return their input
        snapshots = []
        for p, due in zip(params, rewind.restore.unbind(0)):
            state = self.state[p]
            snapshots.append(state[SNAPSHOT_KEY])
            if pending:  # the ray's: a later look before the step keeps a rewind already due
                state[REWIND_DUE_KEY].logical_or_(due.to(state[REWIND_DUE_KEY].device))
            else:
                state[REWIND_DUE_KEY].copy_(due)
        torch._foreach_copy_(snapshots, kept_snapshots([p.detach() for p in params], snapshots,
                                                       rewind.keep))  # fmt: skip
        self._arm_rewinds()

    def _arm_rewinds(self) -> None:
        """Make the next ``step()`` end with :meth:`apply_due_rewinds` (a step post hook,
        registered once; it returns at once while no rewind is due)."""
        self._rewinds_due = True
        if getattr(self, "_rewind_hook", None) is None:
            self._rewind_hook = self.register_step_post_hook(_apply_due_rewinds)

    def _arm_rewinds_from_state(self) -> None:
        """After a checkpoint loads: arm the hook if the checkpoint has rewind flags (one may be
        due; the load recast keeps them bool)."""
        if any(REWIND_DUE_KEY in state for state in self.state.values()):
            self._arm_rewinds()

    @torch.no_grad()
    def apply_due_rewinds(self) -> None:
        """Move the parameters an observation's cut flagged back to their snapshots,
        ``θ ← θ + r (S − θ)`` (:func:`metalr.functional._validation_state.restored`), in place
        of the step that has just run; clears the flags (they stay in the state, False).
        ``step()`` calls it at its end: under ZeroRedundancyOptimizer each rank rewinds its own
        share before ZeRO broadcasts it, so every rank holds what one process would."""
        if not getattr(self, "_rewinds_due", False):
            return
        for group in self.param_groups:
            due = [p for p in group["params"] if REWIND_DUE_KEY in self.state.get(p, {})]
            if not due:
                continue
            fraction = group["validation"].get("rewind", 0.0)
            if ray_enabled(group["validation"]):  # the ray ceiling goes all the way back
                fraction = 1.0
            flags = [self.state[p][REWIND_DUE_KEY] for p in due]
            if fraction > 0:
                snapshots = [self.state[p][SNAPSHOT_KEY] for p in due]
                back = restored([p.detach() for p in due], snapshots, flags, fraction)
                torch._foreach_copy_([p.detach() for p in due], back)
            for flag in flags:
                flag.fill_(False)
        self._rewinds_due = False


def _apply_due_rewinds(optimizer: Any, _args: Any, _kwargs: Any) -> None:
    optimizer.apply_due_rewinds()


#: State keys the first step creates, one of which every stepped parameter has: Adam's step
#: counter, SGD's momentum buffer or stored direction, HyperLR's direction buffer.
_STEPPED_KEYS = ("step", "momentum_buffer", "prev_direction")


def _stepped(state: dict[str, Any]) -> bool:
    """Whether a parameter with this state has been stepped (has a rate and a last direction)."""
    return RATE_KEY in state and any(key in state for key in _STEPPED_KEYS)


def _known_false(flags: Tensor) -> bool:
    """Whether every flag is False, read on the host only where that is free
    (:func:`~metalr.functional._common.host_readable`; elsewhere: False, unknown)."""
    return host_readable(flags) and not bool(flags.any())


def _ray_finished(rays: list[Tensor]) -> bool:
    """Whether a group's ray rule has acted (its ``DONE`` flag), read on the host only where
    that is free (elsewhere: False, and the rule runs). A rule that has acted is inert — no
    streak, no clock, no snapshot, no rewind; its update returns its input — so an observation
    may skip it."""
    return bool(rays) and all(host_readable(r) and bool(r[DONE] > 0) for r in rays)


def _refuse_dtensor(params: list[Tensor]) -> None:
    if any(type(p).__name__ == "DTensor" for p in params):
        raise NotImplementedError(
            "observe_validation does not support sharded (FSDP2 / DTensor) parameters yet; "
            "use DDP (replicated parameters), where the validation gradient is averaged"
        )
