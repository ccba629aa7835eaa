"""Two-sided compression from factors equals R_outᵀ G R_in with both matrices materialised."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from attrib_core import Captured, LayerSpec, factored_dense, factored_inner, project_factors, project_gradient, side_seed
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
