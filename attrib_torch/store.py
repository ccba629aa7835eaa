"""An on-disk store of training-set features: memory-mapped shards, a manifest, builds that resume to the same bytes.

A store is a directory::

    manifest.json                what the rows are (below), the shards, and whether the build is complete
    part-00000.npy               one shard per writer: its examples' feature rows
    part-00000.positions.npy     per-token stores: each row's position in its sequence (int32)
    part-00000.counts.npy        per-token stores: each example's number of rows (int64)
    part-00000.ledger.json       the shard's build record: its chunks, their sizes and checksums
    build.json                   (``attrib build``) the command's configuration

Shards are NumPy ``.npy`` files with a header padded to ``HEADER_BYTES``: reads are
zero-copy (``torch.from_numpy`` over a memory map), the header says dtype and shape,
and any tool reads them. They are appended to chunk by chunk (a per-token store's rows
per chunk are known only once computed), the header written last. ``bfloat16``, which
NumPy lacks, is stored as its 16-bit patterns (``uint16``) and viewed back. (safetensors
files are written whole, once: neither appending nor resuming fits them.)

The manifest records the rows and examples, the feature width and its layout per
module (block), the dtype, a description of the features (method, loss, projection
kind, seed and dims), fingerprints (SHA-256) of the model's state (parameters and
buffers) and of the data, the chunking, the library version, the device kind and one
SHA-256 per file. A build works through chunks of ``chunk_rows`` examples on a grid
fixed by the training set (not by the number of writers), each featurised in batches
of ``batch_size`` from the chunk's start, appended, synced to disk, and only then
recorded in the shard's ledger by an atomic rename. Killed at any point, the same call
checks the recorded chunks' bytes against their checksums, cuts the files back to the
last good one and finishes with the bytes an uninterrupted build writes, since every
row is computed in the same batch either way. A build into a store made with another
model, data, dtype, description or chunking refuses, naming the field that differs; a
file whose size or checksum is wrong is refused on open; one writer per shard at a
time (a lock); readers share nothing mutable, so any number may read at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

import kernels

from attrib_core.trees import examples_in

from .data import batches

__all__ = ["FeatureStore", "StoreMismatch", "StoreCorrupted", "StoreWriter", "TokenRows", "build_store",
           "stored_rows", "stored_examples", "read_manifest", "fingerprint_state",
           "fingerprint_data", "STORE_DTYPES"]

FORMAT = "attrib-store/2"
HEADER_BYTES = 128  # every shard's .npy header, padded to this size (a multiple of 64)
MANIFEST = "manifest.json"
STORE_DTYPES = {"float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, np.uint16),
                "float32": (torch.float32, np.float32)}
# the fields two builds of one store must agree on
_IDENTITY = ("format", "examples", "width", "dtype", "layout", "description", "model", "data", "chunk_rows",
             "batch_size", "per_token", "columns", "version", "device")


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
    elif isinstance(value, (np.ndarray, np.generic)):
        value = np.asarray(value)
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
    import tempfile

    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(handle, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # another writer's rename of the same content is harmless: each has its own file
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


def read_manifest(path: Union[str, os.PathLike]) -> dict:
    """A store's manifest as written, finished or not (StoreCorrupted if it cannot be read)."""
    return _read_json(Path(path) / MANIFEST)


def _shard_name(index: int) -> str:
    return f"part-{index:05d}.npy"


def _column_file(shard: str, column: str) -> str:
    return f"{shard[:-4]}.{column}.npy"


def _ledger_name(index: int) -> str:
    return f"part-{index:05d}.ledger.json"


def _chunk_ranges(rows: int, chunk_rows: int) -> List[Tuple[int, int]]:
    return [(start, min(start + chunk_rows, rows)) for start in range(0, rows, chunk_rows)]


def _slices(n_chunks: int, world: int) -> List[Tuple[int, int]]:
    """Writer ``r`` takes chunks ``[lo_r, hi_r)``: contiguous, disjoint, as even as whole chunks allow."""
    return [(r * n_chunks // world, (r + 1) * n_chunks // world) for r in range(world)]


def _npy_header(np_dtype: np.dtype, shape: Tuple[int, ...]) -> bytes:
    """The ``.npy`` (format version 1.0) header of an array of ``shape``, padded with spaces to exactly
    ``HEADER_BYTES``: a shard is written after a placeholder of that size, and the header goes in front once its
    rows are counted."""
    shape = tuple(int(d) for d in shape)
    text = f"{{'descr': {np.lib.format.dtype_to_descr(np.dtype(np_dtype))!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    room = HEADER_BYTES - 10 - 1  # magic, version and length take 10 bytes; a newline ends the text
    if len(text) > room:
        raise ValueError(f"store: shape {shape} does not fit a {HEADER_BYTES}-byte .npy header")
    body = (text.ljust(room) + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body


class _Appended:
    """One ``.npy`` file written row block by row block after a placeholder header (rows not known ahead)."""

    def __init__(self, file: Path, np_dtype: Any, width: Optional[int], kept_rows: int) -> None:
        self.file, self.np_dtype, self.width, self.rows = file, np.dtype(np_dtype), width, kept_rows
        self.row_bytes = self.np_dtype.itemsize * (width or 1)
        kept = HEADER_BYTES + kept_rows * self.row_bytes
        if file.exists():
            if file.stat().st_size < kept:
                raise StoreCorrupted(f"store {file.parent}: {file.name} holds fewer bytes than its ledger records")
            self.handle = open(file, "r+b")
            self.handle.truncate(kept)  # rows written after the last recorded chunk are computed again
        else:
            self.handle = open(file, "w+b")
            self.handle.write(b"\0" * HEADER_BYTES)
        self.handle.seek(kept)

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.np_dtype)
        if values.size:  # (a batch of padding only keeps no positions)
            self.handle.write(memoryview(values.reshape(-1).view(np.uint8)))
        self.rows += len(values)

    def sync(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def finish(self) -> str:
        """Write the header for the rows appended, sync, close; returns the file's SHA-256."""
        shape = (self.rows, self.width) if self.width is not None else (self.rows,)
        self.handle.seek(0)
        self.handle.write(_npy_header(self.np_dtype, shape))
        self.sync()
        self.handle.close()
        return _file_sha256(self.file)

    def close(self) -> None:
        self.handle.close()


@dataclass(frozen=True)
class Shard:
    """One writer's rows: its file, the first row it holds and how many, the first example and how many
    (equal to the rows unless the store is per token), its SHA-256, and its per-row columns
    ``{name: {"file", "rows", "sha256"}}``."""

    file: str
    start: int
    rows: int
    example_start: int
    examples: int
    sha256: str
    columns: Dict[str, Dict[str, Any]]


class TokenRows(NamedTuple):
    """A per-token featurisation of a batch: ``rows`` ``(R, width)``, one per kept position, example after
    example; ``counts`` ``(B,)`` positions kept per example; ``positions`` ``(R,)`` each row's position."""

    rows: Tensor
    counts: Tensor
    positions: Tensor


class FeatureStore:
    """A complete store, opened for reading: its manifest and its shards as memory-mapped tensors.

    Open with :meth:`open`. ``features()`` yields ``(first row, rows)`` per shard without
    copying; ``rows(start, stop)`` gathers a range; ``blocks`` streams it; ``topk``
    searches it; ``column(name)`` reads a per-row column (a per-token store's
    ``"positions"``, a recorded store's ``"index"``). Readers share nothing mutable:
    any number of processes may read one store at once.
    """

    def __init__(self, path: Path, manifest: dict, shards: List[Shard]) -> None:
        self.path, self.manifest, self.shards = path, manifest, shards
        self.torch_dtype, self._np_dtype = STORE_DTYPES[manifest["dtype"]]

    @classmethod
    def open(cls, path: Union[str, os.PathLike], *, verify: bool = True) -> "FeatureStore":
        """Open a complete store, checking each file's size and (``verify``) its SHA-256 against the manifest.

        Raises:
            FileNotFoundError: no manifest at ``path``.
            StoreCorrupted: an unreadable manifest, a build not finished, a missing,
                truncated or altered file (named).
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
        columns = manifest.get("columns", {})
        for shard in shards:
            _check_file(path, shard.file, (shard.rows, manifest["width"]), STORE_DTYPES[manifest["dtype"]][1],
                        shard.sha256 if verify else None)
            if set(shard.columns) != set(columns):
                raise StoreCorrupted(f"store {path}: shard {shard.file} has columns {sorted(shard.columns)}, the "
                                     f"manifest says {sorted(columns)}")
            for name, entry in shard.columns.items():
                _check_file(path, entry["file"], (entry["rows"],), columns[name], entry["sha256"] if verify else None)
        return cls(path, manifest, shards)

    @property
    def n_rows(self) -> int:
        """Rows of features: one per example, or per kept token of a per-token store."""
        return int(self.manifest["rows"])

    @property
    def n_examples(self) -> Optional[int]:
        """Examples featurised (the dataset's length); None for a store recorded during training."""
        return self.manifest.get("examples")

    @property
    def width(self) -> int:
        return int(self.manifest["width"])

    @property
    def per_token(self) -> bool:
        return bool(self.manifest.get("per_token"))

    def _tensor(self, array: np.ndarray) -> Tensor:
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if self.manifest["dtype"] == "bfloat16" else tensor

    def features(self) -> Iterator[Tuple[int, Tensor]]:
        """``(first row, rows)`` for each shard in order: ``rows`` ``(n_shard, width)`` maps the file, no copy."""
        for shard in self.shards:
            # copy-on-write: writable for torch, the file untouched
            yield shard.start, self._tensor(np.load(self.path / shard.file, mmap_mode="c"))

    def rows(self, start: int = 0, stop: Optional[int] = None) -> Tensor:
        """Rows ``[start, stop)``, gathered across shards (a copy)."""
        stop = self.n_rows if stop is None else stop
        if not 0 <= start <= stop <= self.n_rows:
            raise ValueError(f"rows: expected 0 <= start <= stop <= {self.n_rows}, got [{start}, {stop})")
        parts = [t[max(start - s, 0) : max(min(stop - s, len(t)), 0)] for s, t in self.features()]
        parts = [p for p in parts if len(p)]
        return torch.cat(parts) if parts else torch.zeros(0, self.width, dtype=self.torch_dtype)

    def column(self, name: str) -> Tensor:
        """The per-row column ``name`` over every shard (a copy): ``(n_rows,)``, or ``(n_examples,)`` for a
        per-token store's ``"counts"``."""
        columns = self.manifest.get("columns", {})
        if name not in columns:
            raise KeyError(f"column: store {self.path} has columns {sorted(columns)}, not {name!r}")
        return torch.cat([torch.from_numpy(np.load(self.path / s.columns[name]["file"])) for s in self.shards])

    def token_offsets(self) -> Tensor:
        """``(n_examples + 1,)``: example ``i``'s rows of a per-token store are ``[offsets[i], offsets[i + 1])``."""
        if not self.per_token:
            raise ValueError(f"token_offsets: store {self.path} holds one row per example, not per token")
        offsets = torch.zeros(self.n_examples + 1, dtype=torch.long)
        offsets[1:] = self.column("counts").long().cumsum(0)
        return offsets

    def locate(self, rows: Tensor) -> Tuple[Tensor, Tensor]:
        """``(examples, positions)`` of row indices of a per-token store (e.g. :meth:`topk`'s ``indices``)."""
        offsets = self.token_offsets()
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < self.n_rows):
            raise ValueError(f"rows: expected indices in [0, {self.n_rows}), got [{int(rows.min())}, "
                             f"{int(rows.max())}]")
        examples = torch.searchsorted(offsets, rows, right=True) - 1
        return examples, self.column("positions").long()[rows]

    def topk(self, queries: Tensor, k: int, *, largest: bool = True, block_rows: int = 16384,
             distributed: bool = False) -> kernels.TopK:
        """For each query row ``(m, width)``, the ``k`` store rows with the largest (or smallest) inner product.

        Exact: the store is streamed shard by shard in blocks of ``block_rows`` rows
        (plain reads into one buffer, scored with :func:`kernels.inner`, merged into a
        running top-k with :func:`kernels.merge_topk`), so memory holds one block and
        the ``(m, k)`` result whatever the store's size; indices are rows of the
        store, ties to the smaller index (:meth:`locate` turns a per-token store's rows
        into examples and positions). With ``distributed`` (under ``torch.distributed``,
        every rank passing the same queries) each rank scans every ``world``-th block and
        the ranks' results are gathered and merged
        (:func:`attrib_torch.distributed.gather_topk`): every rank returns what one
        process scanning the whole store would.
        """
        if not isinstance(queries, Tensor) or queries.dim() != 2 or queries.shape[1] != self.width:
            raise ValueError(f"queries: expected a (m, {self.width}) tensor, got "
                             f"{tuple(queries.shape) if isinstance(queries, Tensor) else type(queries).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n_rows:
            raise ValueError(f"k: expected an integer in [1, {self.n_rows}], got {k!r}")
        if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
            raise ValueError(f"block_rows: expected a positive integer, got {block_rows!r}")
        if not bool(torch.isfinite(queries).all()):
            raise ValueError("queries: contain NaN or Inf")
        wide = torch.promote_types(torch.promote_types(queries.dtype, self.torch_dtype), torch.float32)
        queries = queries.to(wide)
        from .distributed import check_same, gather_topk, world

        if distributed:
            check_same(queries, "queries")
        running = kernels.empty_topk(queries.shape[0], wide, queries.device)
        for start, block in self.blocks(block_rows, part=world() if distributed else (0, 1)):
            scores = kernels.inner(block.to(queries.device, wide), queries).T  # (m, block)
            running = kernels.merge_topk(running, scores, start, k, largest=largest)
        return gather_topk(running, k, largest=largest) if distributed else running

    def blocks(self, block_rows: int, *, part: Tuple[int, int] = (0, 1)) -> Iterator[Tuple[int, Tensor]]:
        """``(first row, rows)`` blocks of at most ``block_rows`` rows, read from the shards into one reused
        buffer (plain reads, not the memory map: the process holds one block, whatever the store's size).
        Each block is valid until the next is read. ``part=(rank, world)``: every ``world``-th block only, from
        ``rank`` (the others are not read)."""
        row_bytes = self.width * np.dtype(self._np_dtype).itemsize
        buffer = np.empty((block_rows, self.width), dtype=self._np_dtype)
        rank, size = part
        count = 0
        for shard in self.shards:
            with open(self.path / shard.file, "rb", buffering=0) as f:
                for first in range(0, shard.rows, block_rows):
                    n = min(block_rows, shard.rows - first)
                    count += 1
                    if (count - 1) % size != rank:
                        continue
                    f.seek(HEADER_BYTES + first * row_bytes)
                    view = memoryview(buffer[:n].reshape(-1).view(np.uint8))
                    got = 0
                    while got < n * row_bytes:
                        read = f.readinto(view[got:])
                        if not read:
                            raise StoreCorrupted(f"store {self.path}: shard {shard.file} ended early")
                        got += read
                    yield shard.start + first, self._tensor(buffer[:n])


def stored_rows(store: FeatureStore, rows: int, *, part: Tuple[int, int] = (0, 1)) -> Iterator[Tuple[int, Tensor]]:
    """``(first row, rows)``: the store's rows ``rows`` at a time from row 0, whatever its shards (so that stores of
    the same rows built by other numbers of writers give the same blocks), in float32 or wider (a copy each).
    ``part=(rank, world)``: only every ``world``-th block from ``rank`` is read."""
    wide = torch.promote_types(store.torch_dtype, torch.float32)
    rank, size = part
    for block, first in enumerate(range(0, store.n_rows, rows)):
        if block % size == rank:
            yield first, store.rows(first, min(first + rows, store.n_rows)).to(wide)


def stored_examples(store: FeatureStore, examples: int, *,
                    part: Tuple[int, int] = (0, 1)) -> Iterator[Tuple[int, Tensor]]:
    """``(first example, rows)``: the store's rows of ``examples`` examples at a time, in float32 or wider (a copy
    each); a per-token store's rows added up per example, in order of position (what one row per example would
    hold). ``part=(rank, world)``: only every ``world``-th block from ``rank`` is read."""
    wide = torch.promote_types(store.torch_dtype, torch.float32)
    n = store.n_examples
    offsets = store.token_offsets() if store.per_token else None
    rank, size = part
    for block, first in enumerate(range(0, n, examples)):
        if block % size != rank:
            continue
        last = min(first + examples, n)
        if offsets is None:
            yield first, store.rows(first, last).to(wide)
            continue
        lo, hi = int(offsets[first]), int(offsets[last])
        owner = torch.repeat_interleave(torch.arange(last - first), offsets[first + 1 : last + 1] - offsets[first:last])
        yield first, torch.zeros(last - first, store.width, dtype=wide).index_add_(0, owner,
                                                                                  store.rows(lo, hi).to(wide))


def _check_file(path: Path, name: str, shape: Tuple[int, ...], np_dtype: Any, sha256: Optional[str]) -> None:
    """``path / name`` holds an array of ``shape`` and ``np_dtype`` after a ``HEADER_BYTES`` header, nothing
    beyond, and (``sha256`` given) those exact bytes; else StoreCorrupted naming the file."""
    file = path / name
    if not file.exists():
        raise StoreCorrupted(f"store {path}: {name} is missing")
    try:
        array = np.load(file, mmap_mode="r")
    except (ValueError, OSError) as error:
        raise StoreCorrupted(f"store {path}: {name} cannot be read as an array ({error})") from error
    if array.shape != tuple(shape) or array.dtype != np.dtype(np_dtype):
        raise StoreCorrupted(f"store {path}: {name} holds {array.shape} {array.dtype}, the manifest says "
                             f"{tuple(shape)} {np.dtype(np_dtype)}")
    if array.offset != HEADER_BYTES or file.stat().st_size != HEADER_BYTES + array.nbytes:
        raise StoreCorrupted(f"store {path}: {name} is truncated or has bytes beyond its rows")
    if sha256 is not None and _file_sha256(file) != sha256:
        raise StoreCorrupted(f"store {path}: {name}'s checksum does not match the manifest (the file was altered "
                             "or damaged)")


def check_agrees(where: str, held: Mapping[str, Any], wanted: Mapping[str, Any], whose: str) -> None:
    """StoreMismatch naming the first field of ``wanted`` whose value (as JSON reads it back) ``held`` does not have."""
    for field, value in wanted.items():
        value = json.loads(json.dumps(value))
        if held.get(field) != value:
            raise StoreMismatch(f"{where}: its {field} is {json.dumps(held.get(field))[:200]}, {whose} is "
                                f"{json.dumps(value)[:200]}")


def _checked_layout(width: int, layout: Optional[Sequence[Tuple[str, int]]], dtype: str) -> List[Tuple[str, int]]:
    """The layout as ``[(name, width)]`` (one block of ``width`` if None), after checking ``width``, the layout's
    widths and ``dtype``; a ValueError naming the argument otherwise."""
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(STORE_DTYPES)}, got {dtype!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width: expected a positive integer, got {width!r}")
    layout = [(str(n), int(w)) for n, w in (layout or [("features", width)])]
    if sum(w for _, w in layout) != width:
        raise ValueError(f"layout: its widths add up to {sum(w for _, w in layout)}, not width={width}")
    return layout


def _check_agrees(path: Path, existing: dict, wanted: dict) -> None:
    check_agrees(f"store {path}", existing, {f: wanted.get(f) for f in _IDENTITY},
                 "this build's (build into a new directory, or remove the old store)")
    if existing.get("world") != wanted.get("world"):
        raise StoreMismatch(f"store {path}: it is being built by {existing.get('world')} writers, this build has "
                            f"{wanted.get('world')}; resume it with as many")


def build_store(
    path: Union[str, os.PathLike],
    featurize: Callable[[Any], Union[Tensor, TokenRows]],
    dataset: Any,
    *,
    width: int,
    description: Mapping[str, Any],
    model_state: Mapping[str, Tensor],
    layout: Optional[Sequence[Tuple[str, int]]] = None,
    dtype: str = "float32",
    per_token: bool = False,
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
            (e.g. an attributor's ``generate_train_rep`` for one checkpoint); with
            ``per_token``, a :class:`TokenRows` of the batch's kept positions.
        dataset: a map-style dataset; batches are collated by a DataLoader.
        width: features per row; ``layout`` splits it per module (names and widths).
        description: what the features are (method, projection kind, seed, dims, ...),
            JSON values; a store built with another description refuses to be extended.
        model_state: the state dict the features come from (fingerprinted).
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"`` on disk.
        per_token: one row per kept position; the store keeps each row's position
            (column ``"positions"``) and each example's number of rows (``"counts"``,
            whence :meth:`FeatureStore.token_offsets`).
        batch_size: examples per ``featurize`` call, from each chunk's start.
        chunk_rows: examples written and recorded at a time (a multiple of ``batch_size``).
        rank, world: this writer and the number of writers (each writes its own shard
            of whole chunks; under ``torch.distributed`` pass its rank and world size).
        timings: a dict to receive this writer's seconds spent fingerprinting
            (``"fingerprints"``) and featurising and writing its rows (``"rows"``, with
            ``"rows_written"``, the examples this call computed).

    Returns:
        The opened store once every writer's shard is complete, else None: under
        ``torch.distributed`` every rank returns it (after all have finished); writers run
        one after another get it from the call that finds every shard done.

    Raises:
        ValueError / TypeError: bad arguments, before anything is computed.
        StoreMismatch: ``path`` holds a store of another model, data, dtype,
            description, chunking or number of writers.
    """
    path = Path(path)
    layout = _checked_layout(width, layout, dtype)
    for name, value in (("batch_size", batch_size), ("chunk_rows", chunk_rows), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if chunk_rows % batch_size:
        raise ValueError(f"chunk_rows: expected a multiple of batch_size={batch_size}, got {chunk_rows}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank: expected an integer in [0, {world}), got {rank!r}")
    if not isinstance(per_token, bool):
        raise TypeError(f"per_token: expected a bool, got {type(per_token).__name__}")
    if not callable(featurize):
        raise TypeError("featurize: expected a function batch -> (B, width) tensor")
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset: expected a map-style dataset (len and indexing), got {type(dataset).__name__}")
    n = len(dataset)
    chunks = _chunk_ranges(n, chunk_rows)
    clock = time.perf_counter()
    wanted = {
        "format": FORMAT, "examples": n, "width": width, "dtype": dtype, "layout": layout,
        "description": dict(description), "model": fingerprint_state(model_state),
        "data": fingerprint_data(dataset), "chunk_rows": chunk_rows, "batch_size": batch_size, "world": world,
        "per_token": per_token, "columns": dict(_TOKEN_COLUMNS) if per_token else {},
        "version": _library_version(), "device": torch.device(device if device is not None else "cpu").type,
    }
    wanted = json.loads(json.dumps(wanted))  # as it reads back from the manifest (tuples become lists)
    fingerprinted = time.perf_counter() - clock
    path.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _start(path, wanted)
    _barrier(world)  # every writer sees the manifest rank 0 checked or wrote
    if rank != 0:
        if not (path / MANIFEST).exists():
            raise ValueError(f"rank: writer 0 creates the store's manifest; start it before rank {rank} (under "
                             "torch.distributed the writers wait for it)")
        _check_agrees(path, _read_json(path / MANIFEST), wanted)
    lo, hi = _slices(len(chunks), world)[rank]
    clock = time.perf_counter()
    with _writer_lock(path, rank):
        written = _write_shard(path, rank, chunks[lo:hi], featurize, dataset, wanted, device, show_progress)
    if timings is not None:
        timings.update(fingerprints=fingerprinted, rows=time.perf_counter() - clock, rows_written=written)
    if not _distributed(world):  # writers run one after another: whichever sees every shard done finishes
        return _finish(path, wanted, chunks)
    _barrier(world)
    finished = _finish(path, wanted, chunks) if rank == 0 else None
    _barrier(world)  # the final manifest is written before any rank opens the store
    return finished if rank == 0 else FeatureStore.open(path, verify=False)


def _start(path: Path, wanted: dict) -> None:
    """Writer 0's first step: check an existing manifest agrees (marking it unfinished if a shard is to be
    written again), or start a new store, removing shards and ledgers a store without a manifest left."""
    if (path / MANIFEST).exists():
        existing = _read_json(path / MANIFEST)
        _check_agrees(path, existing, wanted)
        if existing.get("complete") and not all(_ledger_finished(path, r) for r in range(wanted["world"])):
            _write_json_atomic(path / MANIFEST, {**existing, "complete": False})  # before any shard is touched
        return
    for stale in sorted(path.glob("part-*")):  # of a build whose manifest was removed: not this build's rows
        stale.unlink()
    _write_json_atomic(path / MANIFEST, {**wanted, "complete": False, "shards": []})


def _ledger_finished(path: Path, rank: int) -> bool:
    ledger = path / _ledger_name(rank)
    return ledger.exists() and bool(_read_json(ledger).get("sha256"))


def _distributed(world: int) -> bool:
    return world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _writer_lock(path: Path, rank: int) -> Iterator[None]:
    """Hold writer ``rank``'s lock on the store: a second build of the same shard refuses instead of
    interleaving its writes (an advisory ``flock``, released when the process ends, also by a kill)."""
    import fcntl

    with open(path / f".lock-{_shard_name(rank)[:-4]}", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise StoreMismatch(f"store {path}: another process is writing shard {_shard_name(rank)}") from error
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# a per-token store's columns: each row's position in its sequence, each example's number of rows
_TOKEN_COLUMNS = {"positions": "int32", "counts": "int64"}


def _barrier(world: int) -> None:
    """Wait for the other writers when they run under ``torch.distributed``."""
    if _distributed(world):
        torch.distributed.barrier()


def _featurized(featurize: Callable[[Any], Any], batch: Any, wanted: dict) -> Tuple[Tensor, Dict[str, Tensor]]:
    """One batch's feature rows and, for a per-token store, its columns, checked against the manifest."""
    with torch.no_grad():
        out = featurize(batch)
    examples = examples_in(batch)
    if wanted["per_token"]:
        if not isinstance(out, TokenRows):
            raise TypeError(f"featurize: a per-token store needs a TokenRows (rows, counts, positions), got "
                            f"{type(out).__name__}")
        rows, counts, positions = out
        if counts.shape != (examples,) or positions.shape != (len(rows),) or int(counts.sum()) != len(rows):
            raise ValueError(f"featurize: TokenRows of {examples} examples need counts ({examples},) adding up to "
                             f"the rows ({len(rows)}) and positions ({len(rows)},); got counts "
                             f"{tuple(counts.shape)} (sum {int(counts.sum())}), positions {tuple(positions.shape)}")
        columns = {"positions": positions, "counts": counts}
    else:
        rows, columns = out, {}
        if isinstance(rows, Tensor) and rows.dim() == 2 and len(rows) != examples:
            raise ValueError(f"featurize: returned {len(rows)} rows for a batch of {examples} examples")
    if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[1] != wanted["width"]:
        raise ValueError(f"featurize: expected a (B, {wanted['width']}) tensor, got "
                         f"{tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__}")
    return rows, columns


def _as_stored(rows: Tensor, dtype: str, *, batch_start: int = 0, what: str = "featurize") -> np.ndarray:
    """Feature rows as the store's on-disk array (bfloat16 as its bit patterns); rows that are not finite in
    ``dtype`` (NaN, or beyond float16's range) are refused, naming the first (``what`` made them; the batch's first
    row is row ``batch_start`` of the store)."""
    values = rows.detach().to("cpu", STORE_DTYPES[dtype][0])
    bad = ~torch.isfinite(values).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        overflow = bool(torch.isfinite(rows[first]).all())
        raise ValueError(f"{what}: row {first} of the batch from example {batch_start} is not finite in {dtype}"
                         + (f" (its largest magnitude {float(rows[first].abs().max()):.3g} overflows {dtype}: use "
                            "float32 or bfloat16)" if overflow else " (NaN or Inf features)"))
    return (values.view(torch.uint16) if dtype == "bfloat16" else values).numpy()


def _write_shard(path: Path, rank: int, mine: List[Tuple[int, int]], featurize: Callable[[Any], Any], dataset: Any,
                 wanted: dict, device: Optional[str], show_progress: bool) -> int:
    """Compute and record this writer's chunks not yet in its ledger; returns the examples it computed.

    The shard and its columns are appended chunk by chunk, in order. A chunk's bytes
    are synced to disk before the ledger records it (an atomic rename). A resumed call
    checks the recorded chunks' bytes against their checksums, cuts the files back to
    the last chunk that matches and continues from there; a ledger of another build
    (another identity) is discarded with its files.
    """
    from torch.utils.data import DataLoader, Subset

    name = _shard_name(rank)
    column_files = {c: _column_file(name, c) for c in wanted["columns"]}
    names = [name, *column_files.values()]
    widths = {name: wanted["width"], **{f: None for f in column_files.values()}}
    dtypes = {name: STORE_DTYPES[wanted["dtype"]][1], **{f: wanted["columns"][c] for c, f in column_files.items()}}
    ledger_path = path / _ledger_name(rank)
    identity = hashlib.sha256(json.dumps([wanted.get(f) for f in (*_IDENTITY, "world")]).encode()).hexdigest()
    ledger: Dict[str, Any] = _read_json(ledger_path) if ledger_path.exists() else {}
    if ledger.get("identity") != identity:  # none, or another build's: start this shard again
        ledger = {"identity": identity, "chunks": []}
        for f in names:
            if (path / f).exists():
                (path / f).unlink()  # a new file, not truncated in place: readers of the old one keep it
    done = ledger["chunks"]  # [first example, {file: rows}, {file: SHA-256 of the chunk's bytes}] per chunk
    if [c[0] for c in done] != [a for a, _ in mine[: len(done)]]:
        raise StoreCorrupted(f"store {path}: ledger {ledger_path.name} records chunks {[c[0] for c in done][:8]}, "
                             f"which are not the first of this writer's chunks {[a for a, _ in mine][:8]}")
    intact = _intact_chunks(path, done, names, dtypes, widths)
    if intact < len(done) and ledger.get("sha256"):  # a finished shard is repaired: the store is unfinished first
        manifest = _read_json(path / MANIFEST)
        if manifest.get("complete"):
            _write_json_atomic(path / MANIFEST, {**manifest, "complete": False})
    if intact < len(done) or (not mine[len(done):] and not ledger.get("sha256")):
        del done[intact:]
        ledger.pop("sha256", None)
    todo = mine[len(done):]
    if not todo and ledger.get("sha256"):
        return 0  # this writer's shard is finished
    kept = {f: sum(c[1][f] for c in done) for f in names}
    files = {f: _Appended(path / f, dtypes[f], widths[f], kept[f]) for f in names}
    try:
        for a, b in todo:
            loader = DataLoader(Subset(dataset, range(a, b)), batch_size=wanted["batch_size"], shuffle=False)
            counts = {f: 0 for f in names}
            digests = {f: hashlib.sha256() for f in names}
            for batch in batches(loader, device, desc=f"store examples {a}-{b}", show_progress=show_progress):
                rows, columns = _featurized(featurize, batch, wanted)
                values = {name: _as_stored(rows, wanted["dtype"], batch_start=a),
                          **{column_files[c]: v.detach().cpu().numpy() for c, v in columns.items()}}
                for f, array in values.items():
                    array = np.ascontiguousarray(array, dtype=dtypes[f])
                    digests[f].update(array.tobytes())
                    files[f].append(array)
                    counts[f] += len(array)
            for f in files.values():
                f.sync()
            done.append([a, counts, {f: d.hexdigest() for f, d in digests.items()}])
            _write_json_atomic(ledger_path, ledger)
        ledger["sha256"] = {f: appended.finish() for f, appended in files.items()}
        _write_json_atomic(ledger_path, ledger)
    finally:
        for appended in files.values():
            appended.close()
    return sum(b - a for a, b in todo)


def _intact_chunks(path: Path, done: list, names: List[str], dtypes: dict, widths: dict) -> int:
    """How many of the recorded chunks, from the first, still hold the bytes their ledger entries hash to."""
    offsets = {f: HEADER_BYTES for f in names}
    handles = {f: open(path / f, "rb") if (path / f).exists() else None for f in names}
    try:
        for i, (_, counts, digests) in enumerate(done):
            for f in names:
                size = counts[f] * np.dtype(dtypes[f]).itemsize * (widths[f] or 1)
                if handles[f] is None:
                    return i
                handles[f].seek(offsets[f])
                data = handles[f].read(size)
                if len(data) != size or hashlib.sha256(data).hexdigest() != digests[f]:
                    return i
                offsets[f] += size
        return len(done)
    finally:
        for handle in handles.values():
            if handle is not None:
                handle.close()


def _finish(path: Path, wanted: dict, chunks: List[Tuple[int, int]]) -> Optional[FeatureStore]:
    """Once every shard's ledger is complete: write the final manifest and open the store (else None)."""
    shards, row = [], 0
    for r, (lo, hi) in enumerate(_slices(len(chunks), wanted["world"])):
        ledger_path = path / _ledger_name(r)
        ledger = _read_json(ledger_path) if ledger_path.exists() else {"chunks": []}
        mine = chunks[lo:hi]
        if not ledger.get("sha256") or len(ledger["chunks"]) != len(mine):
            return None  # another writer has not finished: its call finishes the store
        name = _shard_name(r)
        rows = {f: sum(c[1][f] for c in ledger["chunks"]) for f in ledger["sha256"]}
        columns = {c: {"file": _column_file(name, c), "rows": rows[_column_file(name, c)],
                       "sha256": ledger["sha256"][_column_file(name, c)]} for c in wanted["columns"]}
        first = mine[0][0] if mine else wanted["examples"]
        shards.append({"file": name, "start": row, "rows": rows[name], "example_start": first,
                       "examples": sum(b - a for a, b in mine), "sha256": ledger["sha256"][name], "columns": columns})
        row += rows[name]
    _write_json_atomic(path / MANIFEST, {**wanted, "rows": row, "complete": True, "shards": shards})
    return FeatureStore.open(path, verify=False)


class StoreWriter:
    """A store whose rows arrive one block at a time, their number not known ahead: one shard, appended to.

    For rows recorded as they are made (:class:`attrib_torch.GradientRecorder` writes
    a training run's per-example gradients with it), not featurised from a dataset:
    the manifest's ``examples`` and ``data`` are None, and each row's per-row
    ``columns`` (e.g. its dataset index, training step, learning rate) are kept beside
    it. Not resumable: a process killed before :meth:`close` leaves a store that opens
    as unfinished.

    Args:
        path: a directory without a store.
        width, description, layout, dtype: as :func:`build_store`'s.
        columns: ``{name: NumPy dtype name}`` of the per-row columns :meth:`append` takes.
    """

    def __init__(self, path: Union[str, os.PathLike], *, width: int, description: Mapping[str, Any],
                 layout: Optional[Sequence[Tuple[str, int]]] = None, dtype: str = "float32",
                 columns: Optional[Mapping[str, str]] = None) -> None:
        self.path = Path(path)
        layout = _checked_layout(width, layout, dtype)
        columns = {str(c): np.dtype(d).name for c, d in (columns or {}).items()}
        if (self.path / MANIFEST).exists() or (self.path.exists() and any(self.path.glob("part-*"))):
            raise StoreMismatch(f"store {self.path}: already holds a store; record into a new directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._wanted = json.loads(json.dumps({
            "format": FORMAT, "examples": None, "width": width, "dtype": dtype, "layout": layout,
            "description": dict(description), "data": None, "chunk_rows": None, "batch_size": None, "world": 1,
            "per_token": False, "columns": columns, "version": _library_version(), "device": None}))
        _write_json_atomic(self.path / MANIFEST, {**self._wanted, "model": None, "complete": False, "shards": []})
        name = _shard_name(0)
        self._files = {name: _Appended(self.path / name, STORE_DTYPES[dtype][1], width, 0)}
        self._files.update({c: _Appended(self.path / _column_file(name, c), d, None, 0) for c, d in columns.items()})
        self._closed = False

    @property
    def rows(self) -> int:
        return self._files[_shard_name(0)].rows

    def append(self, rows: Tensor, **columns: Tensor) -> None:
        """Append ``rows`` ``(n, width)`` and, for each column, its ``(n,)`` values."""
        if self._closed:
            raise ValueError(f"store {self.path}: closed; record into a new directory")
        width = self._wanted["width"]
        if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[1] != width:
            raise ValueError(f"rows: expected a (n, {width}) tensor, got "
                             f"{tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__}")
        if set(columns) != set(self._wanted["columns"]):
            raise ValueError(f"columns: expected {sorted(self._wanted['columns'])}, got {sorted(columns)}")
        for c, values in columns.items():
            if tuple(torch.as_tensor(values).shape) != (len(rows),):
                raise ValueError(f"{c}: expected ({len(rows)},) values, one per row, got "
                                 f"{tuple(torch.as_tensor(values).shape)}")
        self._files[_shard_name(0)].append(_as_stored(rows, self._wanted["dtype"], batch_start=self.rows,
                                                      what="rows"))
        for c, values in columns.items():
            self._files[c].append(torch.as_tensor(values).detach().cpu().numpy())

    def close(self, model_state: Mapping[str, Tensor], *, device: Optional[str] = None) -> FeatureStore:
        """Finish the files, record the model state the rows belong with (fingerprinted) and open the store."""
        if self._closed:
            raise ValueError(f"store {self.path}: already closed")
        self._closed = True
        name = _shard_name(0)
        digests = {c: f.finish() for c, f in self._files.items()}
        rows = self._files[name].rows
        columns = {c: {"file": _column_file(name, c), "rows": rows, "sha256": digests[c]}
                   for c in self._wanted["columns"]}
        shard = {"file": name, "start": 0, "rows": rows, "example_start": 0, "examples": rows,
                 "sha256": digests[name], "columns": columns}
        _write_json_atomic(self.path / MANIFEST, {
            **self._wanted, "model": fingerprint_state(model_state), "rows": rows, "complete": True,
            "device": None if device is None else torch.device(device).type, "shards": [shard]})
        return FeatureStore.open(self.path, verify=False)

    def abandon(self) -> None:
        """Close the files without finishing the store (it stays unfinished on disk)."""
        if not self._closed:
            self._closed = True
            for f in self._files.values():
                f.close()
