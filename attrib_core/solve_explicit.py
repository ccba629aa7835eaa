"""Direct solves with an explicit (dense) Hessian: Cholesky, with LDLᵀ and eigendecomposition fallbacks."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._checks import as_block, check_finite, check_nonnegative
from .solution import Solution, Status, solution

__all__ = ["ExplicitFactor", "factor_explicit", "solve_explicit"]


class ExplicitFactor(NamedTuple):
    """A factorisation of ``A = H + damping * I``, reusable for any number of right-hand sides.

    Attributes:
        method: ``"cholesky"`` (``A`` positive definite), ``"ldl"`` (indefinite but
            nonsingular: Bunch-Kaufman ``LDLᵀ``), or ``"eigh"`` (singular to working
            precision: eigendecomposition with the null directions dropped).
        factor: the lower Cholesky factor ``L``, the compact ``LD`` factor, or the
            eigenvectors ``U`` (``P, P``).
        pivots: the ``LDLᵀ`` pivots (``"ldl"`` only; else None).
        eigenvalues: for ``"eigh"``, the eigenvalues of ``A``; else None.
        inverse_eigenvalues: for ``"eigh"``, ``1 / lambda_i`` with eigenvalues of
            magnitude at most ``rcond * max|lambda|`` set to 0 (dropped); else None.
        matrix: ``A`` itself (``"ldl"`` only, for :meth:`matvec`; else None).
        min_eigenvalue: the smallest eigenvalue of ``A`` (``"eigh"`` only; None otherwise).
        n_negative: eigenvalues of ``A`` below zero (from the inertia of ``D`` for
            ``"ldl"``, by Sylvester's law; 0 for ``"cholesky"``).
        n_dropped: eigenvalues treated as zero (``"eigh"`` only; 0 otherwise).
    """

    method: str
    factor: Tensor
    pivots: Optional[Tensor]
    eigenvalues: Optional[Tensor]
    inverse_eigenvalues: Optional[Tensor]
    matrix: Optional[Tensor]
    min_eigenvalue: Optional[float]
    n_negative: int
    n_dropped: int

    @property
    def positive_definite(self) -> bool:
        """Whether ``A`` is positive definite (the Cholesky factorisation succeeded)."""
        return self.method == "cholesky"

    def solve(self, B: Tensor) -> Solution:
        """``A⁻¹`` applied to the rows of ``B`` ``(k, P)`` (a pseudo-inverse on dropped directions).

        Computed, and returned, in the wider of ``B``'s dtype and the factorisation's
        (at least float32), on their common device. ``status`` is ``CONVERGED`` for a
        positive definite ``A``, else ``INDEFINITE``; ``stats`` holds ``method``,
        ``min_eigenvalue``, ``n_negative`` and ``n_dropped``.
        """
        single, rhs = self._block(B)
        if self.method == "cholesky":
            x = torch.cholesky_solve(rhs.T, self.factor.to(rhs.dtype)).T
        elif self.method == "ldl":
            x = torch.linalg.ldl_solve(self.factor.to(rhs.dtype), self.pivots, rhs.T).T
        else:
            U = self.factor.to(rhs.dtype)
            x = ((rhs @ U) * self.inverse_eigenvalues.to(rhs.dtype)) @ U.T
        status = Status.CONVERGED if self.positive_definite else Status.INDEFINITE
        return solution(x, status, 0, single=single, method=self.method, min_eigenvalue=self.min_eigenvalue,
                        n_negative=self.n_negative, n_dropped=self.n_dropped)

    def matvec(self, V: Tensor) -> Tensor:
        """``A`` applied to the rows of ``V`` ``(k, P)``."""
        single, rows = self._block(V, "V")
        if self.method == "cholesky":
            L = self.factor.to(rows.dtype)
            out = (rows @ L) @ L.T
        elif self.method == "ldl":
            out = rows @ self.matrix.to(rows.dtype)
        else:
            U = self.factor.to(rows.dtype)
            out = ((rows @ U) * self.eigenvalues.to(rows.dtype)) @ U.T
        return out[0] if single else out

    def _block(self, B: Tensor, name: str = "B") -> tuple[bool, Tensor]:
        block, single = as_block(B, self.factor.shape[0], name=name)
        if block.device != self.factor.device:
            raise ValueError(f"{name}: is on {block.device} but the factorisation is on {self.factor.device}")
        return single, block.to(torch.promote_types(block.dtype, self.factor.dtype))


def factor_explicit(H: Tensor, *, damping: float = 0.0, rcond: Optional[float] = None) -> ExplicitFactor:
    """Factor ``A = H + damping * I`` for repeated solves.

    Tries Cholesky first. If ``A`` is not positive definite (a non-convex loss, a
    Hessian far from a minimum) it falls back to the symmetric-indefinite ``LDLᵀ``
    factorisation (as cheap as Cholesky; the count of negative eigenvalues comes
    from the inertia of ``D``), and if ``A`` is singular to working precision, to
    the eigendecomposition ``A = U diag(lambda) Uᵀ``, solving with
    ``U diag(1/lambda) Uᵀ`` and dropping eigenvalues with
    ``|lambda| <= rcond * max|lambda|`` (a pseudo-inverse on those directions).
    Negative eigenvalues are kept and counted: the result is still the solution of
    the damped system, and the caller sees it was indefinite. (On a 9,610-parameter
    MLP, float32, the eigendecomposition took about a minute; ``LDLᵀ`` seconds.)

    Args:
        H: symmetric ``(P, P)``. Computed in its own dtype (at least float32).
        damping: ``>= 0``, added to the diagonal.
        rcond: relative cut-off for dropping eigenvalues; default ``P * eps``.

    Raises:
        ValueError: ``H`` is not symmetric beyond rounding (``max|H - Hᵀ| > sqrt(eps) · max|H|``).
    """
    _check_square(H)
    damping = check_nonnegative(damping, "damping")
    if rcond is not None:
        rcond = check_nonnegative(rcond, "rcond")
    dtype = torch.promote_types(H.dtype, torch.float32)
    A = H.to(dtype)
    _check_symmetric(A)
    A = (A + A.T) / 2  # only rounding is left to average away
    if damping:
        A = A + damping * torch.eye(A.shape[0], dtype=dtype, device=A.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return ExplicitFactor("cholesky", L, None, None, None, None, None, 0, 0)
    LD, pivots, info = torch.linalg.ldl_factor_ex(A)
    if int(info) == 0:
        negative = _negative_inertia(LD, pivots)
        if negative is not None:
            return ExplicitFactor("ldl", LD, pivots, None, None, A, None, negative, 0)
    evals, evecs = torch.linalg.eigh(A)
    cutoff = (rcond if rcond is not None else A.shape[0] * torch.finfo(dtype).eps) * evals.abs().max()
    keep = evals.abs() > cutoff
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    return ExplicitFactor(
        "eigh",
        evecs,
        None,
        evals,
        inv,
        None,
        float(evals.min()),
        int((evals < 0).sum()),
        int((~keep).sum()),
    )


def _negative_inertia(LD: Tensor, pivots: Tensor) -> Optional[int]:
    """Negative eigenvalues of ``A = L D Lᵀ``: those of ``D``'s 1x1 and 2x2 blocks (Sylvester's law).

    None when a block is singular to working precision (then ``A`` is too, for the solve).
    """
    diag = torch.diagonal(LD).tolist()
    sub = torch.diagonal(LD, -1).tolist()
    piv = pivots.tolist()
    scale = max(abs(d) for d in diag) or 1.0
    tiny = torch.finfo(LD.dtype).eps * scale
    negative, i = 0, 0
    while i < len(diag):
        if piv[i] < 0:  # a 2x2 block on rows i, i+1
            a, b, c = diag[i], sub[i], diag[i + 1]
            det = a * c - b * b
            if abs(det) <= tiny * scale:
                return None
            negative += 1 if det < 0 else (2 if a < 0 else 0)
            i += 2
        else:
            if abs(diag[i]) <= tiny:
                return None
            negative += diag[i] < 0
            i += 1
    return negative


def solve_explicit(
    H: Tensor, B: Tensor, *, damping: float = 0.0, rcond: Optional[float] = None
) -> Solution:
    """Solve ``(H + damping * I) X = B`` row by row: ``B`` is ``(k, P)`` (or ``(P,)``).

    See :func:`factor_explicit` for the method and :meth:`ExplicitFactor.solve` for
    the result; to solve many batches against one Hessian, factor once and call
    ``.solve`` on the factorisation.
    """
    _check_square(H)
    as_block(B, H.shape[0], name="B")
    return factor_explicit(H, damping=damping, rcond=rcond).solve(B)


def _check_symmetric(A: Tensor) -> None:
    """Refuse a matrix whose asymmetry is more than rounding: symmetrising it would solve another system."""
    scale = float(A.abs().max())
    gap = float((A - A.T).abs().max())
    if gap > torch.finfo(A.dtype).eps ** 0.5 * scale:
        raise ValueError(
            f"H: not symmetric (max |H - Hᵀ| = {gap:.3g}, max |H| = {scale:.3g}); the explicit solver factors a "
            "symmetric matrix. If the asymmetry is rounding, pass (H + H.T) / 2"
        )


def _check_square(H: Tensor) -> None:
    if not isinstance(H, Tensor) or H.dim() != 2 or H.shape[0] != H.shape[1]:
        shape = tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__
        raise ValueError(f"H: expected a square matrix of shape (P, P), got {shape}")
    check_finite(H, "H")
