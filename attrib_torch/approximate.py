"""Approximate top-k over a feature store through FAISS (the optional extra ``attrib[faiss]``).

For stores too large to scan for every query (10⁷ rows and up), an inverted-file index:
the rows are clustered (k-means on a sample), each row listed under its nearest
centroid, and a query scans the lists of its ``nprobe`` nearest centroids only. The
scores are inner products, as :meth:`FeatureStore.topk`'s are; ``"ivf-flat"`` keeps the
rows in float32 (4 bytes a number in memory), ``"ivf-sq8"`` one byte a number (8-bit
scalar quantisation: the scores are approximate too). What it misses is measured
against the exact streamed top-k (``benchmarks/store.py --parts faiss``: recall@k);
use :meth:`FeatureStore.topk` wherever a scan is affordable.

An index is built from a store once, streamed a block at a time, and saved beside it
(``STORE/faiss/``) with the store's manifest digest: an index of another store, or of
the store before it was rebuilt, is refused on load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

import kernels

from .store import MANIFEST, FeatureStore, StoreMismatch

__all__ = ["ApproximateIndex", "INDEX_KINDS", "recall_at_k"]

INDEX_KINDS = ("ivf-flat", "ivf-sq8")
_FOLDER = "faiss"


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ImportError("approximate search needs FAISS: pip install 'attrib[faiss]' (faiss-cpu)") from error
    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss


def _manifest_digest(store: FeatureStore) -> str:
    return hashlib.sha256((store.path / MANIFEST).read_bytes()).hexdigest()


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


class ApproximateIndex:
    """A FAISS inverted-file index over a store's rows; :meth:`search` gives approximate top-k by inner product.

    Build with :meth:`build`, reopen with :meth:`load`. Indices are rows of the store.
    """

    def __init__(self, store: FeatureStore, index: Any, settings: dict) -> None:
        self.store, self.index, self.settings = store, index, settings

    @classmethod
    def build(cls, store: FeatureStore, *, kind: str = "ivf-flat", nlist: Optional[int] = None,
              train_rows: Optional[int] = None, seed: int = 0, block_rows: int = 65536,
              save: bool = True, show_progress: bool = True) -> "ApproximateIndex":
        """Cluster a sample of the store's rows into ``nlist`` lists and add every row, a block at a time.

        Args:
            kind: ``"ivf-flat"`` (rows kept exactly, float32) or ``"ivf-sq8"`` (one byte a number).
            nlist: lists (centroids); default ``4 · sqrt(rows)``, FAISS's rule of thumb.
            train_rows: rows k-means is fitted on, evenly spaced through the store;
                default ``min(rows, 64 · nlist)``.
            seed: of k-means' initialisation.
            save: write the index to ``STORE/faiss/`` (reopened by :meth:`load`).
            show_progress: a progress bar over the rows added.
        """
        faiss = _faiss()
        if not isinstance(store, FeatureStore):
            raise TypeError(f"store: expected a FeatureStore, got {type(store).__name__}")
        if kind not in INDEX_KINDS:
            raise ValueError(f"kind: expected one of {INDEX_KINDS}, got {kind!r}")
        n = store.n_rows
        nlist = max(1, min(n, int(4 * n ** 0.5))) if nlist is None else _positive(nlist, "nlist")
        if nlist > n:
            raise ValueError(f"nlist: expected at most the store's {n} rows, got {nlist}")
        train_rows = min(n, 64 * nlist) if train_rows is None else _positive(train_rows, "train_rows")
        if not nlist <= train_rows <= n:
            raise ValueError(f"train_rows: expected an integer in [nlist={nlist}, {n}], got {train_rows}")
        _positive(block_rows, "block_rows")
        quantizer = faiss.IndexFlatIP(store.width)
        if kind == "ivf-flat":
            index = faiss.IndexIVFFlat(quantizer, store.width, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFScalarQuantizer(quantizer, store.width, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(seed)
        sample = np.unique(np.linspace(0, n - 1, train_rows).round().astype(np.int64))
        index.train(_gathered(store, sample))
        from tqdm.auto import tqdm

        for _, block in tqdm(store.blocks(block_rows), total=-(-n // block_rows), desc="index rows",
                             disable=not show_progress):
            index.add(np.ascontiguousarray(block.float().numpy()))
        settings = {"kind": kind, "nlist": nlist, "train_rows": int(len(sample)), "seed": int(seed),
                    "store": _manifest_digest(store), "rows": n, "width": store.width}
        built = cls(store, index, settings)
        if save:
            built.save()
        return built

    def save(self) -> Path:
        """Write the index and its settings to ``STORE/faiss/``."""
        faiss = _faiss()
        folder = self.store.path / _FOLDER
        folder.mkdir(exist_ok=True)
        faiss.write_index(self.index, str(folder / "index.faiss"))
        (folder / "settings.json").write_text(json.dumps(self.settings, indent=1, sort_keys=True))
        return folder

    @classmethod
    def load(cls, store: FeatureStore) -> "ApproximateIndex":
        """The index saved beside ``store``; refused (StoreMismatch) if it was built from another manifest."""
        faiss = _faiss()
        folder = store.path / _FOLDER
        if not (folder / "index.faiss").exists():
            raise FileNotFoundError(f"store {store.path}: no FAISS index (build one with ApproximateIndex.build)")
        settings = json.loads((folder / "settings.json").read_text())
        if settings.get("store") != _manifest_digest(store):
            raise StoreMismatch(f"store {store.path}: its FAISS index was built from another manifest (the store "
                                "was rebuilt since); build the index again")
        return cls(store, faiss.read_index(str(folder / "index.faiss")), settings)

    def search(self, queries: Tensor, k: int, *, nprobe: int = 16, largest: bool = True) -> kernels.TopK:
        """Approximate top-``k`` rows by inner product for each query ``(m, width)``, best first.

        ``nprobe`` of the ``nlist`` lists are scanned per query (all of them: exact up
        to ``ivf-sq8``'s quantisation). ``largest=False`` gives the smallest scores
        (the search of the negated queries). Where the scanned lists hold fewer than
        ``k`` rows the missing entries have index -1 and score NaN.
        """
        width = self.settings["width"]
        if not isinstance(queries, Tensor) or queries.dim() != 2 or queries.shape[1] != width:
            raise ValueError(f"queries: expected a (m, {width}) tensor, got "
                             f"{tuple(queries.shape) if isinstance(queries, Tensor) else type(queries).__name__}")
        if not bool(torch.isfinite(queries).all()):
            raise ValueError("queries: contain NaN or Inf")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.settings["rows"]:
            raise ValueError(f"k: expected an integer in [1, {self.settings['rows']}], got {k!r}")
        self.index.nprobe = min(_positive(nprobe, "nprobe"), self.settings["nlist"])
        sign = 1.0 if largest else -1.0
        q = np.ascontiguousarray((sign * queries.detach().float()).cpu().numpy())
        values, indices = self.index.search(q, k)
        values, indices = torch.from_numpy(values).double() * sign, torch.from_numpy(indices)
        values[indices < 0] = float("nan")
        return kernels.TopK(values.to(queries.dtype), indices.long())


def _gathered(store: FeatureStore, rows: np.ndarray) -> np.ndarray:
    """The store's ``rows`` (sorted global indices) as one float32 array, read shard by shard."""
    parts = []
    for start, tensor in store.features():
        mine = rows[(rows >= start) & (rows < start + len(tensor))] - start
        if len(mine):
            parts.append(tensor[torch.from_numpy(mine)].float().numpy())
    return np.ascontiguousarray(np.concatenate(parts))


def recall_at_k(approximate: Tensor, exact: Tensor) -> float:
    """The share of the exact top-k's indices ``(m, k)`` that the approximate ``(m, k)`` found, over all queries."""
    found = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approximate, exact))
    return found / exact.numel()

