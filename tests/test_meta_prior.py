"""LRPrior hand-off: the optimizer's first step from a prior IS the meta-learner's inner step."""

from __future__ import annotations

import copy

import pytest
import torch
from test_meta_common import SinusoidSampler, mlp, sinusoid_batch
from torch import nn

import metalr
from metalr.meta import LRPrior, MetaConfig, MetaLearner, load_prior, param_groups_from_prior


def _trained(rule: str, rates: str, backend: str = "vmap") -> MetaLearner:
    lr = 0.003 if rule == "adam_hd" else 0.02
    cfg = MetaConfig(inner_rule=rule, rates=rates, inner_lr=lr, meta_lr=0.05, meta_batch_size=4,
                     inner_steps=2, backend=backend)  # fmt: skip
    learner = MetaLearner(mlp((1, 8, 8, 1), dtype=torch.float64), cfg)
    learner.fit(SinusoidSampler(dtype=torch.float64), 3)  # rates (and β) differ per tensor
    return learner


def _first_step(optimizer: torch.optim.Optimizer, model: nn.Module, sx, sy) -> dict:
    optimizer.zero_grad()
    nn.functional.mse_loss(model(sx), sy).backward()
    optimizer.step()
    return dict(model.named_parameters())


@pytest.mark.parametrize(
    "rule,rates,make",
    [
        ("sgd", "element", lambda m, p: metalr.SGDHD(m.parameters(), granularity="element", foreach=False)),
        ("sgd", "tensor", lambda m, p: metalr.SGDHD(m.parameters(), foreach=False)),
        ("sgd_hd", "tensor", lambda m, p: metalr.SGDHD(param_groups_from_prior(m, p), foreach=False)),
        ("adam_hd", "tensor", lambda m, p: metalr.AdamHD(param_groups_from_prior(m, p), foreach=False)),
        ("adam_hd", "element",
         lambda m, p: metalr.AdamHD(param_groups_from_prior(m, p), granularity="element", foreach=False)),
    ],
)  # fmt: skip
def test_first_optimizer_step_from_a_prior_equals_the_inner_step(rule, rates, make) -> None:
    """Bit for bit on the single-tensor path (foreach=False), which runs the same pure step."""
    learner = _trained(rule, rates, backend="loop")
    prior = learner.export_prior()
    model = mlp(
        (1, 8, 8, 1), dtype=torch.float64, seed=5
    )  # other weights: the prior brings its own
    optimizer = make(model, prior)
    load_prior(optimizer, model, prior, load_weights=True)
    sx, sy, _, _ = (
        t[0] for t in sinusoid_batch(1, 10, 1, torch.Generator().manual_seed(9), torch.float64)
    )
    expected = learner.adapt(sx, sy, steps=1)
    stepped = _first_step(optimizer, model, sx, sy)
    for name, value in expected.items():
        assert torch.equal(stepped[name].detach(), value.detach()), name
    for p in model.parameters():  # the multiplier is the learned rate itself
        rate = optimizer.state[p]["lr_multiplier"]
        assert rate.dtype == metalr.functional.rate_dtype(p)


def test_foreach_path_from_a_prior_agrees_to_rounding() -> None:
    learner = _trained("sgd", "element")
    prior = learner.export_prior()
    model = mlp((1, 8, 8, 1), dtype=torch.float64, seed=5)
    optimizer = metalr.SGDHD(model.parameters(), granularity="element")  # foreach by default
    load_prior(optimizer, model, prior, load_weights=True)
    sx, sy, _, _ = (
        t[0] for t in sinusoid_batch(1, 10, 1, torch.Generator().manual_seed(9), torch.float64)
    )
    expected = learner.adapt(sx, sy, steps=1)
    stepped = _first_step(optimizer, model, sx, sy)
    for name, value in expected.items():
        torch.testing.assert_close(stepped[name].detach(), value.detach(), rtol=1e-15, atol=1e-15)


def test_prior_into_hyperlr_sets_the_effective_rates() -> None:
    learner = _trained("sgd", "tensor")
    prior = learner.export_prior()
    model = mlp((1, 8, 8, 1), dtype=torch.float64)
    optimizer = metalr.HyperLR(torch.optim.SGD(model.parameters(), lr=0.1))
    load_prior(optimizer, model, prior, set_lr=False)
    eff = optimizer.effective_lrs()
    for name, p in model.named_parameters():
        torch.testing.assert_close(eff[p], prior.rates[name], rtol=1e-15, atol=0)


def test_learned_hypergrad_lr_lands_in_one_group_per_parameter() -> None:
    learner = _trained("sgd_hd", "tensor")
    prior = learner.export_prior()
    model = mlp((1, 8, 8, 1), dtype=torch.float64)
    optimizer = metalr.SGDHD(param_groups_from_prior(model, prior))
    load_prior(optimizer, model, prior)
    for (name, _), group in zip(model.named_parameters(), optimizer.param_groups):
        assert group["hypergrad_lr"] == float(prior.hypergrad_lrs[name]) and group["lr"] == 1.0
    for group in optimizer.param_groups:  # the groups keep the rule the prior learned for
        assert group["rule"] == prior.hypergrad_rule
    shared = metalr.SGDHD(model.parameters(), rule=prior.hypergrad_rule)
    with pytest.raises(
        ValueError, match=r"different learned hypergrad_lr.*param_groups_from_prior"
    ):
        load_prior(shared, model, prior)


def test_missing_or_misshaped_parameters_are_named() -> None:
    prior = _trained("sgd", "element").export_prior()
    model = mlp((1, 8, 8, 1), dtype=torch.float64)
    missing = copy.deepcopy(prior)
    del missing.rates["2.bias"]
    with pytest.raises(ValueError, match=r"no rate for parameter '2\.bias'"):
        load_prior(metalr.SGDHD(model.parameters(), granularity="element"), model, missing)
    bad = copy.deepcopy(prior)
    bad.rates["0.weight"] = bad.rates["0.weight"][:4]
    with pytest.raises(
        ValueError, match=r"rate for parameter '0\.weight' has shape \(4, 1\), expected \(8, 1\)"
    ):
        load_prior(metalr.SGDHD(model.parameters(), granularity="element"), model, bad)
    other = mlp((1, 8, 1), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"not in the model: \['4\.bias', '4\.weight'\]"):
        load_prior(metalr.SGDHD(other.parameters(), granularity="element"), other, prior)
    with pytest.raises(ValueError, match=r"not a trainable parameter of the model"):
        load_prior(metalr.SGDHD(other.parameters(), granularity="element"), model, prior)


def test_granularity_and_rule_must_match() -> None:
    element = _trained("sgd", "element").export_prior()
    model = mlp((1, 8, 8, 1), dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"'element' rates but param group 0 uses granularity='tensor'"
    ):
        load_prior(metalr.SGDHD(model.parameters()), model, element)
    tensor = _trained("sgd", "tensor").export_prior()
    with pytest.raises(ValueError, match=r"'tensor' rates .* granularity='element'"):
        load_prior(metalr.SGDHD(model.parameters(), granularity="element"), model, tensor)
    with pytest.raises(ValueError, match=r"inner_rule='sgd' holds rates for SGDHD, not AdamHD"):
        load_prior(metalr.AdamHD(model.parameters()), model, tensor)
    with pytest.raises(TypeError, match=r"SGD is not a metalr optimizer"):
        load_prior(torch.optim.SGD(model.parameters(), lr=0.1), model, tensor)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_save_load_round_trip(tmp_path, fmt: str) -> None:
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    learner = MetaLearner(mlp((1, 4, 1)), MetaConfig(rates="step_tensor", inner_steps=3))
    prior = learner.export_prior()
    path = tmp_path / "prior.bin"
    prior.save(path, format=fmt)
    loaded = LRPrior.load(path)
    for kind in ("rates", "init_weights", "rate_schedule"):
        a, b = getattr(prior, kind), getattr(loaded, kind)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind
    assert loaded.hypergrad_lrs is None and loaded.granularity == "tensor"
    assert loaded.provenance["config"]["rates"] == "step_tensor"
    assert loaded.provenance["torch_version"] == torch.__version__
    if fmt == "torch":
        raw = torch.load(path, weights_only=True)  # plain tensors and a JSON string
        assert set(raw) == {"metadata", "tensors"}


def test_loading_something_else_fails(tmp_path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"metadata": '{"format": "other"}', "tensors": {}}, path)
    with pytest.raises(ValueError, match="is not a metalr LRPrior"):
        LRPrior.load(path)
    with pytest.raises(ValueError, match=r"Invalid granularity: 'group'"):
        LRPrior(rates={}, granularity="group", inner_rule="sgd")


def test_optimizers_do_not_import_the_meta_package() -> None:
    """Dependencies point one way: metalr.meta -> metalr.optim / functional, never back."""
    import ast
    from pathlib import Path

    root = Path(metalr.__file__).parent
    for sub in ("optim", "functional"):
        for path in (root / sub).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                assert not any(n.startswith("metalr.meta") for n in names), path


def test_repr_is_a_short_summary_not_every_tensor() -> None:
    learner = _trained("sgd_hd", "element")
    prior = learner.export_prior()
    text = repr(prior)
    assert str(prior) == text and "\n" not in text and len(text) < 300
    assert "tensor(" not in text  # no tensor dump
    n = sum(r.numel() for r in prior.rates.values())
    assert text.startswith(f"LRPrior({len(prior.rates)} tensors, {n} rates, ")
    assert "granularity='element'" in text and "inner_rule='sgd_hd'" in text
    assert "base_lr=1" in text and "init_weights: yes" in text
    flat = torch.cat([r.reshape(-1) for r in prior.rates.values()])
    assert f"rates in [{float(flat.min()):.4g}, {float(flat.max()):.4g}]" in text
    betas = [float(b) for b in prior.hypergrad_lrs.values()]
    assert f"hypergrad_lr: [{min(betas):.4g}, {max(betas):.4g}] (normalized)" in text
    plain = LRPrior({"w": torch.tensor(0.01)}, "tensor", "sgd")
    assert repr(plain) == ("LRPrior(1 tensor, 1 rate, granularity='tensor', inner_rule='sgd', "
                           "base_lr=1, rates in [0.01, 0.01], hypergrad_lr: no, init_weights: no)")  # fmt: skip
    lslr = MetaLearner(mlp((1, 4, 1)), MetaConfig(rates="step_tensor", inner_steps=3))
    assert "rate_schedule: 3 steps" in repr(lslr.export_prior())


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_file_has_the_usual_permissions(tmp_path, fmt: str, umask: int) -> None:
    """0o666 less the umask (0o644 under 022), as open() gives: not tempfile's 0o600."""
    import os
    import stat

    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    prior = LRPrior({"w": torch.tensor(0.01)}, "tensor", "sgd")
    previous = os.umask(umask)
    try:
        prior.save(tmp_path / "prior.bin", format=fmt)
        prior.save(tmp_path / "prior.bin", format=fmt)  # overwriting keeps the usual mode too
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "prior.bin").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["prior.bin"]  # no temporary left behind
    assert torch.equal(LRPrior.load(tmp_path / "prior.bin").rates["w"], prior.rates["w"])


def _trained_with(**config) -> MetaLearner:
    cfg = MetaConfig(meta_lr=0.05, meta_batch_size=4, inner_steps=2, backend="loop", **config)
    learner = MetaLearner(mlp((1, 8, 8, 1), dtype=torch.float64), cfg)
    learner.fit(SinusoidSampler(dtype=torch.float64), 3)
    return learner


def test_inner_constants_travel_with_the_prior_and_two_steps_match() -> None:
    """A prior learned with Adam betas (0.5, 0.9), eps 1e-3 and a rate floor: the groups of
    ``param_groups_from_prior`` carry them, so two optimizer steps equal ``learner.adapt(2)`` bit
    for bit (without them the first step differed by 3e-3); an optimizer built with other
    constants is refused by ``load_prior``, naming the constant."""
    learner = _trained_with(inner_rule="adam_hd", rates="tensor", inner_lr=0.003,
                            adam_betas=(0.5, 0.9), adam_eps=1e-3, lr_bounds=(1e-4, 1.0))  # fmt: skip
    prior = learner.export_prior()
    model = mlp((1, 8, 8, 1), dtype=torch.float64, seed=5)
    groups = param_groups_from_prior(model, prior)
    assert all(g["betas"] == (0.5, 0.9) and g["eps"] == 1e-3 and g["lr_bounds"] == (1e-4, 1.0)
               for g in groups)  # fmt: skip
    optimizer = metalr.AdamHD(groups, foreach=False)
    load_prior(optimizer, model, prior, load_weights=True)
    sx, sy, _, _ = (
        t[0] for t in sinusoid_batch(1, 10, 1, torch.Generator().manual_seed(9), torch.float64)
    )
    expected = learner.adapt(sx, sy, steps=2)
    for _ in range(2):
        stepped = _first_step(optimizer, model, sx, sy)
    for name, value in expected.items():
        assert torch.equal(stepped[name].detach(), value.detach()), name
    other = metalr.AdamHD(param_groups_from_prior(model, prior, betas=(0.9, 0.999)))
    with pytest.raises(ValueError, match=r"betas=\(0.5, 0.9\)"):
        load_prior(other, model, prior)


def test_a_prior_with_a_model_wide_hypergradient_warns_at_load() -> None:
    learner = _trained_with(inner_rule="sgd_hd", rates="tensor", inner_lr=0.02,
                            hypergrad_granularity="group")  # fmt: skip
    prior = learner.export_prior()
    model = mlp((1, 8, 8, 1), dtype=torch.float64, seed=5)
    optimizer = metalr.SGDHD(param_groups_from_prior(model, prior))
    with pytest.warns(UserWarning, match="hypergrad_granularity='group'"):
        load_prior(optimizer, model, prior)
