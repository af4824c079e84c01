r"""``fused=True`` on the CPU at element granularity: the exact Adam-HD step in one C++ pass
(``metalr/csrc/hd_element.cpp``, built with :mod:`metalr.functional._cpu_kernels`).

Per-element rates need no reduction before the update: each element's hypergradient
``g_i · d_{i,t-1}`` is local, so one pass reads ``g, m, v, θ, r`` and writes ``m, v, θ, r``. Every
rule's element update is a per-tensor function of the sign ``s_i = sign(g_i d_{i,t-1})`` (or, for
``"additive"``, of the product itself)::

    normalized:  r_i ← clamp(r_i · exp(β s_i))
    seek:        r_i ← clamp(min(r_i · exp(μ + [settled] τβ s_i), e^{ceiling}))
    additive:    r_i ← clamp(max(r_i + β g_i d_i / lr, 0))

with ``μ`` the tensor's ramp move (0 once settled) and ``τ`` the training signal's weight. The
constants come from the controllers *before* the step, except at the ramp's turn: the turn at
step t reads the group cosine of step t, which needs the whole pass first. The pass therefore
assumes the ramp continues (``μ = ρ``); when the controller update after the pass says the ramp
turned (once per run) or the step was inactive, the rates of those tensors are moved from ``ρ`` to
the true move and ``θ`` is corrected by ``lr (r' - r'') m̂_t/(√v̂_t + ε)`` (same values to
rounding). The correction needs ``r_{t-1}`` back from ``r'``, so with a finite ceiling on a
ramping tensor (a clamp can lose it) the step takes two passes instead: sums first, then the
update with the true constants. A group with ``lr_bounds`` does not come here (the dispatch,
:func:`metalr.functional._cpu_kernels.applies`, leaves it to the eager step, whose rules move
the rates in use and keep the stored ones), so the pass's clamp is always open.

Before writing, a read-only scan sums each gradient: a sum that is not finite skips the whole
step (the eager path's flag, read on the host as the CPU paths do; with several param groups the
optimizer has already checked every gradient and the sums are skipped); the scan also finds whether
any ``d_{t-1}`` can be non-zero (some first moment is): if none, the step is inactive and the
rates do not move. The seek controllers then move through the rule's own
:func:`metalr.functional._controller.seek_update`, given per tensor the mean sign and the largest
old rate (``Σ s_i / n`` and ``max r_i``, accumulated in the pass) as 0-d stand-ins: exactly what
the eager path derives from the per-element tensors. Where the eager step's ``exp(log r + move)``
is ``r · exp(move)`` here the rates agree to a few units in the last place.

One difference remains by construction: ``d_{t-1}`` that underflow (|d| < 1e-38 in float32
everywhere in a group while some first moment is non-zero) count as an active step here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metalr.functional._common import safe_sqrt
from metalr.functional._compiled import compiled
from metalr.functional._controller import CEILING, RAMP, seek_update_stacked
from metalr.functional._flat_state import add_to_rows, rows_or_stack, write_rows
from metalr.functional._signals import group_signal_from_norms

#: Status codes of the C++ pass.
SKIPPED, WRITTEN, INACTIVE = 0, 1, 2


def adam_hd_element_step(
    ext: Any,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    rates: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    hypergrad_lr: float,
    rule: str,
    maximize: bool = False,
    controllers: Sequence[Tensor] | None = None,
    seek: Mapping[str, Any] | None = None,
    grads_known_finite: bool = False,
) -> None:
    """The exact element-granularity Adam-HD step through the extension ``ext``, in place.

    Per tensor the pass gets ``E[s] = exp(move_s)`` for the signs ``s ∈ {-1, 0, +1}`` and
    ``cap = exp(ceiling)`` (see the module docstring): normalized ``move_s = β s``; seek, settled
    ``move_s = τβ s``, ramping ``move_s = ρ`` (the guess that the ramp goes on; corrected after
    the pass where the controllers say it turned: ``log(turn_cut) - turn_lag · ρ``, or that the
    step was inactive: 0); additive: ``r + β g·d / lr`` instead. The step counters advance unless
    the scan skips the step. ``grads_known_finite``: the optimizer already checked every gradient
    of the step (several param groups): the scan then only looks for a non-zero first moment.
    """
    lr_f, beta = float(lr), float(hypergrad_lr)
    seeking = rule == "seek" and beta != 0  # β = 0: nothing moves
    if rule == "seek" and (controllers is None or seek is None):
        raise ValueError("rule='seek' needs controllers and seek constants")
    # the controllers and step counters as rows of one buffer each (no stack per step)
    ctrl_rows = rows_or_stack(controllers) if seeking else None
    ctrl = ctrl_rows[0].tolist() if ctrl_rows is not None else None
    ramping = [row[RAMP] > 0 for row in ctrl] if ctrl is not None else [False] * len(params)
    two_pass = any(r and math.isfinite(row[CEILING]) for r, row in zip(ramping, ctrl or []))
    decay = 1.0 - lr_f * weight_decay if decoupled_weight_decay else 1.0
    coupled = weight_decay if not decoupled_weight_decay else 0.0
    step_rows = rows_or_stack(steps)
    ts = step_rows[0].tolist()
    per_count = {t: _adam_constants(t, lr_f, beta1, beta2, decay) for t in set(ts)}
    adam = [per_count[t] for t in ts]  # usually one step count for every tensor
    clamp = [-math.inf, math.inf]  # the pass's bounds on r' (open: see the module docstring)
    tau_beta = float(seek.get("track", 1.0)) * beta if seeking else beta

    def rate_rows(moves: Sequence[tuple[float, float, float, float]]) -> Tensor:
        extra = [1.0 / lr_f if lr_f > 0 else 0.0, beta if rule == "additive" else 0.0]
        return torch.tensor([a + list(mv) + clamp + extra for a, mv in zip(adam, moves)],
                            dtype=torch.float64)  # fmt: skip

    if seeking:  # the ramp assumed to continue: ρ for ramping tensors, τβs once settled
        guess = [_moves(row[RAMP], row[CEILING], tau_beta, r) for row, r in zip(ctrl, ramping)]
    elif rule == "normalized" or rule == "seek":
        guess = [_moves(0.0, math.inf, beta, False)] * len(params)
    else:
        guess = [(1.0, 1.0, 1.0, math.inf)] * len(params)
    args = (params, grads, exp_avgs, exp_avg_sqs, rates)
    common = (beta1, beta2, eps, coupled, maximize, rule == "additive")
    scan = 2 if grads_known_finite else 1
    if two_pass:
        sums, status = ext.adam_hd_element_pass(*args, rate_rows(guess), *common, scan, True, False)
        if status == SKIPPED:
            return
        active, turned, new_ctrl = _seek_controllers(sums, rates, controllers, ctrl_rows, ramping,
                                                     beta, seek)  # fmt: skip
        # with the new ceilings (a turned tensor's is set from its largest old rate)
        true = [
            _moves(_rollback(row[RAMP], seek) if turned[i] else row[RAMP], ceiling, tau_beta,
                   ramping[i]) if active else (1.0, 1.0, 1.0, math.inf)
            for i, (row, ceiling) in enumerate(zip(ctrl, new_ctrl[:, CEILING].tolist()))
        ]  # fmt: skip
        ext.adam_hd_element_pass(*args, rate_rows(true), *common, 0, False, True)
        add_to_rows(steps, step_rows, 1)
        return
    sums, status = ext.adam_hd_element_pass(*args, rate_rows(guess), *common, scan, seeking, True)
    if status == SKIPPED:
        return
    add_to_rows(steps, step_rows, 1)
    if not seeking:
        return
    active, turned, new_ctrl = _seek_controllers(sums, rates, controllers, ctrl_rows, ramping, beta,
                                                 seek)  # fmt: skip
    if not any(ramping):
        return  # settled: the pass knew every move
    ceilings = new_ctrl[:, CEILING].tolist()
    for i, row in enumerate(ctrl):
        # the move the pass applied (ρ, or 0 when it found the step inactive) against the true one
        applied = row[RAMP] if ramping[i] and status == WRITTEN else 0.0
        true = (_rollback(row[RAMP], seek) if turned[i] else row[RAMP]) if active else 0.0
        if ramping[i] and true != applied:
            _correct(params[i], exp_avgs[i], exp_avg_sqs[i], rates[i], steps[i], lr_f,
                     true - applied, ceilings[i], beta1, beta2, eps)  # fmt: skip


def bias_corrections(t: float, beta1: float, beta2: float) -> tuple[float, float, float, float]:
    """``(1/(1-β1^{t-1}), 1/√(1-β2^{t-1}), 1-β1^t, 1/√(1-β2^t))`` for a tensor that has taken
    ``t`` steps (the step being taken is ``t+1``; ``t-1`` means ``max(t, 1)``): the Adam
    constants of both CPU kernels' rows (:mod:`metalr.functional._cpu_kernels` too)."""
    prev = max(t, 1.0)
    return (
        1 / (1 - beta1**prev), (1 - beta2**prev) ** -0.5,
        1 - beta1 ** (t + 1), (1 - beta2 ** (t + 1)) ** -0.5,
    )  # fmt: skip


def _adam_constants(t: float, lr: float, beta1: float, beta2: float, decay: float) -> list[float]:
    """``[1/(1-β1^{t-1}), 1/√(1-β2^{t-1}), lr/(1-β1^t), 1/√(1-β2^t), decay]`` for a tensor that
    has taken ``t`` steps (:func:`bias_corrections`)."""
    pc1, pc2, c1, c2 = bias_corrections(t, beta1, beta2)
    return [pc1, pc2, lr / c1, c2, decay]


def _moves(
    move: float, ceiling: float, beta: float, ramping: bool
) -> tuple[float, float, float, float]:
    """``(E[-1], E[0], E[+1], cap)``: the factors ``exp(move)`` of a rate whose sign is
    -1/0/+1, and ``exp(ceiling)``. Ramping: ``move`` for the whole tensor (the ramp step ``ρ``,
    or the turn's roll-back); settled: ``± β`` by sign."""
    cap = math.exp(ceiling) if ceiling < 709 else math.inf
    if ramping:
        f = math.exp(move)
        return (f, f, f, cap)
    return (math.exp(-beta), 1.0, math.exp(beta), cap)


def _rollback(ramp: float, seek: Mapping[str, Any]) -> float:
    """The turn's log-space move: ``log(turn_cut) - turn_lag · ρ``
    (:func:`metalr.functional._controller.seek_update`)."""
    return math.log(seek["turn_cut"]) - seek["turn_lag"] * ramp


def _seek_controllers(
    sums: Tensor,
    rates: Sequence[Tensor],
    controllers: Sequence[Tensor],
    ctrl_rows: tuple[Tensor, bool],
    ramping: Sequence[bool],
    beta: float,
    seek: Mapping[str, Any],
) -> tuple[bool, list[bool], Tensor]:
    """Move the controllers in place from the pass's sums (``ctrl_rows``: them as the rows of one
    buffer, :func:`~metalr.functional._flat_state.rows_or_stack`); returns ``(active, turned, new controllers [n, K])``.

    The rule's :func:`seek_update_stacked` runs at group granularity on stand-ins: per tensor the
    mean sign as its signal and the largest old rate as its rate (the element rule reads only
    those two from the per-element tensors); the group cosine and the active flag come from
    :func:`group_signal_from_norms`, given the group's totals ``Σ g·d``, ``‖g‖``, ``‖d‖``.
    The stand-in rates it returns are not used.
    """
    new_ctrl, active = _element_controllers(
        sums, ctrl_rows[0], beta, sizes=tuple(r.numel() for r in rates), seek=seek
    )
    write_rows(controllers, ctrl_rows, new_ctrl)
    if not any(ramping):
        return bool(active), [False] * len(rates), new_ctrl
    new_ramp = new_ctrl[:, RAMP].tolist()
    return bool(active), [r and n <= 0 for r, n in zip(ramping, new_ramp)], new_ctrl


@compiled
def _element_controllers(
    sums: Tensor, ctrl: Tensor, beta: float, *, sizes: tuple[int, ...], seek: Mapping[str, Any]
) -> tuple[Tensor, Tensor]:
    """The new stacked controllers ``[n, K]`` and the step's active flag from the pass's sums
    (:func:`_seek_controllers`; pure tensor ops, traced into one graph by
    :func:`metalr.functional._compiled.compiled`)."""
    s = sums.to(ctrl.dtype)
    total = s[:, :3].sum(0)
    group_signal, active, grad_norm = group_signal_from_norms(
        total[0:1],
        safe_sqrt(total[1:2]),
        safe_sqrt(total[2:3]),
        torch.ones((), dtype=torch.bool),
        None,
    )
    mean_sign = (sums[:, 3] / sums.new_tensor(sizes)).to(ctrl.dtype)
    _, new_ctrl = seek_update_stacked(
        s[:, 4], ctrl, mean_sign, group_signal, active, sizes, hypergrad_lr=beta, seek=seek,
        granularity="group", grad_norm=grad_norm,
    )  # fmt: skip
    return new_ctrl, active


def _correct(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    rate: Tensor,
    step: Tensor,
    lr: float,
    delta: float,
    ceiling: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """Move a tensor's rates (written with the guessed move) by ``delta`` more in log space,
    capped at ``exp(ceiling)``, and correct its step: ``θ += lr (r' - r'') m̂_t/(√v̂_t + ε)``."""
    from metalr.functional.adam_rule import adam_direction

    new = rate * math.exp(delta)
    if math.isfinite(ceiling):
        new = torch.clamp(new, max=math.exp(ceiling) if ceiling < 709 else math.inf)
    direction = adam_direction(exp_avg, exp_avg_sq, step, beta1, beta2, eps)
    param.addcmul_(direction, (rate - new).mul_(lr))
    rate.copy_(new)
