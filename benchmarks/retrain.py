"""Ground truth by retraining: models refit on subsets of the training set (LDS) or without one example (LOO).

Every result is cached on disk under ``$ATTRIB_CACHE/retrain`` (default
``~/.cache/attrib/retrain``, never inside the checkout), keyed by the
configuration (the caller's ``key`` for the training recipe, a digest of the data,
the subset parameters), and saved after every refit, so an interrupted run resumes
and a rerun costs nothing. Subsets are masks over *positions* of the training
tensors: row ``i`` of ``x_train`` is training example ``i`` everywhere, in the
attributions and in the retraining.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

CACHE = Path(os.environ.get("ATTRIB_CACHE") or Path.home() / ".cache" / "attrib") / "retrain"

Params = Dict[str, Tensor]
TrainFn = Callable[[Tensor, Tensor], Params]  # (x, y) -> fitted parameters
TargetFn = Callable[[Params, Tensor, Tensor], Tensor]  # (params, x_test, y_test) -> (n_test,), larger is better


class Data(NamedTuple):
    """Training and test tensors; labels ``(n,)``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


class LDSTruth(NamedTuple):
    """``subsets`` ``(n_subsets, n_train)`` boolean masks and the retrained models' ``values`` ``(n_subsets, n_test)``."""

    subsets: Tensor
    values: Tensor


class LOOTruth(NamedTuple):
    """``indices`` ``(n,)`` removed one at a time; ``values`` ``(n, n_test)`` = f(full) - f(without i): positive if i helped."""

    indices: Tensor
    values: Tensor


def digest(*tensors: Tensor) -> str:
    """A short content hash of tensors, for cache keys."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def half_subsets(n_train: int, n_subsets: int, *, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """``(n_subsets, n_train)`` masks, each keeping ``round(fraction · n_train)`` positions drawn with ``seed``."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction: expected a number in (0, 1), got {fraction!r}")
    keep = max(1, round(fraction * n_train))
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n_subsets, n_train, dtype=torch.bool)
    for s in range(n_subsets):
        masks[s, torch.randperm(n_train, generator=generator)[:keep]] = True
    return masks


def _cached_refits(path: Path, count: int, refit: Callable[[int], Tensor], desc: str, progress: bool) -> Tensor:
    """Rows ``refit(0) .. refit(count - 1)``, each saved as soon as it is computed."""
    rows = list(torch.load(path, weights_only=True)) if path.exists() else []
    for r in tqdm(range(len(rows), count), desc=desc, disable=not progress, leave=False):
        rows.append(refit(r))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(torch.stack(rows), tmp)
        os.replace(tmp, path)
    return torch.stack(rows[:count])


def retrain_lds(train_fn: TrainFn, target_fn: TargetFn, data: Data, *, n_subsets: int, fraction: float = 0.5,
                seed: int = 0, key: str, cache_dir: Optional[Path] = None, progress: bool = False) -> LDSTruth:
    """Refit on ``n_subsets`` random subsets and record ``target_fn`` on the test set for each.

    Args:
        train_fn: ``(x, y) -> params``, deterministic (fixed initialisation).
        target_fn: ``(params, x_test, y_test) -> (n_test,)``, larger meaning a better prediction.
        data: the tensors.
        n_subsets, fraction, seed: the subsets (:func:`half_subsets`).
        key: names the training recipe (model, regularisation, optimiser) in the cache key.
    """
    subsets = half_subsets(len(data.y_train), n_subsets, fraction=fraction, seed=seed)
    name = f"lds-{key}-{digest(*data)}-f{fraction}-s{seed}.pt"
    path = (cache_dir or CACHE) / name

    def refit(s: int) -> Tensor:
        mask = subsets[s]
        params = train_fn(data.x_train[mask], data.y_train[mask])
        return target_fn(params, data.x_test, data.y_test).detach().double()

    return LDSTruth(subsets, _cached_refits(path, n_subsets, refit, f"retraining {key}", progress))


def retrain_loo(train_fn: TrainFn, target_fn: TargetFn, data: Data, *, indices: Sequence[int], key: str,
                cache_dir: Optional[Path] = None, progress: bool = False) -> LOOTruth:
    """Refit without each training example of ``indices``; ``f(full) - f(without i)`` on the test set."""
    index = torch.as_tensor(list(indices), dtype=torch.long)
    name = f"loo-{key}-{digest(*data, index)}.pt"
    path = (cache_dir or CACHE) / name
    full = target_fn(train_fn(data.x_train, data.y_train), data.x_test, data.y_test).detach().double()
    n = len(data.y_train)

    def refit(r: int) -> Tensor:
        mask = torch.ones(n, dtype=torch.bool)
        mask[index[r]] = False
        return full - target_fn(train_fn(data.x_train[mask], data.y_train[mask]), data.x_test, data.y_test).double()

    return LOOTruth(index, _cached_refits(path, len(index), refit, f"leave-one-out {key}", progress))
