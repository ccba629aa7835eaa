"""Random projections of gradients, as values that can be applied to any batch."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

import kernels

from ._checks import check_count

__all__ = ["Projector", "projector"]

_KINDS = ("gaussian", "rademacher", "sjlt", "mask", "identity")


class Projector(NamedTuple):
    """``G (n, dim_in) -> (n, dim_out)``; the same matrix for the same seed on every batch and device.

    ``kind``, ``seed`` and ``nnz`` define the matrix (see :func:`kernels.project`);
    for ``"mask"``, ``columns`` are the kept coordinates.
    """

    dim_in: int
    dim_out: int
    kind: str
    seed: int
    nnz: int
    columns: Optional[Tensor]

    def __call__(self, G: Tensor, *, offset: Optional[int] = None) -> Tensor:
        """Project ``G`` ``(n, dim_in)``; or, with ``offset``, a slice ``(n, width)`` of input coordinates ``offset ..``.

        Projecting column slices with their offsets and summing gives the projection
        of the whole, for gradients too wide to hold at once (not for ``mask``).
        """
        if G.dim() != 2 or (offset is None and G.shape[1] != self.dim_in):
            raise ValueError(f"G: expected shape (n, {self.dim_in}), got {tuple(G.shape)}")
        offset = 0 if offset is None else offset
        if G.shape[1] + offset > self.dim_in:
            raise ValueError(f"G: columns {offset}..{offset + G.shape[1]} exceed dim_in={self.dim_in}")
        if self.kind == "identity":
            out = torch.zeros(G.shape[0], self.dim_in, dtype=torch.promote_types(G.dtype, torch.float32),
                              device=G.device)
            out[:, offset : offset + G.shape[1]] = G
            return out
        if self.kind == "mask":
            if offset:
                raise ValueError("offset: a mask projector takes the whole gradient")
            scale = math.sqrt(self.dim_in / self.dim_out)
            return G[:, self.columns.to(G.device)].to(torch.promote_types(G.dtype, torch.float32)) * scale
        return kernels.project(G, self.dim_out, kind=self.kind, seed=self.seed, offset=offset, nnz=self.nnz)


def projector(dim_in: int, dim_out: int, *, kind: str = "rademacher", seed: int = 0, nnz: int = 4) -> Projector:
    """A projection from ``dim_in`` to ``dim_out`` coordinates (Johnson-Lindenstrauss).

    Args:
        dim_in: the gradient width ``P``.
        dim_out: ``k``; for ``"identity"`` it must equal ``dim_in``.
        kind: ``"gaussian"``, ``"rademacher"``, ``"sjlt"`` (dense or sparse random
            matrices from :func:`kernels.project`, inner products preserved in
            expectation), ``"mask"`` (``k`` coordinates drawn without replacement
            with the seed, scaled by ``sqrt(P / k)`` so norms are preserved in
            expectation) or ``"identity"``.
        seed: in ``[0, 2**32)``; the matrix depends on nothing else.
        nnz: non-zeros per input coordinate for ``"sjlt"``.
    """
    dim_in = check_count(dim_in, "dim_in")
    dim_out = check_count(dim_out, "dim_out")
    if kind not in _KINDS:
        raise ValueError(f"kind: expected one of {_KINDS}, got {kind!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"seed: expected an integer in [0, 2**32), got {seed!r}")
    columns = None
    if kind == "identity" and dim_out != dim_in:
        raise ValueError(f"dim_out: the identity projection needs dim_out == dim_in ({dim_in}), got {dim_out}")
    if kind == "mask":
        if dim_out > dim_in:
            raise ValueError(f"dim_out: a mask keeps at most dim_in={dim_in} coordinates, got {dim_out}")
        generator = torch.Generator().manual_seed(seed)
        columns = torch.randperm(dim_in, generator=generator)[:dim_out].sort().values
    if kind == "sjlt":
        nnz = check_count(nnz, "nnz")
        if nnz > dim_out:
            raise ValueError(f"nnz: cannot exceed dim_out={dim_out}, got {nnz}")
    return Projector(dim_in, dim_out, kind, seed, nnz, columns)
