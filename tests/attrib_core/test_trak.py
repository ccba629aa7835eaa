"""TRAK's kernel algebra against the formula τ = diag(1 - p) Φ (ΦᵀΦ + λI)⁻¹ Φ_testᵀ."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attrib_core import Status, trak_kernel, trak_train_features, trak_weights


@given(st.integers(2, 20), st.integers(1, 6), st.sampled_from([1e-3, 1.0]), st.integers(0, 1000))
def test_scores_equal_the_formula(n, k, damping, seed):
    g = torch.Generator().manual_seed(seed)
    Phi, test = torch.randn(n, k, generator=g), torch.randn(3, k, generator=g)
    p = torch.rand(n, generator=g)
    kernel = trak_kernel(Phi, damping=damping)
    solved = trak_train_features(kernel, Phi)
    scores = trak_weights(p)[:, None] * (solved.x @ test.double().T)
    K = Phi.double().T @ Phi.double() + damping * torch.eye(k, dtype=torch.float64)
    expected = torch.diag(1 - p.double()) @ Phi.double() @ torch.linalg.solve(K, test.double().T)
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-10)
    assert solved.status.tolist() == [Status.CONVERGED] * n


def test_a_singular_kernel_is_reported_and_probabilities_are_checked():
    Phi = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))  # rank 2 < 5 dimensions
    assert set(trak_train_features(trak_kernel(Phi), Phi).status.tolist()) == {Status.INDEFINITE}
    assert trak_weights(torch.tensor([0.0, 1.0])).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="probabilities: expected values in"):
        trak_weights(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="features: expected a tensor of shape"):
        trak_kernel(torch.ones(3))
