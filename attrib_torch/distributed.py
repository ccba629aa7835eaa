"""Scale-out over ``torch.distributed`` (``torchrun``; gloo on CPU, NCCL on GPU): merged statistics and top-k.

Ranks take deterministic, disjoint parts of the work (:func:`my_part`); a training-set
statistic folded by each rank over its batches is combined by :func:`all_merge`,
which gathers every rank's accumulator state and folds them with the accumulator's own
``merge`` in rank order, so every rank holds the same result (the states are small:
factor covariances, second moments, products). :func:`gather_topk` merges each rank's
top-k into the top-k of their union, ties to the smaller index as a single process
breaks them. Without an initialised process group every function is the one-process
identity, so the same code runs under ``python`` and ``torchrun``.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import torch
from torch import Tensor

import kernels
from attrib_core import Accumulator

__all__ = ["world", "my_part", "RankShare", "all_merge", "all_sum", "gather_topk", "merge_topks", "check_same"]


def world() -> Tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_part(items: Sequence[Any]) -> Sequence[Any]:
    """This rank's items of ``items``: every ``world``-th one from its rank (deterministic, disjoint, covering)."""
    rank, size = world()
    return items[rank::size]


def _moved(state: Any, device: Any) -> Any:
    """``state`` (tensors in NamedTuples, lists, tuples and dicts) with every tensor on ``device``."""
    if isinstance(state, Tensor):
        return state.detach().to(device)
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_moved(v, device) for v in state))
    if isinstance(state, (list, tuple)):
        return type(state)(_moved(v, device) for v in state)
    if isinstance(state, dict):
        return {k: _moved(v, device) for k, v in state.items()}
    return state


def _first_device(state: Any) -> Any:
    leaves = [state] if isinstance(state, Tensor) else (
        list(state.values()) if isinstance(state, dict) else list(state) if isinstance(state, (list, tuple)) else [])
    for leaf in leaves:
        found = _first_device(leaf) if not isinstance(leaf, Tensor) else leaf.device
        if found is not None:
            return found
    return None


class RankShare:
    """Every ``world``-th item of a re-iterable (a loader's batches), from this rank's position: its deterministic,
    disjoint share; the others' items are passed over (still produced by the loader, not computed on)."""

    def __init__(self, items: Any) -> None:
        self.items = items

    def __iter__(self):
        rank, size = world()
        for i, item in enumerate(self.items):
            if i % size == rank:
                yield item


def all_merge(accumulator: Accumulator, state: Any) -> Any:
    """Every rank's ``state`` merged, in rank order, by ``accumulator.merge``; the same result on every rank.

    Each rank folds its own batches (``accumulate`` or ``update`` calls), then calls
    this; ``accumulator.finalize`` of the result equals a fold over all ranks' batches
    up to the order of floating-point sums (bit-equal where the merge tree is the same).
    """
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return state
    device = _first_device(state)
    states: list = [None] * size
    dist.all_gather_object(states, _moved(state, "cpu"))
    merged = states[0]
    for other in states[1:]:
        merged = accumulator.merge(merged, other)
    return merged if device is None else _moved(merged, device)


def all_sum(tensors: Sequence[Tensor]) -> list:
    """Each tensor summed over the ranks (``all_reduce``), in its dtype; the same on every rank. Without a process
    group, the tensors themselves."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return list(tensors)
    out = []
    for t in tensors:
        t = t.detach().clone()
        dist.all_reduce(t)
        out.append(t)
    return out


def merge_topks(parts: Sequence[kernels.TopK], k: int, *, largest: bool = True) -> kernels.TopK:
    """The top-``k`` of the union of several top-k results over disjoint candidates (global indices), each
    ``(m, k_i)``; ties go to the smaller index, as :func:`kernels.merge_topk` breaks them."""
    values = torch.cat([p.values for p in parts], dim=1)
    indices = torch.cat([p.indices for p in parts], dim=1)
    by_index = indices.argsort(dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    order = values.argsort(dim=1, descending=largest, stable=True)[:, :k]
    return kernels.TopK(values.gather(1, order), indices.gather(1, order))


def gather_topk(local: kernels.TopK, k: int, *, largest: bool = True) -> kernels.TopK:
    """Every rank's top-k (over its own candidates, global indices) merged into the top-k of all: on every rank."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return local
    parts: list = [None] * size
    dist.all_gather_object(parts, kernels.TopK(local.values.cpu(), local.indices.cpu()))
    merged = merge_topks(parts, k, largest=largest)
    return kernels.TopK(merged.values.to(local.values.device), merged.indices.to(local.indices.device))


def check_same(value: Tensor, name: str) -> None:
    """Raise a ValueError on every rank unless every rank holds the same ``value`` (shape, dtype and bytes):
    a result merged over ranks is only one answer when they all asked the same question."""
    import hashlib

    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return
    t = value.detach().cpu().contiguous()
    digest = (tuple(t.shape), str(t.dtype), hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest())
    digests: list = [None] * size
    dist.all_gather_object(digests, digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ValueError(f"{name}: ranks {differ} hold other values than rank 0 (shapes "
                         f"{[d[0] for d in digests]}); every rank must pass the same {name}")
