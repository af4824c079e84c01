"""Benchmark ``optimizer.step()`` of metalr's optimizers against ``torch.optim``.

A thin wrapper around :func:`metalr.bench.main`; see :mod:`metalr.bench` for what is measured.

    python experiments/bench_step.py                                # CPU, ~5M params, 1 thread
    python experiments/bench_step.py --device cuda                  # CUDA, ~100M params
    python experiments/bench_step.py --params 200000 --repeats 5 --output results/bench_small
"""

from __future__ import annotations

import sys

from metalr.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
