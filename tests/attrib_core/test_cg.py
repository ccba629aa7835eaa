import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

from attrib_core import cg
from tests.helpers import random_spd

systems = st.tuples(
    st.integers(2, 30),  # P
    st.integers(1, 4),  # right-hand sides
    st.floats(1.0, 1e4),  # condition number
    st.integers(0, 10_000),  # seed
)


def draw(system):
    P, k, cond, seed = system
    A = random_spd(P, cond, seed)
    B = torch.randn(k, P, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return A, B


@given(systems, st.sampled_from([1e-4, 1e-8]))
def test_reaches_tol_on_every_column(system, tol):
    A, B = draw(system)
    result = cg(lambda V: V @ A, B, tol=tol, max_steps=10 * A.shape[0])
    assert bool(result.converged.all())
    true_residual = (B - result.x @ A).norm(dim=1)
    # The recurrence residual and the true one agree up to rounding.
    assert bool((true_residual <= tol * B.norm(dim=1) * 1.01 + 1e-12).all())
    torch.testing.assert_close(result.stats["residual_norm"], true_residual, rtol=1e-3, atol=1e-9)
    assert bool((result.steps <= 10 * A.shape[0]).all())


@given(systems, st.sampled_from([1, 3]))
def test_iterates_equal_scipy(system, steps):
    A, B = draw(system)
    result = cg(A, B, tol=0.0, max_steps=steps)
    for j in range(B.shape[0]):
        expected, _ = scipy.sparse.linalg.cg(A.numpy(), B[j].numpy(), rtol=0.0, atol=0.0, maxiter=steps)
        np.testing.assert_allclose(result.x[j].numpy(), expected, rtol=1e-9, atol=1e-12)


def test_columns_converge_independently():
    A = random_spd(20, 100.0, 3)
    evals, evecs = torch.linalg.eigh(A)
    B = torch.stack([evecs[:, 0], torch.randn(20, dtype=torch.float64)])
    result = cg(A, B, tol=1e-10)
    # An eigenvector is solved in one step; the random column needs many.
    assert result.steps[0].item() == 1 and result.steps[1].item() > 5
    torch.testing.assert_close(result.x[0], evecs[:, 0] / evals[0])
    assert bool(result.converged.all())


def test_damping_x0_and_single_vector():
    A = random_spd(8, 50.0, 4)
    b = torch.randn(8, dtype=torch.float64)
    expected = torch.linalg.solve(A + 0.3 * torch.eye(8, dtype=torch.float64), b)
    result = cg(A, b, damping=0.3, tol=1e-12)
    assert result.x.shape == (8,)
    torch.testing.assert_close(result.x, expected)
    # From a guess already within tol, no step is taken and the guess is returned.
    warm = cg(A, b, damping=0.3, tol=1e-6, x0=expected + 1e-9)
    assert warm.steps.item() == 0 and bool(warm.converged)
    assert torch.equal(warm.x, expected + 1e-9)
    # From a poor guess, it still converges to the same solution.
    far = cg(A, b, damping=0.3, tol=1e-12, x0=torch.full((8,), 5.0, dtype=torch.float64))
    torch.testing.assert_close(far.x, expected)


def test_max_steps_reports_unconverged():
    A = random_spd(30, 1e4, 5)
    result = cg(A, torch.randn(2, 30, dtype=torch.float64), tol=1e-12, max_steps=2)
    assert not bool(result.converged.any())
    assert result.steps.tolist() == [2, 2]


def test_jacobi_preconditioner_cuts_steps_on_a_badly_scaled_matrix():
    g = torch.Generator().manual_seed(6)
    scales = torch.logspace(0, 4, 40, dtype=torch.float64)
    A = random_spd(40, 3.0, 6) * torch.sqrt(scales[:, None] * scales[None, :])
    B = torch.randn(3, 40, generator=g, dtype=torch.float64)
    plain = cg(A, B, tol=1e-8)
    inv_diag = 1.0 / torch.diagonal(A)
    pre = cg(A, B, tol=1e-8, preconditioner=lambda R: R * inv_diag)
    assert bool(pre.converged.all())
    assert pre.steps.max() < plain.steps.max()
    torch.testing.assert_close(pre.x, torch.linalg.solve(A, B.T).T, rtol=1e-5, atol=1e-8)


def test_zero_right_hand_side_takes_no_step():
    A = random_spd(5, 10.0, 7)
    result = cg(A, torch.zeros(2, 5, dtype=torch.float64))
    assert result.steps.tolist() == [0, 0] and bool(result.converged.all())
    assert torch.equal(result.x, torch.zeros(2, 5, dtype=torch.float64))


def test_bad_input():
    A = random_spd(3, 2.0, 0)
    B = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="mv"):
        cg("A", B)
    with pytest.raises(ValueError, match="mv"):
        cg(torch.ones(4, 4), B)
    with pytest.raises(ValueError, match="max_steps"):
        cg(A, B, max_steps=0)
    with pytest.raises(ValueError, match="damping"):
        cg(A, B, damping=-1.0)
    with pytest.raises(ValueError, match="tol"):
        cg(A, B, tol=-1.0)
    with pytest.raises(ValueError, match="x0"):
        cg(A, B, x0=torch.ones(1, 3))
    with pytest.raises(TypeError, match="preconditioner"):
        cg(A, B, preconditioner=1.0)
    with pytest.raises(ValueError, match="B: contains NaN"):
        cg(A, torch.tensor([1.0, float("nan"), 0.0]))


def test_single_right_hand_side_has_scalar_diagnostics_and_infinite_settings_are_rejected():
    A = random_spd(4, 3.0, 0)
    result = cg(A, torch.ones(4, dtype=torch.float64))
    assert result.x.shape == (4,)
    assert result.steps.shape == () and result.stats["residual_norm"].shape == () and result.converged.shape == ()
    for bad in ({"tol": float("inf")}, {"damping": float("inf")}, {"atol": float("nan")}):
        with pytest.raises(ValueError, match="finite"):
            cg(A, torch.ones(4, dtype=torch.float64), **bad)
    nan_matrix = A.clone()
    nan_matrix[0, 1] = float("nan")
    with pytest.raises(ValueError, match="mv: contains NaN"):
        cg(nan_matrix, torch.ones(4, dtype=torch.float64))
