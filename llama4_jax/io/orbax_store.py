"""The parameter checkpoint as Orbax lays it out on disk, written and read slice by slice with tensorstore.

This is the one module that knows Orbax's internals (its tensorstore specs from a private module, the
`_METADATA` tree file and `_CHECKPOINT_METADATA` written by hand); `tests/test_orbax_store.py` compares them
with what Orbax itself writes and reads, so an Orbax upgrade that changes the format fails there, loudly.

`ParamWriter` writes the exact `params/` layout `ocp.StandardCheckpointer` writes (OCDBT key-value store,
zarr arrays, the metadata files), one slice of a stacked leaf at a time, so a converter never holds a whole
stacked leaf; `ParamReader` reads leaves or slices back from any such checkpoint (converted or training).
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import time
from typing import Any, Iterable

import numpy as np
import tensorstore as ts
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from llama4_jax.io.validate import CheckpointError, Stored

METADATA = "_METADATA"
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
STANDARD_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"


def is_params_dir(directory: str | os.PathLike) -> bool:
  """Whether `directory` is an Orbax parameter checkpoint (it has the metadata tree file)."""
  return os.path.isfile(os.path.join(os.fspath(directory), METADATA))


def leaf_name(path: Iterable) -> str:
  """Orbax's name of a leaf: its keys joined by dots."""
  return ".".join(str(k) for k in path)


class ParamWriter:
  """Writes a parameter checkpoint in Orbax's own layout, slice by slice.

  `create(path, shape, dtype, stacked)` declares a leaf; `write(path, value, index)` writes the whole leaf
  (`index=None`) or its block `index` along axis 0. Chunks (`chunk_shape`) are at most `chunk_bytes`, one
  block of a stacked leaf or less, split along the leading axes; `write` hands the value (any strides: a
  transposed view costs no copy) to tensorstore one chunk at a time, at most `in_flight` chunks at once,
  so tensorstore's buffers stay bounded whatever the tensor's size. `finish()` checks that every leaf
  and block was written exactly once and writes the metadata files Orbax reads (`_METADATA`,
  `_CHECKPOINT_METADATA`). Files are fsynced once, in `finish`, not per write."""

  def __init__(self, directory: str, compress: bool = True, chunk_bytes: int = 8 << 20, in_flight: int = 2):
    self.directory = os.path.abspath(directory)
    os.makedirs(self.directory, exist_ok=False)
    self._compress, self._chunk_bytes, self._in_flight = compress, chunk_bytes, in_flight
    self._ctx = _context(sync=False)  # no fsync per write (it dominates small writes); `finish` fsyncs once
    self._leaves: dict[tuple, dict] = {}
    self._t0 = time.time_ns()

  def create(self, path: tuple, shape: tuple[int, ...], dtype, stacked: bool = False) -> None:
    shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
    write_shape = (1,) + shape[1:] if stacked else shape
    spec = ts_utils.ArrayWriteSpec(self.directory, leaf_name(path), global_shape=shape, write_shape=write_shape,
                                   dtype=dtype, use_ocdbt=True, use_compression=self._compress)
    chunks = chunk_shape(shape, dtype.itemsize, stacked, self._chunk_bytes)
    spec.json["metadata"]["chunks"] = list(chunks)
    arr = ts.open(spec.json, create=True, open=True, context=self._ctx).result()
    self._leaves[tuple(path)] = {"array": arr, "shape": shape, "dtype": dtype, "stacked": stacked,
                                 "write_shape": write_shape, "chunks": chunks, "written": set()}

  def write(self, path: tuple, value: np.ndarray, index: int | None = None) -> None:
    leaf = self._leaves[tuple(path)]
    want = leaf["shape"][1:] if index is not None else leaf["shape"]
    if tuple(value.shape) != want or np.dtype(value.dtype) != leaf["dtype"]:
      raise ValueError(f"{leaf_name(path)}[{index}]: got {value.dtype}{list(value.shape)}, "
                       f"expected {leaf['dtype']}{list(want)}")
    key = None if index is None else int(index)
    if key in leaf["written"]:
      raise ValueError(f"{leaf_name(path)}[{index}] written twice")
    target = leaf["array"] if index is None else leaf["array"][key]
    chunks = leaf["chunks"] if index is None else leaf["chunks"][1:]
    pending: collections.deque = collections.deque()
    for piece in _pieces(want, chunks):
      if len(pending) >= self._in_flight:
        pending.popleft().result()
      pending.append(target[piece].write(np.ascontiguousarray(value[piece])))
    while pending:
      pending.popleft().result()
    leaf["written"].add(key)

  def finish(self) -> None:
    for path, leaf in self._leaves.items():
      want = set(range(leaf["shape"][0])) if leaf["stacked"] else {None}
      if leaf["written"] != want:
        missing = sorted(want - leaf["written"], key=str)
        raise ValueError(f"{leaf_name(path)}: slices {missing} never written")
    tree = {}
    for path, leaf in self._leaves.items():
      keys = [str(k) for k in path]
      tree[str(tuple(keys))] = {
          "key_metadata": [{"key": k, "key_type": 2} for k in keys],
          "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                             "write_shape": list(leaf["write_shape"])}}
    _write_json(os.path.join(self.directory, METADATA),
                {"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
                 "store_array_data_equal_to_fill_value": True, "custom_metadata": None})
    _write_json(os.path.join(self.directory, CHECKPOINT_METADATA),
                {"item_handlers": STANDARD_HANDLER, "metrics": {}, "performance_metrics": {},
                 "init_timestamp_nsecs": self._t0, "commit_timestamp_nsecs": time.time_ns(),
                 "custom_metadata": {}})
    self._leaves.clear()
    _fsync_tree(self.directory)


def _context(sync: bool = True) -> ts.Context:
  """Orbax's tensorstore context with a small OCDBT cache (Orbax's 100 MB would count against the
  streaming memory bound; B-tree nodes are all it needs to hold here) and no chunk cache (an open array
  would otherwise keep every chunk it has read or written)."""
  spec = ts_utils.get_ts_context(use_ocdbt=True).spec.to_json()
  spec["cache_pool#ocdbt"] = {"total_bytes_limit": 16 << 20}
  spec["cache_pool"] = {"total_bytes_limit": 0}
  if not sync:
    spec["file_io_sync"] = False
  return ts.Context(spec)


def chunk_shape(shape: tuple[int, ...], itemsize: int, stacked: bool, target_bytes: int) -> tuple[int, ...]:
  """Storage chunk of a leaf: one block of a stacked leaf (or the whole leaf), cut along its leading axes
  until it holds at most `target_bytes` (never below one row of the innermost axis)."""
  chunk = list(shape)
  start = 0
  if stacked:
    chunk[0], start = 1, 1
  for i in range(start, len(shape)):
    inner = math.prod(shape[i + 1:]) * itemsize
    if inner * shape[i] <= target_bytes:
      break
    chunk[i] = max(1, min(shape[i], target_bytes // max(inner, 1)))
    if inner <= target_bytes:
      break
  return tuple(max(1, c) for c in chunk)


def _pieces(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Iterable[tuple[slice, ...]]:
  """Index tuples of the chunk-aligned pieces of an array: the chunk grid over the leading axes that are
  cut (every later axis is whole, so each piece is exactly one chunk)."""
  cut = [i for i in range(len(shape)) if chunks[i] < shape[i]]
  if not cut:
    yield tuple(slice(None) for _ in shape)
    return
  last = cut[-1]
  for starts in itertools.product(*(range(0, shape[i], chunks[i]) for i in range(last + 1))):
    yield tuple(slice(s, min(s + chunks[i], shape[i])) for i, s in enumerate(starts))


def _fsync_tree(directory: str) -> None:
  """Flushes every file and directory under `directory` to disk."""
  for root, _, files in os.walk(directory):
    for name in files:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    fd = os.open(root, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f)
    f.flush()
    os.fsync(f.fileno())


class ParamReader:
  """Reads leaves, or blocks of stacked leaves, of an Orbax parameter checkpoint (any written by
  `ParamWriter`, `save_params` or a `Checkpointer` step's `params`) without restoring the whole tree."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = os.path.abspath(os.fspath(directory))
    if not is_params_dir(self.directory):
      raise CheckpointError(f"{self.directory}: not an Orbax parameter checkpoint ({METADATA} not found)")
    try:
      with open(os.path.join(self.directory, METADATA)) as f:
        md = json.load(f)
      entries = list(md["tree_metadata"].values())
    except (OSError, ValueError, KeyError, AttributeError) as e:
      raise CheckpointError(f"{self.directory}/{METADATA}: unreadable ({type(e).__name__}: {e})") from None
    self._zarr3 = bool(md.get("use_zarr3", False))
    self._ocdbt = os.path.exists(os.path.join(self.directory, "manifest.ocdbt"))
    self._ctx = _context()
    self.paths: dict[tuple, str] = {}
    for entry in entries:
      keys = tuple(k["key"] for k in entry["key_metadata"])
      self.paths[keys] = leaf_name(keys)
    self._open: dict[tuple, Any] = {}

  def _array(self, path: tuple):
    keys = tuple(str(k) for k in path)
    if keys not in self.paths:
      raise KeyError(f"{self.directory}: no stored parameter {leaf_name(keys)}")
    if keys not in self._open:
      spec = ts_utils.ArrayReadSpec(self.directory, self.paths[keys], use_zarr3=self._zarr3, use_ocdbt=self._ocdbt)
      try:
        self._open[keys] = ts.open(spec.json, context=self._ctx).result()
      except ValueError as e:  # tensorstore's I/O and format errors
        raise self._unreadable(keys, e) from None
    return self._open[keys]

  def _unreadable(self, keys: tuple, e: Exception) -> CheckpointError:
    reason = str(e).split(" [tensorstore_spec=")[0]
    return CheckpointError(f"{self.directory}: parameter {leaf_name(keys)!r} is unreadable (truncated or corrupt "
                           f"files?): {reason}")

  def has(self, path: tuple) -> bool:
    return tuple(str(k) for k in path) in self.paths

  def shape_dtype(self, path: tuple) -> tuple[tuple[int, ...], np.dtype]:
    arr = self._array(path)
    return tuple(arr.shape), np.dtype(arr.dtype.numpy_dtype)

  def stored(self) -> dict[str, Stored]:
    """{leaf name: (this directory, shape, numpy dtype name)} of every stored leaf (for `validate`)."""
    out = {}
    for keys, name in self.paths.items():
      shape, dtype = self.shape_dtype(keys)
      out[name] = Stored(self.directory, shape, dtype.name)
    return out

  def read(self, path: tuple, index: int | None = None, dtype=None, in_flight: int = 2) -> np.ndarray:
    """The leaf, or its block `index`, optionally converted to `dtype` while reading. Read one storage
    chunk at a time (at most `in_flight` at once) into the result, so tensorstore's decode buffers stay
    a few chunks whatever the size of the leaf."""
    arr = self._array(path)
    chunks = tuple(arr.chunk_layout.read_chunk.shape)
    if dtype is not None and np.dtype(dtype) != np.dtype(arr.dtype.numpy_dtype):
      arr = ts.cast(arr, ts.dtype(np.dtype(dtype).name))
    if index is not None:
      arr, chunks = arr[int(index)], chunks[1:]
    out = np.empty(tuple(arr.shape), arr.dtype.numpy_dtype)
    pending: collections.deque = collections.deque()
    try:
      for piece in _pieces(out.shape, chunks):
        if len(pending) >= in_flight:
          done, fut = pending.popleft()
          out[done] = fut.result()
        pending.append((piece, arr[piece].read()))
      while pending:
        done, fut = pending.popleft()
        out[done] = fut.result()
    except ValueError as e:  # tensorstore's I/O and format errors
      raise self._unreadable(tuple(str(k) for k in path), e) from None
    return out
