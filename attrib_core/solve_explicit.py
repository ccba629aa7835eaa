"""Direct solves with an explicit (dense) Hessian: Cholesky, with an eigendecomposition fallback."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._checks import as_block, check_finite, check_nonnegative

__all__ = ["ExplicitFactor", "ExplicitSolution", "factor_explicit", "solve_factored", "solve_explicit"]


class ExplicitFactor(NamedTuple):
    """A factorisation of ``A = H + damping * I``, reusable for any number of right-hand sides.

    Attributes:
        method: ``"cholesky"`` (``A`` was positive definite) or ``"eigh"`` (it was not).
        positive_definite: whether the Cholesky factorisation succeeded.
        factor: the lower Cholesky factor ``L`` (``P, P``), or the eigenvectors ``U``.
        inverse_eigenvalues: for ``"eigh"``, ``1 / lambda_i`` with eigenvalues of
            magnitude at most ``rcond * max|lambda|`` set to 0 (dropped); else None.
        min_eigenvalue: the smallest eigenvalue of ``A`` (``"eigh"`` only; None otherwise).
        n_negative: eigenvalues of ``A`` below zero (``"eigh"`` only; 0 otherwise).
        n_dropped: eigenvalues treated as zero (``"eigh"`` only; 0 otherwise).
    """

    method: str
    positive_definite: bool
    factor: Tensor
    inverse_eigenvalues: Optional[Tensor]
    min_eigenvalue: Optional[float]
    n_negative: int
    n_dropped: int


class ExplicitSolution(NamedTuple):
    """``x`` solves ``(H + damping * I) x = b`` for every row ``b``; the rest are diagnostics."""

    x: Tensor
    method: str
    positive_definite: bool
    min_eigenvalue: Optional[float]
    n_negative: int
    n_dropped: int


def factor_explicit(H: Tensor, *, damping: float = 0.0, rcond: Optional[float] = None) -> ExplicitFactor:
    """Factor ``A = H + damping * I`` for repeated solves.

    Tries Cholesky first. If ``A`` is not positive definite (a non-convex loss, a
    Hessian far from a minimum) it falls back to the eigendecomposition
    ``A = U diag(lambda) Uᵀ`` and solves with ``U diag(1/lambda) Uᵀ``, dropping
    eigenvalues with ``|lambda| <= rcond * max|lambda|`` (a pseudo-inverse on
    those directions). Negative eigenvalues are kept and counted: the result is
    still the solution of the damped system, and the caller sees it was indefinite.

    Args:
        H: symmetric ``(P, P)``. Computed in its own dtype (at least float32).
        damping: ``>= 0``, added to the diagonal.
        rcond: relative cut-off for dropping eigenvalues; default ``P * eps``.
    """
    _check_square(H)
    damping = check_nonnegative(damping, "damping")
    if rcond is not None:
        rcond = check_nonnegative(rcond, "rcond")
    dtype = torch.promote_types(H.dtype, torch.float32)
    A = H.to(dtype)
    A = (A + A.T) / 2
    if damping:
        A = A + damping * torch.eye(A.shape[0], dtype=dtype, device=A.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return ExplicitFactor("cholesky", True, L, None, None, 0, 0)
    evals, evecs = torch.linalg.eigh(A)
    cutoff = (rcond if rcond is not None else A.shape[0] * torch.finfo(dtype).eps) * evals.abs().max()
    keep = evals.abs() > cutoff
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    return ExplicitFactor(
        "eigh",
        False,
        evecs,
        inv,
        float(evals.min()),
        int((evals < 0).sum()),
        int((~keep).sum()),
    )


def solve_factored(factor: ExplicitFactor, B: Tensor) -> Tensor:
    """Apply ``(H + damping * I)^{-1}`` from :func:`factor_explicit` to the rows of ``B`` ``(k, P)``.

    Computed, and returned, in the wider of ``B``'s dtype and the factorisation's
    (at least float32), on their common device.
    """
    block, single = as_block(B, factor.factor.shape[0], name="B")
    if block.device != factor.factor.device:
        raise ValueError(f"B: is on {block.device} but the factorisation is on {factor.factor.device}")
    dtype = torch.promote_types(block.dtype, factor.factor.dtype)
    rhs = block.to(dtype)
    if factor.method == "cholesky":
        x = torch.cholesky_solve(rhs.T, factor.factor.to(dtype)).T
    else:
        U = factor.factor.to(dtype)
        x = ((rhs @ U) * factor.inverse_eigenvalues.to(dtype)) @ U.T
    return x[0] if single else x


def solve_explicit(
    H: Tensor, B: Tensor, *, damping: float = 0.0, rcond: Optional[float] = None
) -> ExplicitSolution:
    """Solve ``(H + damping * I) X = B`` row by row: ``B`` is ``(k, P)`` (or ``(P,)``).

    See :func:`factor_explicit` for the method; to solve many batches against
    one Hessian, factor once and call :func:`solve_factored`.
    """
    _check_square(H)
    as_block(B, H.shape[0], name="B")
    factor = factor_explicit(H, damping=damping, rcond=rcond)
    x = solve_factored(factor, B)
    return ExplicitSolution(
        x,
        factor.method,
        factor.positive_definite,
        factor.min_eigenvalue,
        factor.n_negative,
        factor.n_dropped,
    )


def _check_square(H: Tensor) -> None:
    if not isinstance(H, Tensor) or H.dim() != 2 or H.shape[0] != H.shape[1]:
        shape = tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__
        raise ValueError(f"H: expected a square matrix of shape (P, P), got {shape}")
    check_finite(H, "H")
