import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attrib_core import Status, factor_explicit, solve_explicit
from tests.helpers import random_spd

systems = st.tuples(
    st.integers(1, 12),  # P
    st.integers(1, 5),  # right-hand sides
    st.floats(1.0, 1e6),  # condition number
    st.sampled_from([0.0, 1e-3, 1.0]),  # damping
    st.integers(0, 10_000),  # seed
)


@given(systems)
def test_equals_torch_linalg_solve(system):
    P, k, cond, damping, seed = system
    H = random_spd(P, cond, seed)
    B = torch.randn(k, P, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    result = solve_explicit(H, B, damping=damping)
    expected = torch.linalg.solve(H + damping * torch.eye(P, dtype=torch.float64), B.T).T
    torch.testing.assert_close(result.x, expected, rtol=1e-7, atol=1e-9)
    assert result.stats["method"] == "cholesky" and bool((result.status == Status.CONVERGED).all())
    one = solve_explicit(H, B[0], damping=damping)
    torch.testing.assert_close(one.x, expected[0], rtol=1e-7, atol=1e-9)


@given(st.integers(2, 10), st.integers(1, 3), st.integers(0, 10_000))
def test_indefinite_is_reported_and_damped_solution_returned(P, n_negative, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    n_negative = min(n_negative, P - 1)
    evals = torch.linspace(1.0, 3.0, P, dtype=torch.float64)
    evals[:n_negative] = -torch.linspace(2.0, 4.0, n_negative, dtype=torch.float64)
    H = (q * evals) @ q.T
    B = torch.randn(3, P, generator=g, dtype=torch.float64)
    damping = 0.5
    result = solve_explicit(H, B, damping=damping)
    # Indefinite but nonsingular: LDLᵀ, with the count of negative eigenvalues from its inertia.
    assert result.stats["method"] == "ldl" and bool((result.status == Status.INDEFINITE).all())
    assert result.stats["n_negative"] == n_negative and result.stats["n_dropped"] == 0
    A = H + damping * torch.eye(P, dtype=torch.float64)
    torch.testing.assert_close(result.x @ A, B, rtol=1e-8, atol=1e-8)


def test_singular_directions_are_dropped():
    # H = diag(2, 0): the solution is the pseudo-inverse one, finite, with one drop.
    H = torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64))
    result = solve_explicit(H, torch.tensor([[4.0, 1.0]], dtype=torch.float64))
    assert result.stats["n_dropped"] == 1 and result.stats["method"] == "eigh"
    assert result.status.tolist() == [Status.INDEFINITE]
    torch.testing.assert_close(result.x, torch.tensor([[2.0, 0.0]], dtype=torch.float64))


def test_factor_once_solve_many():
    H = random_spd(6, 100.0, 0)
    factor = factor_explicit(H, damping=0.1)
    for seed in range(3):
        B = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(factor.solve(B).x, solve_explicit(H, B, damping=0.1).x)
    torch.testing.assert_close(factor.matvec(factor.solve(B).x), B)


def test_low_precision_inputs_are_solved_in_float32():
    H = random_spd(5, 10.0, 1).to(torch.float16)
    B = torch.ones(2, 5, dtype=torch.float16)
    result = solve_explicit(H, B)
    assert result.x.dtype == torch.float32
    expected = torch.linalg.solve(H.double(), B.double().T).T
    torch.testing.assert_close(result.x.double(), expected, rtol=1e-3, atol=1e-3)


def test_bad_input():
    H = random_spd(3, 2.0, 0)
    with pytest.raises(ValueError, match=r"H: expected a square"):
        solve_explicit(torch.ones(3, 2), torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"B: expected width P=3"):
        solve_explicit(H, torch.ones(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="damping"):
        solve_explicit(H, torch.ones(1, 3), damping=-0.1)
    bad = H.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="H: contains NaN"):
        solve_explicit(bad, torch.ones(1, 3))


def test_a_non_symmetric_matrix_is_refused_and_rounding_is_not():
    H = random_spd(4, 5.0, 2)
    skewed = H.clone()
    skewed[0, 1] += 0.5
    with pytest.raises(ValueError, match="H: not symmetric"):
        solve_explicit(skewed, torch.ones(1, 4, dtype=torch.float64))
    rounded = H.clone()
    rounded[0, 1] += 1e-12 * H.abs().max()  # rounding of a computed Hessian: averaged away
    expected = torch.linalg.solve((rounded + rounded.T) / 2, torch.ones(4, 1, dtype=torch.float64)).T
    torch.testing.assert_close(solve_explicit(rounded, torch.ones(1, 4, dtype=torch.float64)).x, expected)
