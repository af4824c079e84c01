"""``metalr ablate`` as functions: a study config → one JSONL record per grid cell.

The grid is ``tasks × optimizers × lrs × seeds`` (lr-free optimizers run once per task and seed).
A cell's id is the SHA-256 of everything that determines its result (task, size, optimizer spec,
lr, seed, steps, ...), so the results folder is a cache:

* ``records.jsonl``: one JSON line per finished run, appended by the parent process only (one
  ``write`` + flush + ``fsync``; a torn last line from a crash is cut off before the next append);
* ``curves/<id>.json``: the run's per-step curves (training and validation loss, min/mean/max
  effective lr), written atomically before its record;
* ``study.json``: the resolved study config and provenance;
* ``tensorboard/<task>/<optimizer>/lr<lr>_seed<seed>/`` (``tensorboard: true``): one TensorBoard
  run per cell: ``loss/train``, ``loss/val``, ``lr/min|mean|max`` at every logged step and, for
  metalr optimizers, each tensor's effective rate (``effective_lr/<name>``).

Rerunning a study skips every cell whose id is already recorded: an interrupted grid resumes, and
nothing is duplicated. Executors (:mod:`metalr.workbench.executors`): ``local`` runs cells in this
process (``workers: 1``, at its torch thread count, with a progress bar over each run's steps) or in
a pool of ``workers`` spawned processes; ``ray`` runs each cell as a Ray task on a local Ray
instance of ``workers`` CPUs or on the cluster at ``ray_address``; pool and Ray workers use one
torch thread each. Whatever the executor, only this process writes records and curves; TensorBoard
events are written by the worker that ran the cell (on a multi-node Ray cluster, on that node).

Progress (unless ``quiet``): on a terminal, a bar over the grid's runs; otherwise (a log file, a
pipe, CI) a line on stderr after the first finished run, then every tenth of the grid or every
``LOG_EVERY_S`` seconds, and at the end: done/total, cached/run, elapsed and an estimate of the time
left. The last line says how many cells were cached (recorded by an earlier run, skipped) and how
many ran: ``ablate_default: 80 cached, 0 run (0.1 s)``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from metalr.integrations import unwrap_optimizer
from metalr.integrations.tensorboard import log_effective_lrs
from metalr.meta.results import _atomic, atomic_write_json, config_sha256, json_safe, provenance
from metalr.workbench import executors as E
from metalr.workbench import layerwise as L
from metalr.workbench import optimizers as O
from metalr.workbench.config import StudyConfig
from metalr.workbench.find_lr import find_lr
from metalr.workbench.search import search_lr_decay, search_lrs
from metalr.workbench.tasks import Task, make_task
from metalr.workbench.validation import build_watcher, with_step_budget

RECORD_FORMAT = "metalr.ablate-record/1"
RESULT_KEYS = ("task", "optimizer", "lr", "seed")
LOG_EVERY_S = 10.0  # progress lines when stderr is not a terminal: at least this often


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} but CUDA is not available (use device=cpu or auto)")
    return device


def expand(cfg: StudyConfig) -> list[dict[str, Any]]:
    """The grid's cells, in a fixed order (task, optimizer, lr, seed).

    A cell's id hashes everything that decides its run; for a metalr optimizer that includes
    the settings it resolves from the library's defaults (``resolved``:
    :func:`~metalr.workbench.optimizers.resolved_settings`), so a study rerun after the defaults
    change reruns those cells instead of reporting records made under the old ones."""
    cells = []
    for task in cfg.tasks:
        for name, spec in cfg.optimizers.items():
            if not O.applies_to(spec, task):
                continue
            lrs = spec.get("lrs", cfg.lrs) if O.uses_lr(spec) else [None]
            steps = cfg.steps_of(task)
            settings = O.resolved_settings(spec, steps)  # metalr's defaults: part of the cell
            resolved = {} if settings is None else {"resolved": config_sha256(settings)[:16]}
            for lr in lrs:
                for seed in cfg.seeds:
                    cell = {"task": task, "size": cfg.size, "optimizer": name, "spec": spec,
                            "lr": lr, "seed": seed, "steps": steps, "log_every": cfg.log_every,
                            "divergence": cfg.divergence, "range_test_steps": cfg.range_test_steps,
                            "fallback_text": cfg.fallback_text, **resolved}  # fmt: skip
                    cell["id"] = config_sha256(cell)[:20]
                    cells.append(cell)
    return cells


@functools.lru_cache(maxsize=8)
def _task(name: str, size: str, device: str, fallback_text: bool) -> Task:
    return make_task(name, size, device, fallback_text=fallback_text)


def train(task: Task, spec: dict[str, Any], lr: float | None, seed: int, steps: int,
          log_every: int, divergence: float, device: str, *, progress: bool = False,
          writer: Any = None) -> dict[str, Any]:  # fmt: skip
    """Train one model; returns final losses, status and curves.

    ``progress`` shows a bar over the steps (on a terminal); ``writer`` (a TensorBoard
    ``SummaryWriter``) gets the curves' values at every logged step.
    """
    from tqdm.auto import tqdm

    model = task.model(seed, device)
    spec = with_step_budget(spec, steps)
    opt = O.build_for_model(spec, model, lr, task)
    sched = O.build_schedule(spec, opt, steps)
    set_beta = O.build_hypergrad_warmup(spec, opt)
    watcher = build_watcher(spec, task, seed, opt, model)
    nxt = task.batches(seed)
    # a guarded optimizer reads the step's loss from a closure (gradients already computed)
    guarded = bool(spec.get("spike_guard"))
    curves: dict[str, list] = {k: [] for k in ("step", "train_loss", "val_loss", "lr_min",
                                               "lr_mean", "lr_max")}  # fmt: skip
    window: list[float] = []

    def log(step: int) -> float:
        O.set_mode(opt, "eval")
        val = task.evaluate(model, "val", seed)
        O.set_mode(opt, "train")
        s = O.lr_summary(opt)
        curves["step"].append(step)
        curves["train_loss"].append(sum(window) / len(window) if window else None)
        curves["val_loss"].append(val)
        for k in ("min", "mean", "max"):
            curves[f"lr_{k}"].append(s[k])
        for name, rate in (O.layer_lrs(opt, model) or {}).items():  # per-layer trajectories
            curves.setdefault("lr_layers", {}).setdefault(name, []).append(rate)
        window.clear()
        if writer is not None:
            _write_scalars(writer, step, curves, opt, model)
        train_loss = curves["train_loss"][-1]
        bar.set_postfix_str(f"val {val:.4g}" if train_loss is None else
                            f"train {train_loss:.4g} val {val:.4g}", refresh=False)  # fmt: skip
        return val

    bar = tqdm(total=steps, desc="steps", unit="step", leave=False, position=1,
               disable=None if progress else True, dynamic_ncols=True)  # fmt: skip
    O.set_mode(opt, "train")
    try:
        initial_val = log(0)
        first, status, peak = None, "ok", -math.inf
        for step in range(1, steps + 1):
            x, y = nxt()
            loss = task.loss(model(x), y)
            value = loss.detach().item()
            first = value if first is None else first
            peak = max(peak, value)
            if not math.isfinite(value) or value > divergence * first:
                status = "diverged"
                break
            window.append(value)
            opt.zero_grad()
            loss.backward()
            if set_beta is not None:
                set_beta(step)
            if guarded:
                opt.step(lambda loss=loss: loss)
            else:
                opt.step()
            if sched is not None:
                sched.step()
            stop = watcher is not None and watcher.after_step(step)
            if step % log_every == 0 or step == steps or stop:
                log(step)
            bar.update(1)
            if stop:
                status = "stopped early"
                break
    finally:
        bar.close()
    diverged = status == "diverged"
    stream = watcher.finish() if watcher is not None else None
    O.set_mode(opt, "eval")
    final_val = math.inf if diverged else curves["val_loss"][-1]
    if stream is not None and stream["early_stopping_restored"] and not diverged:
        final_val = task.evaluate(model, "val", seed)  # the restored (best check's) weights
    test = math.inf if diverged else task.evaluate(model, "test", seed)
    train_tail = [v for v in curves["train_loss"][-1:] if v is not None]
    return {"status": status, "initial_val_loss": initial_val, "final_val_loss": final_val,
            "final_test_loss": test, "final_train_loss": train_tail[0] if train_tail else None,
            "best_val_loss": min(curves["val_loss"]),
            "steps_done": step if status != "ok" else steps, "validation_stream": stream,
            "final_lr": {**O.lr_summary(opt), "geomean": L.lr_geomean(opt)}, "curves": curves,
            # the largest minibatch training loss over the run ÷ the first one
            "peak_train_ratio": peak / first if first else None,
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def _write_scalars(writer: Any, step: int, curves: dict[str, list], opt: Any, model: Any) -> None:
    if curves["train_loss"][-1] is not None:  # None at step 0: no training step yet
        writer.add_scalar("loss/train", curves["train_loss"][-1], step)
    writer.add_scalar("loss/val", curves["val_loss"][-1], step)
    for k in ("min", "mean", "max"):
        writer.add_scalar(f"lr/{k}", curves[f"lr_{k}"][-1], step)
    if hasattr(unwrap_optimizer(opt), "effective_lrs"):  # metalr: the rate of every tensor
        log_effective_lrs(writer, opt, step, model.named_parameters())


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError("tensorboard=true needs TensorBoard: pip install tensorboard") from exc
    return SummaryWriter


def _summary_writer(logdir: str) -> Any:
    """A ``SummaryWriter`` on ``logdir``, after deleting the events of an interrupted attempt."""
    cls = _summary_writer_class()
    for old in Path(logdir).glob("events.out.tfevents.*"):
        old.unlink()
    return cls(logdir)


def run_cell(cell: dict[str, Any], device: str = "cpu", *, progress: bool = False,
             tensorboard: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Run one grid cell; returns its record (without provenance) and its curves.

    ``progress``: bars over the steps of each training run; ``tensorboard``: the folder of the
    run's TensorBoard events (the final run only: not LR-search trials or range tests).
    """
    tic = time.perf_counter()
    spec, kind = cell["spec"], cell["spec"]["kind"]
    base = {k: cell[k] for k in ("id", "task", "size", "optimizer", "lr", "seed", "steps")}
    base.update(kind=kind, spec=spec, format=RECORD_FORMAT)
    if kind in O.PEERS and not O.peer_available(kind):
        return {**base, "status": "not installed", "lr_used": None, "extra": {
            "install": f'pip install "torch==2.13.0" {O.peer_package(kind)}'},
            "wall_time_s": 0.0, "curves": None}  # fmt: skip
    task = _task(cell["task"], cell["size"], device, cell["fallback_text"])
    steps = cell["steps"]
    if spec.get("batch_size") is not None:  # and with `epochs`, its own step budget
        task = dataclasses.replace(task, batch_size=spec["batch_size"])
        steps = base["steps"] = L.run_steps(spec, len(task.splits(0)[0][0]), steps)
    args = (cell["seed"], steps, cell["log_every"], cell["divergence"], device)
    lr, extra = cell["lr"], {}
    if kind == "range_test_adam":
        x_y = task.batches(cell["seed"] + 500)
        rt = find_lr(lambda: task.model(cell["seed"], device),
                     lambda p: O.build_optimizer(spec, p, 1e-3),
                     lambda m, b: task.loss(m(b[0]), b[1]), x_y,
                     num_steps=cell["range_test_steps"])  # fmt: skip
        lr, extra = rt.suggested_lr, {"range_test": rt.to_dict()}
    elif kind == "tuned_adam" and spec.get("layer_decay_range") is not None:
        trial_steps = spec.get("trial_steps", steps)

        def score2(trial_lr: float, gamma: float) -> float:
            trial = {**spec, "layer_decay": gamma}
            return train(task, trial, trial_lr, cell["seed"], trial_steps, *args[2:],
                         progress=progress)["final_val_loss"]  # fmt: skip

        trials, scores = search_lr_decay(spec, cell["seed"], score2)
        lr, gamma = trials[min(range(len(trials)), key=scores.__getitem__)]
        spec = {**spec, "layer_decay": gamma}
        extra = {"search": spec.get("search", "grid"), "trials": len(trials),
                 "trial_steps_total": trial_steps * len(trials), "trial_lrs": [t[0] for t in trials],
                 "trial_layer_decays": [t[1] for t in trials], "trial_val_losses": scores,
                 "layer_decay": gamma}  # fmt: skip
    elif kind == "tuned_adam":
        trial_steps = spec.get("trial_steps", steps)

        def score(trial_lr: float) -> float:  # selected on the validation split
            return train(task, spec, trial_lr, cell["seed"], trial_steps, *args[2:],
                         progress=progress)["final_val_loss"]  # fmt: skip

        lrs, scores = search_lrs(spec, cell["seed"], score)
        lr = lrs[min(range(len(lrs)), key=scores.__getitem__)]
        extra = {"search": spec.get("search", "grid"), "trials": len(lrs),
                 "trial_steps_total": trial_steps * len(lrs), "trial_lrs": lrs,
                 "trial_val_losses": scores}  # fmt: skip
    elif lr is None:
        lr = O.PEERS[kind][2] if kind in O.PEERS else None
    writer = None if tensorboard is None else _summary_writer(tensorboard)
    try:
        out = train(task, spec, lr, *args, progress=progress, writer=writer)
    finally:
        if writer is not None:
            writer.close()
    info = task_info(task, out.pop("params", None))
    return {**base, "lr_used": lr, **out, "task_info": info,
            "extra": extra, "wall_time_s": time.perf_counter() - tic}  # fmt: skip


def task_info(task: Task, params: int | None) -> dict[str, Any]:
    """What a report needs to state the task's size: examples per split, batch, parameters."""
    train, val, test = task.splits(0)
    return {"train": len(train[0]), "val": len(val[0]), "test": len(test[0]),
            "batch_size": task.batch_size, "params": params}  # fmt: skip


def _tensorboard_dir(root: Path, cell: dict[str, Any]) -> str:
    lr = "" if cell["lr"] is None else f"lr{cell['lr']:g}_"
    name = str(cell["optimizer"]).replace("/", "_")
    return str(root / cell["task"] / name / f"{lr}seed{cell['seed']}")


# ------------------------------------------------------------------------------ the records file
def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a ``records.jsonl`` (a torn last line is ignored)."""
    path = Path(path)
    if path.is_dir():
        path = path / "records.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (a crash mid-append) so the next record starts on its own line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def append_record(record: dict[str, Any], path: Path) -> None:
    line = (json.dumps(json_safe(record), separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def run_study(
    cfg: StudyConfig, *, quiet: bool = False, config_file: str | Path | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run every unfinished cell of ``cfg`` into ``cfg.out_dir``; returns the study's records."""
    if cfg.executor == "ray":  # a missing extra fails before anything is written
        E.import_ray()
    if cfg.tensorboard:
        _summary_writer_class()
    out = cfg.out_dir
    (out / "curves").mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    records_path = out / "records.jsonl"
    lock = open(records_path, "ab")  # noqa: SIM115 - its lock is held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise ValueError(f"another metalr ablate is writing to {out}; wait for it") from None
    try:
        return _run_locked(cfg, out, device, records_path, quiet, config_file)
    finally:
        lock.close()


def _run_locked(cfg: StudyConfig, out: Path, device: str, records_path: Path, quiet: bool,
                config_file: str | Path | None) -> list[dict[str, Any]]:  # fmt: skip
    _repair_tail(records_path)
    prov = provenance(cfg.to_dict(), config_file)
    atomic_write_json({"name": cfg.name, "provenance": prov}, out / "study.json")
    cells = expand(cfg)
    done = {r.get("id") for r in read_records(records_path)}
    todo = [c for c in cells if c["id"] not in done]
    keys = ("config_sha256", "git_commit", "git_dirty", "metalr_version", "torch_version",
            "python_version", "platform", "command")  # fmt: skip
    common = {k: prov[k] for k in keys}
    if device != "cpu":
        common["device"] = f"{device} ({torch.cuda.get_device_name(device)})"
    elif cfg.executor == "ray":
        common["device"] = f"cpu ({E.ray_where(cfg.ray_address, cfg.workers)}; 1 thread per run)"
    else:
        threads = 1 if cfg.workers > 1 else torch.get_num_threads()
        common["device"] = (
            f"cpu ({os.cpu_count()} cores, {cfg.workers} worker(s) x {threads} thread(s))"
        )

    def finish(result: dict[str, Any]) -> None:
        curves = result.pop("curves")
        if curves is not None:
            text = json.dumps(json_safe(curves), separators=(",", ":"))
            _atomic(out / "curves" / f"{result['id']}.json", lambda f: f.write(text), "w")
            result["curves"] = f"curves/{result['id']}.json"
        cell = next(c for c in cells if c["id"] == result["id"])
        settings = O.resolved_settings(cell["spec"], cell["steps"])
        result["provenance"] = {**common, "study_config_sha256": common["config_sha256"],
                                "cell": {k: v for k, v in cell.items() if k != "id"},
                                "cell_sha256": config_sha256(cell), "seed": cell["seed"],
                                "resolved_settings": settings,
                                "wall_time_s": result["wall_time_s"]}  # fmt: skip
        del result["provenance"]["config_sha256"]
        append_record(result, records_path)

    root = out.resolve() / "tensorboard"  # absolute: Ray workers may start elsewhere

    def tb(cell: dict[str, Any]) -> str | None:
        return _tensorboard_dir(root, cell) if cfg.tensorboard else None

    bar = Progress(cfg.name, len(cells), len(cells) - len(todo), quiet=quiet)
    try:
        if not todo:  # all recorded already: no pool, no Ray session
            pass
        elif cfg.executor == "ray":
            E.run_ray(todo, cfg.workers, cfg.ray_address, device, tb, finish, bar)
        elif cfg.workers == 1 or len(todo) <= 1:
            for cell in todo:  # in this process, at its torch thread count (CLI: --threads)
                finish(run_cell(cell, device, progress=not quiet, tensorboard=tb(cell)))
                bar.update(1)
        else:
            E.run_pool(todo, cfg.workers, device, tb, finish, bar)
    finally:
        bar.close()
    ids = {c["id"] for c in cells}
    records = StudyRecords(r for r in read_records(records_path) if r.get("id") in ids)
    records.cached, records.ran, records.seconds = bar.cached, bar.ran, bar.elapsed()
    return records


class StudyRecords(list):
    """The records of a study (a list), and what this call did: ``cached`` cells were recorded
    already (skipped), ``ran`` were run now, in ``seconds``."""

    cached: int = 0
    ran: int = 0
    seconds: float = 0.0

    def summary(self, name: str) -> str:
        """``"<name>: 80 cached, 0 run (0.1 s)"`` / ``"<name>: 3 cached, 77 run in 25.1 s"``."""
        return summary_line(name, self.cached, self.ran, self.seconds)


def summary_line(name: str, cached: int, ran: int, seconds: float) -> str:
    if ran == 0:
        return f"{name}: {cached} cached, 0 run ({seconds:.1f} s)"
    return f"{name}: {cached} cached, {ran} run in {seconds:.1f} s"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class Progress:
    """Progress over a grid's runs: a tqdm bar on a terminal; elsewhere (stderr not a terminal)
    a line every tenth of the runs to do or every ``LOG_EVERY_S`` seconds, and a last line (see
    the module docstring). ``quiet``: nothing. The executors call :meth:`update` per run."""

    def __init__(self, name: str, total: int, cached: int, *, quiet: bool = False,
                 stream: Any = None, tty: bool | None = None) -> None:  # fmt: skip
        self.name, self.total, self.cached, self.ran = name, total, cached, 0
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.quiet = quiet
        self.start = self.last_line = time.perf_counter()
        self.every = max(1, (total - cached) // 10)
        self.bar = None
        if not quiet and self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=cached, desc=f"ablate {name}", unit="run",
                            file=self.stream, dynamic_ncols=True)  # fmt: skip

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.ran += n
        if self.bar is not None:
            self.bar.update(n)
        if self.quiet or self.tty:
            return
        now, todo = time.perf_counter(), self.total - self.cached
        if (
            self.ran in (1, todo)
            or self.ran % self.every == 0
            or now - self.last_line >= LOG_EVERY_S
        ):
            self.last_line = now
            elapsed = now - self.start
            left = elapsed / self.ran * (todo - self.ran)
            self._print(f"ablate {self.name}: {self.cached + self.ran}/{self.total} runs done "
                        f"({self.cached} cached, {self.ran} run), {_duration(elapsed)} elapsed, "
                        f"~{_duration(left)} left")  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if not self.quiet:
            self._print(summary_line(self.name, self.cached, self.ran, self.elapsed()))
