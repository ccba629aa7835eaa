"""Conjugate gradient for many right-hand sides at once, written as a fold."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from ._checks import as_block, check_callable, check_count, check_nonnegative, linear_system
from .fold import fold
from .solution import Solution, Status, solution

__all__ = ["CGState", "cg"]


class CGState(NamedTuple):
    """The carry of the CG fold; every field has one entry (row) per right-hand side."""

    x: Tensor  # (k, P) iterate
    r: Tensor  # (k, P) residual b - A x, updated by recurrence
    p: Tensor  # (k, P) search direction
    rho: Tensor  # (k,) r · M r
    active: Tensor  # (k,) bool: still iterating
    steps: Tensor  # (k,) int: steps this column took
    indefinite: Tensor  # (k,) bool: met a direction of curvature pᵀ A p <= 0


def cg(
    mv: Union[Callable[[Tensor], Tensor], Tensor],
    B: Tensor,
    *,
    tol: float = 1e-5,
    atol: float = 0.0,
    max_steps: Optional[int] = None,
    damping: float = 0.0,
    x0: Optional[Tensor] = None,
    preconditioner: Optional[Callable[[Tensor], Tensor]] = None,
) -> Solution:
    """Solve ``(A + damping I) x = b`` for every row ``b`` of ``B`` by (preconditioned) conjugate gradient.

    Hestenes & Stiefel (1952). All ``k`` systems advance together, one operator
    call per step on the ``(k, P)`` block of search directions; a column stops
    updating once its residual norm is at most ``max(tol * ||b||, atol)`` (the
    criterion of ``scipy.sparse.linalg.cg``), and the loop ends when all have.
    Without a preconditioner and from ``x0 = 0`` the iterates are SciPy's.

    Args:
        mv: ``A`` as an operator ``(k, P) -> (k, P)`` (see :func:`make_hvp`) or a
            symmetric ``(P, P)`` tensor. ``A + damping I`` should be positive definite.
        B: right-hand sides ``(k, P)``, or one ``(P,)`` (then ``x`` is ``(P,)`` too).
        tol: relative tolerance on the residual norm, ``>= 0``.
        atol: absolute tolerance on the residual norm, ``>= 0``.
        max_steps: most iterations, ``>= 1``; default ``10 * P``.
        damping: ``>= 0``, added to the diagonal of ``A``.
        x0: initial guess shaped like ``B``; default zeros.
        preconditioner: ``M ≈ (A + damping I)^{-1}`` as an operator ``(k, P) -> (k, P)``.

    Returns:
        :class:`Solution` with ``stats["residual_norm"]`` (``k,``), ``||b - (A + damping I) x||``
        as tracked by the recurrence, and ``stats["threshold"]`` (``k,``), the norm it
        had to reach. ``status`` is ``DIVERGED`` for a non-finite residual, else
        ``INDEFINITE`` where a search direction met curvature ``pᵀ A p <= 0`` (a column
        stops at zero curvature and goes on at negative curvature, as SciPy's does; it
        may still reach the threshold, but ``A + damping I`` is not positive definite),
        else ``CONVERGED`` within the threshold, ``MAX_STEPS`` otherwise.
    """
    operator, block, single = linear_system(mv, B)
    tol = check_nonnegative(tol, "tol")
    atol = check_nonnegative(atol, "atol")
    damping = check_nonnegative(damping, "damping")
    width = block.shape[1]
    max_steps = 10 * width if max_steps is None else check_count(max_steps, "max_steps")
    if preconditioner is not None:
        check_callable(preconditioner, "preconditioner")
    dtype = torch.promote_types(block.dtype, torch.float32)
    block = block.to(dtype)
    if x0 is not None:
        x0, _ = as_block(x0, width, name="x0")
        if x0.shape != block.shape:
            raise ValueError(f"x0: expected shape {tuple(block.shape)} like B, got {tuple(x0.shape)}")
        x0 = x0.to(dtype)

    def A(v: Tensor) -> Tensor:
        out = operator(v)
        return out + damping * v if damping else out

    def M(r: Tensor) -> Tensor:
        return r if preconditioner is None else preconditioner(r)

    threshold = torch.clamp(tol * block.norm(dim=1), min=atol)
    x = torch.zeros_like(block) if x0 is None else x0
    r = block if x0 is None else block - A(x)
    z = M(r)
    k = block.shape[0]
    state = CGState(
        x=x,
        r=r,
        p=z,
        rho=(r * z).sum(1),
        active=r.norm(dim=1) > threshold,
        steps=torch.zeros(k, dtype=torch.long, device=block.device),
        indefinite=torch.zeros(k, dtype=torch.bool, device=block.device),
    )

    def step(s: CGState) -> CGState:
        q = A(s.p)
        curvature = (s.p * q).sum(1)
        moving = s.active & (curvature != 0)
        alpha = torch.where(moving, s.rho / torch.where(moving, curvature, 1), 0).unsqueeze(1)
        x = s.x + alpha * s.p
        r = s.r - alpha * q
        z = M(r)
        rho = (r * z).sum(1)
        beta = torch.where(moving & (s.rho != 0), rho / torch.where(s.rho != 0, s.rho, 1), 0)
        p = torch.where(moving.unsqueeze(1), z + beta.unsqueeze(1) * s.p, s.p)
        norm = r.norm(dim=1)
        active = moving & (norm > threshold) & torch.isfinite(norm)
        indefinite = s.indefinite | (s.active & ~(curvature > 0))
        return CGState(x, r, p, torch.where(moving, rho, s.rho), active, s.steps + moving.long(), indefinite)

    final = fold(step, state, max_steps, done=lambda s: not bool(s.active.any()))
    norm = final.r.norm(dim=1)
    status = torch.full_like(final.steps, Status.MAX_STEPS)
    status[torch.isfinite(norm) & (norm <= threshold)] = Status.CONVERGED
    status[final.indefinite] = Status.INDEFINITE
    status[~torch.isfinite(norm)] = Status.DIVERGED
    return solution(final.x, status, final.steps, single=single,
                    per_row={"residual_norm": norm, "threshold": threshold})
