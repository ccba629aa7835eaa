"""Triton kernels: random projection with the matrix generated in registers, and fused inner products.

The matrix entries follow the hash spelled out in :mod:`kernels.hash`, step for
step on uint32 words. Imported lazily by :mod:`kernels.dispatch`, only when a call
takes the Triton path, so the package works without Triton. On CPU tensors the
kernels run under ``TRITON_INTERPRET=1`` (the tests do this); the interpreter's
bf16 arithmetic is wrong, so there everything is cast to float32 first.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tuning
from .hash import K0, M1, M2, gaussian_table

_KIND = {"rademacher": 0, "gaussian": 1}


def _host_mix(x: int) -> int:
    """The mixer on a Python int (uint32), for the per-call constant ``mix(seed ^ K0)``."""
    mask = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * M1) & mask
    x ^= x >> 15
    x = (x * M2) & mask
    return x ^ (x >> 16)


@triton.jit
def _mix(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x5BD1E995
    return x ^ (x >> 16)


@triton.jit
def _row_keys(seed_key, rows):
    """``row_key(seed, p)`` for int64 rows, given ``seed_key = mix(seed ^ K0)`` (uint32)."""
    lo = (rows & 0xFFFFFFFF).to(tl.uint32)
    hi = (rows >> 32).to(tl.uint32)
    return _mix(_mix(seed_key ^ lo) ^ hi)


@triton.jit
def _tile(keys, col_start, table_ptr, KIND: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    """Unscaled entries for row keys ``(BP,)`` and the ``BK`` columns from ``col_start`` (int64, a multiple of 32):
    ``(BP, BK)`` in ``DTYPE`` (float32, or for Rademacher also float16/bfloat16)."""
    if KIND == 0:
        # Word w gives columns 32w .. 32w + 31 (bit j & 31 of word j >> 5), a byte for each 8 of them; each byte's
        # thread hashes its word (4 hashes a word, against 32 with one per entry)
        groups = (col_start >> 3) + tl.arange(0, BLOCK_K // 8).to(tl.int64)
        words = (groups >> 2).to(tl.uint32)
        h = _mix(keys[:, None] ^ (words * 0x61C88647)[None, :])  # (BP, BK / 8)
        byte = h >> ((groups & 3) * 8).to(tl.uint32)[None, :]
        return tl.reshape(_byte_signs(byte, DTYPE), (keys.shape[0], BLOCK_K))
    else:
        # One hash per word: word w gives column 2w (low 16 bits) and 2w + 1 (high 16 bits), joined in the thread
        # that hashed it
        words = (col_start >> 1) + tl.arange(0, BLOCK_K // 2).to(tl.int64)
        h = _mix(keys[:, None] ^ (words.to(tl.uint32) * 0x61C88647)[None, :])  # (BP, BK / 2)
        low = tl.load(table_ptr + (h & 0xFFFF).to(tl.int32))
        high = tl.load(table_ptr + (h >> 16).to(tl.int32))
        return tl.reshape(tl.join(low, high), (keys.shape[0], BLOCK_K))


@triton.jit
def _sign(h, bit: tl.constexpr, DTYPE: tl.constexpr):
    return _signs((h >> bit) & 1, DTYPE)


@triton.jit
def _byte_signs(h, DTYPE: tl.constexpr):
    """The 8 entries of the low byte of each word of ``h`` ``(BP, G)``: ``(BP, G, 2, 2, 2)``, entry ``[p, g, i2, i1,
    i0]`` from bit ``4 i2 + 2 i1 + i0``. Built by joins, which keep the 8 entries in the thread that made the byte,
    close to the 8 consecutive columns per thread the tile's store to shared memory wants. (One join tree per word,
    32 columns per thread, made Triton convert layouts through shared memory at every level: 66 barriers an
    iteration against 18 on sm_90a.)"""
    a0 = tl.join(_sign(h, 0, DTYPE), _sign(h, 4, DTYPE))
    a1 = tl.join(_sign(h, 1, DTYPE), _sign(h, 5, DTYPE))
    a2 = tl.join(_sign(h, 2, DTYPE), _sign(h, 6, DTYPE))
    a3 = tl.join(_sign(h, 3, DTYPE), _sign(h, 7, DTYPE))
    b0 = tl.join(a0, a2)
    b1 = tl.join(a1, a3)
    return tl.join(b0, b1)


@triton.jit
def _signs(bits, DTYPE: tl.constexpr):
    """``+1`` where ``bits`` is 0 and ``-1`` where it is 1, made as bit patterns (the sign bit over the pattern of
    1.0), not by int-to-float conversion."""
    if DTYPE == tl.float32:
        return ((bits << 31) | 0x3F800000).to(tl.float32, bitcast=True)
    elif DTYPE == tl.bfloat16:
        return ((bits.to(tl.uint16) << 15) | 0x3F80).to(tl.bfloat16, bitcast=True)
    else:
        return ((bits.to(tl.uint16) << 15) | 0x3C00).to(tl.float16, bitcast=True)


# seed_key is never specialised: Triton turns an integer argument equal to 1 into a
# compile-time constant, and one seed (1580096365) hashes to seed_key == 1.
@triton.jit(do_not_specialize=["seed_key"])
def _entries_kernel(out_ptr, table_ptr, R, K, row_offset, seed_key, KIND: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    keys = _row_keys(seed_key.to(tl.uint32), row_offset + rows)
    values = _tile(keys, tl.program_id(1).to(tl.int64) * BLOCK_K, table_ptr, KIND, BLOCK_K, tl.float32)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], values, mask=mask)


@triton.jit(do_not_specialize=["seed_key"])
def _project_kernel(x_ptr, out_ptr, table_ptr, B, P, K, stride_xs, stride_xb, stride_xp, stride_os, stride_ob,
                    stride_ok, row_offset, seed_key, columns_per_split, KIND: tl.constexpr, DOT: tl.constexpr,
                    PARTS: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """Unscaled ``x @ R[row_offset + p0 : row_offset + p1]`` over split ``program_id(2)``'s columns ``p0 .. p1``
    of ``x`` into ``out[split]``; ``x`` holds ``PARTS`` matrices (``stride_xs`` apart) whose sum is the input: one,
    or the three exact bf16 parts of a float32 input. ``ACCUMULATE`` continues the sums already in ``out``."""
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    first = split * columns_per_split
    last = tl.minimum(first + columns_per_split, P.to(tl.int64))
    key_seed = seed_key.to(tl.uint32)
    col_start = tl.program_id(1).to(tl.int64) * BLOCK_K
    out_ptrs = out_ptr + split * stride_os + offs_b[:, None] * stride_ob + offs_k[None, :] * stride_ok
    out_mask = (offs_b[:, None] < B) & (offs_k[None, :] < K)
    if ACCUMULATE:
        acc = tl.load(out_ptrs, mask=out_mask, other=0.0)
    else:
        acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    for start in range(first, last, BLOCK_P):  # int64: P near 2^31 must not wrap
        offs_p = start + tl.arange(0, BLOCK_P).to(tl.int64)
        x_ptrs = x_ptr + offs_b[:, None] * stride_xb + offs_p[None, :] * stride_xp
        x_mask = (offs_b[:, None] < B) & (offs_p[None, :] < last)
        # The tile of the matrix lives in registers only, reused by the BLOCK_B rows of x (and by every part).
        keys = _row_keys(key_seed, row_offset + offs_p)
        if DOT == 1:  # ±1 entries are exact in fp16/bf16: tensor cores lose nothing
            tile = _tile(keys, col_start, table_ptr, KIND, BLOCK_K, x_ptr.dtype.element_ty)
            part_ptrs = x_ptrs
            for part in tl.static_range(PARTS):  # pointer steps: part * stride_xs in int32 would wrap past 2^31
                acc = tl.dot(tl.load(part_ptrs, mask=x_mask, other=0.0), tile, acc)
                part_ptrs += stride_xs
        elif DOT == 2:  # Gaussian entries (float32) on tensor cores as three tf32 products
            tile = _tile(keys, col_start, table_ptr, KIND, BLOCK_K, tl.float32)
            x = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)
            acc = tl.dot(x, tile, acc, input_precision="tf32x3")
        else:  # FMA in float32 (the interpreter, GPUs without bf16 tensor cores)
            tile = _tile(keys, col_start, table_ptr, KIND, BLOCK_K, tl.float32)
            part_ptrs = x_ptrs
            for part in tl.static_range(PARTS):
                x = tl.load(part_ptrs, mask=x_mask, other=0.0).to(tl.float32)
                acc = tl.dot(x, tile, acc, input_precision="ieee")
                part_ptrs += stride_xs
    tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _scores(a_ptr, b_ptr, offs_n, offs_m, N, M, K, stride_an, stride_ak, stride_bm, stride_bk,
            NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(BLOCK_N, BLOCK_M)`` float32: inner products (cosines with ``NORMALIZE``) of rows ``offs_n`` of ``a`` with
    rows ``offs_m`` of ``b`` (0 outside ``N`` and ``M``)."""
    acc = tl.zeros((offs_n.shape[0], offs_m.shape[0]), dtype=tl.float32)
    norm_a = tl.zeros((offs_n.shape[0],), dtype=tl.float32)
    norm_b = tl.zeros((offs_m.shape[0],), dtype=tl.float32)
    for start in range(0, K.to(tl.int64), BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K).to(tl.int64)
        a = tl.load(a_ptr + offs_n[:, None] * stride_an + offs_k[None, :] * stride_ak,
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + offs_m[:, None] * stride_bm + offs_k[None, :] * stride_bk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        # fp16/bf16 straight onto tensor cores (fp32 accumulation); fp32 as three tf32 products (tf32x3)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        if NORMALIZE:  # the norms ride along the same pass over the data, in fp32
            a32, b32 = a.to(tl.float32), b.to(tl.float32)
            norm_a += tl.sum(a32 * a32, axis=1)
            norm_b += tl.sum(b32 * b32, axis=1)
    if NORMALIZE:  # one norm at a time (their product can underflow where each does not), IEEE sqrt and division
        acc = tl.div_rn(acc, tl.maximum(tl.sqrt_rn(norm_a), 1.1754943508222875e-38)[:, None])
        acc = tl.div_rn(acc, tl.maximum(tl.sqrt_rn(norm_b), 1.1754943508222875e-38)[None, :])
    return acc


@triton.jit
def _inner_kernel(a_ptr, b_ptr, out_ptr, N, M, K, stride_an, stride_ak, stride_bm, stride_bk,
                  stride_on, stride_om, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    acc = _scores(a_ptr, b_ptr, offs_n, offs_m, N, M, K, stride_an, stride_ak, stride_bm, stride_bk, NORMALIZE,
                  PRECISION, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_m[None, :] * stride_om, acc, mask=mask)


_NO_CANDIDATE = tl.constexpr(-(2**63))  # the key of a padding slot: below every score's key


@triton.jit
def _keys(scores, rows, LARGEST: tl.constexpr):
    """int64 keys ordered as (score, then the smaller row first), best largest: the score's float32 bits mapped
    to an int32 of the same order in the high word (``-0.0`` as ``+0.0``; reversed for the smallest), and
    ``2^32 - 1 - row`` in the low word. Distinct rows give distinct keys, so the top keys are one exact answer."""
    bits = tl.where(scores == 0.0, 0, scores.to(tl.int32, bitcast=True))
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: flip the magnitude, keep the sign
    if not LARGEST:
        ordered = ~ordered
    return (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - rows)


@triton.jit
def _bitonic_sort(x, LOG: tl.constexpr, DESCENDING: tl.constexpr):
    """``x`` ``(R, W)`` (``W = 2^LOG``) sorted along its rows by a bitonic network written with reshapes,
    splits and joins only. The interpreter's ``tl.sort`` reduces element by element in Python (seconds a tile),
    so the interpreter runs this network instead; compiled kernels use ``tl.sort``, whose partner exchanges stay
    in registers."""
    R: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1]
    for stage in tl.static_range(1, LOG + 1):  # sorted runs of 2^stage, alternately up and down
        for step in tl.static_range(stage):
            j: tl.constexpr = 1 << (stage - 1 - step)  # compare-exchange i with i + j within blocks of 2j
            pairs = tl.permute(tl.reshape(x, (R, W // (2 * j), 2, j)), (0, 1, 3, 2))
            left, right = tl.split(pairs)
            block = tl.arange(0, W // (2 * j))
            down = (((block * 2 * j) >> stage) & 1) == 1  # this block's run is sorted downwards
            if DESCENDING:
                down = ~down
            down = down[None, :, None]
            low, high = tl.minimum(left, right), tl.maximum(left, right)
            pairs = tl.join(tl.where(down, high, low), tl.where(down, low, high))
            x = tl.reshape(tl.permute(pairs, (0, 1, 3, 2)), (R, W))
    return x


@triton.jit
def _sorted(x, LOG: tl.constexpr, DESCENDING: tl.constexpr, NETWORK: tl.constexpr):
    """``x`` ``(R, 2^LOG)`` sorted along its rows: by :func:`_bitonic_sort` with ``NETWORK``, else ``tl.sort``."""
    if NETWORK:
        return _bitonic_sort(x, LOG, DESCENDING)
    else:
        return tl.sort(x, 1, descending=DESCENDING)


@triton.jit
def _kth_score(best, k, LARGEST: tl.constexpr):
    """``(BLOCK_M,)`` float32: the score of each row's ``k``-th best key (best sorted descending), or ``-inf``
    (``+inf`` for the smallest) while a row holds fewer than ``k`` candidates."""
    slots = tl.arange(0, best.shape[1])
    key = tl.sum(tl.where(slots[None, :] == k - 1, best, 0), 1)
    ordered = (key >> 32).to(tl.int32)
    if not LARGEST:
        ordered = ~ordered
    score = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True)
    return tl.where(key == _NO_CANDIDATE, float("-inf") if LARGEST else float("inf"), score)


@triton.jit
def _topk_kernel(a_ptr, b_ptr, keys_ptr, bad_ptr, N, M, K, stride_an, stride_ak, stride_bm, stride_bk,
                 rows_per_chunk, chunks, k, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
                 LARGEST: tl.constexpr, NETWORK: tl.constexpr, LOG_N: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """For queries (rows of ``b``) ``offs_m`` and the rows of ``a`` in chunk ``program_id(1)``: the keys of the
    best ``BLOCK_N >= k`` rows, best first, into ``keys[m, chunk, :]``, and whether any score was NaN or infinite
    into ``bad[query block, chunk]``. Scores live in registers only, one ``(BLOCK_M, BLOCK_N)`` tile at a time;
    a tile is merged into the running best (by sorting networks) only where one of its scores beats a query's
    ``k``-th best so far, which after the first tiles is rare. Rows come in increasing order, so a score equal
    to the ``k``-th best loses its tie and need not be merged. No score matrix in memory, no host wait."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    first = chunk * rows_per_chunk
    last = tl.minimum(first + rows_per_chunk, N.to(tl.int64))
    best = tl.full((BLOCK_M, BLOCK_N), _NO_CANDIDATE, dtype=tl.int64)
    kth = tl.full((BLOCK_M,), float("-inf") if LARGEST else float("inf"), dtype=tl.float32)
    bad = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for start in range(first, last, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N).to(tl.int64)
        scores = tl.trans(_scores(a_ptr, b_ptr, offs_n, offs_m, N, M, K, stride_an, stride_ak, stride_bm,
                                  stride_bk, NORMALIZE, PRECISION, BLOCK_K))  # (BLOCK_M, BLOCK_N)
        valid = (offs_n < last)[None, :] & (offs_m < M)[:, None]
        bad = tl.maximum(bad, tl.where(valid & ~(tl.abs(scores) < float("inf")), 1, 0))  # NaN fails it too
        if LARGEST:
            better = valid & (scores > kth[:, None])
        else:
            better = valid & (scores < kth[:, None])
        if tl.max(tl.max(better.to(tl.int32), 1), 0) > 0:
            keys = tl.where(better, _keys(scores, offs_n[None, :], LARGEST), _NO_CANDIDATE)
            # the best BLOCK_N of (best, keys): best sorted descending against keys sorted ascending, slot by
            # slot the larger (a bitonic merge's first step), then sorted
            best = _sorted(tl.maximum(best, _sorted(keys, LOG_N, False, NETWORK)), LOG_N, True, NETWORK)
            kth = _kth_score(best, k, LARGEST)
    slots = tl.arange(0, BLOCK_N).to(tl.int64)
    tl.store(keys_ptr + (offs_m[:, None] * chunks + chunk) * BLOCK_N + slots[None, :], best,
             mask=(offs_m < M)[:, None])
    tl.store(bad_ptr + tl.program_id(0).to(tl.int64) * chunks + chunk, tl.max(tl.max(bad, 1), 0))


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class Launch(NamedTuple):
    """One kernel launch as the wrappers below make it: ``kernel[grid](*args, **meta)``. The static analysis of
    the compiled kernels (``benchmarks/kernels_sass.py``) binds the same arguments, so it compiles exactly the
    specialisations a real launch would."""

    kernel: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    meta: Dict[str, Any]

    def __call__(self) -> None:
        device = next(a.device for a in self.args if isinstance(a, Tensor))
        if device.type == "cuda":  # on the tensors' GPU, not the current one
            with torch.cuda.device(device):
                self.kernel[self.grid](*self.args, **self.meta)
        else:
            self.kernel[self.grid](*self.args, **self.meta)


_GRID_Y = 65535  # CUDA's limit on the second and third grid dimensions


def _checked_grid(grid: Tuple[int, ...], name: str, what: str) -> Tuple[int, ...]:
    if any(blocks > _GRID_Y for blocks in grid[1:]):
        raise ValueError(f"{name}: {what} need a grid of {grid} blocks, over the grid's {_GRID_Y} in its second and "
                         "third dimensions")
    return grid


def entries_launch(out: Tensor, table: Tensor, seed: int, row_offset: int, kind: str) -> Launch:
    rows, dim_out = out.shape
    grid = _checked_grid((triton.cdiv(rows, 32), triton.cdiv(dim_out, 32)), "entries_launch", f"{dim_out} columns")
    return Launch(_entries_kernel, grid, (out, table, rows, dim_out, row_offset, _host_mix(seed ^ K0)),
                  dict(KIND=_KIND[kind], BLOCK_R=32, BLOCK_K=32))


class ProjectPlan(NamedTuple):
    """How :func:`project_dense` launches the projection kernel for one input shape and GPU generation.

    ``dot``: 1 on tensor cores (±1 entries, exact in fp16/bf16), 2 Gaussian entries as three tf32 products, 0 FMA.
    ``parts``: 3 where a float32 input goes in as its three exact bf16 parts (:func:`bf16_parts`), else 1.
    ``chunk``: columns of ``x`` per launch (parts are made a chunk at a time; later launches continue the sums).
    ``splits``: programs over disjoint column ranges of ``columns_per_split`` (a multiple of ``block_p``),
    their partial sums added in a fixed order afterwards, for inputs of too few rows to fill the GPU.
    """

    dot: int
    parts: int
    block_b: int
    block_p: int
    block_k: int
    warps: int
    stages: int
    chunk: int
    splits: int
    columns_per_split: int


# Tiles per GPU generation and path: rows ``(above, tile, alternatives)``, taken for inputs of more than ``above``
# rows of x. ``tile`` (BLOCK_B, BLOCK_P, BLOCK_K, warps, stages) is the static plan, chosen with the static model of
# kernels/static_analysis.py (benchmarks/kernels_sass.py, RESULTS.md): no spills, shared memory within the smallest
# GPU that takes the table (227 KiB on Hopper; 99 KiB for "sm_80", which also serves sm_86/sm_89 and later), and a
# bound within 6% of the highest the sweep found (sm_90a's Gaussian 15.8% against 16.7% for a tile that spills
# with half-precision input), which favours many rows per generated tile of the matrix (each tile serves BLOCK_B
# rows of x: the more, the less hashing per multiply-add). ``alternatives`` (BLOCK_B, BLOCK_K,
# warps, stages) keep BLOCK_P and so every output's sum: other schedules without spills, picked to vary rows,
# columns, warps and stages, some with a lower bound (the model leaves out latency, occupancy and L2, which a
# GPU's timing sees), among which that timing chooses (kernels/tuning.py, project_schedules).
_TILES = {
    ("sm_90a", "half"): (
        (128, (256, 64, 128, 8, 3), ((256, 128, 8, 2), (256, 128, 8, 4), (256, 64, 8, 3))),
        (64, (128, 64, 256, 8, 3), ((128, 128, 4, 3), (128, 128, 8, 3), (128, 256, 8, 2))),
        (0, (64, 64, 128, 4, 3), ((64, 256, 4, 3), (64, 256, 8, 3), (64, 128, 8, 3)))),
    ("sm_90a", "parts"): (
        (128, (256, 64, 128, 8, 2), ((128, 128, 8, 3), (128, 256, 8, 2), (256, 64, 8, 2))),
        (64, (128, 32, 128, 4, 3), ((128, 128, 4, 2), (128, 256, 8, 3), (128, 128, 8, 3))),
        (0, (64, 32, 256, 4, 3), ((64, 128, 4, 3), (64, 128, 4, 2), (64, 64, 4, 3)))),
    ("sm_90a", "gaussian"): (
        (64, (128, 32, 128, 8, 3), ((128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 4))),
        (0, (64, 64, 128, 8, 2), ((64, 128, 8, 3), (64, 128, 4, 2), (64, 64, 8, 2)))),
    ("sm_80", "half"): (
        (64, (128, 64, 256, 8, 3), ((128, 256, 8, 2), (128, 128, 4, 3), (256, 64, 8, 3))),
        (0, (64, 32, 128, 4, 2), ((64, 256, 8, 2), (64, 256, 8, 3), (64, 128, 4, 3)))),
    ("sm_80", "parts"): (
        (128, (256, 32, 64, 8, 2), ((128, 128, 8, 3), (128, 256, 8, 2), (128, 64, 4, 3))),
        (64, (128, 32, 64, 4, 3), ((128, 64, 4, 2), (128, 128, 8, 3), (128, 256, 8, 2))),
        (0, (64, 32, 64, 8, 3), ((64, 64, 8, 2), (64, 256, 8, 2), (64, 128, 4, 2)))),
    ("sm_80", "gaussian"): (
        (64, (128, 32, 128, 8, 3), ((128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4))),
        (0, (64, 32, 64, 8, 3), ((64, 64, 8, 2), (64, 64, 8, 4), (64, 64, 4, 2)))),
    (None, "fma"): ((0, (64, 32, 64, 4, 3), ()),),
}
_TARGET_PROGRAMS = 264  # split over P until the grid has this many programs (2 waves of an H100's 132 SMs) ...
_MIN_SPLIT_COLUMNS = 4096  # ... but never into ranges shorter than this
_PART_BYTES = 1 << 28  # bf16 parts of a float32 input made at a time: this many bytes, or block_p columns if more
_TUNE_MACS = 1 << 40  # projections of fewer multiply-adds (B·P·K) take the static plan, untimed
_TUNE_COLUMNS = 1 << 14  # columns of x per split each candidate schedule is timed on


def device_arch(device: torch.device) -> Optional[str]:
    """The tile table a CUDA device takes: ``"sm_90a"`` (Hopper), ``"sm_80"`` (Ampere and later), ``None``
    (older GPUs: no bf16 tensor cores, FMA) or for a CPU tensor."""
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90a" if major == 9 else "sm_80" if major >= 8 else None


def project_schedules(B: int, P: int, K: int, dtype: torch.dtype, kind: str, arch: Optional[str],
                      interpreted: bool) -> List[ProjectPlan]:
    """The launch plans for ``x`` ``(B, P)`` of ``dtype`` projected to ``K`` on ``arch`` (see :class:`ProjectPlan`):
    the static plan first, then its table row's alternatives. They differ in rows and columns per program, warps
    and pipeline stages only; ``block_p``, chunks and splits are the static plan's, so every output element is
    the same sum of the same products in the same order whichever of them runs. The static plan depends on the
    shape and the GPU generation only, never on timings."""
    tensor_cores = arch is not None and not interpreted  # the interpreter's bf16 arithmetic is wrong
    # float32 x as three bf16 parts on tensor cores; the interpreter runs the same plan on float32 copies of them
    parts = 3 if kind == "rademacher" and dtype == torch.float32 and (tensor_cores or interpreted) else 1
    if not tensor_cores:
        dot, path = 0, (None, "fma")
    elif kind == "rademacher":
        dot, path = 1, (arch, "parts" if parts == 3 else "half")
    else:
        dot, path = 2, (arch, "gaussian")
    rows = _TILES[path]
    _, (block_b, block_p, block_k, warps, stages), alternatives = next((r for r in rows if B > r[0]), rows[-1])
    chunk = max(P, 1)
    if parts == 3:
        chunk = min(chunk, max(block_p, _PART_BYTES // (3 * 2 * max(B, 1)) // block_p * block_p))
    programs = max(1, triton.cdiv(B, block_b) * triton.cdiv(K, block_k))  # B = 0: one empty program
    splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, programs), chunk // _MIN_SPLIT_COLUMNS))
    columns_per_split = triton.cdiv(triton.cdiv(chunk, splits), block_p) * block_p
    splits = triton.cdiv(chunk, columns_per_split)
    plan = ProjectPlan(dot, parts, block_b, block_p, block_k, warps, stages, chunk, splits, columns_per_split)
    return [plan] + [plan._replace(block_b=b, block_k=k, warps=w, stages=s) for b, k, w, s in alternatives
                     if triton.cdiv(K, k) <= _GRID_Y]


def project_plan(B: int, P: int, K: int, dtype: torch.dtype, kind: str, arch: Optional[str],
                 interpreted: bool) -> ProjectPlan:
    """The static launch plan (the first of :func:`project_schedules`): the same at every run, so a call's
    summation order (its float rounding) is too."""
    return project_schedules(B, P, K, dtype, kind, arch, interpreted)[0]


def bf16_parts(x: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``(3, B, P)``: float32 ``x`` ``(B, P)`` as three bf16 numbers each, ``x = x₀ + x₁ + x₂``, stored in ``dtype``
    (bfloat16, or float32 holding the same values).

    ``x₀`` is ``x`` truncated to 8 significant bits, ``x₁`` the residual so truncated, ``x₂`` what is left: each
    residual is exact in float32, and what is left has at most 8 significant bits, so the sum is exact wherever
    ``|x| >= 2^-110``; below (float32 residuals in bf16's subnormal range) ``x₂`` is rounded, an absolute error
    under ``2^-133``. A non-finite ``x`` gives NaN parts. With ±1 matrix entries, each part's products are exact
    and three bf16 tensor-core products accumulated in float32 make the float32 projection.
    """
    x = x.to(torch.float32)
    high = -65536  # 0xFFFF0000 as int32: sign, exponent and the top 7 stored bits of the significand
    first = (x.view(torch.int32) & high).view(torch.float32)
    rest = x - first
    second = (rest.view(torch.int32) & high).view(torch.float32)
    out = torch.empty(3, *x.shape, dtype=torch.bfloat16, device=x.device)
    out[0].copy_(first)
    out[1].copy_(second)
    out[2].copy_(rest - second)
    return out if dtype == torch.bfloat16 else out.to(dtype)


def project_launch(x: Tensor, out: Tensor, table: Tensor, kind: str, seed: int, offset: int, plan: ProjectPlan,
                   accumulate: bool = False) -> Launch:
    """The kernel over ``x`` ``(plan.parts, B, P)`` (its parts summing to the input; columns from matrix row
    ``offset``) into ``out`` ``(plan.splits, B, K)``, unscaled; ``accumulate`` continues the sums in ``out``."""
    _, B, P = x.shape
    dim_out = out.shape[2]
    grid = _checked_grid((triton.cdiv(B, plan.block_b), triton.cdiv(dim_out, plan.block_k), plan.splits),
                         "project_launch", f"{dim_out} output columns")
    args = (x, out, table, B, P, dim_out, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
            out.stride(2), offset, _host_mix(seed ^ K0), plan.columns_per_split)
    return Launch(_project_kernel, grid, args,
                  dict(KIND=_KIND[kind], DOT=plan.dot, PARTS=plan.parts, ACCUMULATE=accumulate,
                       BLOCK_B=plan.block_b, BLOCK_P=plan.block_p, BLOCK_K=plan.block_k, num_warps=plan.warps,
                       num_stages=plan.stages))


def inner_launch(a: Tensor, b: Tensor, out: Tensor, normalize: bool, interpreted: bool = False) -> Launch:
    """``out = a bᵀ`` (cosines with ``normalize``) for ``b`` of at most ``65535 · 64`` rows (:func:`inner`
    launches larger ``b`` in slices)."""
    N, K = a.shape
    M = b.shape[0]
    block_n, block_m, block_k = 64, 64, 32
    grid = _checked_grid((triton.cdiv(N, block_n), triton.cdiv(M, block_m)), "inner_launch", f"{M} rows of b")
    precision = "ieee" if interpreted else ("tf32x3" if a.dtype == torch.float32 else "ieee")
    args = (a, b, out, N, M, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1))
    return Launch(_inner_kernel, grid, args, dict(NORMALIZE=normalize, PRECISION=precision, BLOCK_N=block_n,
                                                  BLOCK_M=block_m, BLOCK_K=block_k))


FUSED_TOPK_MAX_K = 128  # larger k takes the streamed path of kernels.topk_inner


class TopKPlan(NamedTuple):
    """The fused top-k's launch: queries ``block_m`` at a time against chunks of ``rows_per_chunk`` rows of ``a``
    (``chunks`` of them), each program (8 warps) keeping its best ``block_n`` (``>= k``) candidates per query."""

    k: int
    block_n: int
    block_m: int
    block_k: int
    rows_per_chunk: int
    chunks: int


def topk_plan(n: int, m: int, k: int, block_rows: Optional[int] = None) -> TopKPlan:
    if not 1 <= k <= FUSED_TOPK_MAX_K:
        raise ValueError(f"k: the fused top-k takes 1 <= k <= {FUSED_TOPK_MAX_K}, got {k}")
    # candidates per tile and kept per query, against 32 queries: the (32, block_n) int64 keys of the running best
    # and of a tile, with 8 warps, fit the registers without spills (static model, RESULTS.md)
    block_n, block_m = max(64, triton.next_power_of_2(k)), 32
    if block_rows is None:  # enough chunks to fill the GPU, each at least 8 tiles of candidates long
        chunks = max(1, min(triton.cdiv(_TARGET_PROGRAMS, triton.cdiv(m, block_m)), n // (8 * block_n)))
        block_rows = triton.cdiv(n, chunks)
    rows_per_chunk = triton.cdiv(max(block_rows, triton.cdiv(n, _GRID_Y)), block_n) * block_n
    return TopKPlan(k, block_n, block_m, 32, rows_per_chunk, triton.cdiv(n, rows_per_chunk))


def topk_launch(a: Tensor, b: Tensor, keys: Tensor, bad: Tensor, plan: TopKPlan, largest: bool, normalize: bool,
                interpreted: bool = False) -> Launch:
    """The fused top-k over ``a`` (candidates) for the rows of ``b`` (queries) into ``keys`` ``(m, chunks,
    block_n)`` int64 and ``bad`` ``(query blocks, chunks)`` int32."""
    N, K = a.shape
    M = b.shape[0]
    grid = (triton.cdiv(M, plan.block_m), plan.chunks)
    precision = "ieee" if interpreted else ("tf32x3" if a.dtype == torch.float32 else "ieee")
    args = (a, b, keys, bad, N, M, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), plan.rows_per_chunk,
            plan.chunks, plan.k)
    return Launch(_topk_kernel, grid, args, dict(NORMALIZE=normalize, PRECISION=precision, LARGEST=largest,
                                                 NETWORK=interpreted, LOG_N=plan.block_n.bit_length() - 1,
                                                 BLOCK_N=plan.block_n, BLOCK_M=plan.block_m, BLOCK_K=plan.block_k,
                                                 num_warps=8))


def decode_keys(keys: Tensor, largest: bool) -> Tuple[Tensor, Tensor]:
    """``(scores float32, rows int64)`` from :func:`_keys`'s int64 keys."""
    ordered = (keys >> 32).to(torch.int32)
    if not largest:
        ordered = ~ordered
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.view(torch.float32), 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def topk(a: Tensor, b: Tensor, k: int, largest: bool, normalize: bool,
         block_rows: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor, int]:
    """For each row of ``b``, the ``k`` rows of ``a`` of the largest (smallest) score, ties to the smaller row:
    ``(values (m, k) float32, indices (m, k), bad (chunks,) bool, rows_per_chunk)``, where ``bad[c]`` says
    chunk ``c`` (rows ``c * rows_per_chunk ..``) gave a NaN or infinite score. ``k <= FUSED_TOPK_MAX_K`` and
    fewer than ``2^32`` rows of ``a``; nothing waits for the GPU (the caller reads ``bad``)."""
    a, b = _same_dtype(a, b)
    n, m = a.shape[0], b.shape[0]
    if n >= 2**32:
        raise ValueError(f"a: the fused top-k ranks fewer than 2**32 rows, got {n}")
    plan = topk_plan(n, m, k, block_rows)
    keys = torch.empty(m, plan.chunks, plan.block_n, dtype=torch.int64, device=a.device)
    bad = torch.empty(triton.cdiv(m, plan.block_m), plan.chunks, dtype=torch.int32, device=a.device)
    topk_launch(a, b, keys, bad, plan, largest, normalize, interpreted=_interpreted())()
    # keys are distinct, so the k largest are one answer whatever torch.topk does with ties
    values, indices = decode_keys(torch.topk(keys.view(m, -1), k, dim=1).values, largest)
    return values, indices, bad.amax(0) > 0, plan.rows_per_chunk


def entries(seed: int, row_offset: int, rows: int, dim_out: int, kind: str, device: torch.device) -> Tensor:
    """Unscaled entries ``R[row_offset : row_offset + rows, :dim_out]``, float32."""
    out = torch.empty(rows, dim_out, dtype=torch.float32, device=device)
    entries_launch(out, gaussian_table(device), seed, row_offset, kind)()
    return out


class TuneKey(NamedTuple):
    """What a projection's timed choice of schedule is remembered by (:mod:`kernels.tuning`): not ``P``."""

    device: torch.device
    arch: Optional[str]
    kind: str
    dtype: torch.dtype
    B: int
    K: int
    splits: int


def _tuned(plans: List[ProjectPlan], x: Tensor, partial: Tensor, table: Tensor, kind: str,
           arch: Optional[str]) -> ProjectPlan:
    """The fastest of ``plans`` (:func:`project_schedules`) for ``x`` on its GPU, each timed once per process and
    :class:`TuneKey` on a sample of ``x``: its first ``splits x columns`` columns, split as the call splits them,
    ``columns`` a multiple of ``block_p`` of at most ``_TUNE_COLUMNS`` and (for ``P`` of more than
    ``8 x splits x block_p``) at most ``P / (8 splits)``, so its 16 launches (4 per schedule) cost at most
    two calls. The sample's sums go into ``partial``, which the projection then overwrites. The static plan,
    untimed, under ``ATTRIB_TUNE=0``, for fewer than ``_TUNE_MACS`` multiply-adds and while a CUDA graph is being
    captured."""
    B, P = x.shape
    K = partial.shape[2]
    plan = plans[0]
    if len(plans) == 1 or B * P * K < _TUNE_MACS or not tuning.enabled():
        return plan
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return plan
    columns = min(plan.columns_per_split, _TUNE_COLUMNS, P // (8 * plan.splits))
    columns = max(plan.block_p, columns // plan.block_p * plan.block_p)
    sample: List[Tensor] = []

    def seconds(index: int) -> float:
        if not sample:
            head = x[:, : columns * plan.splits]
            sample.append(bf16_parts(head) if plan.parts == 3 else head.unsqueeze(0))
        trial = plans[index]._replace(columns_per_split=columns)
        return tuning.cuda_seconds(project_launch(sample[0], partial, table, kind, 0, 0, trial), x.device)

    key = TuneKey(x.device, arch, kind, x.dtype, B, K, plan.splits)
    return plans[tuning.choose(key, len(plans), seconds)]


def project_with_plan(x: Tensor, dim_out: int, kind: str, seed: int, offset: int, plan: ProjectPlan,
                      partial: Optional[Tensor] = None, table: Optional[Tensor] = None) -> Tensor:
    """``x`` projected by the launches of ``plan``: a chunk of columns at a time (float32 parts made per chunk),
    the splits' partial sums (``partial``, ``(splits, B, dim_out)`` float32, allocated if not given) added in a
    fixed order, scaled by ``1/sqrt(dim_out)``."""
    interpreted = _interpreted()
    B, P = x.shape
    if partial is None:
        partial = torch.empty(plan.splits, B, dim_out, dtype=torch.float32, device=x.device)
    if table is None:
        table = gaussian_table(x.device)
    for start in range(0, max(P, 1), plan.chunk):
        columns = x[:, start : start + plan.chunk]
        if plan.parts == 3:
            parts = bf16_parts(columns, torch.float32 if interpreted else torch.bfloat16)
        else:
            parts = columns.unsqueeze(0)
        project_launch(parts, partial, table, kind, seed, offset + start, plan, accumulate=start > 0)()
    out = partial[0] if plan.splits == 1 else partial[0].clone()
    for split in range(1, plan.splits):  # in a fixed order: the same rounding at every run
        out.add_(partial[split])
    return out.mul_(1.0 / math.sqrt(dim_out))


def project_dense(x: Tensor, dim_out: int, kind: str, seed: int, offset: int) -> Tensor:
    """``x`` projected with the static plan for its shape and GPU, or the fastest of its schedules (:func:`_tuned`)."""
    interpreted = _interpreted()
    if interpreted and x.dtype == torch.bfloat16:
        x = x.to(torch.float32)
    B, P = x.shape
    arch = device_arch(x.device)
    plans = project_schedules(B, P, dim_out, x.dtype, kind, arch, interpreted)
    partial = torch.empty(plans[0].splits, B, dim_out, dtype=torch.float32, device=x.device)
    table = gaussian_table(x.device)
    plan = _tuned(plans, x, partial, table, kind, arch)
    return project_with_plan(x, dim_out, kind, seed, offset, plan, partial, table)


def _same_dtype(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """``a`` and ``b`` in one dtype for ``tl.dot`` (float32 under the interpreter, whose bf16 is wrong)."""
    dtype = torch.float32 if _interpreted() else torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def inner(a: Tensor, b: Tensor, normalize: bool) -> Tensor:
    a, b = _same_dtype(a, b)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    rows = _GRID_Y * 64  # b's rows per launch, within the grid's limit
    for start in range(0, b.shape[0], rows):
        stop = min(start + rows, b.shape[0])
        inner_launch(a, b[start:stop], out[:, start:stop], normalize, interpreted=_interpreted())()
    return out
