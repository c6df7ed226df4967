"""The training store: the pairs' latents and the prompts' text embeddings re-packed once from the
run's Parquet shards into memory-mapped Arrow IPC files (docs/scaling.md, "Host memory").

Parquet cannot read one row without decoding its whole column chunk (a generate shard is one row
group: chunk_size x samples latents), so ``capo train`` writes, on its first run, ``RUN/trainset/``::

    latents.arrow     prompt_id, sample_idx, latent (fixed-size binary, C-order raw bytes)
    embeddings.arrow  prompt_id, one fixed-size binary column per embedding key

uncompressed, so ``pa.memory_map`` + ``pa.ipc.open_file`` read a row as a slice of the mapped file
(no decoding; the pages live in the kernel's page cache, shared by every process and worker).
Only the latents named in pairs.parquet and the embeddings of its prompts are copied, shard by
shard (host memory: one shard). Each file is written to a temporary name and renamed, and records
in its schema metadata a fingerprint of its sources (pairs.parquet's bytes, the shards' names,
sizes and mtimes); a file whose fingerprint differs is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load

from capo.devices import DTYPES
from capo.errors import CapoError
from capo.pipeline.integrity import check_parquet
from capo.pipeline.rundir import RunDir, shard_files

STORE_DIR, LATENTS_FILE, EMBEDDINGS_FILE = "trainset", "latents.arrow", "embeddings.arrow"
#: rows per Arrow record batch written (bounds the memory held while re-packing)
WRITE_ROWS = 64
#: schema metadata keys: the fingerprint of the sources and {column: {shape, dtype}}
SOURCE, TENSORS = b"capo.source", b"capo.tensors"
#: dtype name (as stored) -> torch dtype: the latent dtypes and those an embedding may have
STORE_DTYPES: dict[str, torch.dtype] = {**DTYPES, "int64": torch.int64, "int32": torch.int32,
                                        "bool": torch.bool}


class TensorColumn:
    """One fixed-size binary column of a memory-mapped Arrow IPC file, read as tensors
    [N, *shape] of one dtype; indexing copies the rows out of the mapped pages."""

    def __init__(self, path: Path, column: str, shape: Sequence[int], dtype: str):
        self.path, self.column, self.row_shape, self.dtype = path, column, tuple(shape), dtype
        self._views: list[np.ndarray] | None = None
        self._starts = np.zeros(1, np.int64)

    def __getstate__(self) -> dict:  # a spawned DataLoader worker maps the file again
        return {**self.__dict__, "_views": None}

    def _open(self) -> list[np.ndarray]:
        """Per record batch, a read-only uint8 view [rows, row_bytes] of the mapped file."""
        if self._views is None:
            chunks = pa.ipc.open_file(pa.memory_map(str(self.path))).read_all().column(self.column).chunks
            width = chunks[0].type.byte_width
            self._views = [np.frombuffer(c.buffers()[1], np.uint8, len(c) * width, c.offset * width)
                           .reshape(len(c), width) for c in chunks]
            self._starts = np.cumsum([0] + [len(c) for c in chunks])
        return self._views

    def __len__(self) -> int:
        self._open()
        return int(self._starts[-1])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.row_shape))

    def __getitem__(self, index: int | Sequence[int] | np.ndarray) -> torch.Tensor:
        """Rows ``index`` -> a new tensor [len(index), *shape] (an int: [*shape])."""
        views, rows = self._open(), np.atleast_1d(np.asarray(index, np.int64))
        chunk = np.searchsorted(self._starts, rows, side="right") - 1
        if rows.size and (rows.min() < 0 or rows.max() >= self._starts[-1]):
            raise IndexError(f"row out of range for {len(self)} rows of {self.path}")
        out = np.empty((rows.size, views[0].shape[1]), np.uint8)
        for k, (c, r) in enumerate(zip(chunk, rows, strict=True)):
            out[k] = views[c][r - self._starts[c]]
        dtype = STORE_DTYPES[self.dtype]
        tensor = torch.from_numpy(out).view(dtype).reshape(rows.size, *self.row_shape)
        return tensor[0] if np.ndim(index) == 0 else tensor


def fingerprint(run: RunDir) -> str:
    """sha256 of pairs.parquet's bytes and the (name, size, mtime) of every sample/embedding shard."""
    h = hashlib.sha256(run.pairs_path.read_bytes())
    for directory in (run.samples_dir, run.embeddings_dir):
        for chunk, p in sorted(shard_files(directory).items()):
            st = p.stat()
            h.update(f"{directory.name}/{chunk}/{p.name}/{st.st_size}/{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def open_columns(path: Path, source: str) -> tuple[pa.Table, dict[str, TensorColumn]] | None:
    """(the file's non-tensor columns, its tensor columns) if ``path`` holds a store of ``source``."""
    if not path.is_file():
        return None
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
    except (pa.ArrowInvalid, OSError):
        return None
    meta = reader.schema.metadata or {}
    if meta.get(SOURCE) != source.encode():
        return None
    tensors = json.loads(meta[TENSORS])
    keys = reader.read_all().drop_columns(list(tensors))
    return keys, {c: TensorColumn(path, c, spec["shape"], spec["dtype"]) for c, spec in tensors.items()}


class _AtomicIPCWriter:
    """An Arrow IPC file written under a temporary name, renamed on ``close``; the schema (and its
    tensor metadata) comes from the first rows written."""

    def __init__(self, path: Path, source: str):
        self.path, self.source = path, source
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.writer: pa.ipc.RecordBatchFileWriter | None = None
        self.tensors: dict[str, dict] = {}

    def write(self, columns: dict[str, pa.Array], tensors: dict[str, dict]) -> None:
        batch = pa.record_batch(columns)
        if self.writer is None:
            self.tensors = tensors
            meta = {SOURCE: self.source.encode(), TENSORS: json.dumps(tensors).encode()}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pa.ipc.new_file(str(self.tmp), batch.schema.with_metadata(meta))
        elif tensors != self.tensors:
            raise CapoError(f"rows differ in shape or dtype from the first ({tensors} vs {self.tensors})",
                            path=str(self.path))
        self.writer.write_batch(batch)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            os.replace(self.tmp, self.path)


def key(code: np.ndarray, sample_idx: np.ndarray) -> np.ndarray:
    """(prompt code, sample index) -> one int64 key (negative for code -1)."""
    return (code.astype(np.int64) << 32) | sample_idx.astype(np.int64)


def codes(ids: pa.Array | pa.ChunkedArray, prompt_ids: pa.Array) -> np.ndarray:
    """Position of each id in ``prompt_ids`` (-1 if absent)."""
    return pc.index_in(ids, value_set=prompt_ids).fill_null(-1).to_numpy()


def _fixed_rows(values: torch.Tensor) -> tuple[pa.Array, dict]:
    """[B, ...] tensor -> (a fixed-size binary array of its B rows' raw bytes, {shape, dtype})."""
    dtype = next((k for k, v in STORE_DTYPES.items() if v == values.dtype), None)
    if dtype is None:
        raise CapoError(f"cannot store a tensor of dtype {values.dtype} for training")
    raw = values.detach().cpu().contiguous().reshape(values.shape[0], -1).view(torch.uint8).numpy()
    array = pa.FixedSizeBinaryArray.from_buffers(pa.binary(raw.shape[1]), raw.shape[0],
                                                 [None, pa.py_buffer(raw)])
    return array, {"shape": list(values.shape[1:]), "dtype": dtype}


def _shard_batches(directory: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
    for _, path in sorted(shard_files(directory).items()):
        check_parquet(path)  # a truncated shard is an error naming it
        try:
            yield from pq.ParquetFile(path, page_checksum_verification=True).iter_batches(
                batch_size=WRITE_ROWS, columns=columns)
        except OSError as e:  # a page that fails its CRC
            raise CapoError(f"damaged Parquet file ({str(e)[:120]})", path=str(path)) from None


def build_latents(run: RunDir, path: Path, prompt_ids: pa.Array, wanted: np.ndarray, source: str) -> None:
    """Copy the latents with keys ``wanted`` (sorted ``key`` values) from the samples shards."""
    out, found = _AtomicIPCWriter(path, source), 0
    cols = ["prompt_id", "sample_idx", "latent", "latent_shape", "latent_dtype"]
    for batch in _shard_batches(run.samples_dir, cols):
        keys = key(codes(batch.column("prompt_id"), prompt_ids), batch.column("sample_idx").to_numpy())
        take = np.flatnonzero(np.isin(keys, wanted))
        if not take.size:
            continue
        rows = batch.take(pa.array(take))
        shape, dtype = rows.column("latent_shape")[0].as_py(), rows.column("latent_dtype")[0].as_py()
        raw = rows.column("latent")
        width = int(np.prod(shape)) * torch.tensor([], dtype=DTYPES[dtype]).element_size()
        if set(rows.column("latent_dtype").to_pylist()) != {dtype} or \
                any(s != shape for s in rows.column("latent_shape").to_pylist()) or \
                set(pc.binary_length(raw).to_pylist()) != {width}:
            raise CapoError("latents differ in shape or dtype; cannot stack them for training",
                            path=str(run.samples_dir))
        out.write({"prompt_id": rows.column("prompt_id"), "sample_idx": rows.column("sample_idx"),
                   "latent": raw.cast(pa.binary(width))}, {"latent": {"shape": shape, "dtype": dtype}})
        found += take.size
    _check_found(found, wanted.size, "latent", run.samples_dir)
    out.close()


def build_embeddings(run: RunDir, path: Path, prompt_ids: pa.Array, source: str) -> None:
    """Copy the embeddings of ``prompt_ids`` from the embeddings shards, one column per key."""
    out, first, found = _AtomicIPCWriter(path, source), "", 0
    for batch in _shard_batches(run.embeddings_dir, ["prompt_id", "embeddings"]):
        take = np.flatnonzero(codes(batch.column("prompt_id"), prompt_ids) >= 0)
        if not take.size:
            continue
        rows = batch.take(pa.array(take))
        pids = rows.column("prompt_id").to_pylist()
        blobs = [st_load(b) for b in rows.column("embeddings").to_pylist()]
        first = first or pids[0]
        columns, tensors = {"prompt_id": rows.column("prompt_id")}, {}
        for name in sorted(blobs[0]):  # safetensors blobs need not list their keys in one order
            if any(b.keys() != blobs[0].keys() or b[name].shape != blobs[0][name].shape for b in blobs):
                raise CapoError(f"embeddings of prompt {pids[-1]} differ in keys or shapes from {first}",
                                path=str(run.embeddings_dir))
            columns[name], tensors[name] = _fixed_rows(torch.stack([b[name] for b in blobs]))
        try:
            out.write(columns, tensors)
        except CapoError:
            raise CapoError(f"embeddings of prompt {pids[0]} differ in keys or shapes from {first}",
                            path=str(run.embeddings_dir)) from None
        found += take.size
    _check_found(found, len(prompt_ids), "cached embedding", run.embeddings_dir)
    out.close()


def _check_found(found: int, wanted: int, what: str, directory: Path) -> None:
    if found < wanted:
        raise CapoError(f"{wanted - found} {what}(s) named in pairs.parquet are missing", path=str(directory))
    if found > wanted:
        raise CapoError(f"a {what} appears in more than one shard", path=str(directory))


def load(run: RunDir, prompt_ids: pa.Array, wanted: np.ndarray
         ) -> tuple[np.ndarray, TensorColumn, np.ndarray, dict[str, TensorColumn]]:
    """Open RUN/trainset/ (building what is missing or stale) for the latents with keys ``wanted``
    (sorted ``key`` values over codes into ``prompt_ids``) and the embeddings of ``prompt_ids``.
    Returns (the key of each latent row, latents [M, C, H, W], the embedding row of each prompt,
    embeddings {name: [P', ...]})."""
    source, root = fingerprint(run), run.root / STORE_DIR
    latents = open_columns(root / LATENTS_FILE, source)
    if latents is None:
        build_latents(run, root / LATENTS_FILE, prompt_ids, wanted, source)
        latents = open_columns(root / LATENTS_FILE, source)
    embeddings = open_columns(root / EMBEDDINGS_FILE, source)
    if embeddings is None:
        build_embeddings(run, root / EMBEDDINGS_FILE, prompt_ids, source)
        embeddings = open_columns(root / EMBEDDINGS_FILE, source)
    assert latents is not None and embeddings is not None
    (lat_ids, lat), (emb_ids, emb) = latents, embeddings
    row_keys = key(codes(lat_ids.column("prompt_id"), prompt_ids), lat_ids.column("sample_idx").to_numpy())
    return row_keys, lat["latent"], codes(prompt_ids, emb_ids.column("prompt_id").combine_chunks()), emb
