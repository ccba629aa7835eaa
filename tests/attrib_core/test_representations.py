"""One set of representation operations for dense gradients and factored ones: the same numbers either way."""

import torch
from torch import nn
from torch.func import functional_call

from attrib_core import (
    capture_per_example,
    factored_dense,
    factored_plan,
    layer_specs,
    per_sample_grad,
    rep_concat,
    rep_inner,
    rep_normalized,
    rep_rows,
    rep_rowwise,
    rep_slice,
)

model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
params = {k: v.detach() for k, v in model.named_parameters()}
g = torch.Generator().manual_seed(0)
batch = (torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (6,), generator=g))


def loss(p, b):
    return nn.functional.cross_entropy(functional_call(model, p, (b[0],)), b[1])


def penalised(p, b):
    return loss(p, b) + 1e-2 * p["0.weight"].pow(2).sum()


def test_dense_and_factored_representations_agree():
    specs = layer_specs(model, params, None)
    factored = capture_per_example(model, loss, params, batch, specs)
    dense = per_sample_grad(loss)(params, batch)
    torch.testing.assert_close(factored_dense(factored, specs, list(params)), dense)
    for a, b in [(factored, factored), (dense, dense)]:
        assert rep_rows(a) == 6
        torch.testing.assert_close(rep_inner(a, b), dense @ dense.T)
        torch.testing.assert_close(rep_rowwise(a, b), (dense * dense).sum(1))
        unit = rep_normalized(a)
        torch.testing.assert_close(rep_rowwise(unit, unit), torch.ones(6, dtype=torch.float64))
        joined = rep_concat([rep_slice(a, 0, 2), rep_slice(a, 2, 6)])
        torch.testing.assert_close(rep_inner(joined, b), dense @ dense.T)


def test_the_factored_plan_needs_every_parameter_in_a_layer_and_an_exact_capture():
    assert factored_plan(model, (loss,), params, list(params), batch) is not None
    assert factored_plan(model, (loss, penalised), params, list(params), batch) is None  # reads a weight directly
    only_head = ["2.weight", "2.bias"]
    plan = factored_plan(model, (loss,), params, only_head, batch)
    assert [s.module for s in plan] == ["2"]
