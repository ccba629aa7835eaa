"""The counter-based hash that defines every random projection matrix, and its torch evaluation.

Every entry ``R[p, j]`` of a projection matrix (``p``: input coordinate, up to
2⁶⁴; ``j``: output coordinate) is a pure function of ``(seed, p, j)``. Nothing
depends on tile sizes, batch sizes, the number of GPU multiprocessors or the
device, so a projection computed in any chunking, on any device, is the same
projection (up to float summation order). The Triton kernels
(:mod:`kernels.triton_kernels`) and the torch code below evaluate exactly these
steps; the tests hold them to bit-identical entries.

All arithmetic is on unsigned 32-bit words (``mod 2³²``); ``>>`` is a logical
shift. Constants::

    K0 = 0x3243F6A8    M1 = 0x7FEB352D    M2 = 0x5BD1E995    M3 = 0x61C88647

(all below 2³¹). Torch has no unsigned 32-bit arithmetic on every version, so
the torch code holds each word as the int32 with the same bits: ``^``, ``&`` and
the wrapping ``*`` act on the bits exactly as on uint32, and a logical shift is
an arithmetic one masked to the bits that remain. (int32 because int64 ``*`` and
``^`` are not vectorised on common CPUs: the int64 version took 135 ms a
4M-entry Gaussian tile here, the int32 one 10 ms, against 14 ms for the matmul
that consumes the tile.) The tests hold it to a plain-Python uint32 oracle::

    mix(x):            x ^= x >> 16;  x = x * M1;  x ^= x >> 15;  x = x * M2;  x ^= x >> 16
    row_key(seed, p):  mix(mix(mix(seed ^ K0) ^ (p & 0xFFFFFFFF)) ^ (p >> 32))
    word(seed, p, w):  mix(row_key(seed, p) ^ (w * M3))

with ``seed`` in ``[0, 2³²)``. The entries, before the ``1/sqrt(dim_out)`` scale:

* ``rademacher``: ``R[p, j] = +1`` if bit ``j & 31`` of ``word(seed, p, j >> 5)`` is 0,
  else ``-1`` (one word gives 32 entries);
* ``gaussian``: ``R[p, j] = TABLE[(word(seed, p, j >> 1) >> (16 * (j & 1))) & 0xFFFF]``
  (one word gives two entries), where ``TABLE[i] = Φ⁻¹((i + 1/2) / 65536) / c``,
  ``Φ⁻¹`` the standard normal quantile evaluated in float64, ``c`` the square
  root of the table's mean square (so entries have unit variance exactly), and
  the result rounded to float32. A quantile table, not Box-Muller, because it
  is bit-identical on every device (``log``/``cos`` are not) and costs one
  lookup. Its tails are cut at ±4.4 standard deviations;
* ``sjlt`` (sparse JL, ``c`` non-zeros per input coordinate, Kane & Nelson 2014):
  output block ``b = 0 .. c-1`` covers ``[⌊b·k/c⌋, ⌊(b+1)·k/c⌋)``; with
  ``h = word(seed, p, b)``, coordinate ``p`` lands at ``⌊b·k/c⌋ + (h >> 1) mod width_b``
  with sign ``+1`` if ``h & 1 == 0`` else ``-1``, scaled by ``1/sqrt(c)``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "K0", "M1", "M2", "M3", "to_int32", "to_uint", "shr", "mix", "row_key", "word",
    "gaussian_table", "sign_table", "check_seed",
]

K0 = 0x3243F6A8
M1 = 0x7FEB352D
M2 = 0x5BD1E995
M3 = 0x61C88647
_MASK = 0xFFFFFFFF


def to_int32(values: Tensor) -> Tensor:
    """int64 values in ``[0, 2³²)`` as the int32 tensor with the same 32 bits."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def to_uint(bits: Tensor) -> Tensor:
    """int32 bit patterns as their unsigned values, int64 in ``[0, 2³²)``."""
    return bits.to(torch.int64) & _MASK


def shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int32 bit patterns."""
    return (x >> s) & ((1 << (32 - s)) - 1)


def mix(x: Tensor) -> Tensor:
    """The 32-bit mixer on int32 bit patterns."""
    x = x ^ shr(x, 16)
    x = x * M1
    x = x ^ shr(x, 15)
    x = x * M2
    return x ^ shr(x, 16)


def row_key(seed: int, rows: Tensor) -> Tensor:
    """``row_key(seed, p)`` for int64 row indices ``p >= 0``, as int32 bit patterns."""
    key = mix(to_int32(torch.full_like(rows, seed ^ K0)))
    key = mix(key ^ to_int32(rows & _MASK))
    return mix(key ^ to_int32(rows >> 32))


def word(keys: Tensor, words: Tensor) -> Tensor:
    """``word(seed, p, w)`` for row keys ``(T, 1)`` (int32) and int64 word indices ``(1, W)``; int32."""
    return mix(keys ^ to_int32((words * M3) & _MASK))


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed: expected an integer in [0, 2**32), got {seed!r}")
    return seed


@lru_cache(maxsize=None)
def _gaussian_table_cpu() -> Tensor:
    levels = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536
    table = torch.special.ndtri(levels)
    table = table / table.pow(2).mean().sqrt()
    return table.to(torch.float32)


@lru_cache(maxsize=None)
def _sign_table_cpu() -> Tensor:
    byte = torch.arange(256).unsqueeze(1)
    bit = torch.arange(8).unsqueeze(0)
    return (1 - 2 * ((byte >> bit) & 1)).to(torch.float32)


_ON_DEVICE: dict = {}


def gaussian_table(device: torch.device) -> Tensor:
    """``TABLE`` (65,536 float32 values), computed once on the CPU and copied to ``device``."""
    key = ("gaussian", str(device))
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = _gaussian_table_cpu().to(device)
    return _ON_DEVICE[key]


def sign_table(device: torch.device) -> Tensor:
    """``(256, 8)``: entry ``[byte, bit]`` is ``+1`` if that bit of the byte is 0, else ``-1``."""
    key = ("sign", str(device))
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = _sign_table_cpu().to(device)
    return _ON_DEVICE[key]
