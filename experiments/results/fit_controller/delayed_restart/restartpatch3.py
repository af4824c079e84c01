"""Monkeypatch of ``AdamHD.step``: moment restarts tied to the seek controller's first turn.

Copy-extension of ``../matched_restart/restartpatch2.py``; mode ``matched`` is identical to it.
Mode via env ``RESTART`` (read at import; the runner may also set ``restartpatch3.MODE``):

* ``""``        : no patch (AdamHD's defaults).
* ``matched``   : at a tensor's first turn (SINCE 0 -> >0) scale its ``lr_multiplier`` by the mean
                  |d| of the Adam direction just applied (clamped <= 1) and zero exp_avg,
                  exp_avg_sq, step (restartpatch2's ``matched``).
* ``plain``     : the same restart at the first turn without the scale (restartpatch2's any other
                  non-empty mode).
* ``delayed``   : restart + match scale, not at the first turn but at the first step where the turn
                  can no longer be taken back: previous SINCE <= resume_window < new SINCE
                  (resume_window read from the group's ``seek`` dict).
* ``delayed_plain`` : the delayed restart without the scale.
* ``scale``     : the match scale at the first turn, moments kept (no restart).
* ``delayed_scale`` : the match scale at the irreversible point, moments kept.
* ``matched_sqrt`` : as ``matched`` but the multiplier is scaled by sqrt(mean |d|) (half the cut,
                  in log terms).

With env ``RESTART_LOG`` set to a path, every step's per-tensor controller events (first turn,
ramp re-opened, later turns, crossing of resume_window, restart applied) are appended to it as
JSON lines (only for tensors whose event happens at that step).
"""

import json
import os

from metalr.functional._controller import RAMP, SINCE
from metalr.functional.adam_rule import adam_direction
from metalr.optim.adam_hd import AdamHD

MODE = os.environ.get("RESTART", "")
LOG = os.environ.get("RESTART_LOG", "")
_orig = AdamHD.step

AT_TURN = {
    "matched": (True, True),
    "plain": (False, True),
    "scale": (True, False),
    "matched_sqrt": (0.5, True),
}
DELAYED = {"delayed": (True, True), "delayed_plain": (False, True), "delayed_scale": (True, False)}


def _apply(st, b1, b2, eps, scale, reset):
    md = None
    if scale:
        d = adam_direction(st["exp_avg"], st["exp_avg_sq"], st["step"], b1, b2, eps)
        md = d.abs().mean().clamp(max=1.0)
        st["lr_multiplier"].mul_(md if scale is True else md**scale)
        md = md.item()
    if reset:
        st["exp_avg"].zero_()
        st["exp_avg_sq"].zero_()
        st["step"].zero_()
    return md


def step(self, closure=None):
    if not MODE and not LOG:
        return _orig(self, closure)
    self._rp3_t = getattr(self, "_rp3_t", 0) + 1
    before = {}
    for gi, g in enumerate(self.param_groups):
        b1, b2 = g["betas"]
        window = g["seek"]["resume_window"] if isinstance(g.get("seek"), dict) else None
        for pi, p in enumerate(g["params"]):
            st = self.state.get(p, {})
            if "hd_controller" in st:
                c = st["hd_controller"]
                before[p] = (c[SINCE].item(), c[RAMP].item(), b1, b2, g["eps"], window, (gi, pi))
    loss = _orig(self, closure)
    events = []
    for p, (since, ramp, b1, b2, eps, window, idx) in before.items():
        st = self.state[p]
        c = st["hd_controller"]
        new_since, new_ramp = c[SINCE].item(), c[RAMP].item()
        first_turn = since == 0 and new_since > 0
        crossed = window is not None and since <= window < new_since
        ev = []
        if first_turn:
            ev.append("first_turn")
        elif ramp > 0 and new_ramp == 0 and since > 0:
            ev.append("turn_again")
        if ramp == 0 and new_ramp > 0 and since > 0:
            ev.append("reopen")
        if crossed:
            ev.append("crossed" + ("_ramping" if new_ramp > 0 else "_settled"))
        md = None
        if MODE in AT_TURN and first_turn:
            md = _apply(st, b1, b2, eps, *AT_TURN[MODE])
            ev.append("restart")
        elif MODE in DELAYED and crossed:
            md = _apply(st, b1, b2, eps, *DELAYED[MODE])
            ev.append("restart")
        if ev:
            e = {
                "t": self._rp3_t,
                "tensor": idx,
                "ev": ev,
                "since": new_since,
                "mult": st["lr_multiplier"].mean().item(),
            }
            if md is not None:
                e["mean_d"] = md
            events.append(e)
    if LOG and events:
        with open(LOG, "a") as f:
            for e in events:
                f.write(json.dumps(e) + "\n")
    return loss


AdamHD.step = step
