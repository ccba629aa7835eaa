import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from attrib_core import arnoldi, hessian, spectral_projector
from tests.helpers import classification_batch, cross_entropy_loss, params_of, small_mlp


def with_spectrum(evals: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=g, dtype=torch.float64))
    return (q * evals) @ q.T, q.T  # rows of q.T are the eigenvectors


def subspace_angle(U: torch.Tensor, W: torch.Tensor) -> float:
    """Largest principal angle between the row spaces of U and W (orthonormal rows)."""
    cosines = torch.linalg.svdvals(U @ W.T).clamp(max=1.0)
    return float(torch.arccos(cosines.min()))


@given(st.integers(20, 60), st.integers(1, 6), st.integers(0, 10_000), st.booleans())
def test_recovers_top_eigenpairs_of_known_spectra(dim, top_k, seed, indefinite):
    g = torch.Generator().manual_seed(seed + 1)
    bulk = torch.rand(dim - top_k, generator=g, dtype=torch.float64) * 2 - 1  # |λ| <= 1
    top = torch.linspace(10.0, 5.0, top_k, dtype=torch.float64)
    if indefinite:
        top[::2] = -top[::2]  # large negative eigenvalues count by magnitude
    A, vectors = with_spectrum(torch.cat([top, bulk]), seed)
    result = arnoldi(lambda V: V @ A, dim, max_steps=dim, top_k=top_k, seed=seed)
    expected = top[torch.argsort(top.abs(), descending=True)]
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-10, atol=1e-10)
    assert subspace_angle(result.eigenvectors, vectors[:top_k]) < 1e-6
    torch.testing.assert_close(result.eigenvectors @ result.eigenvectors.T, torch.eye(top_k, dtype=torch.float64))


def test_converges_before_the_full_dimension_and_reports_residuals():
    dim = 300
    evals = torch.cat([torch.tensor([100.0, 80.0, 60.0], dtype=torch.float64), torch.linspace(-1, 1, dim - 3, dtype=torch.float64)])
    A, vectors = with_spectrum(evals, 3)
    result = arnoldi(A, dim, max_steps=40, top_k=3, seed=0)
    assert result.steps == 40 and not result.breakdown
    assert subspace_angle(result.eigenvectors, vectors[:3]) < 1e-6
    true_residuals = (result.eigenvectors @ A - result.eigenvalues[:, None] * result.eigenvectors).norm(dim=1)
    torch.testing.assert_close(result.residuals, true_residuals, rtol=1e-4, atol=1e-10)
    assert bool((result.residuals < 1e-6).all())


def test_breakdown_on_an_invariant_subspace():
    # A has rank 3: the Krylov space is exhausted after 3 steps (then breakdown).
    g = torch.Generator().manual_seed(0)
    B = torch.randn(3, 30, generator=g, dtype=torch.float64)
    A = B.T @ B
    result = arnoldi(A, 30, max_steps=20, top_k=3)
    assert result.breakdown and result.steps <= 4
    with pytest.warns(UserWarning, match="only 4 of the top_k=6"):
        short = arnoldi(A, 30, max_steps=20, top_k=6)
    assert short.eigenvalues.shape == (4,)
    torch.testing.assert_close(result.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:3], rtol=1e-9, atol=1e-9)


def test_same_seed_same_result_and_global_rng_untouched():
    A, _ = with_spectrum(torch.linspace(1, 5, 20, dtype=torch.float64), 0)
    state = torch.get_rng_state()
    r1 = arnoldi(A, 20, max_steps=8, top_k=2, seed=4)
    r2 = arnoldi(A, 20, max_steps=8, top_k=2, seed=4)
    assert torch.equal(r1.eigenvectors, r2.eigenvectors)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.filterwarnings("ignore:arnoldi. the Krylov space became invariant")
@given(st.integers(10, 40), st.integers(0, 10_000), st.sampled_from([0.0, 0.5]), st.sampled_from(["drop", "abs"]))
def test_projector_never_nan_on_indefinite_and_singular_spectra(dim, seed, damping, negative):
    g = torch.Generator().manual_seed(seed)
    evals = torch.randn(dim, generator=g, dtype=torch.float64) * 3
    evals[: dim // 4] = 0.0  # exactly singular directions
    A, _ = with_spectrum(evals, seed)
    result = arnoldi(A, dim, max_steps=dim, top_k=dim, seed=seed)
    projector = spectral_projector(result.eigenvalues, result.eigenvectors, damping=damping, negative=negative)
    G = torch.randn(5, dim, generator=g, dtype=torch.float64)
    projected = projector(G)
    assert bool(torch.isfinite(projected).all())
    shifted = result.eigenvalues + damping
    small = shifted.abs() <= 1e-6 * shifted.abs().max()
    assert projector.n_small == int(small.sum())
    if damping == 0:  # the zero eigenvalues that the Krylov space reached are dropped, not inverted
        assert projector.n_small >= 1
    assert projector.n_negative == int(((shifted < 0) & ~small).sum())
    kept = len(shifted) - projector.n_small - (projector.n_negative if negative == "drop" else 0)
    assert projector.vectors.shape == (kept, dim)
    assert bool((projector.eigenvalues > 0).all())
    # Inner products of projections are gᵀ U (Λ+d)⁻¹ Uᵀ g over the kept pairs.
    U, lam = projector.vectors, projector.eigenvalues
    torch.testing.assert_close(projected @ projected.T, G @ U.T @ torch.diag(1 / lam) @ U @ G.T)


def test_projector_equals_inverse_on_a_positive_definite_operator():
    A, _ = with_spectrum(torch.linspace(1, 10, 12, dtype=torch.float64), 2)
    result = arnoldi(A, 12, max_steps=12, top_k=12)
    projector = spectral_projector(result.eigenvalues, result.eigenvectors, damping=0.1)
    G = torch.randn(4, 12, dtype=torch.float64)
    expected = G @ torch.linalg.solve(A + 0.1 * torch.eye(12, dtype=torch.float64), G.T)
    torch.testing.assert_close(projector(G) @ projector(G).T, expected)
    assert projector.n_negative == 0 and projector.n_small == 0


def test_relu_mlp_hessian_gives_no_nan():
    # dattri 0.3's Arnoldi returns NaN here: a ReLU network's Hessian is singular and indefinite.
    model = small_mlp(0, (4, 8, 3), act=nn.ReLU)
    params, f = params_of(model), cross_entropy_loss(model)
    batch = classification_batch(0, 16, 4, 3)
    H = hessian(f, params, batch)
    P = H.shape[0]
    result = arnoldi(H, P, max_steps=P, top_k=20)
    projector = spectral_projector(result.eigenvalues, result.eigenvectors)
    assert bool(torch.isfinite(projector(torch.randn(3, P, dtype=torch.float64))).all())
    assert projector.n_negative + projector.n_small > 0


def test_bad_input():
    A = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="top_k"):
        arnoldi(A, 5, top_k=6)
    with pytest.raises(ValueError, match="max_steps"):
        arnoldi(A, 5, max_steps=2, top_k=3)
    with pytest.raises(TypeError, match="mv"):
        arnoldi("A", 5, top_k=2)
    with pytest.raises(ValueError, match="mv"):
        arnoldi(torch.eye(4), 5, top_k=2)
    with pytest.raises(ValueError, match="mv"):
        arnoldi(lambda V: V * float("nan"), 5, top_k=2)
    with pytest.raises(ValueError, match="negative"):
        spectral_projector(torch.ones(2), torch.eye(2), negative="clip")


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
def test_reports_the_loss_of_orthogonality_of_its_basis(dtype, bound):
    evals = torch.cat([torch.tensor([50.0, 20.0, 10.0], dtype=torch.float64), torch.linspace(-1, 1, 117, dtype=torch.float64)])
    A, _ = with_spectrum(evals, 5)
    result = arnoldi(A.to(dtype), 120, max_steps=60, top_k=3, dtype=dtype)
    assert 0 < result.orthogonality < bound
    assert result.eigenvectors.dtype == dtype
    torch.testing.assert_close(result.eigenvalues.double(), evals[:3], rtol=10 * torch.finfo(dtype).eps ** 0.5, atol=0)
