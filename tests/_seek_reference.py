"""The "seek" controller's equations as a float64 scalar reference (shared by the controller's
tests: ``test_seek_controller.py``, ``test_seek_controller_paths.py``)."""

from __future__ import annotations

import math

from metalr.functional._controller import resolve_seek

#: A constant set whose ramp, turn, ceiling and tie all act within a few dozen steps.
SEEK = resolve_seek(
    {
        "turn_threshold": 0.3,
        "evidence": 0.1,
        "headroom": 2.0,
        "tie": 4.0,
        "turn_lag": 2.0,
        "ramp_rate": 0.05,
        "ramp_growth": 1.5,
        "ramp_max": 0.1,
        "ramp_fast": 0.4,
        "slow_zone": 0.8,
    }
)


def reference(log_rates, signals, group_signals, sizes, beta, seek, grad_norms=None):
    """The module docstring's equations, one scalar at a time, in Python floats
    (``grad_norms``: the group's gradient norm per step, for the vanished-gradient gate)."""
    n = len(log_rates)
    ramp, fast, peak, since = seek["ramp_rate"], 0.0, 0.0, 0
    grad_avg, grad_peak = 0.0, 0.0  # the vanished-gradient gate's average and its peak
    slow, slow_peak = 0.0, 0.0  # the far test's own average (far_decay > 0) and its peak
    mean, sq, ceiling = [0.0] * n, [0.0] * n, [math.inf] * n
    logs = list(log_rates)
    out = []
    for t, (sig, C) in enumerate(zip(signals, group_signals), start=1):
        fast = seek["turn_decay"] * fast + (1 - seek["turn_decay"]) * C
        slow = seek["far_decay"] * slow + (1 - seek["far_decay"]) * C
        ramping = ramp > 0
        if ramping:
            peak = max(peak, fast)
            slow_peak = max(slow_peak, slow)
        turn = ramping and fast <= seek["turn_threshold"] * peak
        # the re-opened ramp: within resume_window steps of the first turn, back above the level
        resume = (
            not ramping and 0 < since <= seek["resume_window"]
            and fast >= seek["resume_level"] * peak
        )  # fmt: skip
        since = since + 1 if since > 0 or turn else since
        if resume:
            ceiling = [math.inf] * n
        vanished, hold = False, 0.0
        if grad_norms is not None and (seek["vanish"] > 0 or seek["noise_hold"] > 0):
            grad_avg = (
                seek["vanish_decay"] * grad_avg + (1 - seek["vanish_decay"]) * grad_norms[t - 1]
            )
            grad_peak = max(grad_peak, grad_avg)
            level = grad_avg / grad_peak if grad_peak > 0 else 1.0
            vanished = level < seek["vanish"]
            hold = seek["noise_hold"] * seek["evidence"] * level  # evidence handed back
        new = []
        for i in range(n):
            b1, b2 = seek["signal_decay"], seek["signal_sq_decay"]
            mean[i] = b1 * mean[i] + (1 - b1) * sig[i]
            sq[i] = b2 * sq[i] + (1 - b2) * sig[i] ** 2
            m_hat, v_hat = mean[i] / (1 - b1**t), sq[i] / (1 - b2**t)
            if ramping and not turn:
                x = logs[i] + ramp
            elif turn:
                x = logs[i] + math.log(seek["turn_cut"]) - seek["turn_lag"] * ramp
                ceiling[i] = x + math.log(seek["headroom"])
            else:
                track = m_hat / (math.sqrt(v_hat) + 1e-8) - seek["evidence"]
                if track < 0:  # the hold slows a fall; it never turns one into a climb
                    track = min(track + hold, 0.0)
                if vanished:
                    track = min(track, 0.0) - seek["vanish_fall"] * seek["evidence"]
                x = logs[i] + beta * track
            new.append(min(x, ceiling[i]))
        centre = sum(w * x for w, x in zip(sizes, new)) / sum(sizes)
        width = math.log(seek["tie"])
        logs = [min(max(x, centre - width), centre + width) for x in new]
        # the two-speed ramp: up to ramp_fast while far from the edge, ramp_max near it
        if seek["far_decay"] > 0:  # the test on the slower average S and its peak Q
            far = slow > seek["slow_zone"] * slow_peak
        else:
            far = fast > seek["slow_zone"] * peak
        cap = max(seek["ramp_fast"], seek["ramp_max"]) if far else seek["ramp_max"]
        ramp = min(ramp * seek["ramp_growth"], cap) if ramping and not turn else 0.0
        ramp = seek["ramp_rate"] if resume else ramp
        out.append(list(logs))
    return out
