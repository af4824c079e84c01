"""Paired A/B of the fused CPU step: this checkout's C++ kernels against another revision's.

Builds ``metalr/csrc/*.cpp`` of ``--base`` (a git revision) as a second extension, loads that
revision's ``metalr/functional/_cpu_kernels.py`` beside today's (the rest of the library is this
checkout's, so use it for neighbouring revisions whose interfaces agree), and times
``optimizer.step()`` of three optimizers on their own copies of the same 5M parameters: torch's
fused Adam, AdamHD(fused=True) through the base kernels and through today's. Each round steps the
three in a shuffled order, after a write to a 32 MB buffer (so no step starts with another's
data in the cache, as in a training step after the backward pass). It prints the per-round
ratios' median and quartiles, and checks that both builds computed the same parameters and rates
(the comparison is meant for changes that keep every value).

    python experiments/ab_cpu_kernels.py --base HEAD~1 [--mode exact|lagged|element] [--pairs 100]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import metalr
from metalr import functional
from metalr.functional import _cpu_kernels as today

ROOT = Path(__file__).resolve().parents[1]


def _at(rev: str, path: str, out: Path) -> Path:
    """``path`` as it is at ``rev``, written into ``out``."""
    target = out / Path(path).name
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True,
                           capture_output=True, text=True)  # fmt: skip
    target.write_text(shown.stdout)
    return target


def load_base(rev: str, out: Path):
    """The base revision's ``_cpu_kernels`` module, bound to a build of its C++ sources (with
    today's flags, :func:`metalr.functional._cpu_kernels.build`)."""
    sources = [_at(rev, f"metalr/csrc/{s.name}", out) for s in today._SOURCES]
    ext = today.build(sources, prefix="metalr_ab_base")
    spec = importlib.util.spec_from_file_location(
        "metalr.functional._cpu_kernels_base", _at(rev, "metalr/functional/_cpu_kernels.py", out)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.load = lambda: ext
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--mode", choices=("exact", "lagged", "element"), default="exact")
    parser.add_argument("--pairs", type=int, default=100, help="timed rounds")
    parser.add_argument("--params", type=int, default=5_000_000)
    parser.add_argument("--tensors", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(args.base, Path(tmp))
    modules = {"base": base, "today": today}

    def use(name: str) -> None:  # the kernel module the optimizers' fused path imports
        functional._cpu_kernels = modules[name]
        sys.modules["metalr.functional._cpu_kernels"] = modules[name]

    per = args.params // args.tensors
    kw = {"lagged": True} if args.mode == "lagged" else {}
    if args.mode == "element":
        kw = {"granularity": "element"}

    def build(kind: str) -> torch.optim.Optimizer:
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(per, generator=gen)) for _ in range(args.tensors)]
        for p in ps:
            p.grad = torch.randn(per, generator=gen) * 1e-3
        if kind == "adam":
            return torch.optim.Adam(ps, lr=1e-3, fused=True)
        return metalr.AdamHD(ps, lr=1e-3, fused=True, **kw)

    opts = {"adam": build("adam"), "base": build("hd"), "today": build("hd")}
    flush = torch.zeros(8_000_000)
    for name, opt in opts.items():
        use("today" if name == "adam" else name)
        for _ in range(5):
            opt.step()
    times: dict[str, list[float]] = {name: [] for name in opts}
    rng, order = random.Random(0), list(opts)
    for _ in range(args.pairs):
        rng.shuffle(order)
        for name in order:
            use("today" if name == "adam" else name)
            flush.add_(1.0)
            t0 = time.perf_counter()
            opts[name].step()
            times[name].append(time.perf_counter() - t0)
    use("today")

    def summary(a: str, b: str) -> str:
        r = sorted(x / y for x, y in zip(times[a], times[b]))
        return f"{statistics.median(r):.3f} (IQR {r[len(r) // 4]:.3f}-{r[3 * len(r) // 4]:.3f})"

    print(f"mode {args.mode}, {args.params:,} parameters in {args.tensors} tensors, "
          f"{args.pairs} rounds, base {args.base}")  # fmt: skip
    for name in opts:
        print(f"{name:6s} median {statistics.median(times[name]) * 1e3:.3f} ms")
    print("base ÷ torch fused Adam  ", summary("base", "adam"))
    print("today ÷ torch fused Adam ", summary("today", "adam"))
    print("today ÷ base             ", summary("today", "base"))
    a, b = opts["base"], opts["today"]
    pa, pb = a.param_groups[0]["params"], b.param_groups[0]["params"]
    same = all(torch.equal(p, q) for p, q in zip(pa, pb)) and all(
        torch.equal(a.state[p]["lr_multiplier"], b.state[q]["lr_multiplier"])
        for p, q in zip(pa, pb)
    )
    print("same parameters and rates:", same)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
