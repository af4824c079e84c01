"""metalr's optimizers inside ``higher.innerloop_ctx`` (optional: ``pip install "metalr[meta]"``).

``register()`` tells ``higher`` how to differentiate through :class:`metalr.SGDHD` and
:class:`metalr.AdamHD`: their differentiable twins call the same pure steps
(:func:`metalr.functional.sgd_hd_step`, :func:`metalr.functional.adam_hd_step`) and keep the
rate (``lr_multiplier``), momentum / previous direction and Adam moments in higher's
per-group state dicts. Tensors passed through ``override`` (e.g. ``{'lr': [α₁, α₂, ...]}`` with
one param group per parameter) stay in the graph, so their meta-gradients are exact::

    import higher
    from metalr.meta import higher_backend
    higher_backend.register()
    opt = metalr.SGDHD([{"params": [p]} for p in model.parameters()], lr=0.1, hypergrad_lr=0.0)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False,
                              override={"lr": rates}) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(sx), sy))
        F.mse_loss(fmodel(qx), qy).backward()        # reaches model weights and rates

Only the inner loop comes from higher; the update math is metalr's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metalr.functional import adam_hd_step, initial_rate, sgd_hd_step
from metalr.functional._controller import initial_controller
from metalr.functional._signals import all_finite, rate_dtype
from metalr.meta.inner_loop import task_loss
from metalr.optim import SGDHD, AdamHD
from metalr.optim._base import CONTROLLER_KEY, RATE_KEY, initial_multiplier
from metalr.tasks.base import TaskBatch, check_task_batch

_INSTALL_HINT = 'metalr.meta.higher_backend needs higher: pip install "metalr[meta]"'


def _higher() -> Any:
    try:
        import higher
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching sys.modules
        raise ImportError(_INSTALL_HINT) from exc
    return higher


def _common(group: dict[str, Any]) -> dict[str, Any]:
    lr, (lo, hi) = group["lr"], group["lr_bounds"]
    if isinstance(lr, Tensor) and math.isinf(hi):
        # clamp_rates computes hi / lr; with hi = inf its backward is 0 · inf = NaN for a tensor
        # lr in the graph (the override). The largest finite number clamps nothing either.
        hi = torch.finfo(lr.dtype).max
    return {
        "lr": lr, "hypergrad_lr": group["hypergrad_lr"], "rule": group["rule"],
        "granularity": group["granularity"], "lr_bounds": (lo, hi), "maximize": group["maximize"],
    }  # fmt: skip


def _make_classes() -> tuple[type, type]:
    higher = _higher()

    class _Base(higher.optim.DifferentiableOptimizer):
        def _groups(self, grouped_grads: Sequence[Sequence[Tensor | None]]):
            """(group, state dicts, params, grads, indices) for params that have a gradient."""
            present = [g for gs in grouped_grads for g in gs if g is not None]
            finite = all_finite(present) if len(self.param_groups) > 1 and present else None
            for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
                idx = [i for i, g in enumerate(grads) if g is not None]
                states = [self.state[group_idx][i] for i in idx]
                params = [group["params"][i] for i in idx]
                for p, st in zip(params, states):  # lazy state, as the optimizer does
                    if RATE_KEY not in st:
                        st[RATE_KEY] = initial_rate(
                            p, group["granularity"], initial_multiplier(group)
                        )
                    if group["rule"] == "seek" and CONTROLLER_KEY not in st:
                        st[CONTROLLER_KEY] = initial_controller(p, rate_dtype(p), group["seek"])
                yield group, states, params, [grads[i] for i in idx], idx, finite

        @staticmethod
        def _step(fn: Any, states: list[dict], group: dict[str, Any], *args: Any, **kw: Any):
            """``fn`` (a pure rule step); the seek rule's new controllers go back into state."""
            if group["rule"] != "seek":
                return fn(*args, **kw)
            controllers = [st[CONTROLLER_KEY] for st in states]
            new, new_controllers = fn(*args, controllers=controllers, seek=group["seek"], **kw)
            for st, c in zip(states, new_controllers):
                st[CONTROLLER_KEY] = c
            return new

    class DifferentiableSGDHD(_Base):
        """``higher`` twin of :class:`metalr.SGDHD` (calls ``sgd_hd_step``)."""

        def _update(self, grouped_grads, **kwargs) -> None:
            for group, states, params, grads, idx, finite in self._groups(grouped_grads):
                new = self._step(
                    sgd_hd_step, states, group, params, grads, [s.get("momentum_buffer") for s in states],
                    [s.get("prev_direction") for s in states], [s[RATE_KEY] for s in states],
                    momentum=group["momentum"], dampening=group["dampening"],
                    weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                    grads_finite=finite, **_common(group),
                )  # fmt: skip
                for i, st, p, buf, d, r in zip(idx, states, *new):
                    group["params"][i] = p
                    st[RATE_KEY] = r
                    if buf is not None:
                        st["momentum_buffer"] = buf
                    if d is not None:
                        st["prev_direction"] = d

    class DifferentiableAdamHD(_Base):
        """``higher`` twin of :class:`metalr.AdamHD` (calls ``adam_hd_step``)."""

        def _update(self, grouped_grads, **kwargs) -> None:
            for group, states, params, grads, idx, finite in self._groups(grouped_grads):
                for p, st in zip(params, states):
                    if "step" not in st:
                        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                        st["exp_avg"] = torch.zeros_like(p)
                        st["exp_avg_sq"] = torch.zeros_like(p)
                beta1, beta2 = group["betas"]
                new = self._step(
                    adam_hd_step, states, group, params, grads, [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], [s[RATE_KEY] for s in states],
                    [s["step"] for s in states], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                    grads_finite=finite, **_common(group),
                )  # fmt: skip
                for i, st, p, m, v, r, s in zip(idx, states, *new):
                    group["params"][i] = p
                    st.update(exp_avg=m, exp_avg_sq=v, step=s)
                    st[RATE_KEY] = r

    return DifferentiableSGDHD, DifferentiableAdamHD


_REGISTERED: dict[type, type] = {}


def register() -> dict[type, type]:
    """Register differentiable ``SGDHD`` / ``AdamHD`` with ``higher`` (idempotent).

    Returns ``{metalr optimizer class: higher differentiable class}``. ``AdamWHD`` is
    registered too (``higher`` looks optimizers up by exact type).
    """
    higher = _higher()
    if not _REGISTERED:
        from metalr.optim import AdamWHD

        sgd_cls, adam_cls = _make_classes()
        _REGISTERED.update({SGDHD: sgd_cls, AdamHD: adam_cls, AdamWHD: adam_cls})
    for opt_cls, diff_cls in _REGISTERED.items():
        higher.register_optim(opt_cls, diff_cls)
    return dict(_REGISTERED)


def meta_gradient_via_higher(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TaskBatch,
    *,
    loss_name: str = "mse",
    inner_steps: int = 1,
    override: dict[str, list[Tensor]] | None = None,
    first_order: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """Mean query loss after ``inner_steps`` steps of ``optimizer`` per task, and its gradient.

    Runs ``higher.innerloop_ctx(model, optimizer, copy_initial_weights=False,
    override=override)`` for each task (registering metalr's optimizers first) and returns
    ``(meta_loss, grads)`` where ``grads`` are with respect to ``model.parameters()`` followed
    by every tensor in ``override`` that requires grad (in ``override``'s order).
    """
    higher = _higher()
    register()
    check_task_batch(batch)
    if inner_steps < 1:
        raise ValueError(f"Invalid inner steps value: {inner_steps}; expected an integer >= 1")
    total: Tensor | None = None
    for i in range(batch.num_tasks):
        sx, sy, qx, qy = (t[i] for t in batch)
        with higher.innerloop_ctx(
            model, optimizer, copy_initial_weights=False, override=override,
            track_higher_grads=True,
        ) as (fmodel, diffopt):  # fmt: skip
            for _ in range(inner_steps):
                loss = task_loss(fmodel(sx), sy, loss_name)
                diffopt.step(loss, grad_callback=_detach if first_order else None)
            query = task_loss(fmodel(qx), qy, loss_name)
            total = query if total is None else total + query
    meta_loss = total / batch.num_tasks
    inputs = list(model.parameters())
    for values in (override or {}).values():
        inputs += [v for v in values if isinstance(v, Tensor) and v.requires_grad]
    grads = torch.autograd.grad(meta_loss, inputs, allow_unused=True, materialize_grads=True)
    return meta_loss, list(grads)


def _detach(grads: Sequence[Tensor | None]) -> list[Tensor | None]:
    """FOMAML: the inner gradients as constants."""
    return [None if g is None else g.detach() for g in grads]
