"""Diagonal curvature: Hutchinson's estimate of an operator's diagonal, and the Jacobi preconditioner."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ._checks import as_operator, check_count, check_finite, check_nonnegative

__all__ = ["hutchinson_diagonal", "jacobi"]


def hutchinson_diagonal(
    mv: Union[Callable[[Tensor], Tensor], Tensor],
    dim: int,
    *,
    samples: int = 100,
    seed: int = 0,
    block: int = 32,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
) -> Tensor:
    """Estimate ``diag(A)`` as ``mean_z z ⊙ (A z)`` over Rademacher ``z`` (Bekas, Kokiopoulou & Saad, 2007).

    Unbiased; its variance per entry is ``Σ_{j≠i} A_ij²`` over ``samples``. When
    per-sample gradients ``G`` are at hand, the empirical Fisher's diagonal is
    exact and cheaper: ``G.pow(2).mean(0)``.

    Args:
        mv: ``A`` as an operator ``(k, dim) -> (k, dim)`` or a ``(dim, dim)`` matrix.
        dim: the operator's size.
        samples: probe vectors, ``>= 1``, applied ``block`` at a time.
        seed: seeds the probes (torch's global RNG is not touched).
    """
    dim = check_count(dim, "dim")
    samples = check_count(samples, "samples")
    block = check_count(block, "block")
    operator = as_operator(mv, dim)
    generator = torch.Generator().manual_seed(check_count(seed, "seed", minimum=0))
    total = torch.zeros(dim, dtype=dtype, device=device)
    done = 0
    while done < samples:
        k = min(block, samples - done)
        z = (torch.randint(0, 2, (k, dim), generator=generator) * 2 - 1).to(dtype=dtype, device=device)
        total += (z * operator(z).to(dtype)).sum(0)
        done += k
    estimate = total / samples
    check_finite(estimate, "mv(z)")
    return estimate


def jacobi(diagonal: Tensor, *, damping: float = 0.0) -> Callable[[Tensor], Tensor]:
    """The Jacobi preconditioner ``R ↦ R / (diag(A) + damping)`` for :func:`cg`.

    Args:
        diagonal: ``(dim,)`` diagonal of ``A`` (exact, or :func:`hutchinson_diagonal`).
        damping: ``>= 0``; pass the same damping as to :func:`cg`.

    Raises:
        ValueError: some ``diagonal + damping <= 0`` (the preconditioner must be
            positive definite for CG); the message counts them.
    """
    if not isinstance(diagonal, Tensor) or diagonal.dim() != 1:
        raise ValueError("diagonal: expected a tensor of shape (dim,)")
    check_finite(diagonal, "diagonal")
    damping = check_nonnegative(damping, "damping")
    shifted = diagonal + damping
    bad = int((shifted <= 0).sum())
    if bad:
        raise ValueError(
            f"diagonal: {bad} entries of diagonal + damping are <= 0; a preconditioner must be "
            "positive definite (raise damping, or clamp the diagonal)"
        )
    inverse = 1.0 / shifted

    def apply(R: Tensor) -> Tensor:
        return R * inverse.to(R.dtype)

    return apply
