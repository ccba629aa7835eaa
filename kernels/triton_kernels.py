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
from typing import Any, Dict, NamedTuple, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

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
def _tile(keys, col_start, cols, table_ptr, KIND: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    """Unscaled entries for row keys ``(BP,)`` and the columns ``cols`` ``(BK,)`` (int64, from ``col_start``, a
    multiple of 32): ``(BP, BK)`` in ``DTYPE`` (float32, or for Rademacher also float16/bfloat16)."""
    if KIND == 0:
        # One hash per 32-bit word: word w gives columns 32w .. 32w + 31 (bit j & 31 of word j >> 5).
        words = (col_start >> 5) + tl.arange(0, BLOCK_K // 32).to(tl.int64)
        h = _mix(keys[:, None] ^ (words.to(tl.uint32) * 0x61C88647)[None, :])  # (BP, BK / 32)
        bits = (h[:, :, None] >> tl.arange(0, 32).to(tl.uint32)[None, None, :]) & 1
        bits = tl.reshape(bits, (keys.shape[0], BLOCK_K))
        return _signs(bits, DTYPE)
    else:
        w = (cols >> 1).to(tl.uint32) * 0x61C88647
        h = _mix(keys[:, None] ^ w[None, :])
        index = (h >> ((cols & 1) * 16).to(tl.uint32)[None, :]) & 0xFFFF
        return tl.load(table_ptr + index.to(tl.int32))


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
    values = _tile(keys, tl.program_id(1).to(tl.int64) * BLOCK_K, cols, table_ptr, KIND, BLOCK_K, tl.float32)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], values, mask=mask)


@triton.jit
def _bf16_part(v):
    """The bf16 number made of ``v``'s upper 16 bits (``v`` float32): ``v`` truncated to 8 significant bits,
    exactly, by bit operations (no rounding conversion)."""
    return (v.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _split_dot(x, tile):
    """``x @ tile`` for float32 ``x`` and a bf16 ``tile`` of ±1 on tensor cores: ``x = x₁ + x₂ + x₃`` exactly
    (three bf16 parts of 8 significant bits each, by truncation: each residual is exact in float32), and ±1 is
    exact in bf16, so three bf16 products accumulated in float32 give the float32 product."""
    x1 = _bf16_part(x)
    r1 = x - x1.to(tl.float32)
    x2 = _bf16_part(r1)
    x3 = _bf16_part(r1 - x2.to(tl.float32))
    return tl.dot(x1, tile) + tl.dot(x2, tile) + tl.dot(x3, tile)


@triton.jit(do_not_specialize=["seed_key"])
def _project_kernel(x_ptr, out_ptr, table_ptr, B, P, K, stride_xb, stride_xp, stride_ob, stride_ok,
                    row_offset, seed_key, scale, KIND: tl.constexpr, DOT: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    key_seed = seed_key.to(tl.uint32)
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    for start in range(0, P.to(tl.int64), BLOCK_P):  # int64: P near 2^31 must not wrap
        offs_p = start + tl.arange(0, BLOCK_P).to(tl.int64)
        x_mask = (offs_b[:, None] < B) & (offs_p[None, :] < P)
        x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_p[None, :] * stride_xp, mask=x_mask, other=0.0)
        # The tile of the matrix lives in registers only, reused by the BLOCK_B rows of x.
        keys = _row_keys(key_seed, row_offset + offs_p)
        col_start = tl.program_id(1).to(tl.int64) * BLOCK_K
        if DOT == 1:  # ±1 entries are exact in fp16/bf16: tensor cores lose nothing
            acc += tl.dot(x, _tile(keys, col_start, offs_k, table_ptr, KIND, BLOCK_K, x.dtype))
        elif DOT == 2:  # float32 x on tensor cores through its exact three-way bf16 split
            acc += _split_dot(x, _tile(keys, col_start, offs_k, table_ptr, KIND, BLOCK_K, tl.bfloat16))
        else:  # FMA in float32 (Gaussian entries, and the interpreter)
            tile = _tile(keys, col_start, offs_k, table_ptr, KIND, BLOCK_K, tl.float32)
            acc += tl.dot(x.to(tl.float32), tile, input_precision="ieee")
    out_mask = (offs_b[:, None] < B) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_k[None, :] * stride_ok, acc * scale, mask=out_mask)


@triton.jit
def _inner_kernel(a_ptr, b_ptr, out_ptr, N, M, K, stride_an, stride_ak, stride_bm, stride_bk,
                  stride_on, stride_om, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    norm_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    norm_b = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, K.to(tl.int64), BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K).to(tl.int64)
        a = tl.load(a_ptr + offs_n[:, None] * stride_an + offs_k[None, :] * stride_ak,
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + offs_m[:, None] * stride_bm + offs_k[None, :] * stride_bk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        # fp16/bf16 straight onto tensor cores (fp32 accumulation); fp32 as three tf32 products (tf32x3)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
        if NORMALIZE:  # the norms ride along the same pass over the data, in fp32
            a32, b32 = a.to(tl.float32), b.to(tl.float32)
            norm_a += tl.sum(a32 * a32, axis=1)
            norm_b += tl.sum(b32 * b32, axis=1)
    if NORMALIZE:  # one norm at a time (their product can underflow where each does not), IEEE sqrt and division
        acc = tl.div_rn(acc, tl.maximum(tl.sqrt_rn(norm_a), 1.1754943508222875e-38)[:, None])
        acc = tl.div_rn(acc, tl.maximum(tl.sqrt_rn(norm_b), 1.1754943508222875e-38)[None, :])
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_m[None, :] * stride_om, acc, mask=mask)


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


def entries_launch(out: Tensor, table: Tensor, seed: int, row_offset: int, kind: str) -> Launch:
    rows, dim_out = out.shape
    grid = (triton.cdiv(rows, 32), triton.cdiv(dim_out, 32))
    return Launch(_entries_kernel, grid, (out, table, rows, dim_out, row_offset, _host_mix(seed ^ K0)),
                  dict(KIND=_KIND[kind], BLOCK_R=32, BLOCK_K=32))


def project_launch(x: Tensor, out: Tensor, table: Tensor, kind: str, seed: int, offset: int,
                   interpreted: bool = False) -> Launch:
    B, P = x.shape
    dim_out = out.shape[1]
    # DOT: 1 fp16/bf16 x on tensor cores, 2 float32 x split into three bf16 parts on tensor cores, 0 float32 FMA
    dot = 0
    if kind == "rademacher" and not interpreted:  # the interpreter's bf16 arithmetic is wrong
        dot = 1 if x.dtype in (torch.float16, torch.bfloat16) else 2
    # Each generated tile of the matrix serves BLOCK_B rows of x: the more, the less hashing per multiply-add
    # (static model, sm_90a bf16: 0.50 integer lane-ops per MAC at 64 rows, 0.27 at 128, 0.14 at 256).
    # (The FMA path gains nothing from it and spills at 256 rows: it keeps 64.)
    block_b, warps = ((256, 8) if B > 128 else (128, 8) if B > 64 else (64, 4)) if dot else (64, 4)
    block_p, block_k = 32, 64
    grid = (triton.cdiv(B, block_b), triton.cdiv(dim_out, block_k))
    args = (x, out, table, B, P, dim_out, x.stride(0), x.stride(1), out.stride(0), out.stride(1), offset,
            _host_mix(seed ^ K0), 1.0 / math.sqrt(dim_out))
    return Launch(_project_kernel, grid, args, dict(KIND=_KIND[kind], DOT=dot, BLOCK_B=block_b, BLOCK_P=block_p,
                                                    BLOCK_K=block_k, num_warps=warps))


_GRID_Y = 65535  # CUDA's limit on the second and third grid dimensions


def inner_launch(a: Tensor, b: Tensor, out: Tensor, normalize: bool, interpreted: bool = False) -> Launch:
    """``out = a bᵀ`` (cosines with ``normalize``) for ``b`` of at most ``65535 · 64`` rows (:func:`inner`
    launches larger ``b`` in slices)."""
    N, K = a.shape
    M = b.shape[0]
    block_n, block_m, block_k = 64, 64, 32
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    if grid[1] > _GRID_Y:
        raise ValueError(f"inner_launch: {M} rows of b need {grid[1]} blocks, over the grid's {_GRID_Y}")
    precision = "ieee" if interpreted else ("tf32x3" if a.dtype == torch.float32 else "ieee")
    args = (a, b, out, N, M, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1))
    return Launch(_inner_kernel, grid, args, dict(NORMALIZE=normalize, PRECISION=precision, BLOCK_N=block_n,
                                                  BLOCK_M=block_m, BLOCK_K=block_k))


def entries(seed: int, row_offset: int, rows: int, dim_out: int, kind: str, device: torch.device) -> Tensor:
    """Unscaled entries ``R[row_offset : row_offset + rows, :dim_out]``, float32."""
    out = torch.empty(rows, dim_out, dtype=torch.float32, device=device)
    entries_launch(out, gaussian_table(device), seed, row_offset, kind)()
    return out


def project_dense(x: Tensor, dim_out: int, kind: str, seed: int, offset: int) -> Tensor:
    B, P = x.shape
    if _interpreted() and x.dtype == torch.bfloat16:
        x = x.to(torch.float32)
    out = torch.empty(B, dim_out, dtype=torch.float32, device=x.device)
    project_launch(x, out, gaussian_table(x.device), kind, seed, offset, interpreted=_interpreted())()
    return out


def inner(a: Tensor, b: Tensor, normalize: bool) -> Tensor:
    if _interpreted():
        a, b = a.to(torch.float32), b.to(torch.float32)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    rows = _GRID_Y * 64  # b's rows per launch, within the grid's limit
    for start in range(0, b.shape[0], rows):
        stop = min(start + rows, b.shape[0])
        inner_launch(a, b[start:stop], out[:, start:stop], normalize, interpreted=_interpreted())()
    return out
