"""An on-disk store of training-set features: memory-mapped shards, a manifest, builds that resume to the same bytes.

A store is a directory::

    manifest.json           what the rows are (below), the shards, and whether the build is complete
    part-00000.npy          one shard per writer: rows [start, start + rows) of the training set
    part-00000.ledger.json  the shard's completed chunks and their checksums (while building)

Shards are NumPy ``.npy`` files, opened as memory maps: reads are zero-copy
(``torch.from_numpy`` over the map), the header says dtype and shape, any tool reads
them, and a preallocated file can be written chunk by chunk in place, which resuming
needs (safetensors files are written whole, once). ``bfloat16``, which NumPy lacks, is
stored as its 16-bit patterns (``uint16``) and viewed back as ``torch.bfloat16``.

The manifest records the rows, the feature width and its layout per module (block),
the dtype, a description of the features (method, projection kind, seed and dims),
fingerprints (SHA-256) of the model's state and of the data, the chunking, the
library version and one SHA-256 per shard. A build writes chunks of ``chunk_rows``
rows on a grid fixed by the training set (not by the number of writers), each
featurised in batches of ``batch_size`` from the chunk's start, flushed to disk, and
only then recorded in the shard's ledger by an atomic rename: killed at any point,
the same call finishes the store with the bytes an uninterrupted build writes, since
every row is computed in the same batch either way. A build into a store made with
another model, data, dtype or description refuses, naming the field that differs; a
shard whose size or checksum is wrong is refused on open.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

import kernels

from .data import batches

__all__ = ["FeatureStore", "StoreMismatch", "StoreCorrupted", "build_store", "fingerprint_state",
           "fingerprint_data", "STORE_DTYPES"]

FORMAT = "attrib-store/1"
MANIFEST = "manifest.json"
STORE_DTYPES = {"float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, np.uint16),
                "float32": (torch.float32, np.float32)}
# the fields two builds of one store must agree on
_IDENTITY = ("format", "rows", "width", "dtype", "layout", "description", "model", "data", "chunk_rows",
             "batch_size")


class StoreMismatch(ValueError):
    """A build or a read that would mix features made another way (another model, data, dtype, projection)."""


class StoreCorrupted(ValueError):
    """A shard whose size or checksum does not match the manifest, or a manifest that cannot be read."""


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("attrib")
    except Exception:  # noqa: BLE001 - run from a checkout that is not installed
        return "unknown"


def _hash_value(h: "hashlib._Hash", value: Any) -> None:
    """Feed ``value`` (tensors, arrays, numbers, strings, and dicts, lists and tuples of them) into ``h``."""
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        h.update(f"A{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        h.update(b"{")
        for key in sorted(value, key=str):
            h.update(repr(key).encode())
            _hash_value(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"(" if isinstance(value, tuple) else b"[")
        for item in value:
            _hash_value(h, item)
        h.update(b")")
    elif isinstance(value, (int, float, str, bool, bytes)) or value is None:
        h.update(f"{type(value).__name__}:{value!r}".encode())
    else:
        raise TypeError(f"data: cannot fingerprint a {type(value).__name__}; examples must be tensors, arrays, "
                        "numbers or strings, in dicts, lists or tuples")


def fingerprint_state(state: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict: every entry's name, dtype, shape and bytes, in sorted order."""
    h = hashlib.sha256()
    _hash_value(h, dict(state))
    return h.hexdigest()


def fingerprint_data(dataset: Any) -> str:
    """SHA-256 of a map-style dataset's examples, in order (one read of the data, no model)."""
    h = hashlib.sha256()
    for i in range(len(dataset)):
        _hash_value(h, dataset[i])
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` so that a reader (or a crash) sees the old file or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise StoreCorrupted(f"{path}: cannot be read as JSON ({error})") from error


def _shard_name(index: int) -> str:
    return f"part-{index:05d}.npy"


def _chunk_ranges(rows: int, chunk_rows: int) -> List[Tuple[int, int]]:
    return [(start, min(start + chunk_rows, rows)) for start in range(0, rows, chunk_rows)]


def _slices(n_chunks: int, world: int) -> List[Tuple[int, int]]:
    """Writer ``r`` takes chunks ``[lo_r, hi_r)``: contiguous, disjoint, as even as whole chunks allow."""
    return [(r * n_chunks // world, (r + 1) * n_chunks // world) for r in range(world)]


@dataclass(frozen=True)
class Shard:
    """One writer's rows: its file, the first global row it holds, its number of rows, its SHA-256."""

    file: str
    start: int
    rows: int
    sha256: str


class FeatureStore:
    """A complete store, opened for reading: its manifest and its shards as memory-mapped tensors.

    Open with :meth:`open`. ``features()`` yields ``(start, rows)`` per shard without
    copying; ``rows(start, stop)`` gathers a range. Several processes may read one
    store at once.
    """

    def __init__(self, path: Path, manifest: dict, shards: List[Shard]) -> None:
        self.path, self.manifest, self.shards = path, manifest, shards
        self.torch_dtype, self._np_dtype = STORE_DTYPES[manifest["dtype"]]

    @classmethod
    def open(cls, path: Union[str, os.PathLike], *, verify: bool = True) -> "FeatureStore":
        """Open a complete store, checking each shard's size and (``verify``) its SHA-256 against the manifest.

        Raises:
            FileNotFoundError: no manifest at ``path``.
            StoreCorrupted: an unreadable manifest, a build not finished, a missing,
                truncated or altered shard (named).
        """
        path = Path(path)
        if not (path / MANIFEST).exists():
            raise FileNotFoundError(f"store: no {MANIFEST} in {path}")
        manifest = _read_json(path / MANIFEST)
        if manifest.get("format") != FORMAT:
            raise StoreCorrupted(f"store {path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        if not manifest.get("complete"):
            raise StoreCorrupted(f"store {path}: its build is not finished (resume it with the same build call)")
        shards = [Shard(**s) for s in manifest["shards"]]
        itemsize = np.dtype(STORE_DTYPES[manifest["dtype"]][1]).itemsize
        for shard in shards:
            file = path / shard.file
            if not file.exists():
                raise StoreCorrupted(f"store {path}: shard {shard.file} is missing")
            array = np.load(file, mmap_mode="r")
            expected = (shard.rows, manifest["width"])
            if array.shape != expected or array.dtype.itemsize != itemsize:
                raise StoreCorrupted(f"store {path}: shard {shard.file} holds {array.shape} {array.dtype}, the "
                                     f"manifest says {expected} {manifest['dtype']}")
            header = file.stat().st_size - array.nbytes
            if header < 0 or array.offset != header:
                raise StoreCorrupted(f"store {path}: shard {shard.file} is truncated")
            if verify and _file_sha256(file) != shard.sha256:
                raise StoreCorrupted(f"store {path}: shard {shard.file}'s checksum does not match the manifest "
                                     "(the file was altered or damaged)")
        return cls(path, manifest, shards)

    @property
    def n_rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def width(self) -> int:
        return int(self.manifest["width"])

    def _shard_tensor(self, shard: Shard) -> Tensor:
        array = np.load(self.path / shard.file, mmap_mode="c")  # copy-on-write: writable for torch, file untouched
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if self.manifest["dtype"] == "bfloat16" else tensor

    def features(self) -> Iterator[Tuple[int, Tensor]]:
        """``(start, rows)`` for each shard in order: ``rows`` ``(n_shard, width)`` maps the file, no copy."""
        for shard in self.shards:
            yield shard.start, self._shard_tensor(shard)

    def rows(self, start: int = 0, stop: Optional[int] = None) -> Tensor:
        """Rows ``[start, stop)`` of the training set, gathered across shards (a copy)."""
        stop = self.n_rows if stop is None else stop
        if not 0 <= start <= stop <= self.n_rows:
            raise ValueError(f"rows: expected 0 <= start <= stop <= {self.n_rows}, got [{start}, {stop})")
        parts = [t[max(start - s, 0) : max(min(stop - s, len(t)), 0)] for s, t in self.features()]
        parts = [p for p in parts if len(p)]
        return torch.cat(parts) if parts else torch.zeros(0, self.width, dtype=self.torch_dtype)


    def topk(self, queries: Tensor, k: int, *, largest: bool = True, block_rows: int = 16384,
             distributed: bool = False) -> kernels.TopK:
        """For each query row ``(m, width)``, the ``k`` store rows with the largest (or smallest) inner product.

        Exact: the store is streamed shard by shard in blocks of ``block_rows`` rows
        (read from the memory map, scored with :func:`kernels.inner`, merged into a
        running top-k with :func:`kernels.merge_topk`), so memory holds one block and
        the ``(m, k)`` result whatever the store's size; indices are rows of the
        training set, ties to the smaller index. With ``distributed`` (under
        ``torch.distributed``) each rank scans every ``world``-th shard and the ranks'
        results are gathered and merged (:func:`attrib_torch.distributed.gather_topk`):
        every rank returns what one process scanning all shards would.
        """
        if not isinstance(queries, Tensor) or queries.dim() != 2 or queries.shape[1] != self.width:
            raise ValueError(f"queries: expected a (m, {self.width}) tensor, got "
                             f"{tuple(queries.shape) if isinstance(queries, Tensor) else type(queries).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n_rows:
            raise ValueError(f"k: expected an integer in [1, {self.n_rows}], got {k!r}")
        if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
            raise ValueError(f"block_rows: expected a positive integer, got {block_rows!r}")
        wide = torch.promote_types(torch.promote_types(queries.dtype, self.torch_dtype), torch.float32)
        queries = queries.to(wide)
        from .distributed import gather_topk, my_part

        shards = list(my_part(self.shards)) if distributed else self.shards
        running = kernels.empty_topk(queries.shape[0], wide, queries.device)
        for start, block in self.blocks(block_rows, shards=shards):
            scores = kernels.inner(block.to(queries.device, wide), queries).T  # (m, block)
            running = kernels.merge_topk(running, scores, start, k, largest=largest)
        return gather_topk(running, k, largest=largest) if distributed else running

    def blocks(self, block_rows: int, *, shards: Optional[Sequence[Shard]] = None) -> Iterator[Tuple[int, Tensor]]:
        """``(first row, rows)`` blocks of at most ``block_rows`` rows, read from the shards into one reused
        buffer (plain reads, not the memory map: the process holds one block, whatever the store's size).
        Each block is valid until the next is read."""
        row_bytes = self.width * np.dtype(self._np_dtype).itemsize
        buffer = np.empty((block_rows, self.width), dtype=self._np_dtype)
        for shard in self.shards if shards is None else shards:
            file = self.path / shard.file
            offset = np.load(file, mmap_mode="r").offset
            with open(file, "rb", buffering=0) as f:
                f.seek(offset)
                for first in range(0, shard.rows, block_rows):
                    n = min(block_rows, shard.rows - first)
                    view = memoryview(buffer[:n].reshape(-1).view(np.uint8))
                    got = 0
                    while got < n * row_bytes:
                        read = f.readinto(view[got:])
                        if not read:
                            raise StoreCorrupted(f"store {self.path}: shard {shard.file} ended early")
                        got += read
                    tensor = torch.from_numpy(buffer[:n])
                    yield shard.start + first, (tensor.view(torch.bfloat16) if self.manifest["dtype"] == "bfloat16"
                                                else tensor)


def _check_agrees(path: Path, existing: dict, wanted: dict) -> None:
    for field in _IDENTITY:
        if existing.get(field) != wanted.get(field):
            mine, theirs = json.dumps(wanted.get(field))[:200], json.dumps(existing.get(field))[:200]
            raise StoreMismatch(f"store {path}: its {field} is {theirs}, this build's is {mine}; build into a new "
                                "directory, or remove the old store")
    if existing.get("world") != wanted.get("world"):
        raise StoreMismatch(f"store {path}: it is being built by {existing.get('world')} writers, this build has "
                            f"{wanted.get('world')}; resume it with as many")


def build_store(
    path: Union[str, os.PathLike],
    featurize: Callable[[Any], Tensor],
    dataset: Any,
    *,
    width: int,
    description: Mapping[str, Any],
    model_state: Mapping[str, Tensor],
    layout: Optional[Sequence[Tuple[str, int]]] = None,
    dtype: str = "float32",
    batch_size: int = 32,
    chunk_rows: int = 1024,
    rank: int = 0,
    world: int = 1,
    device: Optional[str] = "cpu",
    show_progress: bool = True,
    timings: Optional[Dict[str, float]] = None,
) -> Optional[FeatureStore]:
    """Featurise ``dataset`` into the store at ``path``, or finish a build that was interrupted there.

    Args:
        featurize: ``featurize(batch) -> (B, width)`` features of a collated batch
            (e.g. an attributor's ``generate_train_rep`` for one checkpoint).
        dataset: a map-style dataset; batches are collated by a DataLoader.
        width: features per row; ``layout`` splits it per module (names and widths).
        description: what the features are (method, projection kind, seed, dims, ...),
            JSON values; a store built with another description refuses to be extended.
        model_state: the state dict the features come from (fingerprinted).
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"`` on disk.
        batch_size: rows per ``featurize`` call, from each chunk's start.
        chunk_rows: rows written and recorded at a time (a multiple of ``batch_size``).
        rank, world: this writer and the number of writers (each writes its own shard
            of whole chunks; under ``torch.distributed`` pass its rank and world size).
        timings: a dict to receive this writer's seconds spent fingerprinting
            (``"fingerprints"``) and featurising and writing its rows (``"rows"``, with
            ``"rows_written"``, the rows this call computed).

    Returns:
        The opened store once every writer's shard is complete (on ``rank`` 0 when
        ``world > 1``, after the others have finished), else None.

    Raises:
        ValueError / TypeError: bad arguments, before anything is computed.
        StoreMismatch: ``path`` holds a store of another model, data, dtype,
            description, chunking or number of writers.
    """
    path = Path(path)
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(STORE_DTYPES)}, got {dtype!r}")
    for name, value in (("width", width), ("batch_size", batch_size), ("chunk_rows", chunk_rows), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if chunk_rows % batch_size:
        raise ValueError(f"chunk_rows: expected a multiple of batch_size={batch_size}, got {chunk_rows}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank: expected an integer in [0, {world}), got {rank!r}")
    if not callable(featurize):
        raise TypeError("featurize: expected a function batch -> (B, width) tensor")
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset: expected a map-style dataset (len and indexing), got {type(dataset).__name__}")
    layout = [(str(n), int(w)) for n, w in (layout or [("features", width)])]
    if sum(w for _, w in layout) != width:
        raise ValueError(f"layout: its widths add up to {sum(w for _, w in layout)}, not width={width}")
    n = len(dataset)
    chunks = _chunk_ranges(n, chunk_rows)
    clock = time.perf_counter()
    wanted = {
        "format": FORMAT, "rows": n, "width": width, "dtype": dtype, "layout": layout,
        "description": json.loads(json.dumps(dict(description))), "model": fingerprint_state(model_state),
        "data": fingerprint_data(dataset), "chunk_rows": chunk_rows, "batch_size": batch_size, "world": world,
        "version": _library_version(),
    }
    wanted = json.loads(json.dumps(wanted))  # as it reads back from the manifest (tuples become lists)
    fingerprinted = time.perf_counter() - clock
    path.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        if (path / MANIFEST).exists():
            _check_agrees(path, _read_json(path / MANIFEST), wanted)
        else:
            _write_json_atomic(path / MANIFEST, {**wanted, "complete": False, "shards": []})
    _barrier(world)  # every writer sees the manifest rank 0 checked or wrote
    if rank != 0:
        if not (path / MANIFEST).exists():
            raise ValueError(f"rank: writer 0 creates the store's manifest; start it before rank {rank} (under "
                             "torch.distributed the writers wait for it)")
        _check_agrees(path, _read_json(path / MANIFEST), wanted)
    lo, hi = _slices(len(chunks), world)[rank]
    mine = chunks[lo:hi]
    start = mine[0][0] if mine else n
    rows = sum(b - a for a, b in mine)
    clock = time.perf_counter()
    written = _write_shard(path, rank, mine, start, rows, featurize, dataset, wanted, device, show_progress)
    if timings is not None:
        timings.update(fingerprints=fingerprinted, rows=time.perf_counter() - clock, rows_written=written)
    _barrier(world)
    return _finish(path, wanted, chunks, rank)


def _barrier(world: int) -> None:
    """Wait for the other writers when they run under ``torch.distributed``."""
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_shard(path: Path, rank: int, mine: List[Tuple[int, int]], start: int, rows: int,
                 featurize: Callable[[Any], Tensor], dataset: Any, wanted: dict, device: Optional[str],
                 show_progress: bool) -> int:
    """Compute and record this writer's chunks not yet in its ledger; returns the rows it computed."""
    from torch.utils.data import DataLoader, Subset

    torch_dtype, np_dtype = STORE_DTYPES[wanted["dtype"]]
    file = path / _shard_name(rank)
    ledger_path = path / (_shard_name(rank)[:-4] + ".ledger.json")
    ledger: Dict[str, Any] = _read_json(ledger_path) if ledger_path.exists() else {"chunks": {}}
    if file.exists() and ledger["chunks"]:
        array = np.load(file, mmap_mode="r+")
        if array.shape != (rows, wanted["width"]):
            raise StoreCorrupted(f"store {path}: shard {file.name} holds {array.shape}, expected "
                                 f"{(rows, wanted['width'])}")
    else:
        array = np.lib.format.open_memmap(file, mode="w+", dtype=np_dtype, shape=(rows, wanted["width"]))
        ledger = {"chunks": {}}
    todo = [(a, b) for a, b in mine if str(a) not in ledger["chunks"]]
    for a, b in todo:
        loader = DataLoader(Subset(dataset, range(a, b)), batch_size=wanted["batch_size"], shuffle=False)
        offset = a - start
        for batch in batches(loader, device, desc=f"store rows {a}-{b}", show_progress=show_progress):
            with torch.no_grad():
                out = featurize(batch)
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] != wanted["width"]:
                raise ValueError(f"featurize: expected a (B, {wanted['width']}) tensor, got "
                                 f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
            values = out.detach().to("cpu", torch_dtype)
            raw = values.view(torch.uint16) if wanted["dtype"] == "bfloat16" else values
            array[offset : offset + len(raw)] = raw.numpy()
            offset += len(raw)
        if offset != b - start:
            raise ValueError(f"featurize: returned {offset - (a - start)} rows for the {b - a} rows {a}..{b - 1}")
        array.flush()
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
        ledger["chunks"][str(a)] = hashlib.sha256(np.ascontiguousarray(array[a - start : b - start])).hexdigest()
        _write_json_atomic(ledger_path, ledger)
    del array
    if not ledger.get("sha256"):
        ledger["sha256"] = _file_sha256(file)
        _write_json_atomic(ledger_path, ledger)
    return sum(b - a for a, b in todo)


def _finish(path: Path, wanted: dict, chunks: List[Tuple[int, int]], rank: int) -> Optional[FeatureStore]:
    """On rank 0, once every shard's ledger is complete: write the final manifest and open the store."""
    if rank != 0:
        return None
    shards = []
    for r, (lo, hi) in enumerate(_slices(len(chunks), wanted["world"])):
        ledger_path = path / (_shard_name(r)[:-4] + ".ledger.json")
        ledger = _read_json(ledger_path) if ledger_path.exists() else {"chunks": {}}
        mine = chunks[lo:hi]
        if not ledger.get("sha256") or any(str(a) not in ledger["chunks"] for a, _ in mine):
            return None  # another writer has not finished: its last call finishes the store
        shards.append({"file": _shard_name(r), "start": mine[0][0] if mine else wanted["rows"],
                       "rows": sum(b - a for a, b in mine), "sha256": ledger["sha256"]})
    _write_json_atomic(path / MANIFEST, {**wanted, "complete": True, "shards": shards})
    return FeatureStore.open(path, verify=False)
