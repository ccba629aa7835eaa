"""K-FAC factors and EK-FAC: Kronecker-factored empirical Fisher, its eigenvalue correction, and its inverse.

For a layer ``s = W̃ ã`` (``W̃ = [W | b]``, ``ã = [a; 1]``), each example's weight
gradient is ``dW̃_i = Σ_t ds_{it} ã_{it}ᵀ`` over the positions ``t`` the weight is
applied at (one for a 2-D input, the sequence for ``(B, T, d)``, the output
pixels of a convolution). The layer's empirical Fisher ``F = E_i[vec dW̃_i vec dW̃_iᵀ]``
is approximated by

    K-FAC   (Martens & Grosse, 2015; Grosse & Martens, 2016 for convolutions):
            F ≈ A ⊗ S,  A = mean over positions of ã ãᵀ,  S = E_i[Σ_t ds dsᵀ]
            (exact for one example at one position);
    EK-FAC  (George et al., 2018; Grosse et al., 2023): F ≈ (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ
            with ``Q_A, Q_S`` the eigenvectors of ``A, S`` and the corrected
            eigenvalues ``Λ = E_i[(Q_Sᵀ dW̃_i Q_A)²]``, exact on the diagonal of that basis.

Layers are independent blocks. Vectors are laid out as :func:`attrib_core.ravel`
lays out the covered parameters (``EKFAC.names``), the weight row-major.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from opt_einsum import contract
from torch import Tensor, nn

from ._checks import as_block, check_count, check_nonnegative, check_reduction
from .accumulators import Accumulator, accumulate, add_states
from .layer_capture import LayerSpec, capture_examples, layer_specs
from .solution import Solution, Status, solution

__all__ = ["LayerFactors", "KFACFactors", "KFACState", "kfac_accumulator", "kfac_factors", "CorrectionState",
           "ekfac_correction", "EKFACLayer", "EKFAC", "ekfac"]

MaskFn = Optional[Callable[[Any], Tensor]]
Damping = Union[float, Sequence[float]]  # one value for every layer, or one per layer


class LayerFactors(NamedTuple):
    """``A`` ``(d_a, d_a)`` and ``S`` ``(d_out, d_out)`` of one layer (float64), and what they averaged."""

    spec: LayerSpec
    A: Tensor
    S: Tensor
    positions: int
    examples: int


class KFACFactors(NamedTuple):
    """Per-layer factors, and the parameter names they cover in ``params`` order."""

    layers: tuple[LayerFactors, ...]
    names: tuple[str, ...]


class KFACState(NamedTuple):
    """Per layer (in ``specs`` order): the sums of ``ã ãᵀ`` and of ``Σ_t ds dsᵀ``, positions and examples seen."""

    A: tuple[Tensor, ...]
    S: tuple[Tensor, ...]
    positions: tuple[int, ...]
    examples: tuple[int, ...]


def kfac_accumulator(
    model: nn.Module,
    f: Callable[[Mapping[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    *,
    layers: Union[None, str, Sequence[str]] = None,
    mask: MaskFn = None,
    reduction: str = "mean",
) -> Accumulator:
    """The K-FAC factors as a mergeable accumulator over batches (see :func:`kfac_factors`).

    The state is a :class:`KFACState` of float64 sums, ``(d_a, d_a)`` and
    ``(d_out, d_out)`` per layer: its size does not depend on the number of
    batches, and ``merge`` adds. ``finalize`` returns :class:`KFACFactors`.
    """
    check_reduction(reduction)
    specs = layer_specs(model, params, layers)
    device = next(iter(params.values())).device

    def init() -> KFACState:
        zeros = lambda d: torch.zeros(d, d, dtype=torch.float64, device=device)  # noqa: E731
        return KFACState(tuple(zeros(s.d_a) for s in specs), tuple(zeros(s.d_out) for s in specs),
                         (0,) * len(specs), (0,) * len(specs))

    def update(state: KFACState, batch: Any) -> KFACState:
        captured = capture_examples(model, f, params, batch, specs, mask=_mask(mask, batch), reduction=reduction)
        rows = [captured[spec.module] for spec in specs]
        return add_states(state, KFACState(
            tuple(contract("bti,btj->ij", r.a.double(), r.a.double()) for r in rows),
            tuple(contract("bti,btj->ij", r.ds.double(), r.ds.double()) for r in rows),
            tuple(r.positions for r in rows),
            tuple(r.a.shape[0] for r in rows),
        ))

    def finalize(state: KFACState) -> KFACFactors:
        if any(n == 0 for n in state.examples):
            raise ValueError("batches: no batch was given")
        empty = [spec.module for spec, n in zip(specs, state.positions) if n == 0]
        if empty:
            raise ValueError(f"mask: no valid position for layers {empty}")
        factors = tuple(LayerFactors(spec, A / positions, S / examples, positions, examples)
                        for spec, A, S, positions, examples in zip(specs, *state))
        return KFACFactors(factors, _covered_names(params, specs))

    return Accumulator(init, update, add_states, finalize)


def kfac_factors(
    model: nn.Module,
    f: Callable[[Mapping[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    batches: Iterable[Any],
    *,
    layers: Union[None, str, Sequence[str]] = None,
    mask: MaskFn = None,
    reduction: str = "mean",
    reduce: Optional[Callable[[Accumulator, Any], Any]] = None,
) -> KFACFactors:
    """Fit the K-FAC factors ``A = mean ã ãᵀ`` and ``S = E_i[Σ_t ds dsᵀ]`` over ``batches``.

    One pass of :func:`kfac_accumulator`: memory does not grow with the number of batches.

    Args:
        model: the module ``f`` runs through ``functional_call``; hooks are placed
            on its layers for the duration of the call only.
        f: the batched loss ``f(params, batch) -> scalar`` (its labels make this the
            empirical Fisher).
        params: the point of evaluation.
        batches: an iterable of batches (a list, or a DataLoader).
        layers: module names to factor (``nn.Linear`` or ``nn.Conv2d``), or None
            for every such layer whose weight is in ``params``.
        mask: ``mask(batch) -> (B, T)``, nonzero at the valid positions of
            sequence inputs; padded positions count in neither factor.
        reduction: ``"mean"`` or ``"sum"``, how ``f`` combines its batch; used only
            where ``vmap`` cannot trace ``f`` (each example's own output gradients are
            captured otherwise, whatever ``f`` normalises by).
        reduce: combines the folded state with other processes' (:func:`accumulate`'s).
    """
    accumulator = kfac_accumulator(model, f, params, layers=layers, mask=mask, reduction=reduction)
    return accumulate(accumulator, batches, reduce=reduce)


class CorrectionState(NamedTuple):
    """Per layer: the sum of the squared rotated per-example gradients ``(d_out, d_a)``; examples seen."""

    sums: tuple[Tensor, ...]
    examples: tuple[int, ...]


def ekfac_correction(
    model: nn.Module,
    f: Callable[[Mapping[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    bases: Sequence["EKFACLayer"],
    *,
    mask: MaskFn = None,
    reduction: str = "mean",
) -> Accumulator:
    """EK-FAC's eigenvalue correction ``Λ = E_i[(Q_Sᵀ dW̃_i Q_A)²]`` in fixed bases, as an accumulator.

    ``finalize`` returns the ``bases`` with their eigenvalues replaced by ``Λ``. Each
    example's rotated gradient is formed as ``Σ_t (Q_Sᵀ ds)(Q_Aᵀ ã)ᵀ`` from the rotated
    activations and output gradients, never the unrotated ``dW̃_i``.
    """
    check_reduction(reduction)
    specs = [layer.spec for layer in bases]

    def init() -> CorrectionState:
        return CorrectionState(tuple(torch.zeros_like(layer.eigenvalues) for layer in bases), (0,) * len(bases))

    def update(state: CorrectionState, batch: Any) -> CorrectionState:
        captured = capture_examples(model, f, params, batch, specs, mask=_mask(mask, batch), reduction=reduction)
        sums = []
        for layer in bases:
            rows = captured[layer.spec.module]
            ds, a = rows.ds.double() @ layer.QS, rows.a.double() @ layer.QA
            if ds.shape[1] == 1:  # one position: the rotated gradient is an outer product, squared entrywise
                sums.append(ds[:, 0].pow(2).T @ a[:, 0].pow(2))
            else:
                sums.append(contract("bts,bta->bsa", ds, a).pow(2).sum(0))
        counts = tuple(captured[spec.module].a.shape[0] for spec in specs)
        return add_states(state, CorrectionState(tuple(sums), counts))

    def finalize(state: CorrectionState) -> tuple["EKFACLayer", ...]:
        if any(n == 0 for n in state.examples):
            raise ValueError("batches: no batch was given")
        return tuple(layer._replace(eigenvalues=total / n) for layer, total, n in zip(bases, *state))

    return Accumulator(init, update, add_states, finalize)


class EKFACLayer(NamedTuple):
    """One layer's eigenbases ``Q_A`` ``(d_a, d_a)``, ``Q_S`` ``(d_out, d_out)`` and eigenvalues ``(d_out, d_a)``."""

    spec: LayerSpec
    QA: Tensor
    QS: Tensor
    eigenvalues: Tensor


class EKFAC(NamedTuple):
    """A fitted (E)K-FAC approximation ``F̂`` of the empirical Fisher, block-diagonal over layers.

    ``names`` and ``sizes`` give the layout of the vectors it acts on: the covered
    parameters in ``params`` order, each flattened (build them with
    ``per_sample_grad`` on ``select(params, names)``).
    """

    layers: tuple[EKFACLayer, ...]
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    corrected: bool

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def matvec(self, V: Tensor, *, damping: Damping = 0.0) -> Tensor:
        """``(F̂ + damping I)`` applied to the rows of ``V`` ``(k, dim)``."""
        return self._apply(V, lambda lam, d: lam + d, self._per_layer(damping))

    def solve(self, B: Tensor, *, damping: Damping) -> Solution:
        """``(F̂ + damping I)⁻¹`` applied to the rows of ``B`` ``(k, dim)``: rotate, divide, rotate back.

        Exact for ``F̂`` (``status`` ``CONVERGED``). ``damping`` is one number for
        every layer, or one per layer (in ``layers`` order), e.g. :meth:`heuristic_damping`.
        """
        dampings = self._per_layer(damping)
        singular = [layer.spec.module for layer, d in zip(self.layers, dampings)
                    if d == 0 and bool((layer.eigenvalues <= 0).any())]
        if singular:
            raise ValueError(f"damping: layers {singular} have eigenvalues 0, so F̂ is singular; pass damping > 0")
        block, single = as_block(B, self.dim, name="B")
        x = self._apply(block, lambda lam, d: 1.0 / (lam + d), dampings)
        return solution(x, Status.CONVERGED, 0, single=single, damping=tuple(dampings))

    def power(self, V: Tensor, exponent: float, *, damping: Damping) -> Tensor:
        """``(F̂ + damping I)^exponent`` applied to the rows of ``V`` (``-0.5`` whitens; ``-1`` is :meth:`solve`'s x)."""
        dampings = self._per_layer(damping)
        if exponent < 0 and any(d == 0 and bool((layer.eigenvalues <= 0).any())
                                for layer, d in zip(self.layers, dampings)):
            raise ValueError("damping: F̂ has eigenvalues 0, so a negative power of it is undefined; pass damping > 0")
        return self._apply(V, lambda lam, d: (lam + d).pow(exponent), dampings)

    def heuristic_damping(self, factor: float = 0.1) -> tuple[float, ...]:
        """Per layer, ``factor`` times the mean of its eigenvalues (Grosse et al., 2023; kronfluence's heuristic)."""
        factor = check_nonnegative(factor, "factor")
        return tuple(factor * float(layer.eigenvalues.mean()) for layer in self.layers)

    def _per_layer(self, damping: Damping) -> list[float]:
        if isinstance(damping, (list, tuple)):
            if len(damping) != len(self.layers):
                raise ValueError(f"damping: expected one value per layer ({len(self.layers)}), got {len(damping)}")
            return [check_nonnegative(d, f"damping[{i}]") for i, d in enumerate(damping)]
        return [check_nonnegative(damping, "damping")] * len(self.layers)

    def preconditioner(self, *, damping: Damping) -> Callable[[Tensor], Tensor]:
        """``(F̂ + damping I)⁻¹`` as an operator, for :func:`cg`'s ``preconditioner``."""
        self._per_layer(damping)

        def apply(R: Tensor) -> Tensor:
            if R.shape[-1] != self.dim:
                raise ValueError(
                    f"preconditioner: EK-FAC covers {self.dim} parameters ({list(self.names)}), "
                    f"got vectors of width {R.shape[-1]}"
                )
            return self.solve(R, damping=damping).x

        return apply

    def low_rank(self, V: Tensor, rank: int) -> Tensor:
        """The rows of ``V`` ``(k, dim)`` with each layer's ``(d_out, d_a)`` matrix replaced by its best rank-``rank``
        approximation (truncated SVD; Eckart–Young): kronfluence's ``query_gradient_low_rank``.

        A layer whose matrix has rank ``rank`` or less is unchanged; parameters outside the
        layers do not occur (vectors cover exactly :attr:`names`).
        """
        rank = check_count(rank, "rank")
        block, single = as_block(V, self.dim)
        offsets = dict(zip(self.names, _offsets(self.sizes)))
        out = torch.empty_like(block)
        for layer in self.layers:
            M = _gather(block, layer.spec, offsets)  # (k, d_out, d_a)
            if rank < min(M.shape[1:]):
                U, S, Vh = torch.linalg.svd(M, full_matrices=False)
                M = contract("kor,kr,kra->koa", U[..., :rank], S[..., :rank], Vh[:, :rank])
            _scatter(out, M, layer.spec, offsets)
        return out[0] if single else out

    def _apply(self, V: Tensor, scale: Callable[[Tensor, float], Tensor], dampings: Sequence[float]) -> Tensor:
        block, single = as_block(V, self.dim)
        # Rotated in the vectors' own precision (float32 or wider): a rotation's rounding error,
        # eps·‖M‖, is that of storing M in this precision in the first place.
        dtype = torch.promote_types(block.dtype, torch.float32)
        offsets = dict(zip(self.names, _offsets(self.sizes)))
        out = torch.empty_like(block, dtype=dtype)
        for layer, damping in zip(self.layers, dampings):
            spec = layer.spec
            QA, QS = layer.QA.to(dtype), layer.QS.to(dtype)
            M = _gather(block, spec, offsets).to(dtype)  # (k, d_out, d_a)
            rotated = contract("so,kst,ta->koa", QS, M, QA)
            rotated = rotated * scale(layer.eigenvalues, damping).to(dtype)
            _scatter(out, contract("so,koa,ta->kst", QS, rotated, QA), spec, offsets)
        return out[0] if single else out


def ekfac(
    model: nn.Module,
    f: Callable[[Mapping[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    batches: Iterable[Any],
    *,
    layers: Union[None, str, Sequence[str]] = None,
    mask: MaskFn = None,
    reduction: str = "mean",
    correct: bool = True,
    factors: Optional[KFACFactors] = None,
    reduce: Optional[Callable[[Accumulator, Any], Any]] = None,
) -> EKFAC:
    """Fit EK-FAC (or, with ``correct=False``, K-FAC in its eigenbasis) over ``batches``.

    Two passes: the K-FAC factors (skipped when ``factors`` is given), their
    eigendecompositions in float64, then the eigenvalue correction
    ``Λ = E_i[(Q_Sᵀ dW̃_i Q_A)²]``. The correction rotates the captured activations
    and output gradients first (``ã Q_A``, ``ds Q_S``) and forms each example's
    rotated gradient as ``Σ_t (Q_Sᵀ ds)(Q_Aᵀ ã)ᵀ``, never the unrotated ``dW̃_i``.
    Arguments as in :func:`kfac_factors`; ``batches`` must be re-iterable (a list
    or a DataLoader) when two passes are needed. With ``reduce`` (each process
    passing its own share of the batches) both passes' statistics are merged across
    processes, so every process fits the same EK-FAC.
    """
    if factors is None and correct and iter(batches) is batches:
        raise TypeError("batches: EK-FAC passes over the data twice; give a list or a DataLoader, not an iterator")
    if factors is None:
        factors = kfac_factors(model, f, params, batches, layers=layers, mask=mask, reduction=reduction,
                               reduce=reduce)
    bases = []
    for factor in factors.layers:
        eA, QA = torch.linalg.eigh(factor.A)
        eS, QS = torch.linalg.eigh(factor.S)
        bases.append(EKFACLayer(factor.spec, QA, QS, torch.outer(eS.clamp(min=0), eA.clamp(min=0))))
    if correct:
        bases = accumulate(ekfac_correction(model, f, params, bases, mask=mask, reduction=reduction), batches,
                           reduce=reduce)
    sizes = tuple(params[n].numel() for n in factors.names)
    return EKFAC(tuple(bases), factors.names, sizes, correct)


def _mask(mask: MaskFn, batch: Any) -> Optional[Tensor]:
    if mask is None:
        return None
    if not callable(mask):
        raise TypeError("mask: expected a function batch -> (B, T) tensor")
    return mask(batch)


def _covered_names(params: Mapping[str, Tensor], specs: Sequence[LayerSpec]) -> tuple[str, ...]:
    covered = {s.weight for s in specs} | {s.bias for s in specs if s.bias is not None}
    return tuple(n for n in params if n in covered)


def _offsets(sizes: Sequence[int]) -> list[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out


def _gather(block: Tensor, spec: LayerSpec, offsets: Mapping[str, int]) -> Tensor:
    k = block.shape[0]
    start = offsets[spec.weight]
    W = spec.as_matrix(block[:, start : start + spec.d_out * spec.d_in])
    if spec.bias is None:
        return W
    b = block[:, offsets[spec.bias] : offsets[spec.bias] + spec.d_out].reshape(k, spec.d_out, 1)
    return torch.cat([W, b], dim=2)


def _scatter(out: Tensor, M: Tensor, spec: LayerSpec, offsets: Mapping[str, int]) -> None:
    start = offsets[spec.weight]
    out[:, start : start + spec.d_out * spec.d_in] = spec.as_weight(M[:, :, : spec.d_in])
    if spec.bias is not None:
        out[:, offsets[spec.bias] : offsets[spec.bias] + spec.d_out] = M[:, :, spec.d_in]
