"""Monkeypatch: at a tensor's turn (ramp > 0 before the step, 0 after), restart its Adam moments."""

import os

from metalr.functional._controller import RAMP
from metalr.optim.adam_hd import AdamHD

MODE = os.environ.get("RESTART", "")  # "", "first" (first turn only), "every"
_orig = AdamHD.step


def step(self, closure=None):
    if not MODE:
        return _orig(self, closure)
    before = {}
    for g in self.param_groups:
        for p in g["params"]:
            st = self.state.get(p, {})
            if "hd_controller" in st:
                before[p] = (st["hd_controller"][RAMP].item() > 0, st.get("_turned", False))
    loss = _orig(self, closure)
    for p, (ramping, turned) in before.items():
        st = self.state[p]
        if ramping and st["hd_controller"][RAMP].item() == 0 and (MODE == "every" or not turned):
            st["exp_avg"].zero_()
            st["exp_avg_sq"].zero_()
            st["step"].zero_()
            st["_turned"] = True
    return loss


AdamHD.step = step
