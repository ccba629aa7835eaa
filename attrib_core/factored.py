"""Exact gradient inner products of Linear and Conv2d layers from their factors, without per-example gradients.

A layer ``s = W a (+ b)`` applied at positions ``t`` (one for a plain Linear
input, the tokens of a sequence, the output pixels of a convolution) has the
per-example weight gradient ``G = Σ_t ds_t a_tᵀ`` (``d_out × d_a``, the bias as
the weight of an appended constant 1). Two such gradients meet in

    ⟨G_i, G_j⟩ = Σ_t Σ_s (a_{i,t} · a_{j,s}) (ds_{i,t} · ds_{j,s}),

which costs ``T_i T_j (d_a + d_out)`` instead of ``d_a · d_out`` per pair, and never
holds ``G`` (the "ghost" inner product; TracIn-CP-fast in Pruthi et al., 2020, is its
final-layer case). The factors are what :func:`capture` returns.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from opt_einsum import contract
from torch import Tensor

from .layer_capture import Captured, LayerSpec

__all__ = ["factored_inner", "factored_rowwise", "factored_sq_norms", "factored_dense", "factored_cost", "concat_captured"]


def _check_layers(x: Mapping[str, Captured], y: Mapping[str, Captured]) -> None:
    if list(x) != list(y):
        raise ValueError(f"the two factored gradients cover different layers: {list(x)} and {list(y)}")
    if not x:
        raise ValueError("factored gradients: no layer given")


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def factored_inner(x: Mapping[str, Captured], y: Mapping[str, Captured]) -> Tensor:
    """``(n, m)``: inner products of the per-example gradients factored in ``x`` (``n`` examples) and ``y`` (``m``).

    Args:
        x, y: ``{module: Captured(a (n, T, d_a), ds (n, T, d_out), positions)}`` over
            the same layers, in the same order (``T`` may differ between ``x`` and ``y``).

    Returns:
        ``Σ_layers Σ_{t,s} (a_{i,t}·a_{j,s})(ds_{i,t}·ds_{j,s})``, float32 or wider.
    """
    _check_layers(x, y)
    total = None
    for name in x:
        a, ds, b, dt = (_wide(t) for t in (x[name].a, x[name].ds, y[name].a, y[name].ds))
        if a.shape[1] == 1 and b.shape[1] == 1:
            part = (a[:, 0] @ b[:, 0].T) * (ds[:, 0] @ dt[:, 0].T)
        else:
            part = contract("ita,jsa,itd,jsd->ij", a, b, ds, dt)
        total = part if total is None else total + part
    return total


def factored_rowwise(x: Mapping[str, Captured], y: Mapping[str, Captured]) -> Tensor:
    """``(n,)``: ``⟨g_i, h_i⟩`` for the gradients factored in ``x`` and ``y`` of the same ``n`` examples.

    The diagonal of :func:`factored_inner` without the rest of it.
    """
    _check_layers(x, y)
    total = None
    for name in x:
        a, ds, b, dt = (_wide(t) for t in (x[name].a, x[name].ds, y[name].a, y[name].ds))
        if a.shape[1] == 1 and b.shape[1] == 1:
            part = (a[:, 0] * b[:, 0]).sum(1) * (ds[:, 0] * dt[:, 0]).sum(1)
        else:
            part = (torch.einsum("nta,nsa->nts", a, b) * torch.einsum("ntd,nsd->nts", ds, dt)).sum((1, 2))
        total = part if total is None else total + part
    return total


def factored_sq_norms(x: Mapping[str, Captured]) -> Tensor:
    """``(n,)``: squared norms ``Σ_layers ‖Σ_t ds_t a_tᵀ‖²`` of the factored per-example gradients."""
    return factored_rowwise(x, x)


def factored_dense(x: Mapping[str, Captured], specs: Sequence[LayerSpec], names: Sequence[str]) -> Tensor:
    """The per-example gradients themselves, ``(n, P)``, laid out as ``names`` (parameter names) in order.

    Each named parameter must be the weight or bias of one of ``specs``; weights are
    flattened as ``weight.reshape(-1)`` in their own layout (``(d_out, C_in, kh, kw)`` for a
    convolution, ``(d_in, d_out)`` for a Conv1D or an Embedding).
    """
    by_param = {}
    for spec in specs:
        grad = torch.einsum("ntd,nta->nda", _wide(x[spec.module].ds), _wide(x[spec.module].a))
        by_param[spec.weight] = spec.as_weight(grad[:, :, : spec.d_in])
        if spec.bias is not None:
            by_param[spec.bias] = grad[:, :, spec.d_in]
    missing = [n for n in names if n not in by_param]
    if missing:
        raise ValueError(f"names: {missing} are not the weight or bias of a factored layer")
    return torch.cat([by_param[n] for n in names], dim=1)


def factored_cost(specs: Sequence[LayerSpec], positions: Mapping[str, int]) -> tuple[int, int]:
    """Multiply-adds per (train, test) pair: ``(factored, dense)`` = ``(Σ T²(d_a + d_out), Σ d_a · d_out)``.

    ``positions`` maps each layer to its positions per example ``T``.
    """
    factored = sum(positions[s.module] ** 2 * (s.d_a + s.d_out) for s in specs)
    dense = sum(s.d_a * s.d_out for s in specs)
    return factored, dense


def concat_captured(parts: Sequence[Mapping[str, Captured]]) -> dict[str, Captured]:
    """Batches' factors joined along the example dimension (all batches with the same positions ``T``)."""
    if not parts:
        raise ValueError("parts: no batch given")
    return {
        name: Captured(
            torch.cat([p[name].a for p in parts]),
            torch.cat([p[name].ds for p in parts]),
            sum(p[name].positions for p in parts),
        )
        for name in parts[0]
    }
