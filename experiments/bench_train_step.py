"""A whole training step (forward + backward + step) of a small GPT with AdamWHD vs torch AdamW.

``experiments/bench_step.py`` times ``optimizer.step()`` alone; this shows what its ratios mean
in training: a nanoGPT-style character model (4 blocks, width 256, 4 heads, context 128, batch 8,
~3.3M parameters) takes a full step with each optimizer on its own copy of the model, on a fixed
batch. Same protocol as bench_step: warm-up rounds, then rounds in a shuffled order, each step
timed alone; the ratio is the median over rounds of t / t(torch AdamW fused) in the same round.
On CUDA the model is GPT-2-small-sized (12 blocks, width 768, 12 heads, context 256, batch 16,
~85M parameters), the forward pass runs under bf16 autocast (float32 weights and optimizer
state, as mixed-precision training does), and each step is timed between two device syncs.

    python experiments/bench_train_step.py                        # CPU, 1 thread, ~1 minute
    python experiments/bench_train_step.py --repeats 20 --output experiments/results/bench_train_step_cpu
    python experiments/bench_train_step.py --device cuda --output experiments/results/bench_train_step_cuda
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

import metalr
from metalr._benchtools import emit, markdown_table, quantile, write_csv

REFERENCE = "torch AdamW (fused)"


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 256, width: int = 256, depth: int = 4, heads: int = 4,
                 context: int = 128) -> None:  # fmt: skip
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(depth)])
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        logits = self.head(self.ln(self.blocks(x)))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def optimizers() -> dict[str, Callable[[Sequence[nn.Parameter]], torch.optim.Optimizer]]:
    kw = {"lr": 3e-4, "weight_decay": 0.1}
    return {
        REFERENCE: lambda ps: torch.optim.AdamW(ps, fused=True, **kw),
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, foreach=True, **kw),
        "AdamWHD (default: foreach, exact)": lambda ps: metalr.AdamWHD(ps, **kw),
        "AdamWHD fused (exact, 2 passes)": lambda ps: metalr.AdamWHD(ps, fused=True, **kw),
        "AdamWHD fused lagged (1 pass)": lambda ps: metalr.AdamWHD(ps, fused=True, lagged=True,
                                                                  **kw),
    }  # fmt: skip


#: Model and batch per device type: (width, depth, heads, context, batch).
SIZES = {"cpu": (256, 4, 4, 128, 8), "cuda": (768, 12, 12, 256, 16)}


def run(
    repeats: int, warmup: int, seed: int, log: Callable[[str], None], device: str = "cpu"
) -> list[list[str]]:
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    width, depth, heads, context, batch = SIZES["cuda" if cuda else "cpu"]
    torch.manual_seed(seed)
    base = TinyGPT(width=width, depth=depth, heads=heads, context=context).to(dev)
    n_params = sum(p.numel() for p in base.parameters())
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (batch, context), generator=gen).to(dev)
    targets = torch.randint(0, 256, (batch, context), generator=gen).to(dev)
    runs = {}
    for name, make in optimizers().items():
        model = copy.deepcopy(base)
        runs[name] = (model, make(list(model.parameters())))
    threads = f"{torch.get_num_threads()} thread(s)"
    where = f"{torch.cuda.get_device_name(dev)}, bf16 autocast" if cuda else threads
    log(f"{len(runs)} optimizers, {n_params:,} parameters, batch {batch}×{context}, {where}")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def train_step(name: str) -> float:
        model, opt = runs[name]
        sync()
        t0 = time.perf_counter_ns()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(idx, targets)
        loss.backward()
        opt.step()
        sync()
        return (time.perf_counter_ns() - t0) / 1e6

    order = list(runs)
    rng = random.Random(seed)
    for _ in range(warmup):
        rng.shuffle(order)
        for name in order:
            train_step(name)
    times: dict[str, list[float]] = {name: [] for name in runs}
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            rng.shuffle(order)
            for name in order:
                times[name].append(train_step(name))
    finally:
        gc.enable()
    rows = []
    for name in runs:
        ratios = [t / r for t, r in zip(times[name], times[REFERENCE])]
        iqr = quantile(times[name], 0.75) - quantile(times[name], 0.25)
        rows.append([name, f"{statistics.median(times[name]):.1f}", f"{iqr:.1f}",
                     f"{statistics.median(ratios):.3f}"])  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (default: 15)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up rounds (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--output", default=None, metavar="PATH", help="write PATH.md, PATH.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, flush=True)
    rows = run(args.repeats, args.warmup, args.seed, log=log, device=args.device)
    columns = ["optimizer", "train step ms (median)", "IQR ms", f"ratio vs {REFERENCE}"]
    text = "\n".join(markdown_table(columns, "lrrr", rows)) + "\n"
    fields = ["optimizer", "median_ms", "iqr_ms", "ratio"]
    emit(text, args.output, lambda path: write_csv(path, fields, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
