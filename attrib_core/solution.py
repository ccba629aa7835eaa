"""The one result every solver returns, and the status codes it carries per right-hand side."""

from __future__ import annotations

import enum
from typing import Any, NamedTuple, Optional, Protocol

import torch
from torch import Tensor

__all__ = ["Status", "Solution", "Factorisation", "solution"]


class Status(enum.IntEnum):
    """How the solve of one right-hand side ended (the codes held in :attr:`Solution.status`).

    ``CONVERGED``: the solver's own stopping test was met (an exact direct solve,
    a residual within tolerance, a recursion whose updates have settled).
    ``MAX_STEPS``: the step cap was reached first; ``x`` is the last iterate.
    ``DIVERGED``: the iterates grew without bound or became NaN/Inf.
    ``INDEFINITE``: the (damped) operator is not positive definite (negative or
    zero curvature was met); ``x`` solves the system it was given where one
    exists, but an inverse Hessian is not what an influence score assumes.
    """

    CONVERGED = 0
    MAX_STEPS = 1
    DIVERGED = 2
    INDEFINITE = 3


class Solution(NamedTuple):
    """``x`` solves ``(A + damping I) x = b`` for each right-hand side ``b`` (a row of ``B``).

    The one result type of every solver in the core, as ``lineax.linear_solve``
    returns one: failure is data, and the caller decides whether to warn or raise.

    Attributes:
        x: ``(k, P)`` like ``B`` (``(P,)`` for a single right-hand side; a dict or
            list of per-layer blocks where the solver takes one, as :func:`datainf`).
        status: ``(k,)`` int64 codes of :class:`Status` (0-d for a single right-hand side).
        steps: ``(k,)`` int64, the steps each right-hand side took (0 for a direct solve).
        stats: the solver's own diagnostics (residual norms, eigenvalue counts, ...),
            documented by each solver.
    """

    x: Any
    status: Tensor
    steps: Tensor
    stats: dict

    @property
    def converged(self) -> Tensor:
        """``(k,)`` bool: which right-hand sides ended :attr:`Status.CONVERGED`."""
        return self.status == Status.CONVERGED

    def counts(self) -> dict[Status, int]:
        """How many right-hand sides ended with each status that occurred."""
        codes = self.status.reshape(-1).tolist()
        return {s: codes.count(int(s)) for s in Status if int(s) in codes}


class Factorisation(Protocol):
    """A fitted approximation of an operator, reusable for any number of right-hand sides.

    Explicit (Cholesky/LDLᵀ/eigh), EK-FAC, Nyström and the Arnoldi spectral
    projector all answer these two calls; how they were fitted is their own business.
    """

    def solve(self, B: Tensor) -> Solution: ...

    def matvec(self, V: Tensor) -> Tensor: ...


def solution(x: Any, status: Any, steps: Any = 0, *, single: bool = False, like: Optional[Tensor] = None,
             per_row: Optional[dict] = None, **stats: Any) -> Solution:
    """Assemble a :class:`Solution`, broadcasting a scalar ``status``/``steps`` to one per right-hand side.

    ``like`` is the ``(k, P)`` block whose rows are the right-hand sides (default
    ``x``); ``per_row`` holds diagnostics with one entry per right-hand side, the
    other keyword arguments diagnostics of the whole solve. With ``single``, ``x``
    and every per-row field are reduced to the single right-hand side's.
    """
    block = x if like is None else like
    rows, device = block.shape[0], block.device
    status = torch.as_tensor(status, dtype=torch.long, device=device).expand(rows).clone()
    steps = torch.as_tensor(steps, dtype=torch.long, device=device).expand(rows).clone()
    per_row = dict(per_row or {})
    if single:
        x = x[0] if isinstance(x, Tensor) else x
        status, steps = status[0], steps[0]
        per_row = {name: value[0] for name, value in per_row.items()}
    return Solution(x, status, steps, {**stats, **per_row})
