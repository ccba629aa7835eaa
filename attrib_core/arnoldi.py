"""Arnoldi (Lanczos, for a symmetric operator) with full reorthogonalisation, and the projector built from it."""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from ._checks import as_block, as_operator, check_count, check_finite, check_nonnegative
from .fold import fold
from .solution import Solution, Status, solution

__all__ = ["ArnoldiState", "ArnoldiResult", "arnoldi", "SpectralProjector", "spectral_projector"]


class ArnoldiState(NamedTuple):
    basis: Tensor  # (max_steps + 1, dim); rows 0 .. size - 1 are the orthonormal Krylov vectors q_0 .. q_j
    size: int  # rows of ``basis`` filled (j + 1)
    hessenberg: Tensor  # (max_steps + 1, max_steps); column i (rows 0 .. i + 1) filled after step i
    steps: int  # columns of ``hessenberg`` filled
    breakdown: bool  # the Krylov space became invariant


class ArnoldiResult(NamedTuple):
    """The ``top_k`` Ritz pairs of largest magnitude (fewer, with a warning, when the
    iteration breaks down on an invariant subspace of smaller dimension first).

    Attributes:
        eigenvalues: ``(top_k,)``, by decreasing magnitude.
        eigenvectors: ``(top_k, dim)``, orthonormal rows.
        steps: the Krylov dimension built (``<= max_steps``).
        residuals: ``(top_k,)``, ``‖A u - λ u‖`` for each pair, from the recurrence
            (``|β_m s_{m,i}|``); small means converged.
        breakdown: the iteration stopped early on an invariant subspace (then the
            Ritz pairs are exact eigenpairs of ``A`` on that subspace).
        orthogonality: ``max |QᵀQ - I|`` of the Krylov basis used, computed in float64:
            the loss of orthogonality, near the working precision's epsilon when all went well.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    steps: int
    residuals: Tensor
    breakdown: bool
    orthogonality: float


def arnoldi(
    mv: Union[Callable[[Tensor], Tensor], Tensor],
    dim: int,
    *,
    max_steps: int = 100,
    top_k: int = 20,
    seed: int = 0,
    tol: float = 1e-10,
    dtype: torch.dtype = torch.float64,
    device: Optional[Union[str, torch.device]] = None,
) -> ArnoldiResult:
    """Top eigenpairs of a symmetric operator by Arnoldi iteration with full reorthogonalisation.

    Builds an orthonormal basis ``Q`` of the Krylov space ``{q, Aq, A²q, ...}`` from a
    random start, orthogonalising each new vector twice against all previous ones
    (classical Gram-Schmidt, twice: Giraud et al., 2005), and takes the
    eigenpairs of the projected matrix ``T = Qᵀ A Q``. For a symmetric ``A`` this is
    the Lanczos method without its loss of orthogonality. As in Schioppa et al.
    (AAAI 2022), used for influence functions through ``g ↦ Λ^{-1/2} U g``
    (:func:`spectral_projector`).

    Args:
        mv: ``A`` as an operator on blocks ``(k, dim) -> (k, dim)`` (called with
            ``k = 1``), or a symmetric ``(dim, dim)`` matrix.
        dim: the operator's size ``P``.
        max_steps: Krylov dimension to build (clamped to ``dim``); must be ``>= top_k``.
        top_k: eigenpairs kept, by largest ``|λ|``; ``1 <= top_k <= dim``.
        seed: seeds the random start vector (torch's global RNG is not touched).
        tol: stop when the new direction's norm falls below ``tol`` times the norm
            of its column of ``T`` (an invariant subspace).
        dtype: working precision of the basis (float64 by default; ``mv`` is
            called with vectors of this dtype, its output is cast back to it).
        device: where the basis lives; default CPU.
    """
    dim = check_count(dim, "dim")
    top_k = check_count(top_k, "top_k")
    if top_k > dim:
        raise ValueError(f"top_k: cannot exceed dim={dim}, got {top_k}")
    max_steps = check_count(max_steps, "max_steps")
    if max_steps < top_k:
        raise ValueError(f"max_steps: must be >= top_k={top_k} to produce that many pairs, got {max_steps}")
    max_steps = min(max_steps, dim)
    tol = check_nonnegative(tol, "tol")
    seed = check_count(seed, "seed", minimum=0)
    operator = as_operator(mv, dim)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(dim, generator=generator, dtype=torch.float64).to(device, dtype)  # one start in every dtype
    # The basis and the Hessenberg matrix are preallocated and filled row by row: each step
    # donates the state it is given (growing them by concatenation copied the whole basis per step).
    basis = torch.zeros(max_steps + 1, dim, dtype=dtype, device=device)
    basis[0] = start / start.norm()
    state = ArnoldiState(basis, 1, torch.zeros(max_steps + 1, max_steps, dtype=dtype, device=device), 0, False)

    def step(s: ArnoldiState) -> ArnoldiState:
        done = s.basis[: s.size]
        w = operator(done[-1:]).to(dtype).reshape(dim)
        check_finite(w, "mv(q)")
        h = torch.zeros(s.size, dtype=dtype, device=w.device)
        for _ in range(2):  # twice is enough (Kahan's "twice is enough")
            c = done @ w
            w = w - c @ done
            h = h + c
        beta = w.norm()
        j = s.steps
        s.hessenberg[: s.size, j] = h
        s.hessenberg[s.size, j] = beta
        if beta <= tol * max(float(h.norm()), 1e-300) or s.size == dim:
            return s._replace(steps=j + 1, breakdown=True)
        s.basis[s.size] = w / beta
        return s._replace(size=s.size + 1, steps=j + 1)

    final = fold(step, state, max_steps, done=lambda s: s.breakdown)
    m = final.steps
    if m < top_k:
        warnings.warn(
            f"arnoldi: the Krylov space became invariant after {m} steps, so only {m} of the "
            f"top_k={top_k} eigenpairs exist in it; returning {m}",
            stacklevel=2,
        )
    T = final.hessenberg[: m + 1, :m]
    square = T[:m]
    evals, evecs = torch.linalg.eigh((square + square.T) / 2)
    order = torch.argsort(evals.abs(), descending=True)[: min(top_k, m)]
    basis = final.basis[:m]
    beta_m = 0.0 if final.breakdown else float(T[m, m - 1])
    wide = basis.double()  # measured in float64: a float32 Gram matrix's own rounding (about eps·sqrt(dim)) is
    gram = wide @ wide.T  # far larger than the loss of orthogonality of the float32 vectors it would measure
    gram.diagonal().sub_(1)
    return ArnoldiResult(
        evals[order],
        evecs[:, order].T @ basis,
        m,
        (beta_m * evecs[m - 1, order]).abs(),
        final.breakdown,
        float(gram.abs().max()),
    )


class SpectralProjector(NamedTuple):
    """``g ↦ Λ^{-1/2} U g`` for the kept eigenpairs, so ``⟨Pg, Pg'⟩ ≈ gᵀ (A + damping I)⁻¹ g'``.

    Attributes:
        vectors: ``(r, dim)`` kept eigenvectors.
        scales: ``(r,)`` ``1 / sqrt(λ + damping)``, all finite and positive.
        eigenvalues: ``(r,)`` kept ``|λ + damping|`` (positive).
        n_negative: pairs dropped (``negative="drop"``) or reflected
            (``negative="abs"``) because ``λ + damping < 0``.
        n_small: pairs dropped because ``|λ + damping| <= rcond * max |λ + damping|``.
    """

    vectors: Tensor
    scales: Tensor
    eigenvalues: Tensor
    n_negative: int
    n_small: int

    def to(self, dtype: torch.dtype) -> "SpectralProjector":
        """The same projector with its tensors in ``dtype`` (e.g. the gradients' precision, for speed)."""
        return self._replace(vectors=self.vectors.to(dtype), scales=self.scales.to(dtype),
                             eigenvalues=self.eigenvalues.to(dtype))

    def __call__(self, G: Tensor) -> Tensor:
        """Project ``G`` ``(n, dim)`` (or ``(dim,)``) to ``(n, r)``."""
        return (G.to(self.vectors.dtype) @ self.vectors.T) * self.scales

    def solve(self, B: Tensor) -> Solution:
        """``Uᵀ |Λ + damping|⁻¹ U b`` for the rows of ``B`` ``(k, dim)``: the inverse on the kept subspace.

        ``status`` is ``INDEFINITE`` where negative eigenpairs were dropped or
        reflected (``n_negative > 0``), else ``CONVERGED``; ``stats`` holds
        ``n_negative`` and ``n_small``.
        """
        block, single = as_block(B, self.vectors.shape[1], name="B")
        x = (self(block) * self.scales) @ self.vectors
        status = Status.INDEFINITE if self.n_negative else Status.CONVERGED
        return solution(x, status, 0, single=single, n_negative=self.n_negative, n_small=self.n_small)

    def matvec(self, V: Tensor) -> Tensor:
        """``Uᵀ |Λ + damping| U v`` for the rows of ``V`` ``(k, dim)``: the operator on the kept subspace."""
        block, single = as_block(V, self.vectors.shape[1])
        out = ((block.to(self.vectors.dtype) @ self.vectors.T) * self.eigenvalues) @ self.vectors
        return out[0] if single else out


def spectral_projector(
    eigenvalues: Tensor,
    eigenvectors: Tensor,
    *,
    damping: float = 0.0,
    negative: str = "drop",
    rcond: float = 1e-6,
) -> SpectralProjector:
    """Build ``g ↦ (Λ + damping)^{-1/2} U g`` from eigenpairs, with no NaN whatever the spectrum.

    A Hessian away from a minimum (or of a ReLU network) has negative and tiny
    eigenvalues; ``λ^{-1/2}`` of those is NaN or huge. They are handled
    explicitly and counted in the result: tiny ones (``|λ + damping| <= rcond ·
    max``) are dropped; negative ones are dropped (``negative="drop"``) or
    replaced by their magnitude (``negative="abs"``).

    Args:
        eigenvalues: ``(r,)``, e.g. :attr:`ArnoldiResult.eigenvalues`.
        eigenvectors: ``(r, dim)``, orthonormal rows.
        damping: ``>= 0``, added to every eigenvalue.
        negative: ``"drop"`` or ``"abs"``.
        rcond: relative threshold for tiny eigenvalues, ``>= 0``.
    """
    if negative not in ("drop", "abs"):
        raise ValueError(f"negative: expected 'drop' or 'abs', got {negative!r}")
    damping = check_nonnegative(damping, "damping")
    rcond = check_nonnegative(rcond, "rcond")
    if eigenvalues.dim() != 1 or eigenvectors.dim() != 2 or eigenvectors.shape[0] != eigenvalues.shape[0]:
        raise ValueError(
            f"eigenvalues (r,) and eigenvectors (r, dim) disagree: {tuple(eigenvalues.shape)} "
            f"and {tuple(eigenvectors.shape)}"
        )
    check_finite(eigenvalues, "eigenvalues")
    check_finite(eigenvectors, "eigenvectors")
    shifted = eigenvalues + damping
    is_negative = shifted < 0
    magnitude = shifted.abs()
    top = float(magnitude.max()) if magnitude.numel() else 0.0
    small = magnitude <= rcond * top
    keep = ~small & (~is_negative if negative == "drop" else torch.ones_like(small))
    kept = magnitude[keep]
    return SpectralProjector(
        eigenvectors[keep],
        kept.rsqrt(),
        kept,
        int((is_negative & ~small).sum()),
        int(small.sum()),
    )
