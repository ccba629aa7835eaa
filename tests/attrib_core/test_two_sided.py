"""Two-sided compression from factors equals R_outᵀ G R_in with both matrices materialised."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attrib_core import (
    COMPRESSION_KINDS,
    Captured,
    LayerSpec,
    compress_factors,
    compress_gradient,
    compress_one_hot,
    compressed_gradients,
    compression,
    embedding_input_maps,
    factored_dense,
    factored_inner,
    project_factors,
    project_gradient,
    side_seed,
    token_scores,
)
from kernels import projection_entries


@given(n=st.integers(1, 4), t=st.integers(1, 3), d_in=st.integers(1, 6), d_out=st.integers(1, 5),
       k_in=st.integers(1, 4), k_out=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_factors_and_gradients_compress_alike(n, t, d_in, d_out, k_in, k_out, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, t, d_in, generator=g, dtype=torch.float64)
    ds = torch.randn(n, t, d_out, generator=g, dtype=torch.float64)
    spec = LayerSpec("fc", "linear", "fc.weight", None, d_in, d_out)
    factors = {"fc": Captured(a, ds, n * t)}
    G = factored_dense(factors, [spec], ["fc.weight"])  # (n, d_out * d_in)
    R_in = projection_entries(d_in, k_in, seed=side_seed(seed, "fc", "in")).double()
    R_out = projection_entries(d_out, k_out, seed=side_seed(seed, "fc", "out")).double()
    expected = torch.einsum("ok,nod,dj->nkj", R_out, G.reshape(n, d_out, d_in), R_in).reshape(n, -1)
    torch.testing.assert_close(project_gradient(G, spec, (k_out, k_in), seed), expected)
    compressed = project_factors(factors, {"fc": (k_out, k_in)}, seed)
    torch.testing.assert_close(factored_inner(compressed, compressed), expected @ expected.T)


def test_sides_and_modules_get_their_own_seeds():
    seeds = {side_seed(0, m, s) for m in ("a", "b") for s in ("in", "out")}
    assert len(seeds) == 4 and all(0 <= x < 2**32 for x in seeds)
    assert side_seed(1, "a", "in") != side_seed(0, "a", "in")


def _explicit_side(d, k, m, kind, seed):
    """The (d, k) matrix of one compressed side, built entry by entry from the hash (an independent oracle)."""
    if k >= d:
        return torch.eye(d, dtype=torch.float64)
    if kind == "logra":
        return projection_entries(d, k, seed=seed).double()
    from kernels.hash import row_key, to_uint
    from kernels.reference import sjlt_positions

    keys = to_uint(row_key(seed, torch.arange(d)))
    kept = sorted(sorted(range(d), key=lambda i: (int(keys[i]), i))[:m])
    columns, signs = sjlt_positions(seed, torch.arange(m), k, 1)
    R = torch.zeros(d, k, dtype=torch.float64)
    for j, i in enumerate(kept):
        R[i, int(columns[j, 0])] += float(signs[j, 0]) * (d / m) ** 0.5
    return R


@given(n=st.integers(1, 3), t=st.integers(1, 3), d_in=st.integers(1, 12), d_out=st.integers(1, 9),
       rank=st.integers(1, 5), bias=st.booleans(), kind=st.sampled_from(COMPRESSION_KINDS),
       seed=st.integers(0, 2**16))
def test_compression_from_factors_is_the_kronecker_projection_of_the_gradient(n, t, d_in, d_out, rank, bias, kind,
                                                                              seed):
    g = torch.Generator().manual_seed(seed)
    d_a = d_in + bias
    a = torch.randn(n, t, d_a, generator=g, dtype=torch.float64)
    if bias:
        a[..., -1] = 1.0
    ds = torch.randn(n, t, d_out, generator=g, dtype=torch.float64)
    spec = LayerSpec("fc", "linear", "fc.weight", "fc.bias" if bias else None, d_in, d_out)
    factors = {"fc": Captured(a, ds, n * t)}
    names = ["fc.weight"] + (["fc.bias"] if bias else [])
    G = factored_dense(factors, [spec], names)
    comp, exact = compression([spec], rank, kind=kind, seed=seed)
    assert ("fc.out" in exact) == (rank >= d_out) and ("fc.in" in exact) == (rank >= d_a)
    (k_out, k_in), (m_out, m_in) = comp.dims["fc"], comp.masks["fc"]
    R_out = _explicit_side(d_out, k_out, m_out, kind, side_seed(seed, "fc", "out"))
    R_in = _explicit_side(d_a, k_in, m_in, kind, side_seed(seed, "fc", "in"))
    W = factored_dense(factors, [spec], names)[:, : d_out * d_in].reshape(n, d_out, d_in)
    if bias:
        W = torch.cat([W, G[:, d_out * d_in :].reshape(n, d_out, 1)], dim=2)
    # (R_out ⊗ R_in)ᵀ vec(G): the explicit per-example gradient projected with both matrices
    expected = torch.einsum("ok,nod,dj->nkj", R_out, W, R_in).reshape(n, -1)
    torch.testing.assert_close(compress_gradient(G, spec, comp), expected)
    torch.testing.assert_close(compressed_gradients(compress_factors(factors, comp), comp), expected)


def test_token_scores_sum_to_the_examples_scores():
    g = torch.Generator().manual_seed(3)
    specs = [LayerSpec("a", "linear", "a.weight", None, 6, 4), LayerSpec("b", "linear", "b.weight", None, 5, 3)]
    factors = {s.module: Captured(torch.randn(3, 7, s.d_a, generator=g, dtype=torch.float64),
                                  torch.randn(3, 7, s.d_out, generator=g, dtype=torch.float64), 21) for s in specs}
    comp, _ = compression(specs, (2, 3), seed=5)
    projected = compress_factors(factors, comp)
    queries = torch.randn(4, comp.width, generator=g, dtype=torch.float64)
    per_token = token_scores(projected, queries, comp)
    assert per_token.shape == (3, 7, 4)
    torch.testing.assert_close(per_token.sum(1), compressed_gradients(projected, comp) @ queries.T)


def test_compression_rejects_bad_ranks_and_kinds():
    spec = [LayerSpec("fc", "linear", "fc.weight", None, 6, 4)]
    for rank in (0, -1, 2.5, (1,), (1, 0), True):
        with pytest.raises(ValueError, match="rank"):
            compression(spec, rank)
    with pytest.raises(ValueError, match="kind"):
        compression(spec, 2, kind="grass")


@pytest.mark.parametrize("kind", COMPRESSION_KINDS)
@pytest.mark.parametrize("rows, rank", [(7, 3), (7, 9), (300_000, 16)])  # projected; kept exact; streamed rows
def test_an_embedding_compressed_from_its_ids_equals_its_one_hot_rows_compressed(kind, rows, rank):
    """Both sides of a tied pair (an embedding and a swapped output layer) from ids, against the one-hot factors."""
    g = torch.Generator().manual_seed(rows + rank)
    ids = torch.randint(0, rows, (2, 3), generator=g)
    ids[0, 1] = ids[1, 2]  # a repeated id
    ds = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    embed = LayerSpec("wte", "embedding", "wte.weight", None, rows, 4)
    head = LayerSpec("head", "linear", "wte.weight", None, 4, rows)  # the tied output layer, weight (rows, 4)
    comp, _ = compression([embed, head], rank, kind=kind, seed=3)
    assert comp.members["wte"] == (("wte", False), ("head", True))
    one_hot = torch.nn.functional.one_hot(ids, rows).double()
    h = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    out = torch.randn(2, 3, rows, generator=g, dtype=torch.float64) if rows < 1000 else one_hot * 0.5
    explicit = compress_factors({"wte": Captured(one_hot, ds, 6), "head": Captured(h, out, 6)}, comp)
    maps = embedding_input_maps([embed, head], comp)
    assert set(maps) == {"wte"}
    mapped = compress_factors({"wte": Captured(maps["wte"](ids, torch.float64), ds, 6), "head": Captured(h, out, 6)},
                              comp, indexed=maps)
    for module in ("wte", "head"):
        torch.testing.assert_close(mapped[module].a, explicit[module].a, rtol=0, atol=0)
        torch.testing.assert_close(mapped[module].ds, explicit[module].ds, rtol=0, atol=0)
    k, m = comp.dims["wte"][1], comp.masks["wte"][1]
    direct = compress_one_hot(ids, rows, k, m, kind, side_seed(3, "wte", "in"), torch.float64)
    torch.testing.assert_close(direct, explicit["wte"].a, rtol=0, atol=0)
