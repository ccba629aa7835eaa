"""TRAK's kernel algebra (Park, Georgiev, Ilyas, Leclerc & Madry, ICML 2023).

With ``Φ`` ``(n, k)`` the projected per-example gradients of the model output
(the margin) on the training set, ``Φ_test`` those of the test set and ``p_i`` the
probability of training example ``i``'s correct label, one checkpoint's scores are

    τ = diag(Q) Φ (ΦᵀΦ + λI)⁻¹ Φ_testᵀ,   Q = 1 - p,

the paper's kernel ``(ΦᵀΦ)⁻¹`` regularised by ``λ`` and reweighted by ``Q``;
ensembles average the kernel products over checkpoints and multiply by the
checkpoint-averaged ``Q``.
"""

from __future__ import annotations

from torch import Tensor

from ._checks import check_nonnegative
from .solution import Solution
from .solve_explicit import ExplicitFactor, factor_explicit

__all__ = ["trak_kernel", "trak_train_features", "trak_weights"]


def trak_kernel(features: Tensor, *, damping: float = 0.0) -> ExplicitFactor:
    """The factorisation of ``ΦᵀΦ + damping · I`` ``(k, k)``, in float64, for features ``Φ`` ``(n, k)``."""
    if not isinstance(features, Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features: expected a tensor of shape (n, k), got {shape}")
    damping = check_nonnegative(damping, "damping")
    Phi = features.double()
    return factor_explicit(Phi.T @ Phi, damping=damping)


def trak_train_features(kernel: ExplicitFactor, features: Tensor) -> Solution:
    """``Φ (ΦᵀΦ + λI)⁻¹`` row by row, ``(n, k)``: training features whose inner products with ``Φ_test`` are scores.

    ``status`` is ``INDEFINITE`` where the kernel is singular (``λ = 0`` with fewer
    training examples than projected dimensions: a pseudo-inverse was used).
    """
    return kernel.solve(features.double())


def trak_weights(probabilities: Tensor) -> Tensor:
    """``Q = 1 - p`` ``(n,)`` from the probabilities of the correct labels, each in ``[0, 1]``.

    Raises:
        ValueError: a probability outside ``[0, 1]`` or NaN (``p = 1``, a confident model, gives ``Q = 0``).
    """
    p = probabilities.reshape(-1).double()
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError("probabilities: expected values in [0, 1], got some outside (or NaN)")
    return 1.0 - p
