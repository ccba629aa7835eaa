"""Projections: chunk independence, exactness against the materialised matrix, and JL statistics."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import project, projection_entries
from kernels.reference import dense_tile, sjlt_positions

DENSE = ["rademacher", "gaussian"]


def materialised(P, k, kind, seed, offset=0, nnz=4):
    if kind != "sjlt":
        return dense_tile(seed, torch.arange(offset, offset + P), k, kind).double() / math.sqrt(k)
    columns, signs = sjlt_positions(seed, torch.arange(offset, offset + P), k, nnz)
    R = torch.zeros(P, k, dtype=torch.float64)
    for b in range(nnz):
        R[torch.arange(P), columns[:, b]] += signs[:, b].double()
    return R / math.sqrt(nnz)


@given(st.integers(1, 9), st.integers(1, 300), st.integers(1, 80), st.sampled_from(DENSE + ["sjlt"]),
       st.integers(0, 2**32 - 1), st.integers(0, 2**35))
def test_equals_the_materialised_matrix(B, P, k, kind, seed, offset):
    x = torch.randn(B, P, dtype=torch.float64, generator=torch.Generator().manual_seed(seed % 1000))
    nnz = min(3, k)
    got = project(x, k, kind=kind, seed=seed, offset=offset, nnz=nnz)
    torch.testing.assert_close(got, x @ materialised(P, k, kind, seed, offset, nnz), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", DENSE + ["sjlt"])
def test_column_chunks_with_offsets_sum_to_the_whole_and_batches_do_not_matter(kind):
    x = torch.randn(10, 5000, dtype=torch.float64)
    whole = project(x, 96, kind=kind, seed=3)
    chunks = sum(project(x[:, a:b], 96, kind=kind, seed=3, offset=a) for a, b in [(0, 1234), (1234, 4000), (4000, 5000)])
    torch.testing.assert_close(chunks, whole, rtol=1e-12, atol=1e-12)
    rows = torch.cat([project(x[i : i + 3], 96, kind=kind, seed=3) for i in range(0, 10, 3)])
    torch.testing.assert_close(rows, whole, rtol=1e-12, atol=1e-12)


def test_tile_size_does_not_change_the_result(monkeypatch):
    import kernels.reference as reference

    x = torch.randn(4, 3000, dtype=torch.float64)
    expected = project(x, 40, kind="gaussian", seed=1)
    monkeypatch.setattr(reference, "TILE_ENTRIES", 40 * 7)  # 7 rows a tile
    torch.testing.assert_close(project(x, 40, kind="gaussian", seed=1), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    x = torch.randn(3, 2000).to(dtype)
    got = project(x, 64, kind="rademacher", seed=0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, project(x.float(), 64, kind="rademacher", seed=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", DENSE + ["sjlt"])
def test_norms_and_inner_products_within_jl_bounds(kind):
    k, P, n = 512, 4000, 40
    x = torch.randn(n, P, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x / x.norm(dim=1, keepdim=True)
    y = project(x, k, kind=kind, seed=11)
    ratios = y.norm(dim=1) ** 2
    # E|Rx|² = |x|² with standard deviation about sqrt(2/k) = 0.0625; 5 sigma over 40 draws.
    assert float((ratios - 1).abs().max()) < 5 * math.sqrt(2 / k)
    assert abs(float(ratios.mean()) - 1) < 5 * math.sqrt(2 / k) / math.sqrt(n)
    gram, projected = x @ x.T, y @ y.T
    assert float((projected - gram).abs().max()) < 5 * math.sqrt(2 / k)


@pytest.mark.parametrize("kind", DENSE)
def test_entry_moments_and_different_seeds_uncorrelated(kind):
    k, P = 256, 2000
    a = projection_entries(P, k, kind=kind, seed=1).double() * math.sqrt(k)
    b = projection_entries(P, k, kind=kind, seed=2).double() * math.sqrt(k)
    N = a.numel()
    assert abs(float(a.mean())) < 5 / math.sqrt(N)
    assert abs(float(a.pow(2).mean()) - 1) < 5 * math.sqrt(2 / N)
    corr = float((a * b).mean())
    assert abs(corr) < 5 / math.sqrt(N)
    # Neighbouring rows and columns are uncorrelated too.
    assert abs(float((a[1:] * a[:-1]).mean())) < 5 / math.sqrt(N)
    assert abs(float((a[:, 1:] * a[:, :-1]).mean())) < 5 / math.sqrt(N)


def test_bad_input():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="dim_out"):
        project(x, 0)
    with pytest.raises(ValueError, match="kind"):
        project(x, 4, kind="fourier")
    with pytest.raises(ValueError, match="x: expected a matrix"):
        project(torch.randn(10), 4)
    with pytest.raises(TypeError, match="x: expected a float"):
        project(torch.ones(2, 10, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="seed"):
        project(x, 4, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        project(x, 4, seed=2**32)
    with pytest.raises(ValueError, match="nnz"):
        project(x, 4, kind="sjlt", nnz=5)
    with pytest.raises(ValueError, match="offset"):
        project(x, 4, offset=-3)
    with pytest.raises(ValueError, match="offset"):
        project(x, 4, offset=2**64)
    with pytest.raises(ValueError, match="offset"):
        projection_entries(3, 4, offset=-1)
    with pytest.raises(ValueError, match="offset"):
        projection_entries(3, 4, offset=1.5)
