"""The "seek" controller's vector paths (per-rate, stacked) against each other and the float64
reference; the re-opened ramp; the vanished-gradient gate and the noise hold."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _seek_reference import SEEK, reference

from metalr.functional._controller import (
    CEILING,
    CONTROLLER_SIZE,
    GRAD,
    GRAD_PEAK,
    RAMP,
    initial_controller,
    resolve_seek,
    seek_update,
    seek_update_stacked,
)


@pytest.mark.parametrize("per_tensor_beta", [False, True])
@pytest.mark.parametrize("track", [1.0, 0.0])
def test_vector_path_for_scalar_rates_equals_the_per_rate_path(per_tensor_beta, track, monkeypatch):
    """0-d rates are moved as one stacked vector; bit for bit what the per-rate loop computes."""
    import metalr.functional._rate_moves as moves

    gen = torch.Generator().manual_seed(3)
    n, seek = 5, {**SEEK, "track": track}
    sizes = [3, 40, 7, 100, 1]
    beta = [torch.tensor(0.01 * (i + 1), dtype=torch.float64) for i in range(n)]

    def run(vector: bool):
        monkeypatch.setattr(moves, "_scalar_rates", lambda rates, g: vector)
        rates = [torch.tensor(0.5 + 0.1 * i, dtype=torch.float64) for i in range(n)]
        ctrls = [initial_controller(r, torch.float64, seek) for r in rates]
        out = []
        for t in range(12):  # ramp, turn, then track
            sig = [torch.rand((), generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(n)]
            group = torch.tensor(0.9 if t < 4 else -0.2, dtype=torch.float64)
            rates, ctrls = seek_update(
                rates, ctrls, sig, group, torch.tensor(True), sizes,
                hypergrad_lr=beta if per_tensor_beta else 0.05, seek=seek, granularity="tensor",
            )  # fmt: skip
            out.append(torch.stack(rates))
        return torch.stack(out), torch.stack(ctrls)

    gen.manual_seed(3)
    vec = run(True)
    gen.manual_seed(3)
    loop = run(False)
    assert torch.equal(vec[0], loop[0]) and torch.equal(vec[1], loop[1])
    assert not torch.equal(vec[0][0], vec[0][-1])  # the rates did move


@pytest.mark.parametrize("granularity", ["tensor", "group"])
@pytest.mark.parametrize("per_tensor_beta", [False, True])
def test_stacked_update_equals_the_list_update(granularity, per_tensor_beta):
    """seek_update_stacked (a fused step's bookkeeping) is seek_update on stacked vectors: bit for
    bit the same rates and controllers through the ramp, the turn and tracking, and a skip."""
    gen = torch.Generator().manual_seed(5)
    n, sizes = 4, [30, 2, 500, 9]
    betas = [torch.tensor(0.02 * (i + 1), dtype=torch.float64) for i in range(n)]
    beta_list = betas if per_tensor_beta else 0.05
    beta_vec = torch.stack(betas) if per_tensor_beta else 0.05
    rates = [torch.tensor(0.3 + 0.2 * i, dtype=torch.float64) for i in range(n)]
    ctrls = [initial_controller(r, torch.float64, SEEK) for r in rates]
    rate_vec, ctrl_mat = torch.stack(rates), torch.stack(ctrls)
    for t in range(14):
        sig = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
        group = torch.tensor(0.8 if t < 5 else -0.3, dtype=torch.float64)
        active = torch.tensor(t != 7)  # one skipped step
        signals = [group] * n if granularity == "group" else list(sig.unbind(0))
        rates, ctrls = seek_update(
            rates, ctrls, signals, group, active, sizes, hypergrad_lr=beta_list, seek=SEEK,
            granularity=granularity,
        )  # fmt: skip
        prev_rates, prev_ctrl = rate_vec, ctrl_mat
        rate_vec, ctrl_mat = seek_update_stacked(
            rate_vec, ctrl_mat, group.expand(n) if granularity == "group" else sig, group, active,
            sizes, hypergrad_lr=beta_vec, seek=SEEK, granularity=granularity,
        )  # fmt: skip
        if per_tensor_beta:  # one β per rate given as a list: stacked inside, the same values
            from_list, _ = seek_update_stacked(
                prev_rates, prev_ctrl, group.expand(n) if granularity == "group" else sig, group,
                active, sizes, hypergrad_lr=betas, seek=SEEK, granularity=granularity,
            )  # fmt: skip
            assert torch.equal(from_list, rate_vec)
        assert torch.equal(rate_vec, torch.stack(rates)), f"rates, step {t + 1}"
        assert torch.equal(ctrl_mat, torch.stack(ctrls)), f"controllers, step {t + 1}"
    assert float(ctrl_mat[0, RAMP]) == 0 and math.isfinite(float(ctrl_mat[0, CEILING]))


def test_stacked_update_refuses_element_granularity():
    with pytest.raises(ValueError, match="element"):
        seek_update_stacked(
            torch.ones(2), torch.zeros(2, CONTROLLER_SIZE), torch.zeros(2), torch.tensor(0.0),
            torch.tensor(True), [1, 1], hypergrad_lr=0.1, seek=SEEK, granularity="element",
        )  # fmt: skip


def test_reopened_ramp_matches_the_reference_and_ramps_again():
    """A turn whose signal recovers within resume_window steps re-opens the ramp (no ceiling)
    until the next turn; later recoveries do nothing. Against the float64 reference."""
    seek = resolve_seek({**SEEK, "resume_window": 12, "resume_level": 0.6, "turn_decay": 0.0})
    sizes, steps, beta = [10, 50], 50, 0.05
    # agree, dip (a turn at step 6), recover (re-opened), dip again (a second turn), recover late
    group = [0.8] * 5 + [0.1] * 2 + [0.7] * 6 + [0.0] * 3 + [0.3] * 14 + [0.8] * 20
    signals = [[0.5 * c, -0.2 + c] for c in group]
    expected = reference([math.log(0.01)] * 2, signals, group, sizes, beta, seek)
    rates = [torch.full((), 0.01, dtype=torch.float64) for _ in sizes]
    ctrls = [initial_controller(torch.zeros(s), torch.float64, seek) for s in sizes]
    ramps = []
    for t in range(steps):
        rates, ctrls = seek_update(
            rates, ctrls, [torch.tensor(x, dtype=torch.float64) for x in signals[t]],
            torch.tensor(group[t], dtype=torch.float64), torch.tensor(True), sizes,
            hypergrad_lr=beta, seek=seek, granularity="tensor",
        )  # fmt: skip
        assert [math.log(float(r)) for r in rates] == pytest.approx(expected[t], rel=1e-9, abs=1e-9)
        ramps.append(float(ctrls[0][RAMP]))
    assert ramps[5] == 0 and ramps[7] > 0, "turned at step 6, re-opened at step 8"
    assert ramps[-1] == 0 and math.isfinite(float(ctrls[0][CEILING])), "settled for good"
    assert sum(1 for a, b in itertools.pairwise(ramps) if a == 0 and b > 0) == 1, "one re-opening"


@pytest.mark.parametrize(("noise_hold", "fall"), [(0.0, 0.0), (1.0, 0.0), (0.0, 2.0)])
@pytest.mark.parametrize("stacked", [False, True])
def test_vanished_gradient_gate_matches_the_reference_and_stops_the_climb(
    stacked, noise_hold, fall
):
    """With ``vanish`` > 0, once the running average of the group's gradient norm falls below
    ``vanish`` × its peak, settled rates may fall but not climb, however consistent the signal
    (an interpolated training loss); ``noise_hold`` hands the evidence back in proportion to
    the average over its peak. Against the float64 reference, list and stacked forms."""
    seek = resolve_seek(
        {**SEEK, "vanish": 0.05, "vanish_decay": 0.8, "headroom": 1e6, "noise_hold": noise_hold,
         "vanish_fall": fall}
    )  # fmt: skip
    sizes, steps, beta = [10, 50], 80, 0.05
    # a ramp that turns, then a consistent positive signal (the rate would climb) while the
    # gradient norm decays a thousandfold
    group = [0.8] * 6 + [0.0] * 4 + [0.6] * (steps - 10)
    signals = [[0.9 * c, c] for c in group]
    norms = [1.0 if t < 10 else 0.9 ** (t - 10) for t in range(steps)]
    expected = reference([math.log(0.01)] * 2, signals, group, sizes, beta, seek, norms)
    free = reference([math.log(0.01)] * 2, signals, group, sizes, beta, {**seek, "vanish": 0.0})
    rates = [torch.full((), 0.01, dtype=torch.float64) for _ in sizes]
    ctrls = [initial_controller(torch.zeros(s), torch.float64, seek) for s in sizes]
    for t in range(steps):
        sig = [torch.tensor(x, dtype=torch.float64) for x in signals[t]]
        args = (torch.tensor(group[t], dtype=torch.float64), torch.tensor(True), sizes)
        norm = torch.tensor(norms[t], dtype=torch.float64)
        if stacked:
            vec, mat = seek_update_stacked(
                torch.stack(rates), torch.stack(ctrls), torch.stack(sig), *args,
                hypergrad_lr=beta, seek=seek, granularity="tensor", grad_norm=norm,
            )  # fmt: skip
            rates, ctrls = list(vec.unbind(0)), list(mat.unbind(0))
        else:
            rates, ctrls = seek_update(
                rates, ctrls, sig, *args, hypergrad_lr=beta, seek=seek, granularity="tensor",
                grad_norm=norm,
            )  # fmt: skip
        assert [math.log(float(r)) for r in rates] == pytest.approx(expected[t], rel=1e-9, abs=1e-9)
    gated = [row[0] for row in expected]
    averages = _running(norms, 0.8)
    closed = next(t for t, a in enumerate(averages) if a < 0.05 * max(averages[: t + 1]))
    assert 30 < closed < steps - 20
    moves = [b - a for a, b in itertools.pairwise(gated[closed:])]
    assert all(m <= 1e-12 for m in moves), "no climb once closed"
    if fall:  # the collapsed gradient anneals at least at fall · β · evidence a step
        assert all(m <= -fall * beta * seek["evidence"] + 1e-12 for m in moves)
    assert free[-1][0] > gated[-1] + 1.0, "without the gate the rate climbs on"
    assert float(ctrls[0][GRAD_PEAK]) == pytest.approx(max(averages), rel=1e-12)
    assert float(ctrls[0][GRAD]) == pytest.approx(averages[-1], rel=1e-9)


def _running(values, decay):
    avg, out = 0.0, []
    for v in values:
        avg = decay * avg + (1 - decay) * v
        out.append(avg)
    return out


def test_vanished_gradient_gate_off_leaves_its_entries_and_the_rates():
    """``vanish`` and ``noise_hold`` 0 (SGD-HD's defaults) or no gradient norm: the gate's
    entries stay 0 and the rates are those of the rule without it."""
    seek = resolve_seek({**SEEK, "vanish": 0.0, "noise_hold": 0.0})
    rates = [torch.full((), 0.01, dtype=torch.float64) for _ in range(2)]
    ctrls = [initial_controller(torch.zeros(3), torch.float64, seek) for _ in range(2)]
    common = {"hypergrad_lr": 0.05, "seek": seek, "granularity": "tensor"}
    sig = [torch.tensor(0.5, dtype=torch.float64)] * 2
    args = (torch.tensor(0.5, dtype=torch.float64), torch.tensor(True), [3, 3])
    a_rates, a_ctrls = seek_update(rates, ctrls, sig, *args, **common, grad_norm=torch.tensor(2.0))
    b_rates, b_ctrls = seek_update(rates, ctrls, sig, *args, **common)
    for a, b in zip(a_rates + a_ctrls, b_rates + b_ctrls):
        assert torch.equal(a, b)
    assert float(a_ctrls[0][GRAD]) == 0 and float(a_ctrls[0][GRAD_PEAK]) == 0


def test_noise_hold_keeps_a_noisy_rate_while_the_gradient_is_at_its_peak():
    """A signal that is pure noise (SNR 0) anneals the settled rate by β·evidence a step; with
    ``noise_hold`` 1 and the gradient norm at its peak the evidence is handed back: the rate
    holds; as the norm falls to half its peak, half the evidence comes back. Float64 reference."""
    seek = resolve_seek({**SEEK, "noise_hold": 1.0, "vanish_decay": 0.0, "resume_window": 0})
    sizes, beta = [10], 0.05
    group = [0.8] * 6 + [0.0] * 4 + [0.0] * 40
    signals = [[0.0] for _ in group]  # SNR 0 once settled
    for norms, expected_move in (([1.0] * 50, 0.0), ([1.0] * 10 + [0.5] * 40, -0.5)):
        expected = reference([math.log(0.01)], signals, group, sizes, beta, seek, norms)
        rates = [torch.full((), 0.01, dtype=torch.float64)]
        ctrls = [initial_controller(torch.zeros(10), torch.float64, seek)]
        logs = []
        for t, (sig, c, norm) in enumerate(zip(signals, group, norms)):
            rates, ctrls = seek_update(
                rates, ctrls, [torch.tensor(sig[0], dtype=torch.float64)],
                torch.tensor(c, dtype=torch.float64), torch.tensor(True), sizes,
                hypergrad_lr=beta, seek=seek, granularity="tensor",
                grad_norm=torch.tensor(norm, dtype=torch.float64),
            )  # fmt: skip
            logs.append(math.log(float(rates[0])))
            assert logs[-1] == pytest.approx(expected[t][0], rel=1e-9, abs=1e-9)
        moves = [b - a for a, b in itertools.pairwise(logs[20:])]
        assert moves == pytest.approx([expected_move * beta * seek["evidence"]] * len(moves))


@pytest.mark.parametrize("snr_signal", [0.02, 0.6])
def test_noise_hold_slows_a_fall_but_never_adds_a_climb(snr_signal):
    """The hold is capped: a noisy signal whose tracking step is below 0 (SNR ≈ 0.04 < evidence)
    falls more slowly with ``noise_hold`` 0.5 and stands still with 5 (never climbs), and a
    consistent one (SNR ≈ 0.77 > evidence: the rate climbs) climbs exactly as without the hold.
    Every path against the float64 reference."""
    base = {**SEEK, "vanish_decay": 0.0, "resume_window": 0, "headroom": 1e6}
    group = [0.8] * 6 + [0.0] * 4 + [0.0] * 40
    # a small offset under alternating noise: SNR ≈ offset / √(offset² + 0.25)
    signals = [[snr_signal + (0.5 if t % 2 else -0.5)] for t in range(len(group))]
    paths = {}
    for hold in (0.0, 0.5, 5.0):
        seek = resolve_seek({**base, "noise_hold": hold})
        rates = [torch.full((), 0.01, dtype=torch.float64)]
        ctrls = [initial_controller(torch.zeros(10), torch.float64, seek)]
        logs = []
        for sig, c in zip(signals, group):
            rates, ctrls = seek_update(
                rates, ctrls, [torch.tensor(sig[0], dtype=torch.float64)],
                torch.tensor(c, dtype=torch.float64), torch.tensor(True), [10],
                hypergrad_lr=0.05, seek=seek, granularity="tensor",
                grad_norm=torch.tensor(1.0, dtype=torch.float64),
            )  # fmt: skip
            logs.append(math.log(float(rates[0])))
        paths[hold] = logs
        expected = reference([math.log(0.01)], signals, group, [10], 0.05, seek, [1.0] * 50)
        assert logs == pytest.approx([row[0] for row in expected], rel=1e-9, abs=1e-9)
    free, held, strong = (
        [b - a for a, b in itertools.pairwise(paths[h][20:])] for h in (0.0, 0.5, 5.0)
    )
    if snr_signal < 0.1:  # noise: the rule anneals; the hold slows it, never past a standstill
        assert all(f < h <= 0 for f, h in zip(free, held)) and sum(held) < 0
        assert all(abs(m) <= 1e-15 for m in strong)
    else:  # the signal climbs: no hold changes that
        assert paths[0.5] == paths[0.0] and paths[5.0] == paths[0.0]
        assert min(free) > 0
