"""Trainer and logger integrations, on tiny CPU models: Lightning and TensorBoard
(transformers' Trainer: ``test_integrations_transformers.py``).

* Lightning: ``configure_optimizers`` returning a metalr optimizer, alone and with a OneCycleLR in
  the ``lr_scheduler`` dict; checkpoint through the Trainer and resume with ``ckpt_path=`` gives the
  weights and effective rates of an uninterrupted run bit for bit; ``EffectiveLRMonitor`` logs.
* TensorBoard: ``log_effective_lrs`` writes what the event file reads back.

Each framework is skipped when it is not installed (``pip install "metalr[integrations]"``).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _integration_checks import assert_effective_is_lr_times_multiplier, multipliers
from torch import nn
from torch.nn import functional as F

import metalr
from metalr.integrations import effective_lr_stats, unwrap_optimizer
from metalr.optim._base import RATE_KEY

# Lightning 2.6 on torch 2.13 warns about its own use of a deprecated pytree API.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")


# --------------------------------------------------------------------------------- no framework
def test_integrations_import_no_framework() -> None:
    """``import metalr.integrations`` (and the TensorBoard helper) import no framework."""
    code = (
        "import sys, metalr, metalr.integrations, metalr.integrations.tensorboard\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'tensorboard',"
        " 'torch.utils.tensorboard') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_effective_lr_stats_tags_and_values() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    opt = metalr.SGDHD(
        [
            {"params": model[0].parameters(), "granularity": "element"},
            {"params": model[1].parameters(), "lr": 0.05},
        ],
        lr=0.1,
        momentum=0.9,
        hypergrad_lr=0.1,
    )
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
    stats = effective_lr_stats(opt, model)
    summary = opt.lr_summary()
    for i, s in enumerate(summary):
        for k in ("min", "mean", "max"):
            assert stats[f"effective_lr/group{i}/{k}"] == pytest.approx(s[k], rel=1e-12)
    eff = opt.effective_lrs()
    assert stats["effective_lr/0.weight/max"] == pytest.approx(eff[model[0].weight].max().item())
    assert stats["effective_lr/1.weight"] == pytest.approx(eff[model[1].weight].item())
    unnamed = effective_lr_stats(opt, per_tensor=True, prefix="lr")
    assert "lr/group1.param1" in unnamed
    assert not any("weight" in k for k in effective_lr_stats(opt, model, per_tensor=False))
    # lrs= replaces group['lr'] (e.g. the lr of the step just taken) and leaves it as it was.
    swapped = effective_lr_stats(opt, model, lrs=[0.2, 0.5])
    assert swapped["effective_lr/1.weight"] == pytest.approx(
        opt.state[model[1].weight][RATE_KEY].item() * 0.5, rel=1e-6
    )
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.05]
    with pytest.raises(ValueError, match="param groups"):
        effective_lr_stats(opt, lrs=[0.1])
    plain = torch.optim.SGD(model.parameters(), lr=0.3)
    assert effective_lr_stats(plain)["effective_lr/group0/mean"] == pytest.approx(0.3)


# ----------------------------------------------------------------------------------- Lightning
def _lightning():
    return pytest.importorskip("lightning.pytorch", reason="needs lightning")


def _lightning_module(L, scheduler: str | None, granularity: str, total_steps: int):
    class TinyRegression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = metalr.AdamHD(
                self.parameters(), lr=1e-2, hypergrad_lr=0.05, granularity=granularity
            )
            if scheduler is None:
                return opt
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-2, total_steps=total_steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return TinyRegression()


def _loader(n: int = 40, batch: int = 8) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(x.sum(-1, keepdim=True))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _trainer(L, tmp_path, **kwargs):
    defaults = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp_path), "log_every_n_steps": 1,
    }  # fmt: skip
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.mark.parametrize("scheduler", [None, "onecycle"])
def test_lightning_fit_adapts(tmp_path, scheduler) -> None:
    L = _lightning()
    L.seed_everything(0, verbose=False)
    module = _lightning_module(L, scheduler, "tensor", total_steps=10)
    trainer = _trainer(L, tmp_path, max_epochs=2)
    trainer.fit(module, _loader())
    assert trainer.global_step == 10
    opt = unwrap_optimizer(trainer.optimizers[0])
    assert isinstance(opt, metalr.AdamHD)
    assert unwrap_optimizer(module.optimizers()) is opt  # through the LightningOptimizer wrapper
    mult = multipliers(opt)
    assert all(torch.isfinite(m).all() and (m != 1).all() for m in mult)
    assert_effective_is_lr_times_multiplier(opt)
    if scheduler:  # the scheduler ran every step and wrote group['lr']
        sched = trainer.lr_scheduler_configs[0].scheduler
        assert sched.last_epoch == 10
        assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0] != 1e-2


def test_lightning_closure_feeds_the_spike_guard(tmp_path) -> None:
    """Lightning steps with a closure that returns the training loss: the guard sees every one
    (the same value as the module's own loss) with no change to the training loop."""
    L = _lightning()
    L.seed_everything(0, verbose=False)
    seen: list[float] = []

    class Guarded(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.mse_loss(self.net(x), y)
            seen.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return metalr.AdamHD(self.parameters(), lr=1e-2, spike_guard={"warmup": 3.0})

    module = Guarded()
    trainer = _trainer(L, tmp_path, max_epochs=2)
    trainer.fit(module, _loader())
    summary = unwrap_optimizer(trainer.optimizers[0]).spike_summary()
    assert summary[0]["losses"] == len(seen) == 10
    mean = seen[0]
    for loss in seen[1:]:  # the guard's running mean (no spike in this run)
        mean += (1 - 0.95) * (loss - mean)
    assert summary[0]["mean"] == pytest.approx(mean, rel=1e-5)
    assert summary[0]["spikes"] == 0


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("scheduler", [None, "onecycle"])
def test_lightning_checkpoint_resume_exact(tmp_path, scheduler) -> None:
    """Checkpoint after epoch 1 via ModelCheckpoint, resume with ckpt_path= in a new Trainer."""
    L = _lightning()
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0, verbose=False)
    straight = _lightning_module(L, scheduler, "element", total_steps=10)
    _trainer(L, tmp_path / "a", max_epochs=2).fit(straight, _loader())

    L.seed_everything(0, verbose=False)
    first = _lightning_module(L, scheduler, "element", total_steps=10)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _trainer(L, tmp_path / "b", max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(
        first, _loader()
    )
    path = ckpt.best_model_path or ckpt.last_model_path
    assert path, "no checkpoint written"

    L.seed_everything(123, verbose=False)  # different initial weights: all must come from ckpt
    resumed = _lightning_module(L, scheduler, "element", total_steps=10)
    trainer = _trainer(L, tmp_path / "c", max_epochs=2)
    trainer.fit(resumed, _loader(), ckpt_path=path)
    assert trainer.global_step == 10

    opt_a = straight.trainer.optimizers[0]
    opt_c = trainer.optimizers[0]
    eff_a = list(opt_a.effective_lrs().values())
    eff_c = list(opt_c.effective_lrs().values())
    assert all(torch.equal(a, c) for a, c in zip(eff_a, eff_c, strict=True))
    assert any((m != 1).any() for m in multipliers(opt_c))
    for pa, pc in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pc)


def _memory_logger(L):
    from lightning.pytorch.loggers import Logger

    class MemoryLogger(Logger):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[int, dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "memory"

        @property
        def version(self) -> int:
            return 0

        def log_metrics(self, metrics, step=None) -> None:
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

    return MemoryLogger()


@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_lightning_effective_lr_monitor(tmp_path, granularity, per_tensor) -> None:
    L = _lightning()
    from metalr.integrations.lightning import EffectiveLRMonitor

    L.seed_everything(0, verbose=False)
    module = _lightning_module(L, "onecycle", granularity, total_steps=10)
    logger = _memory_logger(L)
    monitor = EffectiveLRMonitor(logging_interval=2, per_tensor=per_tensor)
    used: dict[int, tuple[float, list[torch.Tensor]]] = {}  # step -> (lr it used, multipliers)

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            used[trainer.global_step] = (self.lr, multipliers(trainer.optimizers[0]))

    callbacks = [monitor, Record()]
    trainer = _trainer(L, tmp_path, max_epochs=2, logger=logger, callbacks=callbacks)
    trainer.fit(module, _loader())

    rows = [(s, m) for s, m in logger.rows if any(k.startswith("effective_lr/") for k in m)]
    assert [s for s, _ in rows] == [2, 4, 6, 8, 10]
    assert rows[-1][1] == monitor.last_metrics
    lrs = {lr for lr, _ in used.values()}
    assert len(lrs) == 10  # OneCycleLR moved the lr every step
    for step, metrics in rows:  # the rates each logged step used: its lr × its multipliers
        lr, mult = used[step]
        rates = torch.cat([(m.double() * lr).reshape(-1) for m in mult])
        assert metrics["effective_lr/group0/min"] == pytest.approx(rates.min().item(), rel=1e-6)
        assert metrics["effective_lr/group0/mean"] == pytest.approx(rates.mean().item(), rel=1e-6)
        assert metrics["effective_lr/group0/max"] == pytest.approx(rates.max().item(), rel=1e-6)
    last = rows[-1][1]
    layer_keys = {k for k in last if "net." in k}
    if not per_tensor:
        assert not layer_keys
    elif granularity == "tensor":
        assert layer_keys == {
            f"effective_lr/net.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")
        }
        lr, mult = used[10]
        assert last["effective_lr/net.0.weight"] == pytest.approx(lr * mult[0].item(), rel=1e-6)
    else:
        # min/mean/max per tensor; the one-element output bias has a single rate.
        assert (
            "effective_lr/net.0.weight/max" in layer_keys
            and "effective_lr/net.2.bias" in layer_keys
        )
        assert len(layer_keys) == 3 * 3 + 1


# --------------------------------------------------------------------------------- TensorBoard
@pytest.mark.parametrize("granularity", ["tensor", "element"])
def test_tensorboard_log_effective_lrs(tmp_path, granularity) -> None:
    pytest.importorskip("tensorboard", reason="needs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from metalr.integrations.tensorboard import log_effective_lrs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 1))
    opt = metalr.AdamHD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}],
        lr=1e-2, hypergrad_lr=0.05, granularity=granularity,
    )  # fmt: skip
    x = torch.randn(32, 5)
    y = x[:, :1] - x[:, 1:2]
    writer = SummaryWriter(log_dir=str(tmp_path))
    written = []
    for step in range(1, 9):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if step % 2 == 0:
            written.append(
                (
                    step,
                    log_effective_lrs(writer, opt, step, model.named_parameters(), histograms=True),
                )
            )
    writer.close()

    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == set(written[-1][1])
    for i in (0, 1):
        assert {f"effective_lr/group{i}/{k}" for k in ("min", "mean", "max")} <= tags
    layer = "effective_lr/0.weight" + ("" if granularity == "tensor" else "/mean")
    assert layer in tags
    for tag in tags:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [2, 4, 6, 8]
        for e, (_, values) in zip(events, written, strict=True):
            assert e.value == pytest.approx(values[tag], rel=1e-6)  # stored as float32
    final = opt.lr_summary()
    assert acc.Scalars("effective_lr/group1/max")[-1].value == pytest.approx(
        final[1]["max"], rel=1e-6
    )
    histos = set(acc.Tags()["histograms"])
    assert bool(histos) == (granularity == "element")
