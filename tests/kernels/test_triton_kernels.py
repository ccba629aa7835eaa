"""Every Triton kernel against its torch reference, run on the CPU by the Triton interpreter."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import dispatch, reference

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1", "conftest sets TRITON_INTERPRET=1 before kernels import"
from kernels import triton_kernels  # noqa: E402

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
small = settings(max_examples=10)


@small
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**40), st.integers(1, 70), st.integers(1, 70),
       st.sampled_from(["rademacher", "gaussian"]))
def test_entries_bit_identical(seed, offset, rows, dim_out, kind):
    got = triton_kernels.entries(seed, offset, rows, dim_out, kind, CPU)
    expected = reference.dense_tile(seed, torch.arange(offset, offset + rows), dim_out, kind)
    assert torch.equal(got, expected)


@small
@given(st.integers(1, 70), st.integers(1, 100), st.integers(1, 70), st.sampled_from(["rademacher", "gaussian"]),
       st.sampled_from(DTYPES), st.integers(0, 2**32 - 1), st.integers(0, 2**34))
def test_project_equals_reference(B, P, k, kind, dtype, seed, offset):
    x = torch.randn(B, P, generator=torch.Generator().manual_seed(seed % 997)).to(dtype)
    got = triton_kernels.project_dense(x, k, kind, seed, offset)
    # bf16 goes through a cast: the interpreter's bf16 arithmetic is wrong.
    expected = reference.project_dense(x.to(torch.float32), k, kind, seed, offset)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_project_on_a_strided_input():
    x = torch.randn(40, 90)[:, ::2]  # non-contiguous columns
    torch.testing.assert_close(
        triton_kernels.project_dense(x, 33, "gaussian", 5, 0),
        reference.project_dense(x, 33, "gaussian", 5, 0), rtol=1e-5, atol=1e-5,
    )


@small
@given(st.integers(1, 80), st.integers(1, 80), st.integers(1, 50), st.booleans(), st.sampled_from(DTYPES),
       st.integers(0, 1000))
def test_inner_equals_reference(n, m, k, normalize, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(m, k, generator=g).to(dtype)
    if n > 1:
        a[0] = 0  # a zero row: cosines are 0, not NaN
    got = triton_kernels.inner(a, b, normalize)
    expected = reference.inner(a.float(), b.float(), normalize)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_forced_triton_backend_runs_the_kernels(monkeypatch):
    monkeypatch.setenv("ATTRIB_KERNELS", "triton")
    x = torch.randn(5, 64)
    assert dispatch.backend(x) == "triton"
    torch.testing.assert_close(dispatch.project(x, 16, seed=2), reference.project_dense(x, 16, "rademacher", 2, 0),
                               rtol=1e-5, atol=1e-5)
    a, b = torch.randn(30, 8), torch.randn(4, 8)
    top = dispatch.topk_inner(a, b, 3, block_rows=7)
    expected = torch.topk(a @ b.T, 3, dim=0)
    torch.testing.assert_close(top.values, expected.values.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(top.indices, expected.indices.T)
    assert torch.equal(dispatch.projection_entries(9, 20, kind="gaussian", seed=4),
                       reference.dense_tile(4, torch.arange(9), 20, "gaussian") * (1 / 20**0.5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_inner_is_accurate_against_float64(dtype, normalize):
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(70, 300, generator=g).to(dtype), torch.randn(50, 300, generator=g).to(dtype)
    exact = a.double() @ b.double().T
    if normalize:
        exact = exact / a.double().norm(dim=1)[:, None] / b.double().norm(dim=1)[None, :]
    got = triton_kernels.inner(a, b, normalize).double()
    scale = exact.abs().max()
    assert float((got - exact).abs().max() / scale) < 1e-5  # fp32 accumulation of the inputs' exact products


def test_inner_slices_queries_beyond_the_grid_limit(monkeypatch):
    monkeypatch.setattr(triton_kernels, "_GRID_Y", 2)  # 2 blocks of 64 queries per launch
    g = torch.Generator().manual_seed(12)
    a, b = torch.randn(40, 16, generator=g), torch.randn(300, 16, generator=g)
    torch.testing.assert_close(triton_kernels.inner(a, b, False), a @ b.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="over the grid"):
        triton_kernels.inner_launch(a, b, torch.empty(40, 300), False)


def test_the_three_bf16_parts_of_a_float32_add_up_to_it_exactly():
    import triton
    import triton.language as tl

    @triton.jit
    def parts(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
        x1 = triton_kernels._bf16_part(x)
        r1 = x - x1.to(tl.float32)
        x2 = triton_kernels._bf16_part(r1)
        x3 = triton_kernels._bf16_part(r1 - x2.to(tl.float32))
        for i, part in ((0, x1), (1, x2), (2, x3)):
            tl.store(out_ptr + i * N + offs, part.to(tl.float32), mask=offs < N)

    g = torch.Generator().manual_seed(13)
    # numbers from 2^-100 to 2^120, signed zeros, the largest: the interpreter flushes subnormal numbers to zero,
    # so inputs whose parts would be subnormal (below 2^-110) are left to the GPU
    x = torch.randn(500, generator=g) * torch.exp2(torch.randint(-100, 120, (500,), generator=g).float())
    x = torch.cat([x, torch.tensor([0.0, -0.0, 3.4e38, -3.4e38, 1.0, -1.0])])
    out = torch.empty(3 * len(x))
    parts[(1,)](x, out, len(x), BLOCK=512)
    p = out.view(3, -1)
    assert all(torch.equal(q, q.bfloat16().float()) for q in p)  # each part is a bf16 number
    assert torch.equal(p.double().sum(0), x.double())  # and they add up to x exactly
