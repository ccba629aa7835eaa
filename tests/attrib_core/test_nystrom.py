import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attrib_core import cg, nystrom
from tests.helpers import random_spd


@given(st.integers(2, 25), st.floats(1.0, 1e4), st.integers(0, 10_000))
def test_full_rank_reproduces_the_dense_inverse(dim, cond, seed):
    A = random_spd(dim, cond, seed)
    approx = nystrom(lambda V: V @ A, dim, rank=dim, seed=seed)
    V = torch.randn(3, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(approx.solve(V, damping=0.0).x, torch.linalg.solve(A, V.T).T, rtol=1e-6, atol=1e-8)
    damped = torch.linalg.solve(A + 0.5 * torch.eye(dim, dtype=torch.float64), V.T).T
    torch.testing.assert_close(approx.solve(V, damping=0.5).x, damped, rtol=1e-6, atol=1e-8)


def test_low_rank_captures_a_low_rank_operator_exactly():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(4, 30, generator=g, dtype=torch.float64)
    A = B.T @ B  # rank 4
    approx = nystrom(A, 30, rank=6)
    dense = approx.eigenvectors.T @ torch.diag(approx.eigenvalues) @ approx.eigenvectors
    torch.testing.assert_close(dense, A, rtol=1e-8, atol=1e-8)
    V = torch.randn(2, 30, generator=g, dtype=torch.float64)
    expected = torch.linalg.solve(A + 0.1 * torch.eye(30, dtype=torch.float64), V.T).T
    torch.testing.assert_close(approx.solve(V, damping=0.1).x, expected, rtol=1e-7, atol=1e-8)


def test_preconditioner_cuts_cg_steps_on_a_spiked_spectrum():
    # A few huge eigenvalues over a flat bulk: what a network's Hessian looks like.
    dim = 200
    evals = torch.cat([torch.logspace(4, 2, 10, dtype=torch.float64), torch.linspace(0.5, 1.0, dim - 10, dtype=torch.float64)])
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    A = (q * evals) @ q.T
    B = torch.randn(4, dim, generator=g, dtype=torch.float64)
    damping = 1e-2
    plain = cg(A, B, tol=1e-8, damping=damping)
    pre = cg(A, B, tol=1e-8, damping=damping, preconditioner=nystrom(A, dim, rank=20).preconditioner(damping=damping))
    assert bool(plain.converged.all()) and bool(pre.converged.all())
    assert int(pre.steps.max()) < int(plain.steps.min())
    torch.testing.assert_close(pre.x, plain.x, rtol=1e-5, atol=1e-7)


def test_bad_input():
    A = random_spd(5, 3.0, 0)
    with pytest.raises(ValueError, match="rank"):
        nystrom(A, 5, rank=6)
    with pytest.raises(ValueError, match="rank"):
        nystrom(A, 5, rank=0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        nystrom(-A, 5, rank=3)
    with pytest.raises(ValueError, match="damping"):
        nystrom(A, 5, rank=3).solve(torch.ones(1, 5), damping=0.0)


def test_float32_low_rank_operator_sketched_in_float64():
    # Per-sample gradients of fewer examples than the rank: PSD and singular, products in float32.
    from attrib_core import make_fvp

    for seed in range(5):
        G = torch.randn(10, 500, generator=torch.Generator().manual_seed(seed))
        approx = nystrom(make_fvp(G), 500, rank=40, seed=seed)
        F = (G.T @ G / 10).double()
        dense = approx.eigenvectors.T @ torch.diag(approx.eigenvalues) @ approx.eigenvectors
        assert float((dense - F).norm() / F.norm()) < 1e-4  # float32 products: ~2e-5 measured
