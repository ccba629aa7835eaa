"""Factored (ghost) gradient inner products against per-example gradients from vmap."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from attrib_core import (
    Captured,
    capture,
    concat_captured,
    factored_cost,
    factored_dense,
    factored_inner,
    factored_rowwise,
    factored_sq_norms,
    layer_specs,
    per_sample_grad,
)
from tests.helpers import classification_batch, cross_entropy_loss, params_of, small_mlp

DT = torch.float64


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class Tokens(nn.Module):
    """A Linear layer applied at every position of a sequence, then pooled."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)).mean(1))


def setting(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        model = small_mlp(0, (5, 7, 4))
        batch = classification_batch(1, 9, 5, 4)
    elif kind == "cnn":
        model = TinyCNN().double()
        batch = (torch.randn(6, 1, 4, 4, dtype=DT), torch.randint(0, 5, (6,)))
    else:
        model = Tokens().double()
        batch = (torch.randn(7, 5, 4, dtype=DT), torch.randint(0, 3, (7,)))
    return model, cross_entropy_loss(model), params_of(model), batch


@pytest.mark.parametrize("kind", ["mlp", "cnn", "tokens"])
def test_factors_reproduce_per_example_gradients_and_their_products(kind):
    model, f, params, batch = setting(kind)
    specs = layer_specs(model, params, None)
    names = list(params)
    G = per_sample_grad(f)(params, batch)
    factors = capture(model, f, params, batch, specs, reduction="mean")
    torch.testing.assert_close(factored_dense(factors, specs, names), G)
    half = len(batch[1]) // 2
    first = {m: Captured(c.a[:half], c.ds[:half], 0) for m, c in factors.items()}
    second = {m: Captured(c.a[half:], c.ds[half:], 0) for m, c in factors.items()}
    torch.testing.assert_close(factored_inner(first, second), G[:half] @ G[half:].T)
    torch.testing.assert_close(factored_sq_norms(factors), G.pow(2).sum(1))
    joined = concat_captured([first, second])
    torch.testing.assert_close(factored_inner(joined, joined), G @ G.T)


@given(n=st.integers(1, 4), m=st.integers(1, 4), t=st.integers(1, 3), s=st.integers(1, 3),
       d_a=st.integers(1, 5), d_out=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_inner_and_rowwise_equal_the_dense_gradients(n, m, t, s, d_a, d_out, seed):
    g = torch.Generator().manual_seed(seed)

    def factors(rows, positions):
        a = torch.randn(rows, positions, d_a, generator=g, dtype=DT)
        ds = torch.randn(rows, positions, d_out, generator=g, dtype=DT)
        return {"layer": Captured(a, ds, rows * positions)}

    x, y, z = factors(n, t), factors(m, s), factors(n, s)
    dense = {k: torch.einsum("ntd,nta->nda", v.ds, v.a).reshape(v.a.shape[0], -1)
             for k, v in (("x", x["layer"]), ("y", y["layer"]), ("z", z["layer"]))}
    torch.testing.assert_close(factored_inner(x, y), dense["x"] @ dense["y"].T)
    torch.testing.assert_close(factored_rowwise(x, z), (dense["x"] * dense["z"]).sum(1))


def test_cost_and_bad_input():
    model, f, params, batch = setting("mlp")
    specs = layer_specs(model, params, None)
    factored, dense = factored_cost(specs, {s.module: 1 for s in specs})
    assert (factored, dense) == (6 + 7 + 8 + 4, 6 * 7 + 8 * 4)
    factors = capture(model, f, params, batch, specs)
    with pytest.raises(ValueError, match="different layers"):
        factored_inner(factors, {"0": factors["0"]})
    with pytest.raises(ValueError, match="not the weight or bias"):
        factored_dense(factors, specs[:1], list(params))
