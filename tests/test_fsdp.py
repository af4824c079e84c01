"""FSDP2 (``fully_shard``, DTensor parameters), 2 gloo processes on CPU.

Every tensor is sharded across ranks, so per-tensor sums (the tensor-granularity inner product
and the normalized rule's norms) must cover every rank: the rules reduce DTensor sums to their
full value. Sharded training then equals single-process training on the same global batch, for
every granularity.
"""

from __future__ import annotations

import pytest
import torch
from _distributed import run_ranks
from test_zero import STEPS, _data, _model

import metalr

MAKERS = {
    "AdamHD": lambda p, g: metalr.AdamHD(p, lr=1e-2, hypergrad_lr=0.1, granularity=g),
    "SGDHD": lambda p, g: metalr.SGDHD(p, lr=0.05, momentum=0.9, hypergrad_lr=0.1, granularity=g),
    "HyperLR": lambda p, g: metalr.HyperLR(
        torch.optim.Adam(p, lr=1e-2), hypergrad_lr=0.1, granularity=g
    ),
    # the long-horizon signal: its trails are sharded like the parameters, its sums reduced
    # (turn_threshold 1: settled after the first step, so the later steps read the trail)
    "AdamHD_horizon": lambda p, g: metalr.AdamHD(
        p, lr=1e-2, hypergrad_lr=0.1, granularity=g, seek={"horizon": 0.9, "turn_threshold": 1.0}
    ),
}


CONFIGS = [(name, g) for name in MAKERS for g in ("group", "tensor", "element")]
# the spike guard: rank 0's loss (its value only) spikes at one step; the ranks average it
GUARDED = [("AdamHD", "tensor"), ("AdamHD", "element"), ("SGDHD", "group")]
GUARD = {"warmup": 3.0, "sigmas": 3.0}
SPIKE_AT, SPIKE = 6, 100.0


def _model_at(seed: int | None = None) -> torch.nn.Module:
    """``_model()``; ``seed``: another initialisation (that seed's noise added)."""
    model = _model()
    if seed is not None:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _sharded_model(seed: int | None = None) -> torch.nn.Module:
    """:func:`_model_at` sharded per layer."""
    from torch.distributed.fsdp import fully_shard

    model = _model_at(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _sharded_steps(rank: int, model, opt, steps: range) -> None:
    """Training steps on this rank's half of each batch; rank 0's loss spikes at SPIKE_AT."""
    for step in steps:
        x, y = _data(step)
        half = slice(rank * 4, rank * 4 + 4)

        def closure(x=x[half], y=y[half], step=step):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss.detach() + (SPIKE if rank == 0 and step == SPIKE_AT else 0.0)

        opt.step(closure)


def _train_sharded(rank: int, name: str, granularity: str, guard: bool = False) -> dict:
    model = _sharded_model()
    opt = MAKERS[name](model.parameters(), granularity)
    if guard:
        opt = type(opt)(model.parameters(), **{**opt.defaults, "spike_guard": GUARD})
    _sharded_steps(rank, model, opt, range(STEPS))
    params = [p.full_tensor().detach().clone() for p in model.parameters()]
    rates = []
    for p in model.parameters():
        rate = opt.state[p]["lr_multiplier"]
        rates.append(rate.full_tensor() if hasattr(rate, "full_tensor") else rate.clone())
    return {"params": params, "rates": rates}


def _fsdp_rank(rank: int) -> dict:
    """One process group for every configuration (start-up dominates the cost)."""
    results = {f"{n}-{g}": _train_sharded(rank, n, g) for n, g in CONFIGS}
    results.update({f"{n}-{g}-guard": _train_sharded(rank, n, g, guard=True) for n, g in GUARDED})
    return results


@pytest.fixture(scope="module")
def sharded_results():
    return run_ranks(_fsdp_rank)[0]


@pytest.mark.parametrize("name,granularity", CONFIGS)
def test_fsdp2_equals_single_process(sharded_results, name, granularity):
    result = sharded_results[f"{name}-{granularity}"]
    model = _model()
    opt = MAKERS[name](model.parameters(), granularity)
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for p, q in zip(result["params"], model.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-9, atol=1e-12)
    for rate, p in zip(result["rates"], model.parameters()):
        torch.testing.assert_close(rate, opt.state[p]["lr_multiplier"], rtol=1e-9, atol=0)
    assert any((r != 1).any() for r in result["rates"]), "rates never adapted"


@pytest.mark.parametrize("name,granularity", GUARDED)
def test_fsdp2_spike_guard_equals_single_process(sharded_results, name, granularity):
    """The guard averages the ranks' losses: one process whose loss is their mean (plus half
    rank 0's spike) cuts at the same step and ends with the same weights and rates."""
    result = sharded_results[f"{name}-{granularity}-guard"]
    model = _model()
    plain = MAKERS[name](model.parameters(), granularity)
    opt = type(plain)(model.parameters(), **{**plain.defaults, "spike_guard": GUARD})
    for step in range(STEPS):
        x, y = _data(step)

        def closure(x=x, y=y, step=step):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss.detach() + (SPIKE / 2 if step == SPIKE_AT else 0.0)

        opt.step(closure)
    assert opt.spike_summary()[0]["spikes"] >= 1  # rank 0's spike (random targets add one)
    for p, q in zip(result["params"], model.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-9, atol=1e-12)
    for rate, p in zip(result["rates"], model.parameters()):
        torch.testing.assert_close(rate, opt.state[p]["lr_multiplier"], rtol=1e-9, atol=0)


# torch.distributed.checkpoint under FSDP2: a run saved halfway and loaded into a fresh sharded
# model and optimizer (another initialisation, DCP's template) ends as the run that went on.
DCP_MAKERS = {
    "AdamHD-guard": lambda ps: metalr.AdamHD(ps, lr=1e-2, hypergrad_lr=0.1, spike_guard=GUARD),
    "SGDHD-element": lambda ps: metalr.SGDHD(
        ps, lr=0.05, momentum=0.9, hypergrad_lr=0.1, granularity="element"
    ),
    "HyperLR-Adam": lambda ps: metalr.HyperLR(torch.optim.Adam(ps, lr=1e-2), hypergrad_lr=0.1),
}
#: The runs: each maker, and two of them with ``flatten_optimizer_state_dict=True`` (torchtitan's
#: choice: the loader rebuilds each parameter's entry from the live state's keys).
DCP_RUNS = {**{name: (name, False) for name in DCP_MAKERS},
            "AdamHD-guard-flattened": ("AdamHD-guard", True),
            "HyperLR-Adam-flattened": ("HyperLR-Adam", True)}  # fmt: skip


def _dcp_rank(rank: int, directory: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    results = {}
    for name, (maker, flattened) in DCP_RUNS.items():
        make = DCP_MAKERS[maker]
        options = StateDictOptions(flatten_optimizer_state_dict=flattened)
        model = _sharded_model(0)
        opt = make(model.parameters())
        _sharded_steps(rank, model, opt, range(STEPS // 2))
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, opt, options=options),
        }
        dcp.save(state, checkpoint_id=f"{directory}/{name}")
        _sharded_steps(rank, model, opt, range(STEPS // 2, STEPS))

        loaded_model = _sharded_model(1)
        loaded = make(loaded_model.parameters())
        template = {
            "model": get_model_state_dict(loaded_model),
            "optim": get_optimizer_state_dict(loaded_model, loaded, options=options),
        }
        dcp.load(template, checkpoint_id=f"{directory}/{name}")
        set_model_state_dict(loaded_model, template["model"])
        set_optimizer_state_dict(loaded_model, loaded, template["optim"], options=options)
        _sharded_steps(rank, loaded_model, loaded, range(STEPS // 2, STEPS))
        results[name] = {
            run: [p.full_tensor().detach().clone() for p in m.parameters()]
            for run, m in (("went_on", model), ("resumed", loaded_model))
        }
        results[name]["summaries"] = [o.spike_summary() for o in (opt, loaded)]
    return results


@pytest.fixture(scope="module")
def dcp_results(tmp_path_factory):
    return run_ranks(_dcp_rank, str(tmp_path_factory.mktemp("dcp")))[0]


@pytest.mark.parametrize("name", list(DCP_RUNS))
def test_fsdp2_dcp_checkpoint_resumes_exactly(dcp_results, name):
    result = dcp_results[name]
    for p, q in zip(result["went_on"], result["resumed"]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    went_on, resumed = result["summaries"]
    assert resumed == went_on
    if name.startswith("AdamHD-guard"):  # the guard's statistics came through: every loss
        assert resumed[0]["losses"] == STEPS


# observe_validation under FSDP2 is refused: its autograd leaves are FSDP2's gathered copies of
# the parameters, and its own backward would write other optimizers' .grad, fire
# post-accumulate-grad hooks and mix with accumulated gradients.
def _observing_rank(rank: int) -> str:
    model = _sharded_model()
    opt = metalr.AdamHD(model.parameters(), lr=1e-2)
    _sharded_steps(rank, model, opt, range(2))
    grads = [p.grad for p in model.parameters()]
    try:
        opt.observe_validation(torch.nn.functional.mse_loss(model(_data(9)[0]), _data(9)[1]))
    except NotImplementedError as exc:
        assert all(g is p.grad for g, p in zip(grads, model.parameters()))
        return str(exc)
    return ""


def test_fsdp2_observe_validation_is_refused():
    messages = run_ranks(_observing_rank)
    assert all("does not support sharded (FSDP2 / DTensor)" in m for m in messages)
