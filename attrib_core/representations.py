"""Representations of examples as scores use them: a dense ``(n, D)`` tensor, or factored layer gradients.

A factored representation is ``{module: Captured}`` (:func:`capture_per_example`):
each example's weight gradients held as their layer inputs and output gradients,
whose inner products are exact without forming a ``(d_out, d_in)`` gradient
(:mod:`attrib_core.factored`). Every function here takes either kind, so a
front end handles both through one set of calls.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

import kernels

from .factored import (concat_captured, factored_cost, factored_dense, factored_inner, factored_rowwise,
                       factored_sq_norms)
from .gradients import per_sample_grad_loop
from .layer_capture import Captured, LayerSpec, capture_examples, capture_per_example, layer_specs

__all__ = ["Representation", "rep_rows", "rep_concat", "rep_slice", "rep_inner", "rep_rowwise", "rep_normalized",
           "factored_plan", "exact_factors"]

Representation = Union[Tensor, Mapping[str, Captured]]


def _factored(rep: Any) -> bool:
    return isinstance(rep, Mapping)


def rep_rows(rep: Representation) -> int:
    """The examples a representation holds."""
    return next(iter(rep.values())).a.shape[0] if _factored(rep) else rep.shape[0]


def rep_concat(parts: Sequence[Representation]) -> Representation:
    """Representations of consecutive examples joined (no copy for one part)."""
    if len(parts) == 1:
        return parts[0]
    return concat_captured(parts) if _factored(parts[0]) else torch.cat(list(parts))


def rep_slice(rep: Representation, start: int, stop: int) -> Representation:
    """Examples ``start:stop``."""
    if not _factored(rep):
        return rep[start:stop]
    # positions: every row of the slice (products never read it; masked rows are zeros)
    return {m: Captured(c.a[start:stop], c.ds[start:stop], (stop - start) * c.a.shape[1]) for m, c in rep.items()}


def rep_inner(a: Representation, b: Representation) -> Tensor:
    """``(n_a, n_b)`` inner products."""
    return factored_inner(a, b) if _factored(a) else kernels.inner(a, b)


def rep_rowwise(a: Representation, b: Representation) -> Tensor:
    """``(n,)`` inner products of matching rows."""
    if _factored(a):
        return factored_rowwise(a, b)
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return (a.to(dtype) * b.to(dtype)).sum(1)


def rep_normalized(rep: Representation) -> Representation:
    """Every example's representation divided by its norm (a zero one stays zero).

    For factored gradients, scaling an example's output gradients by ``1/‖g‖`` scales its gradient by ``1/‖g‖``.
    """
    if not _factored(rep):
        return rep / rep.norm(dim=1, keepdim=True).clamp(min=torch.finfo(rep.dtype).tiny)
    scale = factored_sq_norms(rep).sqrt().clamp(min=torch.finfo(torch.float32).tiny).reciprocal()
    return {m: Captured(c.a, c.ds * scale.to(c.ds.dtype)[:, None, None], c.positions) for m, c in rep.items()}


def factored_plan(model: nn.Module, funcs: Sequence[Callable], params: Mapping[str, Tensor],
                  names: Sequence[str], head: Any) -> Optional[tuple[LayerSpec, ...]]:
    """The layers to keep gradients factored over, or None where dense gradients are the way.

    ``params`` are all the model's parameters, ``names`` those the gradients are taken
    with respect to. Factored only if every one of them belongs to a tracked layer
    (``nn.Linear``, ``nn.Conv2d``, Conv1D, Embedding), each of ``funcs`` (the losses whose
    gradients are taken) captures exactly on the example batch ``head`` (a weight read
    outside its layer, a layer run twice, or a model ``vmap`` cannot trace do not; a
    loss with ``per_example`` is captured by hooks and its factors must equal an
    autograd loop's gradients on ``head``), and the factored products cost no more than
    dense ones (:func:`factored_cost`).
    """
    try:
        specs = layer_specs(model, {n: params[n] for n in names}, None)
    except ValueError:  # no Linear/Conv2d layer among the parameters
        return None
    covered = {s.weight for s in specs} | {s.bias for s in specs if s.bias is not None}
    if set(names) - covered:
        return None
    for func in funcs:
        try:
            captured = exact_factors(model, func, params, head, specs)
        except Exception:  # noqa: BLE001 - a direct use of a weight, shared weights, vmap cannot trace: no factors
            return None
        cost, dense_cost = factored_cost(specs, {m: c.a.shape[1] for m, c in captured.items()})
        if cost > dense_cost:
            return None
        if callable(getattr(func, "per_example", None)) and not _equal_to_autograd(func, params, names, head,
                                                                                  captured, specs):
            return None
    return specs


def exact_factors(model: nn.Module, func: Callable, params: Mapping[str, Tensor], batch: Any,
                  specs: Sequence[LayerSpec]) -> dict[str, Captured]:
    """Each example's factors of ``func`` on ``batch``: through ``vmap`` (:func:`capture_per_example`, which proves
    them exact or raises), or, for a loss with ``per_example`` (a Hugging Face model vmap cannot trace), from one
    batched pass of its per-example losses (:func:`capture_examples`; :func:`factored_plan` checks those against
    autograd before choosing them)."""
    if callable(getattr(func, "per_example", None)):
        return capture_examples(model, func, params, batch, specs)
    return capture_per_example(model, func, params, batch, specs)


def _equal_to_autograd(func: Callable, params: Mapping[str, Tensor], names: Sequence[str], batch: Any,
                       captured: Mapping[str, Captured], specs: Sequence[LayerSpec]) -> bool:
    """Whether the factors' gradients equal an autograd loop's on ``batch`` (float rounding aside)."""
    chosen = {n: params[n] for n in names}
    dense = per_sample_grad_loop(lambda c, b: func({**params, **c}, b))(chosen, batch)
    formed = factored_dense(captured, specs, names).to(dense.dtype)
    tolerance = 1e-8 if dense.dtype == torch.float64 else 1e-4
    return float((formed - dense).norm()) <= tolerance * max(float(dense.norm()), 1e-30)
