import pytest
import torch

from attrib_core import cg, hutchinson_diagonal, jacobi
from tests.helpers import random_spd


def test_hutchinson_is_exact_for_a_diagonal_operator_and_unbiased_otherwise():
    d = torch.linspace(1, 5, 7, dtype=torch.float64)
    estimate = hutchinson_diagonal(torch.diag(d), 7, samples=3, dtype=torch.float64)
    torch.testing.assert_close(estimate, d)  # z ⊙ (D z) = d for any ±1 vector z
    A = random_spd(7, 10.0, 0)
    many = hutchinson_diagonal(lambda V: V @ A, 7, samples=20_000, block=1000, dtype=torch.float64)
    torch.testing.assert_close(many, torch.diagonal(A), rtol=0.05, atol=0.05)


def test_jacobi_preconditioned_cg_takes_fewer_steps():
    scales = torch.logspace(0, 3, 60, dtype=torch.float64)
    A = random_spd(60, 5.0, 2) * torch.sqrt(scales[:, None] * scales[None, :])
    B = torch.randn(3, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    plain = cg(A, B, tol=1e-8, damping=0.1)
    pre = cg(A, B, tol=1e-8, damping=0.1, preconditioner=jacobi(torch.diagonal(A), damping=0.1))
    assert bool(pre.converged.all())
    assert int(pre.steps.max()) < int(plain.steps.min())


def test_bad_input():
    with pytest.raises(ValueError, match="positive definite"):
        jacobi(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="diagonal"):
        jacobi(torch.ones(2, 2))
    with pytest.raises(ValueError, match="samples"):
        hutchinson_diagonal(torch.eye(2), 2, samples=0)
