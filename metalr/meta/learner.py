r"""``MetaLearner``: MAML, Meta-SGD, MAML++ LSLR and Reptile over metalr's update rules.

For a batch of tasks :math:`\tau_i` with support set :math:`S_i` and query set :math:`Q_i`, MAML
minimises the query loss after adaptation (Finn et al. 2017; Meta-SGD: Li et al. 2017)::

    θ_i      = unroll(θ_0, α, β; S_i)                (inner loop, metalr.meta.inner_loop)
    L_meta   = 1/T Σ_i L(θ_i; Q_i)
    (θ_0, log α, β_raw) ← Adam(∇ L_meta)             clipped to meta_grad_clip; a non-finite
                                                      loss or gradient skips the step

The task batch is vectorised with ``torch.func.vmap`` (``backend="vmap"``) or looped over with
``torch.autograd.grad`` (``backend="loop"``; modules that mutate buffers such as BatchNorm in
train mode need it). Reptile (Nichol et al. 2018) is ``algorithm="reptile"``:
``θ_0 ← θ_0 + ε (1/T Σ_i θ_i - θ_0)`` with first-order inner loops.

Example::

    learner = MetaLearner(model, MetaConfig(rates="element", inner_steps=1), loss_name="mse")
    for _ in range(1000):
        stats = learner.meta_step(sampler.sample(25, learner.generator))
    learner.evaluate(test_batch)       # {'query_loss': ..., 'query_loss_ci95': ..., ...}
    prior = learner.export_prior()     # learned rates for metalr.SGDHD / AdamHD / HyperLR
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from typing import Any

import torch
from torch import Tensor, nn

from metalr.meta.config import MetaConfig
from metalr.meta.data_parallel import DataParallel
from metalr.meta.inner_loop import InnerRule, LossFn, Params, make_forward, make_loss, unroll
from metalr.meta.parametrize import MetaParameters
from metalr.meta.prior import LRPrior, prior_from_meta
from metalr.tasks.base import TaskBatch, TaskSampler, check_task_batch


class MetaLearner:
    """Learns initial weights, per-parameter rates and ``hypergrad_lr`` from few-shot tasks.

    Args:
        model: the network; its trainable parameters define the meta-parameters (copied: the
            model's own parameters are never written) and its buffers are used as they are.
        config: a :class:`MetaConfig` (default: ``MetaConfig()``, i.e. Meta-SGD, 1 step).
        loss_name: ``"mse"`` or ``"cross_entropy"`` (integer labels) (default: "mse").

    Attributes:
        meta: the :class:`~metalr.meta.parametrize.MetaParameters` (an ``nn.Module``).
        meta_optimizer: ``torch.optim.Adam`` over the learned meta-parameters (``SGD`` with
            ``lr=reptile_step_size`` for Reptile).
        generator: the ``torch.Generator`` :meth:`fit` samples tasks with (saved in
            :meth:`state_dict`).
    """

    def __init__(
        self,
        model: nn.Module,
        config: MetaConfig | None = None,
        loss_name: str = "mse",
        *,
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.config = config if config is not None else MetaConfig()
        if not isinstance(self.config, MetaConfig):
            raise TypeError(f"config must be a MetaConfig, got {type(self.config).__name__}")
        self.model = model
        self.loss_name = loss_name
        self.loss: LossFn = make_loss(make_forward(model), loss_name)
        self.rule = InnerRule.from_config(self.config)
        self.meta = MetaParameters(model, self.config)
        if self.config.algorithm == "reptile":
            params = list(self.meta.init.values())
            self.meta_optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=self.config.reptile_step_size
            )
        else:
            self.meta_optimizer = torch.optim.Adam(
                self.meta.learned_parameters(), lr=self.config.meta_lr
            )
        self.generator = torch.Generator().manual_seed(self.config.seed)
        #: Data-parallel meta-training: each rank meta-trains on its own tasks and the
        #: meta-gradients (and the skip decision) are averaged over this group.
        self.data_parallel = DataParallel(process_group) if process_group is not None else None
        self.step_count = 0
        self.skipped_steps = 0

    # ----------------------------------------------------------------- inner loop
    def _steps(self, steps: int | None) -> int:
        steps = self.config.inner_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"Invalid inner steps value: {steps!r}; expected an integer >= 1")
        if self.config.rates == "step_tensor" and steps > self.config.inner_steps:
            raise ValueError(
                f"rates='step_tensor' learned rates for {self.config.inner_steps} step(s); "
                f"cannot adapt for {steps}"
            )
        return steps

    def _adapt_fn(self, steps: int, create_graph: bool, detach: bool):
        """``adapt(x, y) -> params`` for one task, closing over the current meta-parameters."""
        meta = self.meta
        init = meta.init_params()
        table = (
            [meta.rates(t) for t in range(steps)] if self.rule.per_step_rates else [meta.rates()]
        )
        beta: Any = meta.hypergrad_lrs()
        if beta is None:
            beta = self.config.hypergrad_lr
        if detach:
            init = {n: p.detach() for n, p in init.items()}
            table = [{n: r.detach() for n, r in rates.items()} for rates in table]
            if isinstance(beta, dict):
                beta = {n: b.detach() for n, b in beta.items()}
        mode = "func" if self.config.backend == "vmap" else "autograd"

        def adapt_one(x: Tensor, y: Tensor) -> Params:
            return unroll(
                self.loss, init, lambda t: table[min(t, len(table) - 1)], beta, x, y, self.rule,
                steps, mode=mode, create_graph=create_graph,
            )  # fmt: skip

        return adapt_one

    def _map_tasks(self, fn, batch: TaskBatch) -> Any:
        """``fn(*task)`` for every task, stacked along a new first dimension."""
        if self.config.backend == "vmap":
            return torch.func.vmap(fn, randomness="different")(*batch)
        return _stack_trees([fn(*(t[i] for t in batch)) for i in range(batch.num_tasks)])

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Params:
        """Adapted weights for one task (no task dimension: ``support_x`` is ``[K, ...]``).

        Differentiable with respect to the meta-parameters (second order unless
        ``first_order``), so ``learner.loss(adapted, qx, qy).backward()`` reaches the initial
        weights, the rates and the learned ``hypergrad_lr``.
        """
        if not isinstance(support_x, Tensor) or not isinstance(support_y, Tensor):
            raise TypeError("support_x and support_y must be tensors")
        if support_x.dim() == 0 or support_y.dim() == 0:
            raise ValueError("support_x and support_y must have shape [examples, ...]")
        check_task_batch(TaskBatch(*(t.unsqueeze(0) for t in (support_x, support_y) * 2)))
        fn = self._adapt_fn(self._steps(steps), not self.rule.first_order, detach=False)
        return fn(support_x, support_y)

    # ----------------------------------------------------------------- outer loop
    def meta_loss(self, batch: TaskBatch) -> Tensor:
        """Mean query loss after adaptation over the batch, in the graph of the meta-parameters."""
        check_task_batch(batch)
        adapt_one = self._adapt_fn(self.config.inner_steps, not self.rule.first_order, False)
        return self._map_tasks(
            lambda sx, sy, qx, qy: self.loss(adapt_one(sx, sy), qx, qy), batch
        ).mean()

    def meta_step(self, batch: TaskBatch) -> dict[str, Any]:
        """One meta-update on a batch of tasks.

        Returns ``{"meta_loss", "finite", "grad_norm", "step"}`` (Python numbers). A non-finite
        meta-loss or meta-gradient skips the update (``finite=False``) and counts in
        :attr:`skipped_steps`; the gradient norm is clipped to ``meta_grad_clip``.
        """
        check_task_batch(batch)
        if self.config.algorithm == "reptile":
            return self._reptile_step(batch)
        self.meta_optimizer.zero_grad(set_to_none=True)
        loss = self.meta_loss(batch)
        finite = bool(torch.isfinite(loss))
        grad_norm = math.nan
        params = self.meta.learned_parameters()
        if self.data_parallel is not None:
            finite = self.data_parallel.all(finite)
        if finite:
            loss.backward()
            if self.data_parallel is not None:
                self.data_parallel.average_grads(params)
                loss = self.data_parallel.mean(loss.detach())
            clip = self.config.meta_grad_clip
            norm = torch.nn.utils.clip_grad_norm_(params, math.inf if clip is None else clip)
            grad_norm = float(norm)
            finite = math.isfinite(grad_norm)
        if finite:
            self.meta_optimizer.step()
        else:
            self.skipped_steps += 1
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return {"meta_loss": float(loss.detach()), "finite": finite, "grad_norm": grad_norm,
                "step": self.step_count}  # fmt: skip

    def _reptile_step(self, batch: TaskBatch) -> dict[str, Any]:
        adapt_one = self._adapt_fn(self.config.inner_steps, False, detach=True)

        def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Params, Tensor]:
            adapted = adapt_one(sx, sy)
            return adapted, self.loss(adapted, qx, qy)

        with torch.no_grad():
            adapted, losses = self._map_tasks(one, batch)
            loss = losses.mean()
            init = self.meta.init_params()
            finite = bool(torch.isfinite(loss)) and all(
                bool(torch.isfinite(a).all()) for a in adapted.values()
            )
            delta = {n: init[n] - adapted[n].mean(0) for n in init}
            if self.data_parallel is not None:
                finite = self.data_parallel.all(finite)
                if finite:
                    delta = {n: self.data_parallel.mean(d) for n, d in delta.items()}
            grad_norm = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(d) for d in delta.values()]
            )))  # fmt: skip
        if finite:  # SGD with lr ε on θ - φ̄: θ ← θ + ε (φ̄ - θ)
            for n, p in init.items():
                p.grad = delta[n]
            self.meta_optimizer.step()
        else:
            self.skipped_steps += 1
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return {"meta_loss": float(loss.detach()), "finite": finite, "grad_norm": grad_norm,
                "step": self.step_count}  # fmt: skip

    def fit(
        self,
        sampler: TaskSampler,
        num_iterations: int,
        *,
        progress: bool | None = None,
        log_every: int | None = None,
    ) -> list[dict[str, Any]]:
        """``num_iterations`` meta-steps on batches of ``meta_batch_size`` tasks from ``sampler``,
        drawn with :attr:`generator` (so a resumed run draws the same tasks).

        Args:
            sampler: the task sampler (its ``loss_name`` must match the learner's).
            num_iterations: meta-steps to take (an integer >= 0).
            progress: ``True``: show progress on stderr, a ``tqdm`` bar on a terminal (when
                tqdm is installed), else a log line every ``log_every`` iterations; ``False``:
                silent; ``None``: progress only when stderr is a terminal or a notebook
                (default: None).
            log_every: with progress on, log a line every ``log_every`` iterations instead of
                drawing a bar (default: a bar on a terminal, else a line every tenth of the run).

        Returns:
            One :meth:`meta_step` result per iteration.

        Example::

            history = learner.fit(SinusoidTasks(k_shot=10), 2000, progress=True)
            # meta-train: iteration 200/2000  meta_loss 1.2345 (mean of the last 200)  9.8 s
        """
        if getattr(sampler, "loss_name", self.loss_name) != self.loss_name:
            raise ValueError(
                f"sampler.loss_name is {sampler.loss_name!r} but the learner uses {self.loss_name!r}"
            )
        if (
            isinstance(num_iterations, bool)
            or not isinstance(num_iterations, int)
            or (num_iterations < 0)
        ):
            raise ValueError(
                f"Invalid num_iterations value: {num_iterations!r}; expected an integer >= 0"
            )
        if log_every is not None and (
            isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1
        ):
            raise ValueError(f"Invalid log_every value: {log_every!r}; expected an integer >= 1")
        if progress is None:
            progress = _interactive()
        every = log_every or max(1, num_iterations // 10)
        bar = _progress_bar(num_iterations) if progress and log_every is None else None
        history: list[dict[str, Any]] = []
        tic = time.perf_counter()
        try:
            for it in range(1, num_iterations + 1):
                history.append(
                    self.meta_step(sampler.sample(self.config.meta_batch_size, self.generator))
                )
                if bar is not None:
                    bar.update(1)
                    if it % max(1, min(every, 50)) == 0 or it == num_iterations:
                        bar.set_postfix(meta_loss=f"{history[-1]['meta_loss']:.4f}")
                elif progress and (it % every == 0 or it == num_iterations):
                    window = [h["meta_loss"] for h in history[-every:]]
                    finite = [x for x in window if math.isfinite(x)]
                    mean = sum(finite) / len(finite) if finite else math.nan
                    print(
                        f"meta-train: iteration {it}/{num_iterations}  meta_loss {mean:.4f} "
                        f"(mean of the last {len(window)})  {time.perf_counter() - tic:.1f} s",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            if bar is not None:
                bar.close()
        return history

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, batch: TaskBatch, steps: int | None = None) -> dict[str, float]:
        """Query loss (and accuracy for ``cross_entropy``) before and after adaptation.

        Returns means over tasks and half-widths of their 95% confidence intervals
        (``1.96 · std / √T``): ``query_loss``, ``query_loss_ci95``, ``pre_adaptation_loss``,
        ``pre_adaptation_loss_ci95``, and ``accuracy``, ``accuracy_ci95`` for classification.
        """
        check_task_batch(batch)
        adapt_one = self._adapt_fn(self._steps(steps), False, detach=True)
        init = {n: p.detach() for n, p in self.meta.init_params().items()}
        forward = make_forward(self.model)

        def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, ...]:
            adapted = adapt_one(sx, sy)
            pred = forward(adapted, qx)
            out = (self.loss(adapted, qx, qy), self.loss(init, qx, qy))
            if self.loss_name == "cross_entropy":
                out += ((pred.argmax(-1) == qy).to(pred.dtype).mean(),)
            return out

        values = self._map_tasks(one, batch)
        names = ("query_loss", "pre_adaptation_loss", "accuracy")
        result: dict[str, float] = {"num_tasks": float(batch.num_tasks)}
        for name, v in zip(names, values):
            v = v.double()
            half = 1.96 * float(v.std(correction=1)) / math.sqrt(len(v)) if len(v) > 1 else math.nan
            result[name] = float(v.mean())
            result[f"{name}_ci95"] = half
        return result

    # ----------------------------------------------------------------- export & checkpoints
    def export_prior(self) -> LRPrior:
        """The learned rates (and ``hypergrad_lr``, initial weights) as an :class:`LRPrior`."""
        return prior_from_meta(self.meta, self.config)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly: meta-parameters, meta-optimizer, counters,
        the task generator's state and torch's global CPU RNG state (dropout masks)."""
        return {
            "config": self.config.to_dict(),
            "loss_name": self.loss_name,
            "meta_parameters": self.meta.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "step_count": self.step_count,
            "skipped_steps": self.skipped_steps,
            "generator_state": self.generator.get_state(),
            "torch_rng_state": torch.get_rng_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (also restores torch's global CPU RNG state)."""
        saved = MetaConfig.from_dict(state_dict["config"]).to_dict()
        ours = self.config.to_dict()
        differ = sorted(k for k in ours if ours[k] != saved[k])
        if differ or state_dict["loss_name"] != self.loss_name:
            raise ValueError(
                f"checkpoint was made with a different configuration: {differ or ['loss_name']}"
            )
        self.meta.load_state_dict(state_dict["meta_parameters"])
        self.meta_optimizer.load_state_dict(state_dict["meta_optimizer"])
        self.step_count = int(state_dict["step_count"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        self.generator.set_state(state_dict["generator_state"])
        torch.set_rng_state(state_dict["torch_rng_state"])


def _interactive() -> bool:
    """Whether stderr is a terminal, or the code runs in a Jupyter/IPython kernel."""
    return "ipykernel" in sys.modules or bool(getattr(sys.stderr, "isatty", lambda: False)())


def _progress_bar(total: int) -> Any:
    """A ``tqdm`` bar on stderr (``tqdm.auto``: a widget in notebooks), or ``None`` when tqdm
    is not installed or stderr is not interactive (then :meth:`MetaLearner.fit` logs lines)."""
    if importlib.util.find_spec("tqdm") is None or not _interactive():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="meta-train", unit="it", dynamic_ncols=True)


def _stack_trees(outs: list[Any]) -> Any:
    """Stack a list of equally structured (tuples / dicts of) tensors, as ``vmap`` returns them."""
    first = outs[0]
    if isinstance(first, dict):
        return {k: _stack_trees([o[k] for o in outs]) for k in first}
    if isinstance(first, tuple):
        return tuple(_stack_trees(list(parts)) for parts in zip(*outs))
    return torch.stack(outs)
