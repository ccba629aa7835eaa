"""Argument checks shared by the core: each raises before any computation, naming the argument."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping

import torch
from torch import Tensor


def check_callable(value: Any, name: str) -> None:
    if not callable(value):
        raise TypeError(f"{name}: expected a callable, got {type(value).__name__}")


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry is finite: one reduction (a NaN or Inf anywhere makes the sum non-finite), and the
    elementwise test only when the sum is not finite (it may have overflowed)."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_finite_params(params: Mapping[str, Tensor], name: str = "params") -> None:
    bad = [n for n, t in params.items() if not all_finite(t)]
    if bad:
        raise ValueError(f"{name}: parameters {bad} contain NaN or Inf")


def check_finite(tensor: Tensor, name: str) -> None:
    if not all_finite(tensor):
        raise ValueError(f"{name}: contains NaN or Inf")


def check_nonnegative(value: Any, name: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    if not 0 <= value < float("inf"):  # also rejects NaN
        raise ValueError(f"{name}: expected a finite number >= 0, got {value}")
    return float(value)


def check_positive(value: Any, name: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return float(value)


def check_reduction(reduction: Any) -> None:
    """A loss's batch reduction: ``"mean"`` or ``"sum"``, else a ValueError naming ``reduction``."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def block_width(B: Any, name: str) -> int:
    """The width ``P`` of a ``(k, P)`` block or a ``(P,)`` vector."""
    if not isinstance(B, Tensor):
        raise TypeError(f"{name}: expected a tensor of shape (k, P), got {type(B).__name__}")
    if B.dim() not in (1, 2):
        raise ValueError(f"{name}: expected shape (k, P) or (P,), got {tuple(B.shape)}")
    return B.shape[-1]


def as_block(V: Any, width: int, name: str = "V") -> tuple[Tensor, bool]:
    """Return ``V`` as a ``(k, width)`` block and whether it was a single ``(width,)`` vector."""
    if not isinstance(V, Tensor):
        raise TypeError(f"{name}: expected a tensor of shape (k, {width}), got {type(V).__name__}")
    if V.dim() == 1:
        V, single = V.unsqueeze(0), True
    elif V.dim() == 2:
        single = False
    else:
        raise ValueError(f"{name}: expected shape (k, {width}) or ({width},), got {tuple(V.shape)}")
    if V.shape[1] != width:
        raise ValueError(
            f"{name}: expected width P={width} (shape (k, {width})), got shape {tuple(V.shape)}"
        )
    check_finite(V, name)
    return V, single


def as_operator(mv: Any, width: int, name: str = "mv") -> Callable[[Tensor], Tensor]:
    """An operator ``(k, P) -> (k, P)`` from a callable or a symmetric ``(P, P)`` matrix."""
    if isinstance(mv, Tensor):
        if mv.dim() != 2 or tuple(mv.shape) != (width, width):
            raise ValueError(
                f"{name}: a matrix operator must have shape (P, P) = ({width}, {width}), "
                f"got {tuple(mv.shape)}"
            )
        check_finite(mv, name)
        matrix = mv
        return lambda V: V @ matrix.T.to(V.dtype)
    check_callable(mv, name)
    return mv


def linear_system(mv: Any, B: Any, name: str = "B") -> tuple[Callable[[Tensor], Tensor], Tensor, bool]:
    """The shared entry step of the solvers: ``(operator, block (k, P), single)`` from ``mv`` and ``B``.

    A matrix operator fixes ``P`` and ``B`` is checked against it (an error names ``B``);
    a callable operator takes its width from ``B``.
    """
    if isinstance(mv, Tensor) and mv.dim() == 2 and mv.shape[0] == mv.shape[1]:
        width = mv.shape[0]
        if isinstance(B, Tensor) and B.dim() in (1, 2) and B.shape[-1] != width:
            raise ValueError(f"{name}: expected width P={width}, the size of the matrix mv {tuple(mv.shape)}; "
                             f"got shape {tuple(B.shape)}")
    else:
        width = block_width(B, name)
    block, single = as_block(B, width, name=name)
    return as_operator(mv, width), block, single
