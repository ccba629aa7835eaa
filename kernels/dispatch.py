"""The public kernel functions: argument checks, then the Triton or the torch path by device.

Triton runs on CUDA tensors, the torch reference everywhere else. The
environment variable ``ATTRIB_KERNELS=torch|triton`` forces one path
(``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``, which is how the tests
run the kernels); :func:`backend` names the path a call on a tensor would take.
The Triton module is imported on first use, so this package works without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

from . import reference, tuning
from .hash import check_seed

__all__ = ["backend", "project", "projection_entries", "inner", "topk_inner", "TopK", "KINDS"]

KINDS = ("rademacher", "gaussian", "sjlt")
_BACKENDS = ("torch", "triton")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class TopK(NamedTuple):
    """For each query (row of ``b``): ``values`` ``(m, k)`` best first, and the ``indices`` ``(m, k)`` of rows of ``a``."""

    values: Tensor
    indices: Tensor


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend(x: Tensor) -> str:
    """``"triton"`` or ``"torch"``: the path a kernel call on ``x`` takes.

    Raises:
        ValueError: ``ATTRIB_KERNELS`` holds something other than ``torch`` or ``triton``.
        RuntimeError: ``ATTRIB_KERNELS=triton`` but Triton is missing, or ``x`` is a CPU
            tensor and ``TRITON_INTERPRET=1`` is not set.
    """
    forced = os.environ.get("ATTRIB_KERNELS", "").strip().lower()
    if forced and forced not in _BACKENDS:
        raise ValueError(f"ATTRIB_KERNELS: expected 'torch' or 'triton', got {forced!r}")
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_available():
            raise RuntimeError("ATTRIB_KERNELS=triton, but triton is not installed")
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"ATTRIB_KERNELS=triton on a {x.device.type} tensor needs TRITON_INTERPRET=1 "
                "(Triton compiles for GPUs only)"
            )
        return "triton"
    return "triton" if x.device.type == "cuda" and triton_available() else "torch"


def _triton():
    return importlib.import_module("kernels.triton_kernels")


def project(
    x: Tensor, dim_out: int, *, kind: str = "rademacher", seed: int = 0, offset: int = 0, nnz: int = 4
) -> Tensor:
    """Multiply ``x`` ``(B, P)`` by the random ``(P, dim_out)`` matrix ``R[offset : offset + P]``.

    The matrix is defined entry by entry by the hash in :mod:`kernels.hash` and is
    never materialised whole: the torch path generates one tile of at most 4M
    entries at a time, the Triton kernel one tile (up to ``64 x 256``) in
    registers, shared by up to 256 rows of ``x`` (:func:`kernels.triton_kernels.project_plan`).
    Since entries depend on ``(seed, row, column)`` only, the result does not
    depend on tile, chunk or batch sizes or on the device (up to float summation
    order, which for one shape and GPU generation is the same at every run: a
    projection of at least ``2^40`` multiply-adds on a GPU takes the fastest of a
    few schedules, timed once per shape, that all sum in the static plan's order,
    :mod:`kernels.tuning` (equal results checked under the interpreter and in the
    compiled instructions, not yet on a GPU); ``ATTRIB_TUNE=0`` takes the static
    plan untimed), and
    projecting column slices of ``x`` with their ``offset`` and summing gives the
    projection of the whole (for ``P`` too large to hold at once).

    On GPUs with bf16 tensor cores (sm_80 and later) the Rademacher projection runs
    on them exactly (±1 is exact in fp16/bf16, and float32 ``x`` goes in as three
    exact bf16 parts, so an infinite float32 entry gives NaN there, not ±inf); the
    Gaussian one as three tf32 products (``tf32x3``: each product to about ``2^-21``
    relative instead of float32's ``2^-24``).

    Args:
        x: ``(B, P)`` float32, float16, bfloat16 or float64 (accumulated in float32).
        dim_out: ``k >= 1``.
        kind: ``"rademacher"`` (``±1/sqrt(k)``), ``"gaussian"`` (unit-variance
            entries from a 65,536-level normal quantile table, ``/sqrt(k)``) or
            ``"sjlt"`` (sparse JL: ``nnz`` entries ``±1/sqrt(nnz)`` per input
            coordinate, ``O(B · P · nnz)`` work; torch path on every device).
        seed: in ``[0, 2**32)``.
        offset: index of ``x``'s first column among the matrix rows, ``>= 0``.
        nnz: non-zeros per input coordinate for ``"sjlt"``, ``1 <= nnz <= dim_out``.

    Returns:
        ``(B, dim_out)`` float32 (float64 for float64 ``x``, which takes the torch path).
    """
    _check_matrix(x, "x")
    dim_out = _check_positive_int(dim_out, "dim_out")
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    seed = check_seed(seed)
    _check_offset(offset, x.shape[1])
    if kind == "sjlt":
        nnz = _check_positive_int(nnz, "nnz")
        if nnz > dim_out:
            raise ValueError(f"nnz: cannot exceed dim_out={dim_out}, got {nnz}")
        return reference.project_sjlt(x, dim_out, seed, offset, nnz)
    if x.dtype == torch.float64 or backend(x) == "torch":
        return reference.project_dense(x, dim_out, kind, seed, offset)
    tuning.enabled()  # a bad ATTRIB_TUNE fails here, not at the first call large enough to time
    return _triton().project_dense(x, dim_out, kind, seed, offset)


def projection_entries(
    rows: int, dim_out: int, *, kind: str = "rademacher", seed: int = 0, offset: int = 0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Rows ``offset .. offset + rows`` of the dense projection matrix, scaled, ``(rows, dim_out)`` float32.

    For inspection and tests; a projection never needs them. Computed by the path
    :func:`backend` picks for ``device``, which gives bit-identical values.
    """
    dim_out = _check_positive_int(dim_out, "dim_out")
    rows = _check_positive_int(rows, "rows")
    if kind not in ("rademacher", "gaussian"):
        raise ValueError(f"kind: expected 'rademacher' or 'gaussian', got {kind!r}")
    seed = check_seed(seed)
    _check_offset(offset, rows)
    device = torch.device(device)
    probe = torch.empty(0, device=device)
    if backend(probe) == "triton":
        values = _triton().entries(seed, offset, rows, dim_out, kind, device)
    else:
        values = reference.dense_tile(seed, torch.arange(offset, offset + rows, device=device), dim_out, kind)
    return values * (1.0 / math.sqrt(dim_out))


def inner(a: Tensor, b: Tensor, *, normalize: bool = False) -> Tensor:
    """All inner products ``(n, k) x (m, k) -> (n, m)``; ``normalize`` gives cosines (0 for a zero row).

    Accumulated and returned in float32 (float64 inputs stay float64, on the torch path).
    """
    _check_pair(a, b)
    if backend(a) == "torch" or torch.float64 in (a.dtype, b.dtype):
        return reference.inner(a, b, normalize)
    return _triton().inner(a, b, normalize)


def topk_inner(
    a: Tensor, b: Tensor, k: int, *, largest: bool = True, normalize: bool = False, block_rows: int | None = None
) -> TopK:
    """For each row of ``b``, the ``k`` rows of ``a`` with the largest (or smallest) inner product.

    On the Triton path with ``k <= 128`` (and float32/float16/bfloat16 inputs) one
    fused kernel scores tiles of ``a`` against tiles of ``b`` in registers and keeps
    each query's best candidates by sorting networks over keys that order by score
    and then by smaller index; ``a`` is cut into chunks of about ``block_rows``
    rows (rounded up to a multiple of 64 or 128, at least ``n / 65535``; default:
    enough chunks to fill the GPU), one program each, and only each chunk's best 64
    or 128 candidates per query reach memory (so chunks shorter than a few hundred
    rows hold more keys than they save). Otherwise ``a`` is streamed in blocks of
    ``block_rows`` rows (default: about 16M scores per block), each scored with
    :func:`inner` and merged into a running top-k. Either way the ``(n, m)``
    matrix is never allocated, and ties go to the smaller index of ``a``, whatever
    the block size.

    Returns:
        :class:`TopK` with ``values`` and ``indices`` of shape ``(m, k)``.
    """
    _check_pair(a, b)
    n, m = a.shape[0], b.shape[0]
    k = _check_positive_int(k, "k")
    if k > n:
        raise ValueError(f"k: cannot exceed the number of rows of a ({n}), got {k}")
    if block_rows is not None:
        block_rows = _check_positive_int(block_rows, "block_rows")
    if not bool(torch.isfinite(b).all()):
        raise ValueError("b: contains NaN or Inf")
    fused = backend(a) == "triton" and torch.float64 not in (a.dtype, b.dtype) and m > 0
    if fused and k <= _triton().FUSED_TOPK_MAX_K and n < 2**32:
        values, indices, bad, rows = _triton().topk(a, b, k, largest, normalize, block_rows)
        if bool(bad.any()):  # the one wait for the GPU, after the whole scan
            start = int(bad.nonzero()[0]) * rows
            raise ValueError(f"a: rows {start}..{min(n, start + rows) - 1} give NaN or Inf scores")
        return TopK(values, indices)
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    if block_rows is None:
        block_rows = max(k, (1 << 24) // max(m, 1))
    running = empty_topk(m, dtype, b.device)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        # The same products as inner(a, b) computes, transposed to (m, block) for topk.
        scores = inner(a[start:stop], b, normalize=normalize).T
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(f"a: rows {start}..{stop - 1} give NaN or Inf scores")
        running = _merge(running, scores, start, k, largest)
    return running


def empty_topk(m: int, dtype: torch.dtype, device: torch.device) -> TopK:
    """A running top-k with no candidates yet, for :func:`merge_topk`."""
    return TopK(torch.empty(m, 0, dtype=dtype, device=device), torch.empty(m, 0, dtype=torch.long, device=device))


def merge_topk(running: TopK, scores: Tensor, start: int, k: int, *, largest: bool = True) -> TopK:
    """Merge the scores ``(m, b)`` of candidates ``start .. start + b - 1`` into a running top-k ``(m, k')``.

    The streaming reduction behind :func:`topk_inner`, for scores computed any other
    way (blocks of training examples, shards): the result is the top-k of all the
    candidates merged so far, with ties to the smaller index whatever the blocks.

    Raises:
        ValueError: NaN or Inf among the scores.
    """
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"scores: candidates {start}..{start + scores.shape[1] - 1} give NaN or Inf scores")
    return _merge(running, scores, start, k, largest)


def _merge(running: TopK, scores: Tensor, start: int, k: int, largest: bool) -> TopK:
    values, indices = reference.merge_topk(running.values, running.indices, scores.contiguous(), start, k, largest)
    return TopK(values, indices)


def _check_offset(offset: int, width: int) -> None:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset + width > 2**63:
        raise ValueError(f"offset: expected an integer with 0 <= offset and offset + width <= 2**63, got {offset!r}")


def _check_matrix(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a matrix of shape (rows, width), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float32/float16/bfloat16/float64 tensor, got {x.dtype}")


def _check_pair(a: Tensor, b: Tensor) -> None:
    _check_matrix(a, "a")
    _check_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"b: width {b.shape[1]} does not match a's width {a.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"b: is on {b.device} but a is on {a.device}")


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return value
