"""Per-sample gradients of a batched loss.

The user writes ``f(params, batch) -> scalar`` for a batch, the same loss one
trains with. The library presents each example to ``f`` as a batch of one: it
maps over the batch dimension and puts a leading dimension of size one back on
each example before calling ``f``, so ``f`` never needs an ``unsqueeze(0)``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._checks import check_callable, check_count, check_finite_params

Argnums = Union[int, Sequence[int]]

__all__ = ["per_sample_grad", "per_sample_grad_loop"]


def per_sample_grad(
    f: Callable[..., Tensor],
    *,
    argnums: Argnums = 0,
    in_dims: Sequence[Any] = (None, 0),
    chunk_size: int | None = None,
    flatten: bool = True,
    randomness: str = "error",
) -> Callable[..., Any]:
    """Per-example gradients through ``torch.func.vmap(torch.func.grad(f))``.

    Args:
        f: ``f(*args) -> scalar``, usually ``f(params, batch)``, written for a batch.
        argnums: which argument(s) to differentiate (``0``: the parameter dict).
        in_dims: for each argument, the dimension that indexes examples, or ``None``
            for an argument shared by all examples. An entry may be a tree matching
            the argument (``(0, None)`` for a batch ``(x, shared_mask)``).
        chunk_size: examples per vectorised chunk; bounds memory at the cost of speed.
        flatten: return ``(B, P)`` (parameters concatenated in dict order, as
            :func:`ravel`) instead of ``{name: (B, *shape)}``.
        randomness: ``vmap``'s rule for random operations in ``f``: ``"error"``
            (refuse them), ``"different"`` (an independent draw per example, from
            torch's global generator) or ``"same"``.

    Returns:
        ``g(*args)`` giving ``(B, P)`` or a dict (a tuple of them when ``argnums``
        is a tuple and ``flatten`` is False), where row ``i`` is the gradient of
        ``f`` evaluated on example ``i`` alone, as a batch of one.

    Raises:
        ValueError: non-finite parameters (before computing) or non-finite
            gradients (naming the examples).
    """
    check_callable(f, "f")
    in_dims = _check_in_dims(in_dims)
    if chunk_size is not None:
        check_count(chunk_size, "chunk_size")
    if randomness not in ("error", "different", "same"):
        raise ValueError(f"randomness: expected 'error', 'different' or 'same', got {randomness!r}")

    def g(*args):
        dims = _expand_in_dims(args, in_dims)
        _check_args(args, dims, argnums)

        def one_example(*example):
            return f(*[_add_dim(a, d) for a, d in zip(example, dims)])

        per_example = torch.func.vmap(
            torch.func.grad(one_example, argnums=argnums), in_dims=dims, chunk_size=chunk_size,
            randomness=randomness,
        )
        return _finish(per_example(*args), flatten)

    return g


def per_sample_grad_loop(
    f: Callable[..., Tensor],
    *,
    argnums: Argnums = 0,
    in_dims: Sequence[Any] = (None, 0),
    flatten: bool = True,
) -> Callable[..., Any]:
    """Per-example gradients by a Python loop of ``torch.autograd.grad``.

    The fallback for models that ``vmap`` cannot trace (in-place updates of
    captured tensors, ``.item()``, data-dependent control flow). Same arguments
    and output as :func:`per_sample_grad`; each example is still presented to
    ``f`` as a batch of one. Parameters that do not reach the loss get zeros.
    """
    check_callable(f, "f")
    in_dims = _check_in_dims(in_dims)

    def g(*args):
        dims = _expand_in_dims(args, in_dims)
        _check_args(args, dims, argnums)
        n = _batch_size(args, dims)
        nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
        specs = {k: pytree.tree_flatten(args[k])[1] for k in nums}
        rows = []
        with torch.enable_grad():
            for i in range(n):
                example = [_take(a, d, i) for a, d in zip(args, dims)]
                wrt, squeeze = [], []
                for k in nums:
                    leaves, spec = pytree.tree_flatten(example[k])
                    leaves = [x.detach().requires_grad_(True) for x in leaves]
                    example[k] = pytree.tree_unflatten(leaves, spec)
                    wrt += leaves
                    # A batched argument's gradient keeps its size-one example dimension.
                    squeeze += [d for _, d in _leaves_with_dims(args[k], dims[k])]
                loss = f(*example)
                grads = torch.autograd.grad(loss, wrt, allow_unused=True)
                grads = [torch.zeros_like(w) if gr is None else gr for w, gr in zip(wrt, grads)]
                rows.append([gr if d is None else gr.squeeze(d) for gr, d in zip(grads, squeeze)])
        stacked = [torch.stack([row[j] for row in rows]) for j in range(len(rows[0]))]
        out, start = [], 0
        for k in nums:
            count = specs[k].num_leaves
            out.append(pytree.tree_unflatten(stacked[start : start + count], specs[k]))
            start += count
        return _finish(out[0] if isinstance(argnums, int) else tuple(out), flatten)

    return g


def _finish(grads: Any, flatten: bool) -> Any:
    leaves = pytree.tree_leaves(grads)
    n = leaves[0].shape[0]
    # A row sum is NaN or Inf whenever an entry is, and it is one fast pass; only rows it
    # flags (possibly by overflow of finite entries) get the exact, slower check.
    suspect = torch.zeros(n, dtype=torch.bool, device=leaves[0].device)
    for x in leaves:
        suspect |= ~torch.isfinite(x.reshape(n, -1).sum(dim=1))
    bad = torch.zeros_like(suspect)
    if bool(suspect.any()):
        for x in leaves:
            bad[suspect] |= ~torch.isfinite(x.reshape(n, -1)[suspect]).all(dim=1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"per-sample gradients are NaN or Inf for examples {idx[:20]}"
            f"{' ...' if len(idx) > 20 else ''} of the batch"
        )
    if not flatten:
        return grads
    dtype = leaves[0].dtype
    for x in leaves[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return torch.cat([x.reshape(n, -1).to(dtype) for x in leaves], dim=1)


def _expand_in_dims(args: tuple, in_dims: tuple) -> tuple:
    """An integer ``in_dims`` entry as a tree over its argument: fields that are not tensors (strings, ids)
    or have no such dimension (0-d tensors) are shared by every example, not mapped over."""
    def expand(arg: Any, dim: Any) -> Any:
        if not isinstance(dim, int) or isinstance(dim, bool):
            return dim
        return pytree.tree_map(lambda x: dim if isinstance(x, Tensor) and x.dim() > dim else None, arg)

    if len(args) != len(in_dims):
        return in_dims  # reported by _check_args
    return tuple(expand(a, d) for a, d in zip(args, in_dims))


def _check_in_dims(in_dims: Sequence[Any]) -> tuple:
    if not isinstance(in_dims, (tuple, list)):
        raise TypeError(
            f"in_dims: expected a tuple with one entry per argument of f, got {type(in_dims).__name__}"
        )
    return tuple(in_dims)


def _check_args(args: tuple, in_dims: tuple, argnums: Argnums) -> None:
    if len(args) != len(in_dims):
        raise ValueError(
            f"in_dims has {len(in_dims)} entries but the function was called with {len(args)} arguments"
        )
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    if not nums or not all(isinstance(k, int) and not isinstance(k, bool) for k in nums):
        raise TypeError(f"argnums: expected an int or a tuple of ints, got {argnums!r}")
    for k in nums:
        if not 0 <= k < len(args):
            raise ValueError(f"argnums: {k} is not an argument index (got {len(args)} arguments)")
        if isinstance(args[k], dict):
            check_finite_params(args[k], name=f"argument {k}")
    _batch_size(args, in_dims)


def _batch_size(args: tuple, in_dims: tuple) -> int:
    sizes = set()
    for a, d in zip(args, in_dims):
        for x, dim in _leaves_with_dims(a, d):
            if dim is not None:
                sizes.add(x.shape[dim])
    if not sizes:
        raise ValueError("in_dims: no argument is mapped over (every entry is None)")
    if len(sizes) > 1:
        raise ValueError(f"batch: mapped tensors disagree on the number of examples: {sorted(sizes)}")
    n = sizes.pop()
    if n == 0:
        raise ValueError("batch: has no examples")
    return n


def _leaves_with_dims(tree: Any, dims: Any) -> list[tuple[Tensor, Any]]:
    if dims is None or isinstance(dims, int):
        return [(x, dims) for x in pytree.tree_leaves(tree) if isinstance(x, Tensor)]
    if isinstance(dims, (tuple, list)):
        return [p for t, d in zip(tree, dims) for p in _leaves_with_dims(t, d)]
    if isinstance(dims, dict):
        return [p for k in tree for p in _leaves_with_dims(tree[k], dims.get(k))]
    raise TypeError(f"in_dims: entries must be None, an int, or a tuple/dict of them, got {dims!r}")


def _map_with_dims(fn: Callable[[Tensor, int], Tensor], tree: Any, dims: Any) -> Any:
    if dims is None:
        return tree
    if isinstance(dims, int):
        return pytree.tree_map(lambda x: fn(x, dims) if isinstance(x, Tensor) else x, tree)
    if isinstance(dims, (tuple, list)):
        return type(tree)(_map_with_dims(fn, t, d) for t, d in zip(tree, dims))
    return {k: _map_with_dims(fn, tree[k], dims.get(k)) for k in tree}


def _add_dim(tree: Any, dims: Any) -> Any:
    return _map_with_dims(lambda x, d: x.unsqueeze(d), tree, dims)


def _take(tree: Any, dims: Any, i: int) -> Any:
    return _map_with_dims(lambda x, d: x.narrow(d, i, 1), tree, dims)
