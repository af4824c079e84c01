"""Where ``metalr ablate`` runs grid cells besides its own process: a process pool, or Ray.

Either way a cell (a dict of plain data) goes to a worker that imports the installed ``metalr`` and
calls :func:`metalr.workbench.runner.run_cell` at one torch thread; each result comes back to
``finish`` in the calling process as soon as it is done, so the records, curves and their order of
writing do not depend on the executor. An interruption (or a failed cell) cancels the cells not yet
collected; the records already written stay, and a rerun resumes from them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

import torch

RAY_INSTALL = 'pip install "torch==2.13.0" ray'
Cells = list[dict[str, Any]]
Finish = Callable[[dict[str, Any]], None]
TensorBoardDir = Callable[[dict[str, Any]], str | None]


def _run_in_worker(cell: dict[str, Any], device: str, tensorboard: str | None) -> dict[str, Any]:
    from metalr.workbench.runner import run_cell

    torch.set_num_threads(1)
    return run_cell(cell, device, tensorboard=tensorboard)


# ------------------------------------------------------------------------------ process pool
def _worker_init() -> None:
    torch.set_num_threads(1)
    parent = os.getppid()

    def orphaned() -> None:  # the parent was killed (SIGKILL): do not run on alone
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()


def run_pool(todo: Cells, workers: int, device: str, tb: TensorBoardDir, finish: Finish,
             bar: Any) -> None:  # fmt: skip
    """``todo`` in ``workers`` spawned processes."""
    ctx = get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as ex:
        futures = [ex.submit(_run_in_worker, c, device, tb(c)) for c in todo]
        try:
            for fut in as_completed(futures):
                finish(fut.result())
                bar.update(1)
        except BaseException:
            ex.shutdown(wait=False, cancel_futures=True)
            raise


# ------------------------------------------------------------------------------ Ray
def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"executor=ray needs Ray: {RAY_INSTALL}") from exc
    return ray


def ray_init_args(address: str | None, workers: int) -> dict[str, Any]:
    """``ray.init``'s arguments: ``address`` if given; else none when $RAY_ADDRESS is set (ray.init
    connects there itself, and refuses ``num_cpus``); else a new local instance of ``workers``
    CPUs."""
    if address is not None:
        return {"address": address}
    return {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": workers}


def ray_where(address: str | None, workers: int) -> str:
    """Where :func:`run_ray` will run the cells, in words (for the records' provenance)."""
    if import_ray().is_initialized():
        return "the running Ray session"
    return address or os.environ.get("RAY_ADDRESS") or f"a local Ray instance of {workers} CPU(s)"


def run_ray(todo: Cells, workers: int, address: str | None, device: str, tb: TensorBoardDir,
            finish: Finish, bar: Any) -> None:  # fmt: skip
    """``todo`` as Ray tasks of one CPU each (on a GPU: ``1/workers`` of one), collected with
    ``ray.wait`` as they finish. A Ray session started here is shut down here; one that was
    already running (``ray.init`` called by the user) is left as it is."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(**ray_init_args(address, workers))
    try:
        gpus = 0 if device == "cpu" else 1 / workers
        remote = ray.remote(num_cpus=1, num_gpus=gpus)(_run_in_worker)
        pending = [remote.remote(c, device, tb(c)) for c in todo]
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    finish(ray.get(ref))
                    bar.update(1)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()
