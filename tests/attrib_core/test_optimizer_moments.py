"""Adam's second moments read from a state dict, and their rank-one fit applied to layer factors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from attrib_core import Captured, LayerSpec, adam_second_moments, dense_scales, factored_dense, factored_scales
from attrib_core import scale_factors, scale_gradient


def test_adam_second_moments_are_the_bias_corrected_exp_avg_sq():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    names = [n for n, _ in model.named_parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    squares = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for step in range(1, 4):
        optimizer.zero_grad()
        model(torch.randn(5, 3)).pow(2).sum().backward()
        for n, p in model.named_parameters():  # Adam's recursion, written out
            squares[n] = 0.95 * squares[n] + 0.05 * p.grad.pow(2)
        optimizer.step()
    moments = adam_second_moments(optimizer.state_dict(), names)
    for n in names:
        torch.testing.assert_close(moments[n], squares[n] / (1 - 0.95 ** 3))
    expected = torch.cat([1 / (squares[n].reshape(-1).double() / (1 - 0.95 ** 3)).sqrt().add(1e-8) for n in names])
    torch.testing.assert_close(dense_scales(moments, names), expected)
    with pytest.raises(ValueError, match="one name per optimizer parameter"):
        adam_second_moments(optimizer.state_dict(), names[:-1])
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    sgd.step()
    with pytest.raises(ValueError, match="no exp_avg_sq"):
        adam_second_moments(sgd.state_dict(), names)


@given(n=st.integers(1, 3), t=st.integers(1, 3), d_in=st.integers(1, 5), d_out=st.integers(1, 4),
       bias=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_a_rank_one_second_moment_scales_the_factors_exactly(n, t, d_in, d_out, bias, transposed, seed):
    g = torch.Generator().manual_seed(seed)
    kind = "conv1d" if transposed else "linear"
    spec = LayerSpec("fc", kind, "fc.weight", "fc.bias" if bias else None, d_in, d_out)
    d_a = d_in + bias
    a = torch.randn(n, t, d_a, generator=g, dtype=torch.float64)
    if bias:
        a[..., -1] = 1.0
    ds = torch.randn(n, t, d_out, generator=g, dtype=torch.float64)
    rows = torch.rand(d_out, generator=g, dtype=torch.float64) + 0.1
    cols = torch.rand(d_a, generator=g, dtype=torch.float64) + 0.1
    v = torch.outer(rows, cols)  # (d_out, d_a): Adafactor's rank-one form
    moments = {"fc.weight": (v[:, :d_in].T if transposed else v[:, :d_in]).contiguous()}
    if bias:
        moments["fc.bias"] = v[:, d_in].clone()
    names = ["fc.weight"] + (["fc.bias"] if bias else [])
    dense = factored_dense({"fc": Captured(a, ds, n * t)}, [spec], names)
    flat_v = torch.cat([moments[k].reshape(-1) for k in names])
    scales = factored_scales(moments, spec, 0.0)
    scaled = factored_dense(scale_factors({"fc": Captured(a, ds, n * t)}, {"fc": scales}), [spec], names)
    torch.testing.assert_close(scaled, dense / flat_v.sqrt())
    torch.testing.assert_close(scale_gradient(dense, spec, scales), dense / flat_v.sqrt())
