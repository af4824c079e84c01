"""The CPU kernel of ``fused=True`` (``metalr/csrc/hd_step.cpp``) pass by pass, cache-resident.

``experiments/bench_step.py`` rotates ~26 optimizers' states (~2 GB) through the cache, so every
step there starts from DRAM. This script steps three optimizers only (torch's fused Adam, AdamHD
``fused=True`` exact and lagged; ~250 MB, resident in a large L3) and times the kernel's passes
alone and the rate update that follows them, in shuffled paired rounds, as ratios to torch's
fused Adam:

    python experiments/bench_cpu_kernel.py [--rounds 25]   # 5M parameters in 20 tensors, 1 thread
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

import metalr
from metalr.bench import clone_params, make_shapes, make_tensors
from metalr.functional import _cpu_kernels
from metalr.functional._from_sums import adapt_rates_from_sums


def main(rounds: int = 25) -> int:
    torch.set_num_threads(1)
    ext = _cpu_kernels.load()
    if ext is None:
        raise SystemExit("the C++ kernel could not be built (no compiler?)")
    weights, grads = make_tensors(make_shapes(5_000_000, 20), torch.device("cpu"), 0)
    adam = torch.optim.Adam(clone_params(weights, grads), lr=1e-3, fused=True)
    exact = metalr.AdamHD(clone_params(weights, grads), lr=1e-3, fused=True)
    lagged = metalr.AdamHD(clone_params(weights, grads), lr=1e-3, fused=True, lagged=True)
    for _ in range(3):
        for opt in (adam, exact, lagged):
            opt.step()
    ps = exact.param_groups[0]["params"]
    g = [p.grad for p in ps]
    m = [exact.state[p]["exp_avg"] for p in ps]
    v = [exact.state[p]["exp_avg_sq"] for p in ps]
    scalars = torch.tensor([[1.0, 1.0, 1e-3, 1.0, 1.0, 1.0]], dtype=torch.float64)
    multipliers = torch.ones(len(ps), dtype=torch.float64)

    def kernel(accumulate: bool, write: bool):
        # the passes rewrite the exact optimizer's state: they are timed, not checked
        return lambda: ext.adam_hd_pass(ps, g, m, v, scalars, multipliers, 0.9, 0.999, 1e-8, 0.0, False,
                                        accumulate, write)  # fmt: skip

    group = lagged.param_groups[0]
    rates = [lagged.state[p]["lr_multiplier"].clone() for p in group["params"]]
    controllers = [lagged.state[p]["hd_controller"].clone() for p in group["params"]]
    sums = torch.rand(len(ps), 3, dtype=torch.float64)

    def rate_update() -> None:  # the seek rule from the pass's sums (what runs after a pass)
        adapt_rates_from_sums(
            rates, sums, [p.numel() for p in ps], lr=group["lr"],
            hypergrad_lr=group["hypergrad_lr"], rule="seek", granularity="tensor",
            lr_bounds=group["lr_bounds"], controllers=controllers, seek=group["seek"],
        )  # fmt: skip

    fns = {
        "torch Adam (fused) step": adam.step,
        "rate update from the sums (seek rule)": rate_update,
        "AdamHD fused exact step": exact.step,
        "AdamHD fused lagged step": lagged.step,
        "kernel: sums pass": kernel(True, False),
        "kernel: update pass": kernel(False, True),
        "kernel: one pass (lagged)": kernel(True, True),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    ref = times["torch Adam (fused) step"]
    print("| what | median ms | ratio vs torch Adam (fused) |\n|---|---:|---:|")
    for name, ts in times.items():
        ratio = statistics.median(t / r for t, r in zip(ts, ref))
        print(f"| {name} | {statistics.median(ts) * 1e3:.2f} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25, help="shuffled paired rounds")
    sys.exit(main(parser.parse_args().rounds))
