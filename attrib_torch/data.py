"""Data loaders as attributors use them: checked for order, moved to a device, passed over, sliced, joined."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch.utils import _pytree as pytree
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torch.utils.data._utils.collate import default_collate
from tqdm.auto import tqdm

from attrib_core.trees import examples_in

__all__ = ["check_loader", "batches", "Batches", "Mapped", "Selected", "random_access", "concatenate", "take", "batch_size",
           "fingerprint", "own_batch_dimension", "explained"]


_RANDOM_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def check_loader(loader: Any, name: str) -> None:
    """Reject a loader whose order changes between passes: scores must line up with dataset positions.

    A ``DataLoader`` may use any sampler or batch sampler that yields the same indices
    on every pass (sequential, a fixed list of indices, a deterministic bucketing
    sampler): that is checked by two passes over the indices, never over the data.
    A random sampler is refused by type; ``IterableDataset`` loaders are taken to be
    deterministic, as dattri takes them.

    Raises:
        ValueError: a sampler that shuffles, an empty loader, ``batch_size=None``
            (examples without a batch dimension), or an iterator (one pass only).
        TypeError: something that is not iterable.
    """
    if isinstance(loader, DataLoader):
        _check_data_loader(loader, name)
        return
    try:
        iterator = iter(loader)
    except TypeError:
        raise TypeError(f"{name}: expected a DataLoader or a list of batches, got {type(loader).__name__}") from None
    if iterator is loader:
        raise ValueError(f"{name}: an iterator can be read once only; pass a DataLoader or a list of batches")
    if hasattr(loader, "__len__") and len(loader) == 0:
        raise ValueError(f"{name}: holds no batches")


def _check_data_loader(loader: DataLoader, name: str) -> None:
    if isinstance(loader.dataset, IterableDataset):
        return
    if loader.batch_sampler is None:
        raise ValueError(f"{name}: batch_size=None yields single examples without a batch dimension; "
                         "give the DataLoader a batch_size >= 1")
    if len(loader.dataset) == 0:
        raise ValueError(f"{name}: the dataset is empty")
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None), loader.batch_sampler]
    for sampler in samplers:
        if isinstance(sampler, _RANDOM_SAMPLERS) or getattr(sampler, "shuffle", False) is True:
            raise ValueError(
                f"{name}: the data loader's sampler is a {type(sampler).__name__}; scores must line up with "
                "dataset positions, so use a fixed order (shuffle=False, no random sampler)"
            )
    if type(loader.batch_sampler) is BatchSampler and type(loader.batch_sampler.sampler) is SequentialSampler:
        return
    first, second = (list(map(_indices, loader.batch_sampler)) for _ in range(2))
    if first != second:
        raise ValueError(f"{name}: its batch sampler yields a different order on two passes; scores must line up "
                         "with dataset positions, so use a sampler with a fixed order")
    if not first:
        raise ValueError(f"{name}: its sampler yields no batches")


def _indices(batch: Any) -> list:
    return batch.tolist() if isinstance(batch, torch.Tensor) else list(batch)


def _sliced(loader: Any) -> Optional[Iterator[tuple]]:
    """A sequential, default-collated ``DataLoader`` over a ``TensorDataset``: its batches as slices.

    The same batches the loader would yield, without indexing and collating example by
    example (on the TracInCP benchmark the item-by-item reads had been most of the time);
    None for any other loader.
    """
    if not (isinstance(loader, DataLoader) and type(loader.dataset) is TensorDataset
            and loader.collate_fn is default_collate and type(loader.batch_sampler) is BatchSampler
            and type(loader.batch_sampler.sampler) is SequentialSampler):
        return None
    tensors, size = loader.dataset.tensors, loader.batch_sampler.batch_size
    n = len(loader.dataset)
    stop = n - n % size if loader.batch_sampler.drop_last else n
    return (tuple(t[start : min(start + size, stop)] for t in tensors) for start in range(0, stop, size))


def batches(loader: Iterable[Any], device: torch.device, *, desc: str = "", show_progress: bool = False,
            leave: bool = False) -> Iterator[Any]:
    """The loader's batches on ``device``: tuples of their fields, or dicts as they are (``{"input_ids", ...}``).

    Tensors move to ``device``; other fields (strings, ids) pass through untouched.
    ``leave`` keeps the finished progress bar on screen.
    """
    sliced = _sliced(loader)
    source = loader if sliced is None else sliced
    total = len(loader) if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset) else None
    empty = True
    for batch in tqdm(source, desc=desc, disable=not show_progress, leave=leave, total=total):
        empty = False
        yield _normalised(batch, device)
    if empty:
        raise ValueError("the data loader yielded no batches")


def _normalised(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if not isinstance(batch, (tuple, list)):
        batch = (batch,)
    return tuple(_to(x, device) for x in batch)


class Batches:
    """A loader's batches on ``device``, re-iterable: each ``iter`` is a fresh pass over the loader.

    For statistics that pass over the training set more than once (every CG step, both
    passes of EK-FAC) without holding it: one batch (or group) is in memory at a time.
    ``limit`` keeps the first ``limit`` batches only; ``max_examples`` joins consecutive
    batches into groups of at most that many examples (a batch larger than that stays
    whole), so that a statistic pays its fixed cost per group, not per loader batch.
    """

    def __init__(self, loader: Iterable[Any], device: torch.device, *, limit: Optional[int] = None,
                 max_examples: Optional[int] = None) -> None:
        self.loader, self.device, self.limit, self.max_examples = loader, device, limit, max_examples

    def __iter__(self) -> Iterator[Any]:
        passes = batches(self.loader, self.device)
        passes = passes if self.limit is None else itertools.islice(passes, self.limit)
        return passes if self.max_examples is None else self._grouped(passes)

    def _grouped(self, passes: Iterator[Any]) -> Iterator[Any]:
        group, size = [], 0
        for batch in passes:
            n = batch_size(batch)
            if group and size + n > self.max_examples:
                yield group[0] if len(group) == 1 else concatenate(group, self.device)
                group, size = [], 0
            group.append(batch)
            size += n
        if group:
            yield group[0] if len(group) == 1 else concatenate(group, self.device)


class Mapped:
    """``fn(i, batch)`` for the ``i``-th batch of a re-iterable of batches, on every pass (``fn`` pure in ``i``)."""

    def __init__(self, source: Iterable[Any], fn: Callable[[int, Any], Any]) -> None:
        self.source, self.fn = source, fn

    def __iter__(self) -> Iterator[Any]:
        return (self.fn(i, batch) for i, batch in enumerate(self.source))


class Selected:
    """The examples at positions ``index`` of a re-iterable of batches, batch by batch, in loader order.

    Positions count examples across batches (0 is the first example of the first
    batch); each pass yields, per batch, the rows it holds (batches holding none are skipped).
    """

    def __init__(self, source: Iterable[Any], index: torch.Tensor) -> None:
        self.source, self.index = source, torch.sort(torch.as_tensor(index, dtype=torch.long)).values

    def __iter__(self) -> Iterator[Any]:
        start = 0
        for batch in self.source:
            n = batch_size(batch)
            local = self.index[(self.index >= start) & (self.index < start + n)] - start
            start += n
            if len(local):
                yield take(batch, local)


def random_access(loader: Any, device: torch.device) -> Optional[tuple[Callable[[torch.Tensor], Any], int]]:
    """``(rows, n)``: ``rows(index)`` collates the examples at loader positions ``index`` into one batch, without a pass.

    Possible for a DataLoader over a map-style dataset (its batch sampler gives each
    position's dataset index, ``n`` of them; its ``collate_fn`` builds the batch); None otherwise.
    """
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) \
            or loader.batch_sampler is None:
        return None
    order = [i for group in loader.batch_sampler for i in group]

    def rows(index: torch.Tensor) -> Any:
        return _normalised(loader.collate_fn([loader.dataset[order[i]] for i in index.tolist()]), device)

    return rows, len(order)


def _to(tree: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def _per_example(value: Any, n: int) -> bool:
    """A field holding one value per example: a batched tensor, or a list/tuple of ``n`` non-tensors (ids)."""
    if isinstance(value, torch.Tensor):
        return value.dim() > 0
    return isinstance(value, (list, tuple)) and len(value) == n and not any(
        isinstance(v, (torch.Tensor, Mapping, list, tuple)) for v in value)


def take(batch: Any, index: Any) -> Any:
    """Rows ``index`` (an int, a slice or an index tensor) of every per-example field; shared fields as they are.

    Per-example fields are batched tensors and lists of one non-tensor value per
    example (string ids); nested tuples and dicts are followed.
    """
    n = batch_size(batch)

    def pick(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: pick(v) for k, v in value.items()}
        if not _per_example(value, n):
            return [pick(v) for v in value] if isinstance(value, list) else (
                tuple(pick(v) for v in value) if isinstance(value, tuple) else value)
        if isinstance(value, torch.Tensor):
            return value[index]
        rows = list(range(n))
        chosen = rows[index] if isinstance(index, (int, slice)) else [rows[i] for i in torch.as_tensor(index).tolist()]
        return value[chosen] if isinstance(index, int) else type(value)(value[i] for i in chosen)

    return pick(batch)


def concatenate(loader: Iterable[Any], device: torch.device) -> Any:
    """All of the loader's batches as one batch: per-example fields joined, shared fields kept once.

    Raises:
        ValueError: a field that is neither per-example nor the same in every batch.
    """
    parts = list(batches(loader, device))
    sizes = [batch_size(p) for p in parts]

    def join(values: list, path: str) -> Any:
        first = values[0]
        if isinstance(first, Mapping):
            return {k: join([v[k] for v in values], f"{path}[{k!r}]") for k in first}
        if all(_per_example(v, n) for v, n in zip(values, sizes)):
            if isinstance(first, torch.Tensor):
                return torch.cat(values)
            return type(first)(x for v in values for x in v)
        if isinstance(first, (list, tuple)) and all(len(v) == len(first) for v in values):
            return type(first)(join([v[i] for v in values], f"{path}[{i}]") for i in range(len(first)))
        if all(_same(v, first) for v in values):
            return first
        raise ValueError(f"batches: field {path or 'batch'} is neither one value per example nor the same in "
                         "every batch, so the batches cannot be joined")

    return join(parts, "")


batch_size = examples_in  # examples in a batch: the first dimension of its first tensor


def _same(a: Any, b: Any) -> bool:
    """Two shared field values are equal (tensors by content)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a is b or a == b


def _tensor_print(t: torch.Tensor) -> tuple:
    """Identity, layout, in-place version and a sampled sum: changes when the tensor's content is written."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step]
    total = float(sample.double().sum()) if sample.numel() and sample.dtype != torch.bool else int(sample.sum())
    return (t.data_ptr(), tuple(t.shape), str(t.dtype), t._version, total)


def fingerprint(loader: Any) -> tuple:
    """A cheap key that changes when a loader's data changes, in place or by length.

    Which loader it belongs to is the holder's to check (caches keep the loader itself).

    For a ``DataLoader`` over a ``TensorDataset`` and for a list of batches, every
    tensor's storage, shape, in-place version counter and a sampled sum (at most
    4096 entries each); for other datasets only the dataset object and its length, so
    their data edited in place needs :meth:`clear_cache`.
    """
    if isinstance(loader, DataLoader):
        dataset = loader.dataset
        size = len(dataset) if hasattr(dataset, "__len__") else None
        content = tuple(_tensor_print(t) for t in dataset.tensors) if isinstance(dataset, TensorDataset) else ()
        return (size, content)
    if isinstance(loader, (list, tuple)):
        leaves = pytree.tree_leaves(list(loader))
        return (len(loader), tuple(_tensor_print(t) if isinstance(t, torch.Tensor) else repr(t)[:64] for t in leaves))
    return ()


def own_batch_dimension(func: Any, params: Any, batch: Any, name: str) -> Optional[ValueError]:
    """The error to raise when ``func`` adds its own batch dimension (dattri's ``unsqueeze(0)``); else None.

    That is the diagnosis when ``func`` fails, or gives more than one value, on the
    batch's first example presented as a batch of one (the library's convention) but
    gives one value on the same example without a batch dimension.
    """
    try:
        with torch.no_grad():
            value = func(params, take(batch, slice(0, 1)))
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return None  # the convention works: the failure lies elsewhere
    except Exception:  # noqa: BLE001 - any failure: try the other presentation
        pass
    try:
        with torch.no_grad():
            value = func(params, take(batch, 0))
    except Exception:  # noqa: BLE001
        return None
    if not (isinstance(value, torch.Tensor) and value.numel() == 1):
        return None
    return ValueError(
        f"{name}: it fails (or gives several values) on an example presented as a batch of one but gives one "
        "value on an example without a batch "
        "dimension, so it adds that dimension itself (an unsqueeze(0), as losses written for dattri's per-example "
        "calls do). This library presents every example as a batch of one: remove the unsqueeze(0) calls"
    )


@contextlib.contextmanager
def explained(func: Any, params: Any, batch: Any, name: str, kinds: tuple = (Exception,)) -> Iterator[None]:
    """Run a block that calls ``func`` on ``batch``; an error of ``kinds`` from it is replaced by
    :func:`own_batch_dimension`'s explanation when that applies, and raised as it is otherwise."""
    try:
        yield
    except kinds as error:
        hint = own_batch_dimension(func, params, batch, name)
        if hint is not None:
            raise hint from error
        raise
