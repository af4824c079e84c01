"""``metalr ablate`` as functions: a study config → one JSONL record per grid cell.

The grid is ``tasks × optimizers × lrs × seeds`` (lr-free optimizers run once per task and seed).
A cell's id is the SHA-256 of everything that determines its result (task, size, optimizer spec,
lr, seed, steps, ...), so the results folder is a cache:

* ``records.jsonl``: one JSON line per finished run, appended by the parent process only (one
  ``write`` + flush + ``fsync``; a torn last line from a crash is cut off before the next append);
* ``curves/<id>.json``: the run's per-step curves (training and validation loss, min/mean/max
  effective lr), written atomically before its record;
* ``study.json``: the resolved study config and provenance.

Rerunning a study skips every cell whose id is already recorded: an interrupted grid resumes, and
nothing is duplicated. ``workers > 1`` runs cells in a local process pool (spawned processes, one
torch thread each).
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from metalr.meta.results import _atomic, atomic_write_json, config_sha256, json_safe, provenance
from metalr.workbench import optimizers as O
from metalr.workbench.config import StudyConfig
from metalr.workbench.find_lr import find_lr
from metalr.workbench.tasks import Task, make_task

RECORD_FORMAT = "metalr.ablate-record/1"
RESULT_KEYS = ("task", "optimizer", "lr", "seed")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} but CUDA is not available (use device=cpu or auto)")
    return device


def expand(cfg: StudyConfig) -> list[dict[str, Any]]:
    """The grid's cells, in a fixed order (task, optimizer, lr, seed)."""
    cells = []
    for task in cfg.tasks:
        for name, spec in cfg.optimizers.items():
            lrs = cfg.lrs if O.uses_lr(spec) else [None]
            for lr in lrs:
                for seed in cfg.seeds:
                    cell = {"task": task, "size": cfg.size, "optimizer": name, "spec": spec,
                            "lr": lr, "seed": seed, "steps": cfg.steps, "log_every": cfg.log_every,
                            "divergence": cfg.divergence, "range_test_steps": cfg.range_test_steps,
                            "fallback_text": cfg.fallback_text}  # fmt: skip
                    cell["id"] = config_sha256(cell)[:20]
                    cells.append(cell)
    return cells


@functools.lru_cache(maxsize=8)
def _task(name: str, size: str, device: str, fallback_text: bool) -> Task:
    return make_task(name, size, device, fallback_text=fallback_text)


def train(task: Task, spec: dict[str, Any], lr: float | None, seed: int, steps: int,
          log_every: int, divergence: float, device: str) -> dict[str, Any]:  # fmt: skip
    """Train one model; returns final losses, status and curves."""
    model = task.model(seed, device)
    opt = O.build_optimizer(spec, model.parameters(), lr)
    sched = O.build_schedule(spec, opt, steps)
    nxt = task.batches(seed)
    curves: dict[str, list] = {k: [] for k in ("step", "train_loss", "val_loss", "lr_min",
                                               "lr_mean", "lr_max")}  # fmt: skip
    window: list[float] = []

    def log(step: int) -> float:
        O.set_mode(opt, "eval")
        val = task.evaluate(model, "val")
        O.set_mode(opt, "train")
        s = O.lr_summary(opt)
        curves["step"].append(step)
        curves["train_loss"].append(sum(window) / len(window) if window else None)
        curves["val_loss"].append(val)
        for k in ("min", "mean", "max"):
            curves[f"lr_{k}"].append(s[k])
        window.clear()
        return val

    O.set_mode(opt, "train")
    initial_val = log(0)
    first, status = None, "ok"
    for step in range(1, steps + 1):
        x, y = nxt()
        loss = task.loss(model(x), y)
        value = loss.detach().item()
        first = value if first is None else first
        if not math.isfinite(value) or value > divergence * first:
            status = "diverged"
            break
        window.append(value)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if step % log_every == 0 or step == steps:
            log(step)
    diverged = status == "diverged"
    O.set_mode(opt, "eval")
    final_val = math.inf if diverged else curves["val_loss"][-1]
    test = math.inf if diverged else task.evaluate(model, "test")
    train_tail = [v for v in curves["train_loss"][-1:] if v is not None]
    return {"status": status, "initial_val_loss": initial_val, "final_val_loss": final_val,
            "final_test_loss": test, "final_train_loss": train_tail[0] if train_tail else None,
            "best_val_loss": min(curves["val_loss"]), "steps_done": step if diverged else steps,
            "final_lr": O.lr_summary(opt), "curves": curves}  # fmt: skip


def _trial_lrs(spec: dict[str, Any], seed: int) -> list[float]:
    lo, hi = spec.get("lr_range", [1e-5, 1.0])
    n = spec.get("trials", 8)
    if spec.get("search", "grid") == "grid":
        return [lo * (hi / lo) ** (i / max(1, n - 1)) for i in range(n)]
    g = torch.Generator().manual_seed(1_000 + seed)
    return [lo * (hi / lo) ** float(u) for u in torch.rand(n, generator=g, dtype=torch.float64)]


def run_cell(cell: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Run one grid cell; returns its record (without provenance) and its curves."""
    tic = time.perf_counter()
    spec, kind = cell["spec"], cell["spec"]["kind"]
    base = {k: cell[k] for k in ("id", "task", "size", "optimizer", "lr", "seed", "steps")}
    base.update(kind=kind, spec=spec, format=RECORD_FORMAT)
    if kind in O.PEERS and not O.peer_available(kind):
        return {**base, "status": "not installed", "lr_used": None, "extra": {
            "install": f'pip install "torch==2.13.0" {O.PEERS[kind][0]}'},
            "wall_time_s": 0.0, "curves": None}  # fmt: skip
    task = _task(cell["task"], cell["size"], device, cell["fallback_text"])
    args = (cell["seed"], cell["steps"], cell["log_every"], cell["divergence"], device)
    lr, extra = cell["lr"], {}
    if kind == "range_test_adam":
        x_y = task.batches(cell["seed"] + 500)
        rt = find_lr(lambda: task.model(cell["seed"], device),
                     lambda p: O.build_optimizer(spec, p, 1e-3),
                     lambda m, b: task.loss(m(b[0]), b[1]), x_y,
                     num_steps=cell["range_test_steps"])  # fmt: skip
        lr, extra = rt.suggested_lr, {"range_test": rt.to_dict()}
    elif kind == "tuned_adam":
        trial_steps = spec.get("trial_steps", cell["steps"])
        lrs = _trial_lrs(spec, cell["seed"])
        scores = []
        for trial_lr in lrs:  # selected on the validation split; test loss is reported too
            out = train(task, spec, trial_lr, cell["seed"], trial_steps, *args[2:])
            scores.append(out["final_val_loss"])
        lr = lrs[min(range(len(lrs)), key=scores.__getitem__)]
        extra = {"search": spec.get("search", "grid"), "trials": len(lrs),
                 "trial_steps_total": trial_steps * len(lrs), "trial_lrs": lrs,
                 "trial_val_losses": scores}  # fmt: skip
    elif lr is None:
        lr = O.PEERS[kind][2] if kind in O.PEERS else None
    out = train(task, spec, lr, *args)
    return {**base, "lr_used": lr, **out, "extra": extra,
            "wall_time_s": time.perf_counter() - tic}  # fmt: skip


def _worker_init() -> None:
    torch.set_num_threads(1)
    parent = os.getppid()

    def orphaned() -> None:  # the parent was killed (SIGKILL): do not run on alone
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()


def _run_in_worker(cell: dict[str, Any], device: str) -> dict[str, Any]:
    return run_cell(cell, device)


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
    common = {
        k: prov[k]
        for k in (
            "config_sha256",
            "git_commit",
            "git_dirty",
            "metalr_version",
            "torch_version",
            "python_version",
            "platform",
            "command",
        )
    }
    if device != "cpu":
        common["device"] = f"{device} ({torch.cuda.get_device_name(device)})"
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
        result["provenance"] = {**common, "study_config_sha256": common["config_sha256"],
                                "cell": {k: v for k, v in cell.items() if k != "id"},
                                "cell_sha256": config_sha256(cell), "seed": cell["seed"],
                                "wall_time_s": result["wall_time_s"]}  # fmt: skip
        del result["provenance"]["config_sha256"]
        append_record(result, records_path)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"ablate {cfg.name}",
               unit="run", disable=True if quiet else None, dynamic_ncols=True)  # fmt: skip
    try:
        if cfg.workers == 1 or len(todo) <= 1:
            for cell in todo:  # in this process, at its torch thread count (CLI: --threads)
                finish(run_cell(cell, device))
                bar.update(1)
        else:
            ctx = get_context("spawn")
            with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_worker_init) as ex:
                futures = [ex.submit(_run_in_worker, c, device) for c in todo]
                try:
                    for fut in as_completed(futures):
                        finish(fut.result())
                        bar.update(1)
                except BaseException:
                    ex.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        bar.close()
    ids = {c["id"] for c in cells}
    return [r for r in read_records(records_path) if r.get("id") in ids]
