"""Randomised Nyström approximation of a PSD operator: a low-rank solver and a CG preconditioner."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from ._checks import as_block, as_operator, check_count, check_finite, check_nonnegative
from .solution import Solution, Status, solution

__all__ = ["NystromApprox", "nystrom"]


class NystromApprox(NamedTuple):
    """``Â = U diag(λ) Uᵀ ≈ A``, with ``U`` the rows of ``eigenvectors``.

    Attributes:
        eigenvalues: ``(r,)`` descending, ``>= 0``.
        eigenvectors: ``(r, dim)`` orthonormal rows.
        shift: the stabilising shift ``ν`` that was added and removed.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    shift: float

    def solve(self, B: Tensor, *, damping: float) -> Solution:
        """``(Â + damping I)⁻¹`` applied to the rows of ``B`` ``(k, dim)``, exactly (``status`` ``CONVERGED``).

        ``= U (Λ + μ)⁻¹ Uᵀ b + (b - U Uᵀ b) / μ``; at full rank the second term
        vanishes and ``damping = 0`` is allowed when every ``λ > 0``.
        """
        block, single = as_block(B, self.eigenvectors.shape[1], name="B")
        mu = check_nonnegative(damping, "damping")
        full = self.eigenvectors.shape[0] == self.eigenvectors.shape[1]
        if mu == 0 and not (full and bool((self.eigenvalues > 0).all())):
            raise ValueError(
                "damping: must be > 0 unless the sketch has full rank and positive eigenvalues "
                "(off its range the approximation is singular)"
            )
        U = self.eigenvectors
        coords = block.to(U.dtype) @ U.T
        x = (coords / (self.eigenvalues + mu)) @ U
        if not full:
            x = x + (block.to(U.dtype) - coords @ U) / mu
        x = x.to(torch.promote_types(block.dtype, torch.float32))
        return solution(x, Status.CONVERGED, 0, single=single, rank=U.shape[0])

    def matvec(self, V: Tensor, *, damping: float = 0.0) -> Tensor:
        """``(Â + damping I)`` applied to the rows of ``V`` ``(k, dim)``."""
        block, single = as_block(V, self.eigenvectors.shape[1])
        mu = check_nonnegative(damping, "damping")
        U = self.eigenvectors
        rows = block.to(U.dtype)
        out = ((rows @ U.T) * self.eigenvalues) @ U + mu * rows
        out = out.to(torch.promote_types(block.dtype, torch.float32))
        return out[0] if single else out

    def preconditioner(self, *, damping: float) -> Callable[[Tensor], Tensor]:
        """The Nyström preconditioner for ``A + damping I`` (Frangella, Tropp & Udell, 2023).

        ``P⁻¹ = (λ_r + μ) U (Λ + μ)⁻¹ Uᵀ + (I - U Uᵀ)``, with ``λ_r`` the smallest
        kept eigenvalue: it maps the top of the spectrum of ``A + μI`` onto
        ``λ_r + μ`` and leaves the rest alone, so CG converges at the rate of the
        tail. Pass it to :func:`cg` as ``preconditioner=``.
        """
        mu = check_nonnegative(damping, "damping")
        U, lam = self.eigenvectors, self.eigenvalues
        floor = float(lam[-1]) + mu
        if not floor > 0:
            raise ValueError("damping: must be > 0 when the sketch's smallest eigenvalue is 0")

        def apply(R: Tensor) -> Tensor:
            coords = R.to(U.dtype) @ U.T
            out = (coords * (floor / (lam + mu))) @ U + R.to(U.dtype) - coords @ U
            return out.to(R.dtype)

        return apply


def nystrom(
    mv: Union[Callable[[Tensor], Tensor], Tensor],
    dim: int,
    *,
    rank: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: Optional[Union[str, torch.device]] = None,
) -> NystromApprox:
    """A rank-``rank`` Nyström approximation of a symmetric PSD operator from ``rank`` products.

    The stabilised randomised Nyström method (Tropp, Yurtsever, Udell & Cevher,
    2017; Frangella, Tropp & Udell, 2023): with an orthonormal Gaussian test matrix
    ``Ω`` (``dim × r``), ``Y = AΩ``, a shift ``ν = sqrt(dim) · eps · ‖Y‖``,
    ``Y_ν = Y + νΩ``, ``C = chol(Ωᵀ Y_ν)``, ``B = Y_ν C⁻¹`` and ``B = U Σ Vᵀ``, it
    returns ``U`` and ``λ = max(Σ² - ν, 0)``. Exact when ``rank = dim``.

    Args:
        mv: ``A`` as an operator on blocks ``(k, dim) -> (k, dim)`` (called once, with
            ``k = rank``), or a ``(dim, dim)`` matrix. ``A`` must be PSD (a Gauss-Newton
            or Fisher operator, or a damped Hessian).
        dim: the operator's size.
        rank: ``1 <= rank <= dim``.
        seed: seeds ``Ω`` (torch's global RNG is not touched).
        dtype, device: working precision and place of the sketch.
    """
    dim = check_count(dim, "dim")
    rank = check_count(rank, "rank")
    if rank > dim:
        raise ValueError(f"rank: cannot exceed dim={dim}, got {rank}")
    seed = check_count(seed, "seed", minimum=0)
    operator = as_operator(mv, dim)
    generator = torch.Generator().manual_seed(seed)
    omega, _ = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=dtype))
    omega = omega.to(device)
    Y = operator(omega.T).to(dtype).T  # (dim, rank)
    check_finite(Y, "mv(Ω)")
    norm = float(torch.linalg.matrix_norm(Y, ord=2))
    # The shift must cover the operator's own rounding, which its output dtype does not
    # reveal (a float32 operator answers a float64 sketch in float64): if Cholesky fails
    # at this dtype's precision, retry at float32's, then bfloat16's.
    for eps in sorted({torch.finfo(dtype).eps, torch.finfo(torch.float32).eps, torch.finfo(torch.bfloat16).eps}):
        shift = dim**0.5 * eps * norm
        Y_shift = Y + shift * omega
        core = omega.T @ Y_shift
        C, info = torch.linalg.cholesky_ex((core + core.T) / 2)
        if int(info) == 0:
            break
    else:
        raise ValueError("mv: the operator is not positive semi-definite on the sketch (Cholesky failed)")
    B = torch.linalg.solve_triangular(C, Y_shift.T, upper=False).T  # Y_ν C⁻ᵀ with C lower
    U, sigma, _ = torch.linalg.svd(B, full_matrices=False)
    eigenvalues = torch.clamp(sigma.pow(2) - shift, min=0)
    return NystromApprox(eigenvalues, U.T.contiguous(), shift)
