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


def test_projection_of_no_rows_and_past_the_grid(monkeypatch):
    for kind in ("rademacher", "gaussian"):
        assert triton_kernels.project_dense(torch.randn(0, 10), 8, kind, 1, 0).shape == (0, 8)
    monkeypatch.setattr(triton_kernels, "_GRID_Y", 2)  # 2 blocks of output columns per launch at most
    with pytest.raises(ValueError, match="project_launch: 200 output columns need a grid .* over the grid"):
        triton_kernels.project_dense(torch.randn(3, 10), 200, "rademacher", 1, 0)
    with pytest.raises(ValueError, match="entries_launch: 100 columns need a grid"):
        triton_kernels.entries(0, 0, 4, 100, "gaussian", CPU)


def test_the_three_bf16_parts_of_a_float32_add_up_to_it_exactly():
    g = torch.Generator().manual_seed(13)
    # from 2^-149 (subnormal) to 2^127, signed zeros, the largest
    x = torch.randn(4000, generator=g) * torch.exp2(torch.randint(-149, 127, (4000,), generator=g).float())
    x = torch.cat([x, torch.tensor([0.0, -0.0, 3.4028234e38, -3.4028234e38, 1.0, -1.0, 2.0**-126, 2.0**-149])])
    x = x[torch.isfinite(x)].reshape(1, -1)
    parts = triton_kernels.bf16_parts(x)
    assert parts.dtype == torch.bfloat16 and parts.shape == (3, *x.shape)
    assert torch.equal(triton_kernels.bf16_parts(x, torch.float32), parts.float())  # the same numbers stored wider
    error = (parts.double().sum(0) - x.double()).abs()
    normal = x.abs() >= 2.0**-110
    assert int(normal.sum()) > 3000 and torch.equal(error[normal], torch.zeros_like(error[normal]))  # exact
    assert float(error.max()) < 2.0**-133  # below: the last part rounded in bf16's subnormal range


def _tiny_chunks_and_splits(monkeypatch):
    """Plans that split every input's columns over programs (ranges of 32) and make float32 parts 64 columns at a
    time, so small inputs exercise both."""
    monkeypatch.setattr(triton_kernels, "_MIN_SPLIT_COLUMNS", 32)
    monkeypatch.setattr(triton_kernels, "_PART_BYTES", 3 * 2 * 64 * 5)  # 64 columns of 5 rows


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_projection_split_over_columns_and_chunked_equals_the_reference(monkeypatch, kind, dtype):
    _tiny_chunks_and_splits(monkeypatch)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(5, 300, generator=g).to(dtype)
    cast = torch.float32 if dtype == torch.bfloat16 else dtype  # the interpreter's bf16 arithmetic is wrong
    plan = triton_kernels.project_plan(5, 300, 40, cast, kind, None, interpreted=True)
    assert plan.splits > 1 and plan.columns_per_split % plan.block_p == 0
    assert plan.chunk < 300 if (kind, cast) == ("rademacher", torch.float32) else plan.chunk == 300
    got = triton_kernels.project_dense(x, 40, kind, 9, 123)
    torch.testing.assert_close(got, reference.project_dense(x.float(), 40, kind, 9, 123), rtol=1e-5, atol=1e-5)


def test_a_chunked_float32_projection_continues_the_same_sums(monkeypatch):
    g = torch.Generator().manual_seed(15)
    x = torch.randn(5, 300, generator=g)
    whole = triton_kernels.project_dense(x, 40, "rademacher", 9, 123)
    monkeypatch.setattr(triton_kernels, "_PART_BYTES", 3 * 2 * 64 * 5)
    assert triton_kernels.project_plan(5, 300, 40, torch.float32, "rademacher", None, True).chunk == 64
    assert torch.equal(triton_kernels.project_dense(x, 40, "rademacher", 9, 123), whole)  # bit for bit


def test_the_plan_follows_the_gpu_generation_and_the_shape():
    plan = triton_kernels.project_plan
    for arch in ("sm_80", "sm_90a"):
        half = plan(4096, 1 << 24, 8192, torch.bfloat16, "rademacher", arch, False)
        assert (half.dot, half.parts, half.warps, half.splits) == (1, 1, 8, 1) and half.block_b >= 128
        single = plan(4096, 1 << 24, 8192, torch.float32, "rademacher", arch, False)
        assert single.parts == 3 and single.dot == 1 and 3 * 2 * 4096 * single.chunk <= triton_kernels._PART_BYTES
        assert plan(4096, 1 << 24, 8192, torch.float32, "gaussian", arch, False).dot == 2
        # one row: a single tile of rows, so the columns are split until the grid fills the GPU
        small = plan(1, 1 << 24, 8192, torch.bfloat16, "rademacher", arch, False)
        programs = -(-8192 // small.block_k)
        assert small.block_b == 64 and small.splits * programs >= triton_kernels._TARGET_PROGRAMS
        assert small.columns_per_split >= triton_kernels._MIN_SPLIT_COLUMNS
        assert (small.splits - 1) * small.columns_per_split < (1 << 24) <= small.splits * small.columns_per_split
    fma = plan(4096, 1 << 24, 8192, torch.float32, "rademacher", None, False)  # a GPU without bf16 tensor cores
    assert (fma.dot, fma.parts) == (0, 1)
    assert plan(4096, 1 << 24, 8192, torch.float32, "rademacher", "sm_90a", True).dot == 0  # the interpreter: FMA


GPU_PATHS = [(arch, dtype, kind) for arch in ("sm_80", "sm_90a")
             for dtype, kind in ((torch.bfloat16, "rademacher"), (torch.float32, "rademacher"),
                                 (torch.float32, "gaussian"))]


@pytest.mark.parametrize("arch, dtype, kind", GPU_PATHS)
def test_every_schedule_keeps_the_static_plans_sums(arch, dtype, kind):
    for B in (4096, 200, 128, 64, 1, 0):
        plans = triton_kernels.project_schedules(B, 1 << 24, 8192, dtype, kind, arch, False)
        assert plans[0] == triton_kernels.project_plan(B, 1 << 24, 8192, dtype, kind, arch, False)
        assert len(set(plans)) == len(plans) == 4  # the static plan and three alternatives
        same = {(p.dot, p.parts, p.block_p, p.chunk, p.splits, p.columns_per_split) for p in plans}
        assert len(same) == 1, plans  # the same products, summed in the same order
    assert len(triton_kernels.project_schedules(4096, 1 << 24, 8192, dtype, kind, None, False)) == 1  # FMA
    assert len(triton_kernels.project_schedules(4096, 1 << 24, 8192, dtype, kind, arch, True)) == 1  # interpreter


@pytest.mark.parametrize("B", [300, 100, 40])  # every row of each table
@pytest.mark.parametrize("arch, dtype, kind", GPU_PATHS)
def test_every_schedule_projects_bit_identically(monkeypatch, arch, dtype, kind, B):
    """The tiles a GPU may time against each other, run by the interpreter: every one the same numbers, bit for
    bit. The weakest of the three checks (RESULTS.md): the interpreter's dot is numpy's float32 matmul, not the
    tensor cores, and it ignores warps and stages; what it does check is each tile's indexing and masks over
    rows, columns, the last block of P and split column ranges."""
    monkeypatch.setattr(triton_kernels, "_MIN_SPLIT_COLUMNS", 64)
    g = torch.Generator().manual_seed(17)
    x = torch.randn(B, 200, generator=g)
    plans = triton_kernels.project_schedules(B, 200, 300, dtype, kind, arch, False)
    assert len(plans) == 4 and plans[0].splits > 1
    first = triton_kernels.project_with_plan(x, 300, kind, 3, 17, plans[0]._replace(dot=0))
    torch.testing.assert_close(first, reference.project_dense(x, 300, kind, 3, 17), rtol=1e-5, atol=1e-5)
    for plan in plans[1:]:
        assert torch.equal(triton_kernels.project_with_plan(x, 300, kind, 3, 17, plan._replace(dot=0)), first), plan


def test_the_tuned_plan_is_timed_once_per_shape_on_a_sample(monkeypatch):
    monkeypatch.setattr(triton_kernels, "_TUNE_MACS", 0)
    monkeypatch.setattr(triton_kernels, "_TUNE_COLUMNS", 64)
    monkeypatch.setattr(triton_kernels, "_MIN_SPLIT_COLUMNS", 256)
    monkeypatch.delenv("ATTRIB_TUNE", raising=False)
    triton_kernels.tuning.forget()
    timed = []

    def fake_seconds(launch, device):  # runs the launch as cuda_seconds would, with made-up times
        launch()
        timed.append(launch)
        return [3.0, 1.0, 2.0, 1.0][(len(timed) - 1) % 4]

    monkeypatch.setattr(triton_kernels.tuning, "cuda_seconds", fake_seconds)
    g = torch.Generator().manual_seed(18)
    table = triton_kernels.gaussian_table(CPU)

    def tuned(x, K):  # the interpreter runs the sm_90a Gaussian table's schedules on its FMA path
        plans = [p._replace(dot=0) for p in
                 triton_kernels.project_schedules(*x.shape, K, torch.float32, "gaussian", "sm_90a", False)]
        partial = torch.empty(plans[0].splits, x.shape[0], K)
        return plans, triton_kernels._tuned(plans, x, partial, table, "gaussian", "sm_90a")

    try:
        x = torch.randn(100, 2048, generator=g)
        plans, chosen = tuned(x, 300)
        assert chosen == plans[1] and len(timed) == 4
        splits, block_p = plans[0].splits, plans[0].block_p
        columns = timed[0].args[-1]  # columns per split of the sample
        assert splits > 1 and columns % block_p == 0 and columns <= 64
        assert 16 * columns * splits <= 2 * 2048  # the timed launches cost at most two calls
        for launch in timed:
            assert launch.args[-1] == columns and torch.equal(launch.args[0], x[:, : columns * splits][None])
        wider, chosen = tuned(torch.randn(100, 2100, generator=g), 300)  # another P, as many splits: remembered
        assert wider[0].splits == splits and chosen == wider[1] and len(timed) == 4
        other, chosen = tuned(x, 200)  # another K: timed again
        assert chosen == other[1] and len(timed) == 8
        monkeypatch.setenv("ATTRIB_TUNE", "0")
        triton_kernels.tuning.forget()
        plans, chosen = tuned(x, 300)
        assert chosen == plans[0] and len(timed) == 8
    finally:
        triton_kernels.tuning.forget()


def _stable_topk(scores, k, largest):
    """Oracle: per column of ``scores`` (n, m), rows by score with ties to the smaller row."""
    order = torch.sort(scores.T, dim=1, descending=largest, stable=True).indices[:, :k]
    return scores.T.gather(1, order), order


@settings(max_examples=12)
@given(st.integers(1, 300), st.integers(1, 40), st.integers(1, 5), st.integers(0, 10**6), st.booleans(),
       st.sampled_from([None, 1, 50, 64, 130]))
def test_fused_topk_equals_the_exact_ranking_with_ties(n, m, width, seed, largest, block_rows):
    # small integers: exact scores, and ties everywhere
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-2, 3, (n, width), generator=g).float()
    b = torch.randint(-2, 3, (m, width), generator=g).float()
    k = 1 + seed % min(n, triton_kernels.FUSED_TOPK_MAX_K)
    values, indices, bad, _ = triton_kernels.topk(a, b, k, largest, False, block_rows)
    expected_values, expected_indices = _stable_topk(a @ b.T, k, largest)
    assert torch.equal(indices, expected_indices) and torch.equal(values, expected_values)
    assert not bool(bad.any())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_fused_topk_of_real_valued_scores(dtype, normalize):
    g = torch.Generator().manual_seed(16)
    a, b = torch.randn(500, 24, generator=g).to(dtype), torch.randn(37, 24, generator=g).to(dtype)
    a[7] = 0  # a zero row: cosine 0
    exact = a.double() @ b.double().T
    if normalize:
        exact = exact / a.double().norm(dim=1).clamp_min(1e-300)[:, None] / b.double().norm(dim=1)[None, :]
    for largest in (True, False):
        values, indices, _, _ = triton_kernels.topk(a, b, 20, largest, normalize, 96)
        expected, _ = _stable_topk(exact, 20, largest)
        torch.testing.assert_close(values.double(), expected, rtol=1e-5, atol=1e-5)
        # each returned row really has the returned score, in order
        torch.testing.assert_close(exact.T.gather(1, indices), values.double(), rtol=1e-5, atol=1e-5)
        assert bool((values[:, :-1] >= values[:, 1:]).all() if largest else (values[:, :-1] <= values[:, 1:]).all())


def test_fused_topk_ranks_signed_zeros_as_equal():
    a = torch.tensor([[-0.0], [0.0], [-0.0], [1.0], [-1.0]])
    b = torch.tensor([[1.0], [-1.0]])  # scores -0, +0, -0 (and +0, -0, +0) tie
    values, indices, _, _ = triton_kernels.topk(a, b, 4, True, False)
    assert indices.tolist() == [[3, 0, 1, 2], [4, 0, 1, 2]]
    assert values.tolist() == [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    values, indices, _, _ = triton_kernels.topk(a, b, 4, False, False)
    assert indices.tolist() == [[4, 0, 1, 2], [3, 0, 1, 2]]


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # the interpreter's inf * 0
def test_fused_topk_through_the_dispatcher(monkeypatch):
    monkeypatch.setenv("ATTRIB_KERNELS", "triton")
    g = torch.Generator().manual_seed(17)
    a, b = torch.randint(-3, 4, (300, 3), generator=g).float(), torch.randint(-3, 4, (5, 3), generator=g).float()
    for k in (7, 150):  # fused, and past FUSED_TOPK_MAX_K the streamed path
        top = dispatch.topk_inner(a, b, k, block_rows=64)
        values, indices = _stable_topk(a @ b.T, k, True)
        assert torch.equal(top.indices, indices) and torch.equal(top.values, values)
    bad = a.clone()
    bad[150, 1] = float("inf")  # in the third chunk of 64 rows
    with pytest.raises(ValueError, match=r"a: rows 128\.\.191 give NaN or Inf"):
        dispatch.topk_inner(bad, b, 7, block_rows=64)
    with pytest.raises(ValueError, match="k: the fused top-k takes"):
        triton_kernels.topk_plan(300, 5, 129)
