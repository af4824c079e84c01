"""Monkeypatch of ``AdamHD.step`` for ``protocol.md``: the matched moment restart done here (at a
tensor's first turn: multiplier × c = min(D, 1), D = mean|d| of the turn's direction, then m, v
and the step count zeroed), followed by the tracked match: for the next ``WINDOW`` steps the
multiplier follows f_s = min(D / mean|d_s|, 1), d_s the direction just applied.

Runs using it must switch the library's own restart off (``seek={"moment_restart": 0}``).
``WINDOW`` = W (0 = keep the cut for good, the library's behaviour; None = no patch).
"""

from metalr.functional._controller import SINCE
from metalr.functional.adam_rule import adam_direction
from metalr.optim.adam_hd import AdamHD

WINDOW = None
_orig = AdamHD.step


def _direction_size(st, g):
    b1, b2 = g["betas"]
    return (
        adam_direction(st["exp_avg"], st["exp_avg_sq"], st["step"], b1, b2, g["eps"]).abs().mean()
    )


def step(self, closure=None):
    if WINDOW is None:
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
            size = _direction_size(st, g)
            c = size.clamp(max=1.0)
            st["lr_multiplier"].mul_(c)
            st["exp_avg"].zero_()
            st["exp_avg_sq"].zero_()
            st["step"].zero_()
            st["_tk"] = [size.item(), c.item(), 0]
        elif "_tk" in st:
            size, f_prev, s = st["_tk"]
            s += 1
            if s > WINDOW or f_prev <= 0:
                del st["_tk"]
                continue
            fresh = _direction_size(st, g).item()
            f = min(size / fresh, 1.0) if fresh > 0 else f_prev
            st["lr_multiplier"].mul_(f / f_prev)
            st["_tk"] = [size, f, s]
    return loss


AdamHD.step = step
