"""Run a function on every rank of a gloo process group (CPU), for the distributed tests.

``run_ranks(fn, *args)`` spawns ``world`` processes; each joins one gloo group, calls
``fn(rank, *args)`` and saves what it returns. The parent waits with a deadline (a hang fails the
test instead of the CI job), kills what is left, and returns the results in rank order.

Teardown is where gloo/FSDP runs flake: a rank that leaves while its peer still has work in flight,
or a C++ thread still joinable when the interpreter's static destructors run, aborts the process
("terminate called without an active exception", SIGABRT) after the real work succeeded. So every
rank saves its result, meets the others at a barrier, destroys the group, and leaves with
``os._exit(0)``, which skips those destructors; a rank that fails raises as usual.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, timeout_s: float,
               fn: Callable[..., Any], args: tuple) -> None:  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip
    result = fn(rank, *args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable[..., Any], *args: Any, world: int = 2, timeout_s: float = 180) -> list:
    """``[fn(0, *args), ..., fn(world - 1, *args)]``, each computed in its own gloo rank.

    ``fn`` must be a module-level function (it is pickled into spawned processes) and return
    something ``torch.save`` can write and ``torch.load(weights_only=True)`` can read.
    """
    with tempfile.TemporaryDirectory(prefix="metalr-dist-") as out_dir:
        ctx = mp.start_processes(
            _rank_main, args=(world, free_port(), out_dir, timeout_s, fn, args), nprocs=world,
            join=False, start_method="spawn",
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1):  # raises if a rank fails
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world} gloo ranks did not finish within {timeout_s} s")
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]
