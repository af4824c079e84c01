"""DoG and Mechanic as workbench peers: built at their defaults, stepping, DoG's averaged eval."""

from __future__ import annotations

import pytest
import torch

from metalr.workbench import optimizers as O
from metalr.workbench import peers


def _model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(64, 5)
    y = x.sum(1, keepdim=True)
    return model, x, y


def _fit(opt, model, x, y, steps=30):
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.nn.functional.mse_loss(model(x), y).item()


@pytest.mark.parametrize("kind", ["dog", "mechanic"])
def test_peer_builds_at_its_defaults_and_goes_downhill(kind):
    pytest.importorskip(peers.PACKAGES[kind][0])
    model, x, y = _model_and_data()
    start = torch.nn.functional.mse_loss(model(x), y).item()
    opt = O.build_for_model({"kind": kind}, model, lr=None)
    assert not O.uses_lr({"kind": kind})  # lr-free: one run per seed
    assert _fit(opt, model, x, y, steps=300) < 0.5 * start  # both start from a tiny step


def test_dog_evaluates_at_its_average_and_trains_at_its_iterate():
    pytest.importorskip("dog")
    model, x, y = _model_and_data()
    opt = O.build_for_model({"kind": "dog"}, model, lr=None)
    _fit(opt, model, x, y, steps=10)
    iterate = [p.detach().clone() for p in model.parameters()]
    O.set_mode(opt, "eval")
    averaged = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(iterate, averaged))
    expected = list(opt._averager.averaged_model.parameters())
    assert all(torch.equal(a, e) for a, e in zip(averaged, expected))
    O.set_mode(opt, "eval")  # twice: no-op
    O.set_mode(opt, "train")
    assert all(torch.equal(a, b) for a, b in zip(iterate, model.parameters()))


def test_missing_peer_names_its_pip_package(monkeypatch):
    monkeypatch.setattr(O, "peer_available", lambda kind: False)
    with pytest.raises(ImportError, match='pip install "torch==2.13.0" dog-optimizer'):
        O.build_optimizer({"kind": "dog"}, [torch.nn.Parameter(torch.zeros(2))], None)


def test_install_hints_name_the_pip_packages():
    assert O.peer_package("dog") == "dog-optimizer"
    assert O.peer_package("mechanic") == "mechanic-pytorch"
    assert O.peer_package("prodigy") == "prodigyopt"
