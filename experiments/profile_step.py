"""Where an optimizer step's time goes: host (launch) time, device time, kernels per step.

A diagnostic companion to ``bench_step.py`` / ``bench_train_step.py``: for each optimizer of
``bench_train_step.optimizers()`` on the benchmark's GPT (its gradients from one backward pass),

* ``host ms``: wall time of ``step()`` with the device idle before it and no sync after
  (what the Python side and the launches cost; on a GPU it is hidden only while the device
  is busier than the host),
* ``step ms``: the same step with a device sync after it,
* ``launches``: device kernels per step (CUDA only, from ``torch.profiler``),

then ``torch.profiler``'s top operators by self host time for the metalr rows (and on CUDA by
device time for every row).

    python experiments/profile_step.py                  # CPU (small GPT)
    python experiments/profile_step.py --device cuda    # GPU (GPT-2-small-sized)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_step import SIZES, TinyGPT, optimizers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top", type=int, default=15, help="operators listed per optimizer")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.set_num_threads(1)
    width, depth, heads, context, batch = SIZES["cuda" if cuda else "cpu"]
    torch.manual_seed(0)
    base = TinyGPT(width=width, depth=depth, heads=heads, context=context).to(dev)
    idx = torch.randint(0, 256, (batch, context), device=dev)
    base(idx, idx).backward()
    grads = [p.grad.clone() for p in base.parameters()]
    n_tensors = len(grads)
    print(f"{sum(g.numel() for g in grads):,} parameters in {n_tensors} tensors on {dev}")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    rows, tables = [], []
    for name, make in optimizers().items():
        model = copy.deepcopy(base)
        params = list(model.parameters())
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = make(params)
        for _ in range(5):
            opt.step()
        host, full = [], []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            opt.step()
            host.append(time.perf_counter() - t0)
            sync()
            full.append(time.perf_counter() - t0)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(5):
                opt.step()
            sync()
        launches = "—"
        if cuda:
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            launches = f"{len(kernels) / 5:.0f}"
        rows.append((name, statistics.median(host) * 1e3, statistics.median(full) * 1e3, launches))
        averages = prof.key_averages()
        if "HD" in name:
            table = averages.table(sort_by="self_cpu_time_total", row_limit=args.top)
            tables.append(f"### {name} (5 steps, by host time)\n\n{table}")
        if cuda:
            table = averages.table(sort_by="self_cuda_time_total", row_limit=6)
            tables.append(f"### {name} (5 steps, by device time)\n\n{table}")
    print("\n".join(tables))
    print(f"\n| optimizer ({n_tensors} tensors) | host ms | step ms | launches/step |")
    print("|---|---:|---:|---:|")
    for name, h, f, k in rows:
        print(f"| {name} | {h:.2f} | {f:.2f} | {k} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
