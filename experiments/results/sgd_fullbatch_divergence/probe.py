"""SGD-HD without momentum on full-batch gradients: a known divergence (a probe, 2026-12-08).

    python experiments/results/sgd_fullbatch_divergence/probe.py     # ~1 min on 2 cores

A 2-layer tanh MLP (8 → 64 → 1) and a 3-layer ReLU MLP regress 256 Gaussian points on Gaussian
targets for 300 steps, full batch or minibatches of 32, from lr 1e-3, 1e-2 and 1e-1, with
SGD-HD at its defaults (momentum 0), SGD-HD with momentum 0.9 (what its constants were fitted
with) and torch.optim.SGD; seed 0. Prints the final training loss and its peak over the run
(``inf``: the run diverged). README's SGD-HD paragraph states the finding.
"""

import math

import torch

import metalr


def _tanh_mlp():
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def _relu_mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 1),
    )  # fmt: skip


OPTIMIZERS = {
    "SGD-HD (defaults)": lambda p, lr: metalr.SGDHD(p, lr=lr),
    "SGD-HD momentum 0.9": lambda p, lr: metalr.SGDHD(p, lr=lr, momentum=0.9),
    "SGD": lambda p, lr: torch.optim.SGD(p, lr=lr),
}


def run(make, model_fn, lr, batch, steps=300, seed=0):
    """Final and peak training loss (``inf`` once a loss is not finite)."""
    torch.manual_seed(seed)
    model = model_fn()
    inputs, targets = torch.randn(256, 8), torch.randn(256, 1)
    opt = make(model.parameters(), lr)
    peak = 0.0
    for _ in range(steps):
        if batch:
            idx = torch.randint(0, 256, (batch,))
            x, y = inputs[idx], targets[idx]
        else:
            x, y = inputs, targets
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        peak = max(peak, loss.item()) if math.isfinite(loss.item()) else math.inf
    return (loss.item() if math.isfinite(peak) else math.inf), peak


def main():
    torch.set_num_threads(1)
    print("| model | batch | lr | " + " | ".join(OPTIMIZERS) + " |")
    print("|---|---|---:|" + "---|" * len(OPTIMIZERS))
    for name, model_fn in (("tanh MLP", _tanh_mlp), ("ReLU MLP", _relu_mlp)):
        for batch in (None, 32):
            for lr in (1e-3, 1e-2, 1e-1):
                cells = [run(make, model_fn, lr, batch) for make in OPTIMIZERS.values()]
                text = " | ".join(f"{final:.3g} (peak {peak:.3g})" for final, peak in cells)
                print(f"| {name} | {batch or 'full'} | {lr:g} | {text} |")


if __name__ == "__main__":
    main()
