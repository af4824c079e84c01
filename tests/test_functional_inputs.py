"""The pure functions check their own arguments (the optimizers check theirs at construction):
an unknown granularity or rule, per-parameter lists of different lengths, or a rate of the wrong
shape or dtype for its granularity, is a ValueError naming it — before, ``zip`` dropped the
extra entries, an unknown granularity ran as "tensor", an unknown rule ran as the sign rule at
element granularity, and a misshapen rate failed deep inside (a stack, a broadcast, finfo)."""

from __future__ import annotations

import pytest
import torch

import metalr.functional as F

W = [torch.randn(3), torch.randn(2)]


def _sgd(**kw):
    args = {"params": W, "grads": [torch.ones(3), torch.ones(2)], "momentum_buffers": [None, None],
            "prev_directions": [None, None], "rates": [torch.ones(()), torch.ones(())]}  # fmt: skip
    args.update({k: v for k, v in kw.items() if k in args})
    hyper = {"lr": 0.1, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False,
             "hypergrad_lr": 0.01, "rule": "normalized", "granularity": "tensor",
             "lr_bounds": (0.0, float("inf"))}  # fmt: skip
    hyper.update({k: v for k, v in kw.items() if k in hyper})
    return F.sgd_hd_step(*args.values(), **hyper)


def _adam(**kw):
    args = {"params": W, "grads": [torch.ones(3), torch.ones(2)],
            "exp_avgs": [torch.zeros(3), torch.zeros(2)], "exp_avg_sqs": [torch.zeros(3), torch.zeros(2)],
            "rates": [torch.ones(()), torch.ones(())], "steps": [torch.zeros(()), torch.zeros(())]}  # fmt: skip
    args.update({k: v for k, v in kw.items() if k in args})
    hyper = {"lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
             "decoupled_weight_decay": False, "hypergrad_lr": 0.01, "rule": "normalized",
             "granularity": "tensor", "lr_bounds": (0.0, float("inf"))}  # fmt: skip
    hyper.update({k: v for k, v in kw.items() if k in hyper})
    return F.adam_hd_step(*args.values(), **hyper)


@pytest.mark.parametrize("step", [_sgd, _adam], ids=["sgd", "adam"])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"granularity": "Tensor"}, "Invalid granularity: 'Tensor'"),
     ({"granularity": "per_tensor"}, "Invalid granularity"),
     ({"rule": "normalised"}, "Invalid rule: 'normalised'"),
     ({"rule": "normalised", "granularity": "element"}, "Invalid rule"),
     ({"grads": [torch.ones(3)]}, "different lengths.*'grads': 1"),
     ({"rates": [torch.ones(())]}, "different lengths.*'rates': 1"),
     ({"rates": [torch.ones(3), torch.ones(2)]}, r"rates\[0\]: shape \(3,\) at granularity 'tensor'"),
     ({"rates": [torch.ones(()), torch.ones(3)], "granularity": "element"},
      r"rates\[1\]: shape \(3,\) at granularity 'element'; expected 0-d or the parameter's shape \(2,\)"),
     ({"rates": [torch.ones((), dtype=torch.int64), torch.ones(())]}, r"rates\[0\]: dtype torch.int64")],
)  # fmt: skip
def test_pure_steps_refuse_bad_arguments(step, kwargs, match):
    with pytest.raises(ValueError, match=match):
        step(**kwargs)
    step()  # the same call with good arguments runs


def test_adam_steps_of_another_length_are_refused():
    with pytest.raises(ValueError, match="'steps': 1"):
        _adam(steps=[torch.zeros(())])


def test_lower_level_functions_check_granularity_and_lengths():
    with pytest.raises(ValueError, match="Invalid granularity: 'foo'"):
        F.initial_rate(W[0], "foo")
    with pytest.raises(ValueError, match="Invalid granularity"):
        F.hypergradient([torch.ones(3)], [torch.ones(3)], "layer")
    with pytest.raises(ValueError, match="different lengths"):
        F.inner_products([torch.ones(3), torch.ones(2)], [torch.ones(3)], "tensor", False)
    with pytest.raises(ValueError, match="Invalid rule"):
        F.update_rates([torch.ones(())], [torch.ones(())], None, None, lr=0.1, hypergrad_lr=0.1,
                       rule="sign", granularity="tensor", lr_bounds=(0.0, 1.0))  # fmt: skip


@pytest.mark.parametrize("step", [_sgd, _adam], ids=["sgd", "adam"])
def test_element_rates_may_be_the_parameters_shape_or_broadcast_from_0d(step):
    full = step(rates=[torch.ones(3), torch.ones(2)], granularity="element")
    broadcast = step(rates=[torch.ones(()), torch.ones(())], granularity="element")
    for a, b in zip(full.params, broadcast.params):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("step", [_sgd, _adam], ids=["sgd", "adam"])
def test_element_rates_vmap_alone(step):
    """``vmap`` over the rates only (a population of per-element rates for one gradient): the
    sign rule's in-place product could not take a batched rate (a RuntimeError from vmap)."""
    batch = [torch.rand(4, 3) + 0.5, torch.rand(4, 2) + 0.5]
    vmapped = torch.vmap(lambda a, b: step(rates=[a, b], granularity="element").rates)(*batch)
    for i in range(4):
        one = step(rates=[batch[0][i], batch[1][i]], granularity="element").rates
        for v, o in zip(vmapped, one):
            torch.testing.assert_close(v[i], o)
