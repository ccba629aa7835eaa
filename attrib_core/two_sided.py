"""Two-sided random projection of layer gradients: ``R_outᵀ G R_in`` from the factors, never forming ``G``.

A Linear layer's per-example gradient ``G = Σ_t ds_t a_tᵀ`` (``d_out × d_a``) is
compressed to ``R_outᵀ G R_in`` (``k_out × k_in``) by projecting each factor,
``ds R_out`` and ``a R_in`` (the compression of TracInCP-fast-randproj, Pruthi et al.,
2020, and of LoGra). Inner products of compressed gradients are again factored
products, so :func:`attrib_core.factored_inner` applies unchanged. The matrices
come from :func:`kernels.project`'s counter-based hash, keyed by (seed, module, side):
the same compression on every device, batch and process.
"""

from __future__ import annotations

import zlib
from typing import Mapping, Tuple

import torch
from torch import Tensor

import kernels

from .layer_capture import Captured, LayerSpec

__all__ = ["side_seed", "project_factors", "project_gradient"]


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
    weight = spec.as_matrix(G[:, : spec.d_out * spec.d_in])
    if spec.bias is not None:
        weight = torch.cat([weight, G[:, spec.d_out * spec.d_in :].reshape(n, spec.d_out, 1)], dim=2)
    right = _project_rows(weight, k_in, side_seed(seed, spec.module, "in"))
    both = _project_rows(right.transpose(1, 2), k_out, side_seed(seed, spec.module, "out"))  # (n, k_in, k_out)
    return both.transpose(1, 2).reshape(n, k_out * k_in)
