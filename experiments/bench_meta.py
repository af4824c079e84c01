"""Benchmark meta-tasks/s of the meta-learner (Meta-SGD on sinusoid) against higher and learn2learn.

A thin wrapper around :func:`metalr.meta.benchmark.main`; see :mod:`metalr.meta.benchmark` for
what is measured. learn2learn rows need a separate benchmark-only environment (see README /
``/work/shared/ENV.md``); without learn2learn the ratios are against metalr's loop backend.

    python experiments/bench_meta.py                                  # 1 and 5 inner steps, 1 thread
    python experiments/bench_meta.py --output experiments/results/bench_meta
    python experiments/bench_meta.py --rounds 3 --iterations 2 --steps 1
"""

from __future__ import annotations

import sys

from metalr.meta.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
