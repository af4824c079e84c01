"""Monkeypatch of ``AdamHD.step`` for ``protocol.md``: the matched moment restart done here
(as ``../matched_restart/restartpatch2.py``'s ``matched``: at a tensor's first turn, multiplier ×
c = min(mean|d|, 1), then m, v and the step count zeroed), with the cut undone over the next
steps: at the s-th step after the restart the multiplier is multiplied by c^(−(1−b)·b^(s−1)).

Runs using it must switch the library's own restart off (``seek={"moment_restart": 0}``).
``DECAY`` = b (0 = keep the cut for good, the library's default behaviour).
"""

from metalr.functional._controller import SINCE
from metalr.functional.adam_rule import adam_direction
from metalr.optim.adam_hd import AdamHD

DECAY = None  # None: no patch
_orig = AdamHD.step


def step(self, closure=None):
    if DECAY is None:
        return _orig(self, closure)
    before = {}
    for g in self.param_groups:
        for p in g["params"]:
            st = self.state.get(p, {})
            if "hd_controller" in st:
                before[p] = (st["hd_controller"][SINCE].item(), g)
    loss = _orig(self, closure)
    for p, (since, g) in before.items():
        st = self.state[p]
        if since == 0 and st["hd_controller"][SINCE].item() > 0:  # first turn: restart + match
            b1, b2 = g["betas"]
            d = adam_direction(st["exp_avg"], st["exp_avg_sq"], st["step"], b1, b2, g["eps"])
            c = d.abs().mean().clamp(max=1.0)
            st["lr_multiplier"].mul_(c)
            st["exp_avg"].zero_()
            st["exp_avg_sq"].zero_()
            st["step"].zero_()
            st["_tm"] = [c.item(), 0]
        elif "_tm" in st and DECAY > 0:
            c, s = st["_tm"]
            s += 1
            w = (1 - DECAY) * DECAY ** (s - 1)
            if w < 1e-4 or c <= 0:
                del st["_tm"]
                continue
            st["lr_multiplier"].mul_(c ** (-w))
            st["_tm"] = [c, s]
    return loss


AdamHD.step = step
