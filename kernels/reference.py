"""The torch reference of every kernel: the CPU path and the tests' oracle.

Projections generate the matrix one bounded tile of rows at a time from the
hash in :mod:`kernels.hash` and never hold it whole; inner products and the
top-k merge are plain torch. All accumulation is float32, or float64 for float64
inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .hash import gaussian_table, row_key, shr, sign_table, word

__all__ = ["TILE_ENTRIES", "dense_tile", "project_dense", "project_sjlt", "inner", "merge_topk"]

# Entries of one generated tile of the matrix (4 MiB in float32). Larger tiles fall
# out of cache while they are generated: at P = 2^18, k = 1024 on this machine,
# 1M-entry tiles projected Gaussian 19% faster than 4M-entry ones.
TILE_ENTRIES = 1 << 20


def dense_tile(seed: int, rows: Tensor, dim_out: int, kind: str) -> Tensor:
    """Unscaled entries ``R[rows, 0:dim_out]`` (``±1`` or ``TABLE`` values), float32, shape ``(T, dim_out)``."""
    keys = row_key(seed, rows).unsqueeze(1)
    T, device = rows.shape[0], rows.device
    if kind == "rademacher":
        words = word(keys, torch.arange((dim_out + 31) // 32, device=device).unsqueeze(0))
        octets = torch.empty(*words.shape, 4, dtype=torch.int32, device=device)
        for i in range(4):
            torch.bitwise_and(shr(words, 8 * i) if i else words, 0xFF, out=octets[..., i])
        tile = sign_table(device).index_select(0, octets.reshape(-1)).reshape(T, -1)  # (T, W * 32)
    else:
        words = word(keys, torch.arange((dim_out + 1) // 2, device=device).unsqueeze(0))
        halves = torch.empty(*words.shape, 2, dtype=torch.int32, device=device)
        torch.bitwise_and(words, 0xFFFF, out=halves[..., 0])
        torch.bitwise_and(shr(words, 16), 0xFFFF, out=halves[..., 1])
        tile = gaussian_table(device).index_select(0, halves.reshape(-1)).reshape(T, -1)  # (T, W * 2)
    return tile[:, :dim_out]


def project_dense(x: Tensor, dim_out: int, kind: str, seed: int, offset: int) -> Tensor:
    """``x @ R[offset : offset + P] / sqrt(dim_out)`` for ``x`` ``(B, P)``, one tile of rows at a time."""
    B, P = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(B, dim_out, dtype=dtype, device=x.device)
    rows_per_tile = max(1, TILE_ENTRIES // dim_out)
    for start in range(0, P, rows_per_tile):
        stop = min(P, start + rows_per_tile)
        rows = torch.arange(offset + start, offset + stop, device=x.device)
        out.addmm_(x[:, start:stop].to(dtype), dense_tile(seed, rows, dim_out, kind).to(dtype))
    return out * (1.0 / math.sqrt(dim_out))


def sjlt_positions(seed: int, rows: Tensor, dim_out: int, nnz: int) -> tuple[Tensor, Tensor]:
    """Columns ``(T, nnz)`` (int64) and signs ``(T, nnz)`` (float32, ``±1``) of rows ``rows`` of the SJLT."""
    keys = row_key(seed, rows).unsqueeze(1)
    h = word(keys, torch.arange(nnz, device=rows.device).unsqueeze(0)).to(torch.int64)
    blocks = torch.arange(nnz + 1, device=rows.device) * dim_out // nnz
    starts, widths = blocks[:-1].unsqueeze(0), (blocks[1:] - blocks[:-1]).unsqueeze(0)
    columns = starts + ((h >> 1) & 0x7FFFFFFF) % widths
    signs = (1 - 2 * (h & 1)).to(torch.float32)
    return columns, signs


def project_sjlt(x: Tensor, dim_out: int, seed: int, offset: int, nnz: int) -> Tensor:
    """The sparse JL transform of ``x`` ``(B, P)``: ``O(B · P · nnz)`` scatter-adds, a bounded tile at a time.

    Signs are folded into the scatter rather than multiplied in: a coordinate with
    sign ``-1`` adds into a second bank of ``dim_out`` columns that is subtracted at
    the end, so each of the ``nnz`` passes reads the tile of ``x`` once and writes
    nothing else (3x faster than multiplying by the signs first, measured).
    """
    B, P = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    banks = torch.zeros(B, 2 * dim_out, dtype=dtype, device=x.device)
    # A tile here is the rows' positions and signs ((T, nnz) each); x is read in place.
    rows_per_tile = max(1, TILE_ENTRIES // nnz)
    for start in range(0, P, rows_per_tile):
        stop = min(P, start + rows_per_tile)
        rows = torch.arange(offset + start, offset + stop, device=x.device)
        columns, signs = sjlt_positions(seed, rows, dim_out, nnz)
        targets = columns + dim_out * (signs < 0)
        source = x[:, start:stop].to(dtype)
        for b in range(nnz):
            banks.index_add_(1, targets[:, b], source)
    return (banks[:, :dim_out] - banks[:, dim_out:]) * (1.0 / math.sqrt(nnz))


def inner(a: Tensor, b: Tensor, normalize: bool) -> Tensor:
    """``(n, k) x (m, k) -> (n, m)`` in float32 or wider; with ``normalize``, cosines (0 for a zero row)."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a32, b32 = a.to(dtype), b.to(dtype)
    out = a32 @ b32.T
    if normalize:  # one norm at a time: their product can underflow where each does not
        tiny = torch.finfo(dtype).tiny
        out = out / a32.norm(dim=1).clamp(min=tiny).unsqueeze(1) / b32.norm(dim=1).clamp(min=tiny).unsqueeze(0)
    return out


def merge_topk(
    values: Tensor, indices: Tensor, block: Tensor, start: int, k: int, largest: bool
) -> tuple[Tensor, Tensor]:
    """Merge a running top-k ``(m, k')`` with the scores ``(m, b)`` of rows ``start .. start + b``.

    ``torch.topk`` picks the block's best ``k``; it breaks ties arbitrarily, which
    matters only where the k-th value also occurs outside the pick, so such rows
    are re-picked exactly by ``(score, smaller index first)``. The ``2k`` survivors
    are then ranked exactly the same way, so the result does not depend on the
    block sizes and the smallest index wins every tie.
    """
    kb = min(k, block.shape[1])
    picked = torch.topk(block, kb, dim=1, largest=largest).indices
    kth = block.gather(1, picked[:, -1:])
    crossing = (block == kth).sum(1) != (block.gather(1, picked) == kth).sum(1)
    if bool(crossing.any()):
        rows = crossing.nonzero().flatten()
        positions = torch.arange(block.shape[1], device=block.device).expand(len(rows), -1)
        picked[rows] = _exact_pick(block[rows], positions, kb, largest)
    candidates = torch.cat([values, block.gather(1, picked)], dim=1)
    candidate_indices = torch.cat([indices, picked + start], dim=1)
    order = _exact_pick(candidates, candidate_indices, min(k, candidates.shape[1]), largest)
    return candidates.gather(1, order), candidate_indices.gather(1, order)


def _exact_pick(values: Tensor, indices: Tensor, k: int, largest: bool) -> Tensor:
    """Positions of the best ``k`` by ``(score, smaller index first)``, in that order."""
    order = torch.argsort(indices, dim=1, stable=True)
    ranked = torch.sort(values.gather(1, order), dim=1, descending=largest, stable=True).indices[:, :k]
    return order.gather(1, ranked)
