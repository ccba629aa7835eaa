"""Curvature operators: Hessian, Gauss-Newton and empirical-Fisher products, and the dense Hessian.

Every operator is a callable ``mv(V) -> (k, P)`` on a block ``V`` of shape
``(k, P)`` (a single ``(P,)`` vector is also accepted and returned as ``(P,)``),
with parameters flattened in dict order as by :func:`attrib_core.ravel`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ._checks import (
    as_block,
    check_callable,
    check_count,
    check_finite,
    check_finite_params,
    check_nonnegative,
)
from .trees import ravel

Operator = Callable[[Tensor], Tensor]

__all__ = ["hvp", "make_hvp", "gnvp", "make_gnvp", "fvp", "make_fvp", "hessian"]

_MODES = ("rev-rev", "rev-fwd")
_CHUNK_BYTES = 128 << 20


def make_hvp(
    f: Callable[[Mapping[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any,
    *,
    mode: str = "rev-rev",
    damping: float = 0.0,
    chunk_size: int | None = None,
) -> Operator:
    """The Hessian of ``f(params, batch)`` with respect to ``params``, as an operator.

    ``mv(V) = V H + damping * V`` for ``V`` of shape ``(k, P)`` (``H`` is symmetric),
    where ``H = d^2 f / d params^2`` at ``params``.

    Args:
        f: the batched loss ``f(params, batch) -> scalar``.
        params: ``{name: tensor}``, the point of linearisation (``P`` entries in all).
        batch: the data ``f`` is evaluated on, passed through unchanged.
        mode: ``"rev-rev"`` (reverse over reverse: the gradient graph is built once
            here and every call differentiates it again; cheapest for repeated
            calls) or ``"rev-fwd"`` (forward over reverse: a ``jvp`` of the
            gradient, no graph kept between calls; lower memory).
        damping: added multiple of the identity, ``>= 0``.
        chunk_size: right-hand sides per vectorised chunk. By default, as many as
            keep a chunk's working memory near 128 MiB (see :func:`hessian`): past
            that, larger chunks only add memory traffic (measured: a block of 128
            rows costs twice as much per row as one of 32 on a 9,610-parameter MLP).
    """
    f_flat, theta = _flat_objective(f, params, batch)
    _check_mode(mode)
    damping = check_nonnegative(damping, "damping")
    if chunk_size is None:
        chunk_size = _rows_within(_CHUNK_BYTES, f, params, batch)
    check_count(chunk_size, "chunk_size")
    grad_f = torch.func.grad(f_flat)
    if mode == "rev-rev":
        _, pullback = torch.func.vjp(grad_f, theta)

        def column(v: Tensor) -> Tensor:
            return pullback(v)[0]

    else:

        def column(v: Tensor) -> Tensor:
            return torch.func.jvp(grad_f, (theta,), (v,))[1]

    batched = torch.func.vmap(column, chunk_size=chunk_size)
    return _block_operator(batched, theta.numel(), damping, theta.dtype)


def hvp(
    f: Callable[[Mapping[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any,
    V: Tensor,
    *,
    mode: str = "rev-rev",
    chunk_size: int | None = None,
) -> Tensor:
    """Hessian-vector products ``V H`` for a block ``V`` of shape ``(k, P)``; see :func:`make_hvp`."""
    _check_mode(mode)
    as_block(V, _width(params))
    return make_hvp(f, params, batch, mode=mode, chunk_size=chunk_size)(V)


def make_gnvp(
    out_fn: Callable[[Mapping[str, Tensor], Any], Any],
    loss_fn: Callable[[Any, Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any,
    *,
    damping: float = 0.0,
    chunk_size: int | None = None,
) -> Operator:
    """The generalised Gauss-Newton matrix ``G = Jᵀ H_out J`` as an operator.

    ``J`` is the Jacobian of the model outputs ``out_fn(params, batch)`` with
    respect to the parameters and ``H_out`` the Hessian of ``loss_fn(outputs, batch)``
    with respect to the outputs (Schraudolph, 2002; Martens, 2010). ``G`` drops the
    second-order term of the network, so it is positive semi-definite whenever the
    loss is convex in the outputs (cross-entropy, squared error), at any ``params``.

    Args:
        out_fn: ``out_fn(params, batch) -> outputs`` (a tensor or a tree of them).
        loss_fn: ``loss_fn(outputs, batch) -> scalar``, so the full loss is
            ``loss_fn(out_fn(params, batch), batch)``.
        params, batch, damping, chunk_size: as in :func:`make_hvp`.

    Returns:
        ``mv(V) = V G + damping * V`` for ``V`` of shape ``(k, P)``.
    """
    check_callable(loss_fn, "loss_fn")
    out_flat, theta = _flat_objective(out_fn, params, batch, name="out_fn")
    damping = check_nonnegative(damping, "damping")
    if chunk_size is None:
        chunk_size = _rows_within(_CHUNK_BYTES, out_fn, params, batch)
    check_count(chunk_size, "chunk_size")
    outputs, pull_out = torch.func.vjp(out_flat, theta)
    grad_loss = torch.func.grad(lambda out: loss_fn(out, batch))

    def column(v: Tensor) -> Tensor:
        _, jv = torch.func.jvp(out_flat, (theta,), (v,))
        _, hjv = torch.func.jvp(grad_loss, (outputs,), (jv,))
        return pull_out(hjv)[0]

    batched = torch.func.vmap(column, chunk_size=chunk_size)
    return _block_operator(batched, theta.numel(), damping, theta.dtype)


def gnvp(
    out_fn: Callable[[Mapping[str, Tensor], Any], Any],
    loss_fn: Callable[[Any, Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any,
    V: Tensor,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Gauss-Newton-vector products ``V G`` for ``V`` of shape ``(k, P)``; see :func:`make_gnvp`."""
    as_block(V, _width(params))
    return make_gnvp(out_fn, loss_fn, params, batch, chunk_size=chunk_size)(V)


def make_fvp(grads: Tensor, *, damping: float = 0.0) -> Operator:
    """The empirical Fisher ``F = Gᵀ G / n`` of per-sample gradients, as an operator.

    Args:
        grads: per-sample gradients ``G`` of shape ``(n, P)``.
        damping: added multiple of the identity, ``>= 0``.

    Returns:
        ``mv(V) = (V Gᵀ) G / n + damping * V`` for ``V`` of shape ``(k, P)``;
        it never forms the ``(P, P)`` matrix.
    """
    if not isinstance(grads, Tensor) or grads.dim() != 2:
        raise ValueError(
            f"grads: expected per-sample gradients of shape (n, P), got "
            f"{tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__}"
        )
    check_finite(grads, "grads")
    damping = check_nonnegative(damping, "damping")
    n = grads.shape[0]

    def batched(V: Tensor) -> Tensor:
        return (V @ grads.T) @ grads / n

    return _block_operator(batched, grads.shape[1], damping, grads.dtype)


def fvp(grads: Tensor, V: Tensor) -> Tensor:
    """Empirical-Fisher-vector products ``V F`` for ``V`` of shape ``(k, P)``; see :func:`make_fvp`."""
    return make_fvp(grads)(V)


def hessian(
    f: Callable[[Mapping[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any,
    *,
    mode: str = "rev-rev",
    max_bytes: int = 128 << 20,
) -> Tensor:
    """The dense Hessian of ``f(params, batch)``, shape ``(P, P)``, built in blocks of rows.

    Each block of ``b`` rows is ``E H`` for ``b`` unit vectors ``E``, one vectorised
    Hessian-vector product. ``b`` is chosen so that one block's working memory
    (its input and output rows plus about four times the forward pass's saved
    activations per row, measured once) stays within ``max_bytes``; the ``(P, P)``
    result itself is not counted. The result is symmetrised, ``(H + Hᵀ) / 2``.
    """
    _check_mode(mode)
    check_count(max_bytes, "max_bytes")
    rows = _rows_within(max_bytes, f, params, batch)
    mv = make_hvp(f, params, batch, mode=mode, chunk_size=rows)
    flat, _ = ravel(params)
    p = flat.numel()
    H = torch.empty(p, p, dtype=flat.dtype, device=flat.device)
    for start in range(0, p, rows):
        stop = min(p, start + rows)
        unit = torch.zeros(stop - start, p, dtype=flat.dtype, device=flat.device)
        unit[torch.arange(stop - start), torch.arange(start, stop)] = 1
        H[start:stop] = mv(unit)
    return (H + H.T) / 2


def _width(params: Mapping[str, Tensor]) -> int:
    return ravel(params)[0].numel()


def _rows_within(max_bytes: int, f: Callable, params: Mapping[str, Tensor], batch: Any) -> int:
    """Rows of a vectorised Hessian product whose working memory fits in ``max_bytes``.

    Per row: its input and output rows, twice over, plus four times the
    activations the forward pass saves (the double-differentiated graph keeps
    several tensors of that size per row).
    """
    flat, _ = ravel(params)
    per_row = 4 * flat.numel() * flat.element_size() + 4 * _saved_activation_bytes(f, params, batch)
    return max(1, min(flat.numel(), max_bytes // max(per_row, 1)))


def _saved_activation_bytes(f: Callable, params: Mapping[str, Tensor], batch: Any) -> int:
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(live, batch)
    return total


def _flat_objective(
    f: Callable, params: Mapping[str, Tensor], batch: Any, name: str = "f"
) -> tuple[Callable[[Tensor], Any], Tensor]:
    check_callable(f, name)
    theta, unravel = ravel(params)
    check_finite_params(params)
    theta = theta.detach()

    def f_flat(t: Tensor) -> Any:
        return f(unravel(t), batch)

    return f_flat, theta


def _block_operator(
    batched: Callable[[Tensor], Tensor], width: int, damping: float, dtype: torch.dtype
) -> Operator:
    def mv(V: Tensor) -> Tensor:
        block, single = as_block(V, width)
        out = batched(block.to(dtype))
        if damping:
            out = out + damping * block
        return out[0] if single else out

    return mv


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
