"""Curvature operators: Hessian, Gauss-Newton and empirical-Fisher products, and the dense Hessian.

Every operator is a callable ``mv(V) -> (k, P)`` on a block ``V`` of shape
``(k, P)`` (a single ``(P,)`` vector is also accepted and returned as ``(P,)``),
with parameters flattened in dict order as by :func:`attrib_core.ravel`.
"""

from __future__ import annotations

import contextlib

from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

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

__all__ = ["hvp", "make_hvp", "gnvp", "make_gnvp", "fvp", "make_fvp", "hessian", "saved_activation_bytes"]

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
            Finding that number costs one forward pass, at the first call with
            more than one row; pass ``chunk_size`` to skip it (e.g. when a new
            operator is built for every mini-batch).

    Raises:
        ValueError: non-finite parameters, an empty batch, or (``"rev-rev"``) a
            non-finite loss or gradient at ``params``; at call time, a product that
            is NaN or Inf.
    """
    f_flat, theta = _flat_objective(f, params, batch)
    _check_mode(mode)
    damping = check_nonnegative(damping, "damping")
    if chunk_size is not None:
        check_count(chunk_size, "chunk_size")
    if mode == "rev-rev":
        grad_and_loss = torch.func.grad_and_value(f_flat)
        gradient, pullback, loss = torch.func.vjp(grad_and_loss, theta, has_aux=True)
        if not (bool(torch.isfinite(loss)) and bool(torch.isfinite(gradient).all())):
            raise ValueError("f: the loss or its gradient at params is NaN or Inf")

        def column(v: Tensor) -> Tensor:
            with _second_derivative_explained():
                return pullback(v)[0]

    else:
        grad_f = torch.func.grad(f_flat)

        def column(v: Tensor) -> Tensor:
            with _second_derivative_explained():
                return torch.func.jvp(grad_f, (theta,), (v,))[1]

    def measure() -> int:
        return _rows_within(_CHUNK_BYTES, f, params, batch)

    return _block_operator(column, theta, damping, chunk_size, measure)


@contextlib.contextmanager
def _second_derivative_explained():
    """An operation without a second derivative (a fused attention kernel) as a ValueError that says what to do."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as error:
        text = str(error)
        if "derivative for" in text and "not implemented" in text:
            raise ValueError(
                f"f: the model runs an operation without a second derivative ({text.splitlines()[0][:160]}), and a "
                "Hessian-vector product needs one; for a transformers model, build it with "
                "attn_implementation='eager' (torch's fused scaled_dot_product_attention has no double backward "
                "on this device)") from error
        raise


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
    if chunk_size is not None:
        check_count(chunk_size, "chunk_size")
    outputs, pull_out = torch.func.vjp(out_flat, theta)
    grad_loss = torch.func.grad(lambda out: loss_fn(out, batch))

    def column(v: Tensor) -> Tensor:
        _, jv = torch.func.jvp(out_flat, (theta,), (v,))
        _, hjv = torch.func.jvp(grad_loss, (outputs,), (jv,))
        return pull_out(hjv)[0]

    def measure() -> int:
        return _rows_within(_CHUNK_BYTES, out_fn, params, batch)

    return _block_operator(column, theta, damping, chunk_size, measure)


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
    if grads.shape[0] == 0:
        raise ValueError("grads: no examples (shape (0, P))")
    check_finite(grads, "grads")
    damping = check_nonnegative(damping, "damping")
    n = grads.shape[0]

    def product(V: Tensor) -> Tensor:
        return (V @ grads.T) @ grads / n

    return _block_operator(product, grads, damping, None, None, vectorised=True)


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
    _flat_objective(f, params, batch)
    _check_mode(mode)
    check_count(max_bytes, "max_bytes")
    flat, _ = ravel(params)
    p = flat.numel()
    H = torch.zeros(p, p, dtype=torch.promote_types(flat.dtype, torch.float32), device=flat.device)
    rows = _rows_within(max_bytes, f, params, batch)
    add_hessian_rows_(H, f, params, batch, rows=rows, mode=mode)
    return symmetrise_(H, rows)


def add_hessian_rows_(H: Tensor, f: Callable[[Mapping[str, Tensor], Any], Tensor], params: Mapping[str, Tensor],
                      batch: Any, *, rows: int, weight: float = 1.0, mode: str = "rev-rev") -> Tensor:
    """``H += weight · ∇²f(params, batch)`` in place, ``rows`` rows at a time (no ``(P, P)`` temporary).

    ``rows`` bounds each vectorised block (see :func:`hessian`, which sizes it from a
    memory budget); the result is not symmetrised (the caller does that once, after
    the last batch).
    """
    p = H.shape[0]
    blocks = -(-p // rows)
    rows = -(-p // blocks)  # balanced blocks, the last padded with zero rows to the same size
    mv = make_hvp(f, params, batch, mode=mode, chunk_size=rows)
    for start in range(0, p, rows):
        stop = min(p, start + rows)
        unit = torch.zeros(rows, p, dtype=H.dtype, device=H.device)
        unit[torch.arange(stop - start), torch.arange(start, stop)] = 1
        H[start:stop].add_(mv(unit)[: stop - start].to(H.dtype), alpha=weight)
    return H


def symmetrise_(H: Tensor, block: int = 1024) -> Tensor:
    """``H ← (H + Hᵀ) / 2`` in place, one pair of blocks at a time (no ``(P, P)`` temporaries)."""
    p = H.shape[0]
    for i in range(0, p, block):
        rows = slice(i, min(p, i + block))
        for j in range(i, p, block):
            cols = slice(j, min(p, j + block))
            mean = (H[rows, cols] + H[cols, rows].T) / 2
            H[rows, cols] = mean
            H[cols, rows] = mean.T
    return H


def _width(params: Mapping[str, Tensor]) -> int:
    return ravel(params)[0].numel()


def _rows_within(max_bytes: int, f: Callable, params: Mapping[str, Tensor], batch: Any) -> int:
    """Rows of a vectorised Hessian product whose working memory fits in ``max_bytes``.

    Per row: its input and output rows, twice over, plus four times the
    activations the forward pass saves (the double-differentiated graph keeps
    several tensors of that size per row).
    """
    flat, _ = ravel(params)
    per_row = 4 * flat.numel() * flat.element_size() + 4 * saved_activation_bytes(f, params, batch)
    return max(1, min(flat.numel(), max_bytes // max(per_row, 1)))


def saved_activation_bytes(f: Callable, params: Mapping[str, Tensor], batch: Any) -> int:
    """Bytes of the tensors autograd saves in one forward pass of ``f(params, batch)``: what a product holds per row."""
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
    empty = [tuple(x.shape) for x in pytree.tree_leaves(batch) if isinstance(x, Tensor) and x.dim() and not len(x)]
    if empty:
        raise ValueError(f"batch: has no examples (tensors of shapes {empty})")
    theta = theta.detach()

    def f_flat(t: Tensor) -> Any:
        return f(unravel(t), batch)

    return f_flat, theta


def _block_operator(
    column: Callable[[Tensor], Tensor],
    reference: Tensor,
    damping: float,
    chunk_size: int | None,
    measure: Callable[[], int] | None,
    vectorised: bool = False,
) -> Operator:
    """Wrap a per-vector product as an operator on ``(k, P)`` blocks.

    ``column`` maps one ``(P,)`` vector (or, when ``vectorised``, a whole block);
    blocks are run through ``vmap`` in chunks of ``chunk_size`` rows, found by
    ``measure()`` at the first call with more than one row when not given. The
    result has dtype ``promote(V, params, float32)``.
    """
    width, dtype = reference.shape[-1], reference.dtype
    batched = {"fn": None}

    def run(block: Tensor) -> Tensor:
        if vectorised:
            return column(block)
        if block.shape[0] == 1:
            return column(block[0]).unsqueeze(0)
        if batched["fn"] is None:
            size = chunk_size if chunk_size is not None else measure()
            batched["fn"] = torch.func.vmap(column, chunk_size=size)
        return batched["fn"](block)

    def mv(V: Tensor) -> Tensor:
        block, single = as_block(V, width)
        out_dtype = torch.promote_types(torch.promote_types(block.dtype, dtype), torch.float32)
        out = run(block.to(dtype)).to(out_dtype)
        if damping:
            out = out + damping * block.to(out_dtype)
        if not bool(torch.isfinite(out).all()):
            raise ValueError("the operator's product is NaN or Inf (is the loss finite at params?)")
        return out[0] if single else out

    return mv


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
