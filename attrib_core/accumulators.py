"""Training-set statistics as mergeable accumulators: ``init``, ``update(state, batch)``, ``merge``, ``finalize``.

Attribution reduces over the training set: curvature (the Hessian, its products,
K-FAC covariances, EK-FAC's eigenvalue correction) and gradient moments are sums
over examples. Each is an :class:`Accumulator`, a NamedTuple of four pure
functions over a NamedTuple state, as optax's transforms are pairs of pure
functions: folding ``update`` over all batches and merging the states of any
split of them give the same state (up to float summation order), so a
statistic can be computed batch by batch in constant memory, or on several
ranks whose states ``merge`` combines (what ``torch.distributed.all_reduce``
computes for sums).

How a batch statistic combines follows the loss's own normalisation: for a loss
that is a mean over its batch (``reduction="mean"``) the full training set's
statistic is ``Σ_b n_b c_b / Σ_b n_b``; for a sum (``"sum"``) it is ``Σ_b c_b``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._checks import as_block, check_callable, check_nonnegative, check_reduction
from .curvature import (
    _CHUNK_BYTES,
    Operator,
    _rows_within,
    add_hessian_rows_,
    make_gnvp,
    make_hvp,
    saved_activation_bytes,
    symmetrise_,
)
from .gradients import per_sample_grad
from .trees import examples_in, ravel

__all__ = [
    "Accumulator",
    "SumState",
    "accumulate",
    "add_states",
    "batch_sum",
    "hessian_sum",
    "hvp_sum",
    "gnvp_sum",
    "second_moments",
    "full_hvp",
    "full_gnvp",
    "full_hessian",
]

class Accumulator(NamedTuple):
    """A training-set statistic as four pure functions (``State`` is a NamedTuple).

    ``init() -> State``; ``update(State, batch) -> State``; ``merge(State, State) -> State``,
    associative and commutative, with ``init()`` its identity; ``finalize(State) -> result``.
    ``update`` may add into the storage of the state it is given (the state is donated,
    as with ``jax.jit``'s ``donate_argnums``): keep the returned state, not the old one.
    ``merge`` and ``finalize`` leave their inputs as they are.
    """

    init: Callable[[], Any]
    update: Callable[[Any, Any], Any]
    merge: Callable[[Any, Any], Any]
    finalize: Callable[[Any], Any]


class SumState(NamedTuple):
    """A weighted sum of batch statistics: ``total`` (a tensor or a tree of them; None before
    the first batch), the examples seen, and the batches seen."""

    total: Any
    examples: int
    batches: int


def add_states(a: NamedTuple, b: NamedTuple) -> NamedTuple:
    """The ``merge`` of states that are NamedTuples of per-layer tuples of sums: field by field, entry by entry."""
    return type(a)(*(tuple(x + y for x, y in zip(fa, fb)) for fa, fb in zip(a, b)))


def accumulate(accumulator: Accumulator, batches: Iterable[Any], *,
               reduce: Optional[Callable[[Accumulator, Any], Any]] = None) -> Any:
    """Fold ``accumulator.update`` over ``batches`` from ``init()`` and finalize: the statistic of all of them.

    ``reduce(accumulator, state) -> state``, where given, combines the folded state with
    other processes' before it is finalized (:func:`attrib_torch.distributed.all_merge`:
    each rank folds its own batches, the states are merged with ``accumulator.merge``).
    """
    state = accumulator.init()
    for batch in batches:
        state = accumulator.update(state, batch)
    if reduce is not None:
        state = reduce(accumulator, state)
    return accumulator.finalize(state)


def batch_sum(statistic: Callable[[Any], Any], *, reduction: str = "mean") -> Accumulator:
    """The training-set total of a per-batch ``statistic(batch)`` normalised like the loss.

    With ``reduction="mean"`` (``statistic`` a mean over the batch's examples, as the
    loss is) the result is ``Σ_b n_b c_b / Σ_b n_b``, the statistic of one batch
    holding every example; with ``"sum"`` it is ``Σ_b c_b``. The state is a
    :class:`SumState`; ``merge`` adds.
    """
    check_callable(statistic, "statistic")
    check_reduction(reduction)

    def update(state: SumState, batch: Any) -> SumState:
        n = examples_in(batch)
        weight = n if reduction == "mean" else 1
        value = statistic(batch)
        if state.total is None:
            total = _tree_scale(value, weight)
        else:  # the running sum is the state's own storage, added to in place (the state is donated)
            total = pytree.tree_map(lambda t, v: t.add_(v.to(t.dtype), alpha=weight), state.total, value)
        return SumState(total, state.examples + n, state.batches + 1)

    def finalize(state: SumState) -> Any:
        if state.batches == 0:
            raise ValueError("batches: no batch was given")
        return _tree_scale(state.total, 1.0 / state.examples) if reduction == "mean" else state.total

    return Accumulator(lambda: SumState(None, 0, 0), update, _merge_sums, finalize)


def _merge_sums(a: SumState, b: SumState) -> SumState:
    return SumState(_tree_add(a.total, b.total), a.examples + b.examples, a.batches + b.batches)


def hessian_sum(f: Callable, params: Mapping[str, Tensor], *, reduction: str = "mean", mode: str = "rev-rev",
                max_bytes: int = 128 << 20) -> Accumulator:
    """The dense Hessian ``(P, P)`` of the full training loss, one batch's rows at a time.

    Each batch's Hessian is added into the running ``(P, P)`` sum block of rows by
    block of rows (:func:`add_hessian_rows_`), so memory is that one matrix and one
    block, whatever the number of batches; ``finalize`` symmetrises once. The block
    size is measured once, on the first batch, and scaled by each batch's size
    (measuring every batch grew resident memory by about 1 MB a batch: allocator
    fragmentation from the measuring pass between the blocks).
    """
    check_reduction(reduction)
    flat, _ = ravel(params)
    dtype = torch.promote_types(flat.dtype, torch.float32)
    measured: dict = {}

    def update(state: SumState, batch: Any) -> SumState:
        n = examples_in(batch)
        if not measured:
            measured.update(rows=_rows_within(max_bytes, f, params, batch), examples=n)
        rows = max(1, min(flat.numel(), measured["rows"] * measured["examples"] // n))
        total = state.total
        if total is None:
            total = torch.zeros(flat.numel(), flat.numel(), dtype=dtype, device=flat.device)
        add_hessian_rows_(total, f, params, batch, rows=rows, weight=n if reduction == "mean" else 1, mode=mode)
        return SumState(total, state.examples + n, state.batches + 1)

    def finalize(state: SumState) -> Tensor:
        if state.batches == 0:
            raise ValueError("batches: no batch was given")
        H = state.total / state.examples if reduction == "mean" else state.total.clone()
        return symmetrise_(H)

    return Accumulator(lambda: SumState(None, 0, 0), update, _merge_sums, finalize)


def hvp_sum(f: Callable, params: Mapping[str, Tensor], V: Tensor, *, reduction: str = "mean",
            mode: str = "rev-rev", chunk_size: Optional[int] = None) -> Accumulator:
    """``V H`` ``(k, P)`` with ``H`` the Hessian of the full training loss, one batch's product at a time."""
    return batch_sum(lambda batch: make_hvp(f, params, batch, mode=mode, chunk_size=chunk_size)(V),
                     reduction=reduction)


def gnvp_sum(out_fn: Callable, loss_fn: Callable, params: Mapping[str, Tensor], V: Tensor, *,
             reduction: str = "mean", chunk_size: Optional[int] = None) -> Accumulator:
    """``V G`` ``(k, P)`` with ``G`` the Gauss-Newton matrix of the full training loss (see :func:`make_gnvp`)."""
    return batch_sum(lambda batch: make_gnvp(out_fn, loss_fn, params, batch, chunk_size=chunk_size)(V),
                     reduction=reduction)


def second_moments(f: Callable, params: Mapping[str, Tensor]) -> Accumulator:
    """``E_i[g_i ⊙ g_i]`` ``(P,)``: the per-coordinate second moment of per-example gradients.

    The diagonal of the empirical Fisher (a diagonal or Adam-style preconditioner),
    and, summed over a layer's coordinates, the trace DataInf's damping heuristic
    needs. ``g_i`` is example ``i``'s gradient as a batch of one (:func:`per_sample_grad`),
    so the mean is over examples whatever ``f`` normalises by.
    """
    grads = per_sample_grad(f)

    def moment(batch: Any) -> Tensor:
        g = grads(params, batch)
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        return g.pow(2).mean(0)

    return batch_sum(moment, reduction="mean")


def full_hvp(f: Callable, params: Mapping[str, Tensor], batches: Iterable[Any], *, reduction: str = "mean",
             mode: str = "rev-rev", damping: float = 0.0, chunk_size: Optional[int] = None,
             keep_bytes: int = 64 << 20) -> Operator:
    """The Hessian of the full training loss over ``batches`` as an operator, never joining them.

    ``mv(V) = V H + damping V`` with ``H = Σ_b w_b H_b`` (``w_b = n_b / N`` for a mean
    loss, 1 for a sum): each call folds the batches' products as :func:`hvp_sum` does
    (``batches`` must be re-iterable: a list, or an object whose ``__iter__`` starts over).
    With ``mode="rev-rev"`` the first batches' gradient graphs are kept between calls
    while their estimated size (four times their forward pass's saved activations)
    stays within ``keep_bytes``, so a training set that fits pays for its graph once,
    as one batch's :func:`make_hvp` does; the other batches' graphs are rebuilt at every
    call, so memory stays bounded by ``keep_bytes`` plus one batch's product, whatever
    the number of batches.
    """
    check_reduction(reduction)
    measured: dict = {"chunk": chunk_size}
    kept: dict = {}  # batch position -> its operator, graph included

    def operator(position: int, batch: Any) -> Operator:
        if position in kept:
            return kept[position]
        op = make_hvp(f, params, batch, mode=mode, chunk_size=measured["chunk"])
        if mode == "rev-rev":
            if "per_example" not in measured:
                measured["per_example"] = 4 * saved_activation_bytes(f, params, batch) / examples_in(batch)
            cost = measured["per_example"] * examples_in(batch)
            if measured.get("kept_bytes", 0) + cost <= keep_bytes:
                kept[position] = op
                measured["kept_bytes"] = measured.get("kept_bytes", 0) + cost
        return op

    def products(V: Tensor) -> Accumulator:
        if measured["chunk"] is None:
            measured["chunk"] = _chunk_rows(V, f, params, batches)
        # the statistic of (position, batch): the batch's product, by its kept operator where there is one
        return batch_sum(lambda item: operator(*item)(V), reduction=reduction)

    _check_reiterable(batches)
    return _summed_operator(products, params, _Numbered(batches), damping)


class _Numbered:
    """``(position, batch)`` pairs of a re-iterable of batches, on every pass."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches

    def __iter__(self):
        return enumerate(self.batches)


def _chunk_rows(V: Tensor, fn: Callable, params: Mapping[str, Tensor], batches: Iterable[Any]) -> Optional[int]:
    """Rows per vectorised product, measured once on the first batch (None until a block of several rows)."""
    return _rows_within(_CHUNK_BYTES, fn, params, next(iter(batches))) if V.shape[0] > 1 else None


def _check_reiterable(batches: Iterable[Any]) -> None:
    if iter(batches) is batches:
        raise TypeError("batches: every product passes over the data again; give a list or a re-iterable "
                        "loader, not an iterator")


def full_gnvp(out_fn: Callable, loss_fn: Callable, params: Mapping[str, Tensor], batches: Iterable[Any], *,
              reduction: str = "mean", damping: float = 0.0, chunk_size: Optional[int] = None) -> Operator:
    """The Gauss-Newton matrix of the full training loss over ``batches`` as an operator (see :func:`full_hvp`)."""
    measured = {"chunk": chunk_size}

    def products(V: Tensor) -> Accumulator:
        if measured["chunk"] is None:
            measured["chunk"] = _chunk_rows(V, out_fn, params, batches)
        return gnvp_sum(out_fn, loss_fn, params, V, reduction=reduction, chunk_size=measured["chunk"])

    _check_reiterable(batches)
    return _summed_operator(products, params, batches, damping)


def full_hessian(f: Callable, params: Mapping[str, Tensor], batches: Iterable[Any], *, reduction: str = "mean",
                 mode: str = "rev-rev") -> Tensor:
    """The dense Hessian ``(P, P)`` of the full training loss over ``batches`` (:func:`hessian_sum`)."""
    return accumulate(hessian_sum(f, params, reduction=reduction, mode=mode), batches)


def _summed_operator(make: Callable[[Tensor], Accumulator], params: Mapping[str, Tensor],
                     batches: Iterable[Any], damping: float) -> Operator:
    damping = check_nonnegative(damping, "damping")
    width = sum(p.numel() for p in params.values())

    def mv(V: Tensor) -> Tensor:
        block, single = as_block(V, width)
        out = accumulate(make(block), batches)
        if damping:
            out = out + damping * block.to(out.dtype)
        return out[0] if single else out

    return mv


def _tree_add(a: Any, b: Any) -> Any:
    """``a + b`` in new storage (a merged state never shares a tensor with the states it came from)."""
    if a is None or b is None:
        return None if a is None and b is None else pytree.tree_map(torch.clone, b if a is None else a)
    return pytree.tree_map(lambda x, y: x + y, a, b)


def _tree_scale(tree: Any, factor: float) -> Any:
    return pytree.tree_map(lambda x: x * factor, tree)
