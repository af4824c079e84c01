"""Monkeypatch: restart moments at the first turn; 'matched' also scales the multiplier by the
mean |d| of the last direction before the restart (the first fresh step keeps its size)."""

import os

from metalr.functional._controller import SINCE
from metalr.functional.adam_rule import adam_direction
from metalr.optim.adam_hd import AdamHD

MODE = os.environ.get("RESTART", "")
_orig = AdamHD.step


def step(self, closure=None):
    if not MODE:
        return _orig(self, closure)
    before = {}
    for g in self.param_groups:
        b1, b2 = g["betas"]
        for p in g["params"]:
            st = self.state.get(p, {})
            if "hd_controller" in st:
                before[p] = (st["hd_controller"][SINCE].item(), b1, b2, g["eps"])
    loss = _orig(self, closure)
    for p, (since, b1, b2, eps) in before.items():
        st = self.state[p]
        if since == 0 and st["hd_controller"][SINCE].item() > 0:
            if MODE == "matched":
                d = adam_direction(st["exp_avg"], st["exp_avg_sq"], st["step"], b1, b2, eps)
                st["lr_multiplier"].mul_(d.abs().mean().clamp(max=1.0))
            st["exp_avg"].zero_()
            st["exp_avg_sq"].zero_()
            st["step"].zero_()
    return loss


AdamHD.step = step
