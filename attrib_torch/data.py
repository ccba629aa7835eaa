"""Data loaders as attributors use them: checked for order, moved to a device, concatenated."""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import torch
from torch.utils import _pytree as pytree
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset
from torch.utils.data._utils.collate import default_collate
from tqdm.auto import tqdm

__all__ = ["check_loader", "batches", "concatenate", "batch_size", "fingerprint"]


def check_loader(loader: Any, name: str) -> None:
    """Reject a loader whose order changes between passes: scores must line up with dataset positions.

    Raises:
        ValueError: a ``DataLoader`` that shuffles (a ``RandomSampler``), or an iterator
            (one pass only).
        TypeError: something that is not iterable.
    """
    if isinstance(loader, DataLoader):
        sampler = loader.batch_sampler.sampler if loader.batch_sampler is not None else loader.sampler
        for s in {id(sampler): sampler, id(loader.sampler): loader.sampler}.values():
            if not isinstance(s, SequentialSampler):
                raise ValueError(
                    f"{name}: the data loader's sampler is a {type(s).__name__}; scores must line up with "
                    "dataset positions, so use a sequential order (shuffle=False, no random sampler)"
                )
        return
    try:
        iterator = iter(loader)
    except TypeError:
        raise TypeError(f"{name}: expected a DataLoader or a list of batches, got {type(loader).__name__}") from None
    if iterator is loader:
        raise ValueError(f"{name}: an iterator can be read once only; pass a DataLoader or a list of batches")


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


def batches(loader: Iterable[Any], device: torch.device, *, desc: str = "", show_progress: bool = False) -> Iterator[Any]:
    """The loader's batches as tuples of tensors on ``device``."""
    sliced = _sliced(loader)
    source = loader if sliced is None else sliced
    total = len(loader) if isinstance(loader, DataLoader) else None
    for batch in tqdm(source, desc=desc, disable=not show_progress, leave=False, total=total):
        if not isinstance(batch, (tuple, list)):
            batch = (batch,)
        yield tuple(pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, list(batch)))


def concatenate(loader: Iterable[Any], device: torch.device) -> tuple:
    """All of the loader's batches as one batch (tensors concatenated along the first dimension)."""
    parts = list(batches(loader, device))
    if not parts:
        raise ValueError("the data loader is empty")
    return tuple(
        torch.cat([p[i] for p in parts]) if isinstance(parts[0][i], torch.Tensor) else parts[0][i]
        for i in range(len(parts[0]))
    )


def batch_size(batch: tuple) -> int:
    """Examples in a batch: the first dimension of its first tensor."""
    for item in pytree.tree_leaves(batch):
        if isinstance(item, torch.Tensor) and item.dim():
            return item.shape[0]
    raise ValueError("batch: holds no tensor with a batch dimension")


def _tensor_print(t: torch.Tensor) -> tuple:
    """Identity, layout, in-place version and a sampled sum: changes when the tensor's content is written."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step]
    total = float(sample.double().sum()) if sample.numel() and sample.dtype != torch.bool else int(sample.sum())
    return (t.data_ptr(), tuple(t.shape), str(t.dtype), t._version, total)


def fingerprint(loader: Any) -> tuple:
    """A cheap key that changes when a loader's data changes, in place or by length.

    For a ``DataLoader`` over a ``TensorDataset`` and for a list of batches, every
    tensor's storage, shape, in-place version counter and a sampled sum (at most
    4096 entries each); for other datasets, the dataset object and its length.
    """
    if isinstance(loader, DataLoader):
        dataset = loader.dataset
        size = len(dataset) if hasattr(dataset, "__len__") else None
        content = tuple(_tensor_print(t) for t in dataset.tensors) if isinstance(dataset, TensorDataset) else ()
        return (id(loader), id(dataset), size, content)
    if isinstance(loader, (list, tuple)):
        leaves = pytree.tree_leaves(list(loader))
        return (id(loader), len(loader), tuple(_tensor_print(t) if isinstance(t, torch.Tensor) else repr(t)[:64]
                                               for t in leaves))
    return (id(loader),)
