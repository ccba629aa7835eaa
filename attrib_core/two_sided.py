"""Two-sided compression of layer gradients from their factors, never forming ``G``.

A layer's per-example gradient ``G = Σ_t ds_t a_tᵀ`` (``d_out × d_a``) is compressed
to ``Σ_t (R_outᵀ ds_t)(R_inᵀ a_t)ᵀ = R_outᵀ G R_in`` (``k_out × k_in``) by compressing
each factor on its own (TracInCP-fast-randproj, Pruthi et al., 2020; LoGra, Choe et
al., 2024), so only ``k_out · k_in`` numbers per module are ever formed. Two kinds:

- ``"logra"``: ``R`` dense Rademacher ``±1/sqrt(k)``;
- ``"factgrass"`` (FactGraSS): a sparse mask keeps ``m`` of a side's ``d`` coordinates
  (scaled by ``sqrt(d/m)``, so norms are kept in expectation), then a sparse JL
  transform with one nonzero per coordinate maps them to ``k``; ``O(d)`` work per row.

A side whose rank is at least its dimension is kept exact (no projection). Inner
products of compressed gradients are factored products again
(:func:`attrib_core.factored_inner` applies unchanged). Every matrix and mask comes
from :mod:`kernels`' counter-based hash keyed by (seed, module, side): the same
compression on every device, batch and process.
"""
from __future__ import annotations

import functools
import math
import zlib
from typing import Callable, Collection, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from opt_einsum import contract
from torch import Tensor

import kernels
import kernels.reference
from kernels.hash import row_key, to_uint

from .kfac import EKFAC, EKFACLayer
from .layer_capture import Captured, LayerSpec

__all__ = ["side_seed", "project_factors", "project_gradient", "Compression", "compression", "compress_factors",
           "compress_one_hot", "embedding_input_maps", "compressed_covariances", "compressed_ekfac",
           "compress_gradient", "compress_parameter_gradients", "compressed_gradients", "token_gradients",
           "token_scores", "COMPRESSION_KINDS"]

COMPRESSION_KINDS = ("logra", "factgrass")
MASK_RATIO = 4  # FactGraSS keeps this many coordinates per output dimension before its SJLT


def side_seed(seed: int, module: str, side: str) -> int:
    """The projection seed of one side (``"in"`` or ``"out"``) of one module, in ``[0, 2**32)``."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{module}/{side}".encode())) % (1 << 32)


def _project_rows(x: Tensor, dim: int, seed: int) -> Tensor:
    """``x (..., d) @ R (d, dim)``, ``R`` Rademacher ``±1/sqrt(dim)``."""
    flat = x.reshape(-1, x.shape[-1])
    return kernels.project(flat, dim, kind="rademacher", seed=seed).reshape(*x.shape[:-1], dim)


def project_factors(x: Mapping[str, Captured], dims: Mapping[str, Tuple[int, int]], seed: int) -> dict[str, Captured]:
    """Each layer's factors projected: ``a R_in`` ``(n, T, k_in)`` and ``ds R_out`` ``(n, T, k_out)``.

    Args:
        x: ``{module: Captured(a (n, T, d_a), ds (n, T, d_out), positions)}``.
        dims: ``{module: (k_out, k_in)}``.
        seed: the compression's seed.
    """
    return {m: Captured(_project_rows(c.a, dims[m][1], side_seed(seed, m, "in")),
                        _project_rows(c.ds, dims[m][0], side_seed(seed, m, "out")), c.positions)
            for m, c in x.items()}


def project_gradient(G: Tensor, spec: LayerSpec, dims: Tuple[int, int], seed: int) -> Tensor:
    """``vec(R_outᵀ G_i R_in)`` for explicit gradients ``G`` of one layer: ``(n, k_out · k_in)``.

    The same compression as :func:`project_factors`, for gradients already formed.
    ``G`` ``(n, d_out · d_in [+ d_out])`` holds the weight's gradient flattened in the
    weight's own layout (:meth:`LayerSpec.as_matrix`), then the bias's if it is factored,
    as :func:`per_sample_grad` lays out the layer's parameters.
    """
    n = G.shape[0]
    k_out, k_in = dims
    right = _project_rows(spec.gradient_matrix(G), k_in, side_seed(seed, spec.module, "in"))
    both = _project_rows(right.transpose(1, 2), k_out, side_seed(seed, spec.module, "out"))  # (n, k_in, k_out)
    return both.transpose(1, 2).reshape(n, k_out * k_in)


class Compression(NamedTuple):
    """How each block's gradient is compressed: the kind, the seed, and per block ``(k_out, k_in)``, the
    ``(m_out, m_in)`` coordinates FactGraSS's masks keep (the full sides for ``"logra"``), and its members.

    A block is one module, or the modules sharing one weight (tied input and output
    embeddings), named by its first module. ``members[block]`` lists ``(module, swapped)``:
    a swapped member stores the weight the other way round (an Embedding ``(V, E)`` tied
    to a Linear ``(V, E)`` whose output is ``V``), so its input factor is compressed on
    the block's output side and its output gradient on the input side; the members'
    compressed gradients add up to the compressed gradient of the shared weight.
    """

    kind: str
    seed: int
    dims: Mapping[str, Tuple[int, int]]
    masks: Mapping[str, Tuple[int, int]]
    members: Mapping[str, Tuple[Tuple[str, bool], ...]]

    @property
    def width(self) -> int:
        """Numbers per example: ``Σ k_out · k_in`` over the blocks."""
        return sum(k_out * k_in for k_out, k_in in self.dims.values())

    def description(self) -> dict:
        """What makes two compressions the same (JSON values): kind, seed, and per block its dims and masks."""
        return {"kind": self.kind, "seed": self.seed, "dims": {b: list(d) for b, d in self.dims.items()},
                "masks": {b: list(m) for b, m in self.masks.items()}}


def _blocks(specs: Sequence[LayerSpec]) -> dict[str, list[LayerSpec]]:
    """Specs grouped by the weight they hold, in order of first appearance, named by the first module."""
    by_weight: dict[str, list[LayerSpec]] = {}
    for spec in specs:
        by_weight.setdefault(spec.weight, []).append(spec)
    blocks = {}
    for members in by_weight.values():
        first = members[0]
        for other in members[1:]:
            if first.bias is not None or other.bias is not None:
                raise ValueError(f"layers: {first.module!r} and {other.module!r} share a weight and one of them has "
                                 "a bias; only tied weights without biases are compressed together")
            swapped = other.transposed != first.transposed
            expected = (first.d_a, first.d_out) if swapped else (first.d_out, first.d_a)
            if (other.d_out, other.d_a) != expected:
                raise ValueError(f"layers: {first.module!r} and {other.module!r} share a weight of different shapes")
        blocks[first.module] = members
    return blocks


def compression(specs: Sequence[LayerSpec], rank: Union[int, Tuple[int, int]], *, kind: str = "logra",
                seed: int = 0) -> Tuple[Compression, list[str]]:
    """The compression of ``specs`` at ``rank`` (``k`` on both sides, or ``(k_out, k_in)``), and the sides kept exact.

    Specs holding the same weight (tied embeddings, from ``layer_specs(..., tied=True)``)
    form one block. A side whose rank is at least its dimension (``d_out``, or ``d_a``
    with the bias's constant) is kept exact rather than projected to as many or more
    numbers; the second value names them (``"module.out"``, ``"module.in"``).

    Raises:
        ValueError: an unknown ``kind``, or a rank that is not a positive integer.
    """
    if kind not in COMPRESSION_KINDS:
        raise ValueError(f"kind: expected one of {COMPRESSION_KINDS}, got {kind!r}")
    ranks = (rank, rank) if isinstance(rank, int) and not isinstance(rank, bool) else rank
    if (not isinstance(ranks, tuple) or len(ranks) != 2
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)):
        raise ValueError(f"rank: expected a positive integer or a pair (k_out, k_in) of them, got {rank!r}")
    dims, masks, members, exact = {}, {}, {}, []
    for name, group in _blocks(specs).items():
        first = group[0]
        sides = []
        for side, d, k in (("out", first.d_out, ranks[0]), ("in", first.d_a, ranks[1])):
            if k >= d:
                exact.append(f"{name}.{side}")
            sides.append((min(k, d), d if k >= d or kind == "logra" else min(d, MASK_RATIO * k)))
        dims[name] = (sides[0][0], sides[1][0])
        masks[name] = (sides[0][1], sides[1][1])
        members[name] = tuple((s.module, s.transposed != first.transposed) for s in group)
    return Compression(kind, int(seed), dims, masks, members), exact


def _mask_rows(d: int, m: int, seed: int, device: torch.device) -> Tensor:
    """The ``m`` of ``d`` coordinates FactGraSS keeps, in order: the smallest hash keys of ``(seed, coordinate)``."""
    keys = to_uint(row_key(seed, torch.arange(d, device=device)))
    return keys.argsort(stable=True)[:m].sort().values


@functools.lru_cache(maxsize=1024)
def _rademacher(d: int, k: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The ``(d, k)`` matrix :func:`kernels.project` multiplies by (``±1/sqrt(k)``), held for reuse across batches."""
    signs = kernels.reference.dense_tile(seed, torch.arange(d, device=device), k, "rademacher")
    return signs.to(dtype) * (1.0 / math.sqrt(k))


_HELD_ENTRIES = 1 << 22  # a side's matrix up to 16 MiB (float32) is held; a larger one is streamed


def _side(x: Tensor, k: int, m: int, kind: str, seed: int) -> Tensor:
    """One factor ``(..., d)`` compressed to ``(..., k)``: exact when ``k = d``, else by the kind's transform."""
    d = x.shape[-1]
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    if k >= d:
        return wide
    if kind == "logra":
        if d * k <= _HELD_ENTRIES:  # two-sided matrices are small: generated once, not on every batch
            return wide @ _rademacher(d, k, seed, wide.device, wide.dtype)
        return _project_rows(wide, k, seed)
    flat = wide.reshape(-1, d)
    if m < d:
        flat = flat[:, _mask_rows(d, m, seed, x.device)] * math.sqrt(d / m)
    sketched = kernels.project(flat.contiguous(), k, kind="sjlt", seed=seed, nnz=1)
    return sketched.to(wide.dtype).reshape(*x.shape[:-1], k)


def compress_factors(x: Mapping[str, Captured], comp: Compression, *,
                     indexed: Collection[str] = ()) -> dict[str, Captured]:
    """Each module's factors compressed on its block's sides: ``a`` ``(n, T, k_in)`` and ``ds`` ``(n, T, k_out)``
    (a swapped member's output gradient becomes its ``a``, its input its ``ds``).

    The modules in ``indexed`` are embeddings captured through :func:`embedding_input_maps`:
    their input factor is compressed already and is passed through.
    """
    out = {}
    for block, group in comp.members.items():
        (k_out, k_in), (m_out, m_in) = comp.dims[block], comp.masks[block]
        seeds = side_seed(comp.seed, block, "out"), side_seed(comp.seed, block, "in")
        for module, swapped in group:
            c = x[module]
            on_out, on_in = (c.a, c.ds) if swapped else (c.ds, c.a)
            done = module in indexed  # its input factor (on_out when swapped, else on_in) is compressed
            out[module] = Captured(on_in if done and not swapped else _side(on_in, k_in, m_in, comp.kind, seeds[1]),
                                   on_out if done and swapped else _side(on_out, k_out, m_out, comp.kind, seeds[0]),
                                   c.positions)
    return out


_ONE_HOT_ENTRIES = 1 << 22  # one-hot rows formed at a time when an embedding's side is compressed from its ids


def compress_one_hot(ids: Tensor, d: int, k: int, m: int, kind: str, seed: int, dtype: torch.dtype) -> Tensor:
    """``(..., k)``: the one-hot rows of ``ids`` over ``d`` coordinates compressed as :func:`compress_factors`'s side
    transform compresses them, without forming ``(..., d)``.

    Each distinct id's row is compressed once (the dense matrix's rows, gathered, where it
    is held; else a few thousand one-hot rows at a time through the same transform), then
    gathered for every position: exact for any number of rows.
    """
    unique, inverse = torch.unique(ids, return_inverse=True)
    wide = torch.promote_types(dtype, torch.float32)
    if k >= d:
        rows = torch.eye(d, dtype=wide, device=ids.device)[unique]
    elif kind == "logra" and d * k <= _HELD_ENTRIES:
        rows = _rademacher(d, k, seed, ids.device, wide)[unique]
    else:
        step = max(1, _ONE_HOT_ENTRIES // d)
        rows = torch.cat([_side(torch.nn.functional.one_hot(unique[i : i + step], d).to(wide), k, m, kind, seed)
                          for i in range(0, len(unique), step)])
    return rows[inverse]


def embedding_input_maps(specs: Sequence[LayerSpec], comp: Compression,
                         column_scales: Optional[Mapping[str, Tensor]] = None) -> dict[str, Callable]:
    """``{embedding module: map(ids, dtype)}`` for :func:`attrib_core.capture`'s ``input_maps``: each embedding's
    one-hot input factor compressed on its block's side (the output side for a swapped member) from its ids,
    times ``column_scales[module][id]`` where given (:func:`attrib_core.factored_scales`' column), so that
    :func:`compress_factors` with ``indexed=`` the maps' keys gives what compressing the one-hot rows would."""
    swapped_of = {module: (block, swapped) for block, group in comp.members.items() for module, swapped in group}
    maps = {}
    for spec in specs:
        if spec.kind != "embedding":
            continue
        block, swapped = swapped_of[spec.module]
        side = 0 if swapped else 1
        k, m = comp.dims[block][side], comp.masks[block][side]
        seed = side_seed(comp.seed, block, ("out", "in")[side])
        scale = None if column_scales is None else column_scales[spec.module]

        def map_(ids: Tensor, dtype: torch.dtype, d=spec.d_in, k=k, m=m, seed=seed, scale=scale) -> Tensor:
            rows = compress_one_hot(ids, d, k, m, comp.kind, seed, dtype)
            return rows if scale is None else rows * scale.to(rows.device, rows.dtype)[ids].unsqueeze(-1)

        maps[spec.module] = map_
    return maps


def compressed_gradients(projected: Mapping[str, Captured], comp: Compression) -> Tensor:
    """``(n, Σ k_out · k_in)``: each example's compressed gradient ``Σ_t ds'_t a'_tᵀ`` block after block
    (a tied weight's members summed), row-major."""
    parts = []
    for group in comp.members.values():
        total = None
        for module, _ in group:
            c = projected[module]
            part = torch.einsum("ntk,ntl->nkl", c.ds, c.a).reshape(c.a.shape[0], -1)
            total = part if total is None else total + part
        parts.append(total)
    return torch.cat(parts, dim=1)


def compress_gradient(G: Tensor, spec: LayerSpec, comp: Compression) -> Tensor:
    """``(n, k_out · k_in)``: explicit gradients of one block compressed as :func:`compress_factors` compresses
    their factors; ``spec`` is the block's first module (``G`` laid out as in :func:`project_gradient`)."""
    n = G.shape[0]
    (k_out, k_in), (m_out, m_in) = comp.dims[spec.module], comp.masks[spec.module]
    weight = spec.gradient_matrix(G)  # (n, d_out, d_a) in the block's orientation
    right = _side(weight, k_in, m_in, comp.kind, side_seed(comp.seed, spec.module, "in"))  # (n, d_out, k_in)
    both = _side(right.transpose(1, 2), k_out, m_out, comp.kind, side_seed(comp.seed, spec.module, "out"))
    return both.transpose(1, 2).reshape(n, k_out * k_in)


def compress_parameter_gradients(grads: Mapping[str, Tensor], specs: Sequence[LayerSpec], comp: Compression, *,
                                 transform: Optional[Callable[[Tensor, LayerSpec], Tensor]] = None) -> Tensor:
    """``(n, Σ k_out · k_in)``: explicit gradients ``{parameter: (n, ...)}`` of the blocks' weights (and biases)
    compressed block after block as :func:`compressed_gradients` lays out the factors' (a tied weight's gradient
    once, in its block's orientation); ``transform(G, spec)`` is applied to each block's ``(n, P_block)`` first."""
    first: dict[str, LayerSpec] = {}
    for spec in specs:
        first.setdefault(spec.module, spec)
    parts = []
    for block in comp.members:
        spec = first[block]
        names = [spec.weight] + ([spec.bias] if spec.bias else [])
        n = grads[names[0]].shape[0]
        G = torch.cat([grads[name].reshape(n, -1) for name in names], dim=1)
        parts.append(compress_gradient(G if transform is None else transform(G, spec), spec, comp))
    return torch.cat(parts, dim=1)


def compressed_covariances(projected: Mapping[str, Captured], comp: Compression) -> dict[str, Tuple[Tensor, Tensor]]:
    """Per block, ``(Σ ds' ds'ᵀ, Σ a' a'ᵀ)`` over the examples and positions of compressed factors, float64:
    K-FAC's output and input factors of the compressed gradients, unnormalised (a tied block's members pooled,
    each in the block's orientation). Sums over batches add up."""
    out = {}
    for block, group in comp.members.items():
        S = A = 0
        for module, _ in group:
            c = projected[module]
            ds, a = c.ds.double().reshape(-1, c.ds.shape[-1]), c.a.double().reshape(-1, c.a.shape[-1])
            S, A = S + ds.T @ ds, A + a.T @ a
        out[block] = (S, A)
    return out


def compressed_ekfac(covariances: Mapping[str, Tuple[Tensor, Tensor]], gradients: Tensor, comp: Compression) -> EKFAC:
    """EK-FAC of the compressed gradients ``(n, comp.width)``, block by block.

    Each block's bases are the eigenvectors of its :func:`compressed_covariances`; its
    eigenvalues are corrected to ``Λ = mean_i (Q_Sᵀ G̃_i Q_A)²`` over the rows of
    ``gradients`` (George et al., 2018), so the fit is exact on the diagonal of that
    basis. The result acts on vectors laid out as :func:`compressed_gradients` lays
    them out (one pseudo-layer ``k_out × k_in`` per block, named ``"<block>.compressed"``).
    """
    if gradients.dim() != 2 or gradients.shape[1] != comp.width:
        raise ValueError(f"gradients: expected (n, {comp.width}) compressed gradients, got {tuple(gradients.shape)}")
    layers, start = [], 0
    for block, (k_out, k_in) in comp.dims.items():
        S, A = covariances[block]
        QS, QA = torch.linalg.eigh(S)[1], torch.linalg.eigh(A)[1]
        G = gradients[:, start : start + k_out * k_in].double().reshape(-1, k_out, k_in)
        start += k_out * k_in
        corrected = contract("so,nst,ta->noa", QS, G, QA).pow(2).mean(0)
        spec = LayerSpec(block, "linear", f"{block}.compressed", None, k_in, k_out)
        layers.append(EKFACLayer(spec, QA, QS, corrected))
    names = tuple(layer.spec.weight for layer in layers)
    return EKFAC(tuple(layers), names, tuple(k_out * k_in for k_out, k_in in comp.dims.values()), True)


def token_gradients(projected: Mapping[str, Captured], comp: Compression) -> Tensor:
    """``(n, T, Σ k_out · k_in)``: each position's term ``ds'_t a'_tᵀ`` of the compressed gradients, laid out as
    :func:`compressed_gradients` lays out their sum over ``t`` (every module with the same positions ``T``)."""
    positions = {c.a.shape[1] for c in projected.values()}
    if len(positions) != 1:
        raise ValueError(f"per-position gradients need the same positions in every module, got {sorted(positions)}")
    parts = []
    for group in comp.members.values():
        total = None
        for module, _ in group:
            c = projected[module]
            part = torch.einsum("ntk,ntl->ntkl", c.ds, c.a).reshape(*c.a.shape[:2], -1)
            total = part if total is None else total + part
        parts.append(total)
    return torch.cat(parts, dim=2)


def token_scores(projected: Mapping[str, Captured], queries: Tensor, comp: Compression) -> Tensor:
    """``(n, T, m)``: each position's term ``Σ_modules ds'_tᵀ Q a'_t`` of the scores against ``m`` queries.

    ``queries`` ``(m, Σ k_out · k_in)`` are compressed (and preconditioned) query
    gradients laid out as :func:`compressed_gradients`; summed over ``t`` the terms
    are the examples' scores ``compressed_gradients(projected, comp) @ queries.T``.
    Every module must have the same positions ``T`` (the tokens of a sequence).
    """
    positions = {c.a.shape[1] for c in projected.values()}
    if len(positions) != 1:
        raise ValueError(f"per-position scores need the same positions in every module, got {sorted(positions)}")
    total, start = None, 0
    for block, group in comp.members.items():
        k_out, k_in = comp.dims[block]
        Q = queries[:, start : start + k_out * k_in].reshape(-1, k_out, k_in)
        start += k_out * k_in
        for module, _ in group:
            c = projected[module]
            part = contract("ntk,jkl,ntl->ntj", c.ds, Q.to(c.a.dtype), c.a)
            total = part if total is None else total + part
    return total
