"""The embedded default job: Adam vs AdamHD across initial learning rates on sklearn digits.

Run ``metalr`` (or ``metalr demo``). An MLP (64-64-10) trains for a fixed number of full-batch
steps from each initial lr with torch.optim.Adam and with metalr.AdamHD at its defaults; the table
shows the final validation loss and AdamHD's final mean effective rate.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import metalr

LRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """sklearn's bundled 8×8 digits (no download), standardised, 75/25 train/validation split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError('the demo needs scikit-learn: pip install "metalr[experiments]"') from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    cut = int(0.75 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def train(make_optimizer, data, steps: int, seed: int) -> tuple[float, torch.optim.Optimizer]:
    """Full-batch training of a 64-64-10 MLP; returns the final validation loss."""
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = make_optimizer(model.parameters())
    loss_fn = torch.nn.functional.cross_entropy
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(x_train), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        val = loss_fn(model(x_val), y_val).item()
    return (float("inf") if math.isnan(val) else val), optimizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metalr demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per cell (mean reported)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_digits_split()
    start = time.perf_counter()
    print(
        f"sklearn digits, MLP 64-64-10, {args.steps} full-batch steps, mean of {args.seeds} seeds"
    )
    print("| initial lr | Adam val loss | AdamHD val loss | AdamHD final mean lr |")
    print("|---:|---:|---:|---:|")
    for lr in LRS:
        adam, hd, eff = 0.0, 0.0, 0.0
        for seed in range(args.seeds):
            adam += train(lambda p, lr=lr: torch.optim.Adam(p, lr=lr), data, args.steps, seed)[0]
            loss, opt = train(lambda p, lr=lr: metalr.AdamHD(p, lr=lr), data, args.steps, seed)
            hd += loss
            eff += opt.lr_summary()[0]["mean"]
        n = args.seeds
        print(f"| {lr:g} | {adam / n:.4f} | {hd / n:.4f} | {eff / n:.3g} |")
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0
