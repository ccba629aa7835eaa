"""How the influence attributors apply ``(H + λI)⁻¹``: one definition per solver, shared by every front end.

``IFAttributorExplicit``, ``IFAttributorCG``, ``IFAttributorLiSSA``,
``IFAttributorArnoldi`` and the legacy ``IFAttributor(target_func, ...)`` all
build their inverse from the same settings object (:class:`ExplicitInverse`,
:class:`CGInverse`, :class:`LiSSAInverse`, :class:`ArnoldiInverse`: dattri's
argument names and defaults, checked once), fitted on the same
:class:`TrainingLoss`, and report through :func:`solved`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, NamedTuple, Optional

import torch
from torch import Tensor

from attrib_core import (
    ExplicitFactor,
    Solution,
    SpectralProjector,
    arnoldi,
    cg,
    factor_explicit,
    full_hessian,
    full_hvp,
    lissa,
    make_hvp,
    saved_activation_bytes,
    spectral_projector,
)

from .checks import nonnegative, nonnegative_int, positive, positive_int
from .data import Batches, Selected, batch_size as examples_in, concatenate, explained, random_access, take
from .solver_reports import record

__all__ = ["InverseSetting", "TrainingLoss", "training_loss", "ExplicitInverse", "CGInverse", "LiSSAInverse", "ArnoldiInverse",
           "INVERSES", "solved"]

_GROUP_BYTES = 32 << 20  # saved activations of one group of training batches in a curvature product
_MODES = ("rev-rev", "rev-fwd")


class InverseSetting:
    """An attributor's argument read from its inverse's settings, the one place it is kept.

    Fixed at construction: what was fitted depends on it, so assigning it later
    raises instead of being silently ignored.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Optional[type] = None) -> Any:
        return self if obj is None else getattr(obj.inverse, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"{self.name}: is fixed at construction (the fit depends on it); build a new "
                             f"attributor with {self.name}={value!r}")


class TrainingLoss(NamedTuple):
    """The training loss over a training loader: ``f(chosen, batch)``, its batches, how they combine.

    ``batches`` is re-iterable (every pass starts over); the full loss is
    ``Σ_b n_b f_b / N`` (``reduction="mean"``) or ``Σ_b f_b`` (``"sum"``). ``loader`` and
    ``device`` are kept for solvers that draw examples at random (LiSSA).
    """

    f: Callable
    chosen: Dict[str, Tensor]
    batches: Any
    reduction: str
    loader: Any
    device: torch.device


def training_loss(f: Callable, chosen: Dict[str, Tensor], loader: Any, device: torch.device) -> TrainingLoss:
    """The training loss over ``loader``, batch by batch, never the training set joined into one batch.

    How batch losses combine into the full loss is read off the loss itself: on the
    first two batches, the loss of both joined must equal the example-weighted mean
    of theirs (a mean loss) or their sum (a sum). A loss that is neither (a sum plus
    a weight penalty, a per-token mean) cannot be split exactly, so it is evaluated
    on the joined training set. Batches are grouped so that a group's forward pass
    saves at most 32 MiB: a fixed bound on memory, with the fixed cost of every
    product (building its graph) paid per group rather than per loader batch; a
    training set that fits one group is held as that one batch.
    """
    passes = iter(Batches(loader, device))
    first, second = next(passes), next(passes, None)
    # One forward pass before any Hessian work, so that a loss that cannot run says why.
    with explained(f, chosen, first, "loss_func"), torch.no_grad():
        f(chosen, first)
    reduction = "mean" if second is None else _reduction(f, chosen, first, second, device)
    if reduction is None:
        return TrainingLoss(f, chosen, [concatenate(loader, device)], "sum", loader, device)
    per_example = saved_activation_bytes(f, chosen, first) / max(examples_in(first), 1)
    group = max(1, int(_GROUP_BYTES // max(per_example, 1)))
    grouped = Batches(loader, device, max_examples=group)
    groups = iter(grouped)
    whole = next(groups)
    if next(groups, None) is None:  # the training set is one group: held once (within the budget), not re-read
        return TrainingLoss(f, chosen, [whole], reduction, loader, device)
    return TrainingLoss(f, chosen, grouped, reduction, loader, device)


def _reduction(f: Callable, chosen: Dict[str, Tensor], first: Any, second: Any,
               device: torch.device) -> Optional[str]:
    """``"mean"`` or ``"sum"``: how ``f`` of two batches joined follows from theirs; None if neither does."""
    with torch.no_grad():
        a, b = float(f(chosen, first)), float(f(chosen, second))
        joined = float(f(chosen, concatenate([first, second], device)))
    na, nb = examples_in(first), examples_in(second)
    tolerance = 1e-4 * max(abs(a), abs(b), abs(joined), 1e-30)
    if abs(joined - (na * a + nb * b) / (na + nb)) <= tolerance:
        return "mean"
    if abs(joined - (a + b)) <= tolerance:
        return "sum"
    return None


def _mode(mode: Any) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode: expected 'rev-rev' or 'rev-fwd', got {mode!r}")
    return mode


@dataclass(frozen=True)
class ExplicitInverse:
    """The dense Hessian of the training loss, factored once (Cholesky; LDLᵀ or eigh when not definite)."""

    regularization: float = 0.0
    solver = "the explicit solve"

    def __post_init__(self) -> None:
        object.__setattr__(self, "regularization", nonnegative(self.regularization, "regularization"))

    def factor(self, loss: TrainingLoss) -> ExplicitFactor:
        H = full_hessian(loss.f, loss.chosen, loss.batches, reduction=loss.reduction)
        return factor_explicit(H, damping=self.regularization)

    def fit(self, loss: TrainingLoss) -> Callable[[Tensor], Solution]:
        return self.factor(loss).solve

    def advice(self) -> str:
        return f"H + {self.regularization}·I is not positive definite; raise regularization."


@dataclass(frozen=True)
class CGInverse:
    """Conjugate gradient on Hessian-vector products of the training loss, all test rows at once."""

    max_iter: int = 10
    tol: float = 1e-7
    mode: str = "rev-rev"
    regularization: float = 0.0
    solver = "CG"

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_iter", positive_int(self.max_iter, "max_iter"))
        object.__setattr__(self, "tol", nonnegative(self.tol, "tol"))
        object.__setattr__(self, "mode", _mode(self.mode))
        object.__setattr__(self, "regularization", nonnegative(self.regularization, "regularization"))

    def fit(self, loss: TrainingLoss) -> Callable[[Tensor], Solution]:
        mv = full_hvp(loss.f, loss.chosen, loss.batches, reduction=loss.reduction, mode=self.mode)
        return lambda B: cg(mv, B, tol=0.0, atol=self.tol, max_steps=self.max_iter, damping=self.regularization)

    def advice(self) -> str:
        return f"Raise max_iter (now {self.max_iter}) or regularization (now {self.regularization:g})."


@dataclass(frozen=True)
class LiSSAInverse:
    """LiSSA: a Neumann series on Hessians of ``batch_size`` training examples drawn at random each step.

    dattri's recursion ``h = v + (1 - damping) h - H h / scaling`` is the core's
    :func:`attrib_core.lissa` with a shift of ``damping · scaling``.
    """

    batch_size: int = 1
    num_repeat: int = 1
    recursion_depth: int = 5000
    damping: float = 0.0
    scaling: float = 50.0
    mode: str = "rev-rev"
    seed: int = 0
    solver = "LiSSA"

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_repeat", "recursion_depth"):
            object.__setattr__(self, name, positive_int(getattr(self, name), name))
        object.__setattr__(self, "damping", nonnegative(self.damping, "damping"))
        if self.damping >= 2:
            raise ValueError(f"damping: must be < 2, got {self.damping}; the recursion h = v + (1 - damping) h - "
                             "H h / scaling cannot contract otherwise")
        object.__setattr__(self, "scaling", positive(self.scaling, "scaling"))
        object.__setattr__(self, "mode", _mode(self.mode))
        object.__setattr__(self, "seed", nonnegative_int(self.seed, "seed"))

    def fit(self, loss: TrainingLoss) -> Callable[[Tensor], Solution]:
        rows, n = _draws(loss)

        def solve(B: Tensor) -> Solution:
            def sample_mv(generator: torch.Generator):
                index = torch.randperm(n, generator=generator)[: self.batch_size]
                return make_hvp(loss.f, loss.chosen, rows(index), mode=self.mode, chunk_size=B.shape[0])

            return lissa(sample_mv, B, max_steps=self.recursion_depth, scale=self.scaling,
                         damping=self.damping * self.scaling, repeats=self.num_repeat, seed=self.seed)

        return solve

    def advice(self) -> str:
        return ("Raise scaling (above the largest Hessian eigenvalue) against divergence, recursion_depth "
                "against the step cap, or damping.")


def _draws(loss: TrainingLoss) -> tuple[Callable[[Tensor], Any], int]:
    """``(rows, n)``: the training examples at given positions as a batch, by random access where the loader
    allows it, else from the training set joined once (an iterable dataset, or a loss only the joined set gives)."""
    if isinstance(loss.batches, list):  # the training set already held as one batch
        return (lambda index: take(loss.batches[0], index.to(loss.device))), examples_in(loss.batches[0])
    access = random_access(loss.loader, loss.device)
    if access is not None:
        return access
    joined = concatenate(loss.loader, loss.device)
    return (lambda index: take(joined, index.to(loss.device))), examples_in(joined)


@dataclass(frozen=True)
class ArnoldiInverse:
    """The top eigenpairs of the Hessian (of a seeded fraction of the training set) by Arnoldi iteration."""

    proj_dim: int = 100
    max_iter: int = 100
    tol: float = 1e-7
    regularization: float = 0.0
    seed: int = 0
    precompute_data_ratio: float = 1.0
    solver = "Arnoldi"

    def __post_init__(self) -> None:
        object.__setattr__(self, "proj_dim", positive_int(self.proj_dim, "proj_dim"))
        object.__setattr__(self, "max_iter", positive_int(self.max_iter, "max_iter"))
        if self.max_iter < self.proj_dim:
            raise ValueError(f"max_iter: must be >= proj_dim={self.proj_dim} to produce that many eigenpairs, "
                             f"got {self.max_iter}")
        object.__setattr__(self, "tol", nonnegative(self.tol, "tol"))
        object.__setattr__(self, "regularization", nonnegative(self.regularization, "regularization"))
        object.__setattr__(self, "seed", nonnegative_int(self.seed, "seed"))
        ratio = positive(self.precompute_data_ratio, "precompute_data_ratio")
        if ratio > 1:
            raise ValueError(f"precompute_data_ratio: expected a number in (0, 1], got {ratio!r}")
        object.__setattr__(self, "precompute_data_ratio", ratio)

    def check_width(self, dim: int) -> None:
        if self.proj_dim > dim:
            raise ValueError(f"proj_dim: cannot exceed the number of parameters ({dim}), got {self.proj_dim}")

    def fit(self, loss: TrainingLoss) -> SpectralProjector:
        """The spectral projector ``g ↦ (Λ + λ)^{-1/2} U g``; its ``.solve`` is the inverse on the kept pairs."""
        data = loss.batches
        n = sum(examples_in(batch) for batch in data)
        keep = max(1, round(self.precompute_data_ratio * n))
        if keep < n:  # the Hessian of a seeded random subset of the training examples
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:keep]
            data = Selected(data, order)
        dim = sum(v.numel() for v in loss.chosen.values())
        self.check_width(dim)
        mv = full_hvp(loss.f, loss.chosen, data, reduction=loss.reduction)
        # The Krylov basis is built in the gradients' precision (float64 reorthogonalisation and
        # projections took 4x as long on float32 models), and again in float64 should it lose its
        # orthogonality there.
        precision = torch.promote_types(next(iter(loss.chosen.values())).dtype, torch.float32)
        for dtype in dict.fromkeys((precision, torch.float64)):
            result = arnoldi(mv, dim, max_steps=self.max_iter, top_k=self.proj_dim, seed=self.seed, tol=self.tol,
                             dtype=dtype, device=loss.device)
            if _semi_orthogonal(result.orthogonality, dtype):
                break
        projector = spectral_projector(result.eigenvalues.double(), result.eigenvectors, damping=self.regularization)
        return projector.to(precision)

    def advice(self) -> str:
        return f"Raise regularization (now {self.regularization:g}) to keep the negative eigenpairs' directions."


def _semi_orthogonal(orthogonality: float, dtype: torch.dtype) -> bool:
    """Whether a Krylov basis built in ``dtype`` is orthogonal enough to keep: its loss of orthogonality is within
    ``sqrt(eps)`` (semi-orthogonality, Simon 1984: the projected matrix is then ``QᵀAQ`` of an orthonormal basis to
    working precision, so its Ritz pairs are as good as an exactly orthogonal basis would give); past it the basis
    is rebuilt in float64. Twice-iterated Gram-Schmidt in float32 stays near 1e-4 on wide operators (7e-5 after 50 and
    after 200 steps on a 170,560-dimensional spectrum spanning eight decades), under float32's sqrt(eps) = 3.5e-4."""
    return orthogonality <= math.sqrt(torch.finfo(dtype).eps)

INVERSES = {"explicit": ExplicitInverse, "cg": CGInverse, "lissa": LiSSAInverse, "arnoldi": ArnoldiInverse}


def settings_of(inverse_type: type) -> list[str]:
    """The argument names an inverse takes (dattri's)."""
    return [f.name for f in fields(inverse_type)]


def solved(owner: Any, solve: Callable[[Tensor], Solution], B: Tensor, inverse: Any, where: str) -> Tensor:
    """``solve(B).x``, its statuses recorded for the one warning of ``owner``'s public call."""
    solution = solve(B)
    record(owner, solution, solver=inverse.solver, where=where, advice=inverse.advice())
    return solution.x
