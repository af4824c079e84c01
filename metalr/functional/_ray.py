r"""The ray ceiling: a long-horizon validation signal that caps the rates once (pure functions).

Every other validation signal is greedy or late: ``−⟨∇L_val, d_t⟩`` asks about the last step,
the hold waits for the validation loss to rise. On a task that overfits within its budget the
damage of a rate above the best fixed one is done before either turns. The *ray cosine* asks
about the whole path travelled so far::

    c_t = cos(∇L_val(θ_t), θ_t − θ_0)  =  sign and size of  d/dα L_val(θ_0 + α(θ_t − θ_0)) at α = 1

positive when *less* travel along the straight line from the start would have given a lower
validation loss (MARTHE's forward-mode hypergradient with every step's Jacobian taken as the
identity and no discount). At fixed Adam rates 3–10× above the best one it turns positive within
the first ~5% of the budget on the tasks that overfit, while at the best rate it stays ≤ 0
until late (``experiments/ray_signal_probe.py``, README "The ray of travel"). So the rule acts
once, early, given the run's step budget ``T`` (``validation={"ray_steps": T}``)::

    streak ← streak + 1  if c_t > τ  else 0                       (at each observation)
    at the first observation with  streak ≥ k  and  t < w·T:
        f = clamp(t / (a·T), φ, 1)
        ceiling ← min(ceiling, log m + log f)      (every tensor of the group; the controller's)
        m ← min(m, f · m)                           (per element: capped at f × the largest)
        the ramp stops; a turn taken back within ``resume_window`` can no longer re-open it
        θ ← S                                        (the last observation with c ≤ τ, if any)
    S ← θ   at an observation with c ≤ τ before w·T (the snapshot the rewind goes back to)

(``τ`` = ``ray_tau`` 0.005, ``k`` = ``ray_persist`` 2, ``w`` = ``ray_before`` 0.1, ``a`` =
``ray_target`` 0.3, ``φ`` = ``ray_floor`` 0.1; ``t`` = the training steps taken: the seek
controller's count of active steps, plus the first step, which has no direction to read.) ``f``
is the rate whose overshoot would come at ``a`` of the budget if the step of the overshoot
scales as 1 / rate (at fixed rates it does, roughly: digits_mlp 1e-2, 3e-3, 1e-3 turn at steps
50, 100, 300). A *ceiling*, not a cut of the rates alone: AdamHD's ramp and tracking target the
edge of stability whatever the rate is, and climb back over a plain cut.

**The clock** (``ray_clock``). At fixed rates the overshoot comes once the run has travelled a
given distance, ``Σ_s m_s`` steps × rate; a run that ramps up from a rate decades too small has
travelled far less in its first ``t`` steps than ``t`` steps at its present rate. With
``ray_clock = 1`` the rule reads, in place of ``t``, the steps at the present rate that the
travel so far is worth, on the group's largest multiplier ``m̄`` read at the observations
(a sum over the intervals between them, each at the rate of its end)::

    t_eff ← t_eff · m̄_prev / m̄ + (t − t_prev)        (at each finite observation; 0 at first)

so ``t_eff = t`` at a fixed rate, and both the window (``t_eff < w·T``) and the factor
(``f = clamp(t_eff / (a·T), φ, 1)``) use it. ``ray_clock = 0`` is the step count ``t``, the
rule of the first three checks.

**The gate** (``ray_gate`` γ). A run can read ``c > τ`` early without overfitting: on a task
still far from fitting its training set the path carries noise that less travel would also
have removed. With ``γ < 1`` the rule acts only at an observation where the group's gradient
norm has fallen from its peak, ``G_t < γ · H_t`` (the seek controller's running average of
``‖g_t‖`` and its running peak, :mod:`metalr.functional._controller`'s gradient gate: the
training loss is being fitted); the streak and the snapshot run as before. Where the
controller keeps no gradient norm (``vanish`` and ``noise_hold`` both 0, SGD-HD's defaults) the
gate is open. ``γ = 1`` (default) is no gate.

The cosine is the param group's (sums over its tensors, all-reduced under sharded state); ``θ_0``
is each parameter's value at its first step (``optimizer.state[p]['hd_ray_anchor']``), ``S`` the
rewind's snapshot (``'hd_best_params'``); the group's streak, whether it has acted and whether a
snapshot was kept are ``optimizer.state[p]['hd_ray']``. Nothing here syncs with the host.

Measured (README, "The ray ceiling in the library"): alone, on the whole validation split's
gradient every 20 steps, it passed a fresh-seed check on study 1's six tasks (seeds 87-89: 12/30
cells within 10% of tuned Adam against 11/30, paired mean log-ratio −0.037, −0.077 to −0.005;
digits_mlp 1.19-1.67× → 1.04-1.23×, no other task moved beyond the margin); added to the
recommended minibatch option it reached 29/30 on study 9's seeds but did not pass its own check
(seeds 90-92: 25/30 against 23/30, −0.019, −0.048 to +0.003). On the clock alone it did not
either (seeds 96-98: 26/30 against 23/30, −0.039, −0.095 to +0.001: mnist1d's cells paid); on
the clock with the gate at 0.8 it passed (seeds 52-54: 25/30 against 20/30, −0.030, −0.060 to
−0.005; digits_mlp's five cells 1.11-1.30× → 0.90-1.04×), and those are the defaults since
(``experiments/results/ray_signal/check6``-``check8``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from metalr.functional._controller import CEILING, COUNT, GRAD, GRAD_PEAK, RAMP, SINCE
from metalr.functional._rate_moves import log_level
from metalr.functional._validation_state import LEVEL, Rewind

#: The rule's constants (the defaults of ``validation={...}``'s ``ray_*`` keys): off until
#: ``ray_steps`` is given. τ, k, w, a and φ are those of the prototype checked on fresh seeds
#: (``experiments/results/ray_signal/check2``), chosen on development seeds 100-102; the clock
#: and the gate (γ 0.8, chosen on the same seeds) since their check passed (``check8``; 0 and 1
#: give the rule of checks 3-5).
RAY_DEFAULTS: dict[str, float] = {
    "ray_steps": 0.0,
    "ray_tau": 0.005,
    "ray_persist": 2.0,
    "ray_before": 0.1,
    "ray_target": 0.3,
    "ray_floor": 0.1,
    "ray_clock": 1.0,
    "ray_gate": 0.8,
}

#: Entries of a group's ray state vector (one per parameter tensor, the same in each): the
#: observations in a row with ``c > τ``, whether the rule has acted (1), whether a snapshot
#: has been kept (1), and the clock: ``t_eff``, the step ``t`` and the log of the group's
#: largest multiplier at the last finite observation (kept whatever ``ray_clock`` says).
STREAK, DONE, KEPT, EFFECTIVE, SEEN, SEEN_LEVEL = range(6)
RAY_SIZE = 6


def ray_enabled(options: Mapping[str, float]) -> bool:
    """Whether a group's validation options switch the ray ceiling on (``ray_steps > 0``)."""
    return options.get("ray_steps", 0.0) > 0


def initial_ray_state(param: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh ray state: no streak, not acted, no snapshot kept, the clock at 0."""
    return torch.zeros(RAY_SIZE, dtype=dtype, device=param.device)


def upgraded_ray_state(ray: Tensor) -> Tensor:
    """A ray state of a checkpoint from before the clock (3 entries) padded with a clock at 0:
    the next observation then reads ``t_eff = t``. A current state is returned as it is."""
    if ray.numel() >= RAY_SIZE:
        return ray
    return torch.cat([ray, ray.new_zeros(RAY_SIZE - ray.numel())])


def effective_steps(ray: Tensor, steps: Tensor, level: Tensor) -> Tensor:
    """``t_eff`` after an observation at step ``steps`` with the group's largest log multiplier
    ``level`` (0-d each), from a group's ray state (``[n, RAY_SIZE]``; the module's equation)."""
    previous = ray[:, EFFECTIVE].amax()
    ratio = torch.exp(torch.clamp(ray[:, SEEN_LEVEL].amax() - level, max=80.0))
    carried = torch.where(previous > 0, previous * ratio, torch.zeros_like(previous))
    return carried + torch.clamp_min(steps - ray[:, SEEN].amax(), 0.0)


def ray_sums(
    val_grads: Sequence[Tensor], params: Sequence[Tensor], anchors: Sequence[Tensor]
) -> Tensor:
    """``(⟨g, θ − θ_0⟩, ‖g‖², ‖θ − θ_0‖²)`` summed over the tensors, in float64 (``[3]``; sum
    them over the ranks that shard a group before :func:`ray_cosine`). The travel is taken in
    the parameter's dtype, then each product is exact in float64 and summed there by a dot
    product (no product tensor is kept)."""
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros(3, dtype=torch.float64, device=device)
    for g, p, a in zip(val_grads, params, anchors):
        g64 = torch.view_as_real(g) if g.is_complex() else g
        travel = p.detach() - a.to(p.dtype)
        t64 = torch.view_as_real(travel) if travel.is_complex() else travel
        g64 = g64.reshape(-1).to(torch.float64)
        t64 = t64.reshape(-1).to(torch.float64)
        dots = [torch.dot(g64, t64), torch.dot(g64, g64), torch.dot(t64, t64)]
        total = total + torch.stack(dots)
    return total


def ray_cosine(sums: Tensor) -> Tensor:
    """``c = ⟨g, θ − θ_0⟩ / (‖g‖ ‖θ − θ_0‖)`` from :func:`ray_sums` (0 before any travel)."""
    dot, gg, tt = sums.unbind(0)
    norm = torch.sqrt(gg * tt)
    return torch.where(norm > 0, dot / norm.clamp_min(1e-300), torch.zeros_like(dot))


def _stacked(controllers: Sequence[Tensor]) -> Tensor:
    """A group's seek controllers as one ``[n, CONTROLLER_SIZE]`` tensor (the first one's dtype)."""
    return torch.stack([c.to(controllers[0].dtype) for c in controllers])


def gradient_fall(controllers: Sequence[Tensor]) -> Tensor:
    """``G_t / H_t``, the group's gradient-norm average over its peak (0-d; the largest over the
    tensors, which share it); 0 where the controller keeps no gradient norm (the gate open) and
    for a group without tensors here."""
    if not controllers:
        return torch.zeros((), dtype=torch.float64)
    ctrl = _stacked(controllers)
    avg, peak = ctrl[:, GRAD], ctrl[:, GRAD_PEAK]
    ratio = torch.where(peak > 0, avg / peak.clamp_min(1e-30), torch.zeros_like(avg))
    return ratio.amax()


def steps_taken(controllers: Sequence[Tensor]) -> Tensor:
    """The training steps ``t`` a group has taken (0-d): the largest of its seek controllers'
    counts of active steps, plus the first step, which has no direction to read and so is not
    counted (0 for a group without tensors here: a rank of sharded state holding none)."""
    if not controllers:
        return torch.zeros((), dtype=torch.float64)
    return _stacked(controllers)[:, COUNT].amax() + 1


class RayUpdate(NamedTuple):
    """One observation's ray rule for a group: the new rates, controllers, validation statistics
    and ray states (each gated: an observation that does not act returns them as they were,
    the streak and flags aside), and what the rewind does (``keep``: the snapshot is taken now;
    ``restore``: the parameters go back to it at the end of the next step)."""

    rates: list[Tensor]
    controllers: list[Tensor]
    stats: list[Tensor]
    ray: list[Tensor]
    rewind: Rewind


class RayDecision(NamedTuple):
    """The ray rule's decision at one observation (:func:`ray_decision`): whether it acts
    (0-d bool), the log-rate ceiling of each tensor where it does (``[n]``: ``log m + log f``),
    the new ray states and what the rewind does."""

    act: Tensor
    cap: Tensor
    ray: list[Tensor]
    rewind: Rewind


def ray_decision(
    rates: Sequence[Tensor],
    controllers: Sequence[Tensor],
    ray: Sequence[Tensor],
    cosine: Tensor,
    finite: Tensor,
    *,
    options: Mapping[str, float],
    granularity: str,
    steps: Tensor | None = None,
    level: Tensor | None = None,
    fall: Tensor | None = None,
    levels: Tensor | None = None,
) -> RayDecision:
    """The first half of :func:`ray_update` (pure): the streak, the clock, the window, the gate
    and the factor — whether the rule acts, the ceiling it puts, the new ray states and the
    rewind — without touching the rates. ``levels``: each tensor's log level (``[n]``; default:
    of ``rates``); the other arguments as for :func:`ray_update`."""
    options = {**RAY_DEFAULTS, **options}  # a checkpoint's options from before the ray
    ctrl = _stacked(controllers)  # [n, K]
    dtype, device = ctrl.dtype, ctrl.device
    state = torch.stack([upgraded_ray_state(r).to(device=device, dtype=dtype) for r in ray])
    budget = float(options["ray_steps"])
    steps = steps_taken(controllers) if steps is None else steps.to(device=device, dtype=dtype)
    if levels is None:
        levels = torch.stack([log_level(r, granularity).to(device=device, dtype=dtype)
                              for r in rates])  # fmt: skip
    levels = levels.to(device=device, dtype=dtype)
    top = levels.amax() if level is None else level.to(device=device, dtype=dtype)
    effective = effective_steps(state, steps, top)
    clock = effective if options["ray_clock"] > 0 else steps
    done = state[:, DONE].amax() > 0
    valid = finite.to(device) & ~done
    over = cosine.to(device=device, dtype=dtype) > options["ray_tau"]
    streak = torch.where(over, state[:, STREAK].amax() + 1, torch.zeros_like(steps))
    streak = torch.where(valid, streak, state[:, STREAK].amax())
    window = clock < options["ray_before"] * budget
    act = valid & window & (streak >= options["ray_persist"])
    if options["ray_gate"] < 1:  # only where the training gradient has fallen from its peak
        fall = gradient_fall(controllers) if fall is None else fall
        act = act & (fall.to(device=device, dtype=dtype) < options["ray_gate"])
    keep = valid & window & ~over
    kept = state[:, KEPT].amax() > 0
    factor = torch.clamp(clock / (options["ray_target"] * budget), options["ray_floor"], 1.0)
    new_state = torch.stack([  # the clock counts valid looks: it stops once the rule has acted
        streak.expand(len(ray)),
        (done | act).to(dtype).expand(len(ray)),
        (kept | keep).to(dtype).expand(len(ray)),
        torch.where(valid, effective, state[:, EFFECTIVE].amax()).expand(len(ray)),
        torch.where(valid, steps, state[:, SEEN].amax()).expand(len(ray)),
        torch.where(valid, top, state[:, SEEN_LEVEL].amax()).expand(len(ray)),
    ], dim=1)  # fmt: skip
    n = len(rates)
    return RayDecision(
        act,
        levels + torch.log(factor),
        [s.to(o.dtype) for s, o in zip(new_state.unbind(0), ray)],
        Rewind(keep.expand(n), (act & kept).expand(n)),
    )


def ray_capped(
    rates: Sequence[Tensor],
    controllers: Sequence[Tensor],
    stats: Sequence[Tensor],
    act: Tensor,
    cap: Tensor,
    *,
    seek: Mapping[str, float],
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The second half of :func:`ray_update` (pure): where ``act`` (0-d bool), each tensor's
    controller ceiling lowered to ``cap`` (``[n]``, from :func:`ray_decision`), its ramp
    stopped and a turn's re-opening closed, its multipliers capped at ``exp(cap)`` and the
    hold's level brought down to it; elsewhere all as they were."""
    ctrl = _stacked(controllers)
    new_ceiling = torch.where(act, torch.minimum(ctrl[:, CEILING], cap), ctrl[:, CEILING])
    new_ramp = torch.where(act, torch.zeros_like(ctrl[:, RAMP]), ctrl[:, RAMP])
    since = ctrl[:, SINCE]
    closed = torch.clamp_min(since, float(seek.get("resume_window", 0.0)) + 1.0)
    new_since = torch.where(act & (since > 0), closed, since)
    new_ctrl = ctrl.clone()
    new_ctrl[:, CEILING], new_ctrl[:, RAMP], new_ctrl[:, SINCE] = new_ceiling, new_ramp, new_since
    new_rates = [
        torch.where(act.to(r.device), torch.minimum(r, torch.exp(c).to(r)), r)
        for r, c in zip(rates, cap.unbind(0))
    ]
    new_stats = []
    for s, c in zip(stats, cap.unbind(0)):  # the hold brings a rate back to its level at most
        level = s[LEVEL]
        lowered = torch.where(act.to(s.device) & torch.isfinite(level),
                              torch.minimum(level, c.to(s)), level)  # fmt: skip
        new_stats.append(torch.cat([s[:LEVEL], lowered.reshape(1), s[LEVEL + 1 :]]))
    return new_rates, [c.to(o.dtype) for c, o in zip(new_ctrl.unbind(0), controllers)], new_stats


def ray_update(
    rates: Sequence[Tensor],
    controllers: Sequence[Tensor],
    stats: Sequence[Tensor],
    ray: Sequence[Tensor],
    cosine: Tensor,
    finite: Tensor,
    *,
    options: Mapping[str, float],
    seek: Mapping[str, float],
    granularity: str,
    steps: Tensor | None = None,
    level: Tensor | None = None,
    fall: Tensor | None = None,
) -> RayUpdate:
    """The ray ceiling after one observation of a group (pure; equations in the module
    docstring): :func:`ray_decision`, then :func:`ray_capped`. ``cosine``: the group's ray
    cosine (0-d); ``finite``: whether the observation counts (a non-finite loss or gradient
    changes nothing); ``steps``: the training steps ``t`` the group has taken (0-d; default
    :func:`steps_taken` of ``controllers``) and ``level``: the log of the group's largest
    multiplier (0-d; default: of ``rates``); ``fall``: ``G_t / H_t`` (0-d; default
    :func:`gradient_fall` of ``controllers``) — under sharded state all three the largest over
    the ranks, so that every rank decides alike."""
    decision = ray_decision(
        rates, controllers, ray, cosine, finite, options=options, granularity=granularity,
        steps=steps, level=level, fall=fall,
    )  # fmt: skip
    new_rates, new_controllers, new_stats = ray_capped(
        rates, controllers, stats, decision.act, decision.cap, seek=seek
    )
    return RayUpdate(new_rates, new_controllers, new_stats, decision.ray, decision.rewind)


def check_ray_options(options: Mapping[str, float]) -> None:
    """``ValueError`` for ray settings that cannot work together (naming the keys)."""
    if options.get("ray_clock", 0.0) not in (0.0, 1.0):
        raise ValueError(
            f"Invalid validation: 'ray_clock' ({options['ray_clock']}) must be 0 (the step "
            "count) or 1 (the rate-weighted clock)"
        )
    if ray_enabled(options) and options.get("rewind", 0.0) > 0:
        raise ValueError(
            f"Invalid validation: 'ray_steps' ({options['ray_steps']}) and 'rewind' "
            f"({options['rewind']}) both move the parameters back to a snapshot of their own; "
            "set one of them to 0"
        )
