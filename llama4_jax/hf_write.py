"""Writing the HF safetensors layout tensor by tensor: shard planning, streamed files, the index.

A safetensors file is an 8-byte little-endian header length, a JSON header (`{key: {dtype, shape,
data_offsets}}` plus `__metadata__`, padded with spaces to a multiple of 8) and the raw tensor bytes. All
shapes and dtypes are known before any weight is read, so the header is written first and each tensor's
bytes are appended as it is produced: only one tensor is ever in memory. Sharding follows
`save_pretrained`: tensors in order, a new shard when the next tensor would push the current one past
`max_shard_size` (a tensor is never split), `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`,
or a single `model.safetensors` when everything fits in one shard.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16",
               np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2",
               np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8"}

_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(size: int | str) -> int:
  """Bytes of "5GB" (decimal units, as transformers), "500MiB" (binary) or an int."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
  if not m or m.group(2).upper() not in _UNITS:
    raise ValueError(f"size {size!r}: expected a number with an optional unit (KB, MB, GB, KiB, MiB, GiB)")
  n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
  if n <= 0:
    raise ValueError(f"size {size!r} must be positive")
  return n


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  key: str
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: list[TensorSpec], max_shard_size: int | str) -> list[tuple[str, list[TensorSpec]]]:
  """[(file name, tensors)] in order, greedy like `save_pretrained`."""
  limit = parse_size(max_shard_size)
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for s in specs:
    if shards[-1] and size + s.nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(s)
    size += s.nbytes
  if len(shards) == 1:
    return [(SINGLE_FILE, shards[0])]
  n = len(shards)
  return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", group) for i, group in enumerate(shards)]


class SafetensorsWriter:
  """One safetensors file written in order: `write(key, array)` for every planned tensor, then `close()`.
  A non-contiguous array (a transposed view) is copied out a few rows at a time, never whole. The file is
  fsynced on close; `close()` refuses a file with tensors missing."""

  def __init__(self, path: str, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
    self.path = path
    self._specs = list(specs)
    self._next = 0
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for s in self._specs:
      if s.dtype not in DTYPE_NAMES:
        raise ValueError(f"{path}: key {s.key!r}: dtype {s.dtype} has no safetensors name")
      header[s.key] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                       "data_offsets": [offset, offset + s.nbytes]}
      offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    self._file = open(path, "wb")
    self._file.write(len(raw).to_bytes(8, "little"))
    self._file.write(raw)

  def write(self, key: str, array: np.ndarray) -> None:
    if self._next >= len(self._specs):
      raise ValueError(f"{self.path}: unexpected extra tensor {key!r}")
    s = self._specs[self._next]
    if key != s.key or tuple(array.shape) != s.shape or np.dtype(array.dtype) != s.dtype:
      raise ValueError(f"{self.path}: expected {s.key!r} {s.dtype}{list(s.shape)}, got {key!r} "
                       f"{array.dtype}{list(array.shape)}")
    if array.flags.c_contiguous or array.ndim == 0:
      self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    else:  # a strided view (e.g. a transpose): copy out ~16 MB of leading rows at a time
      rows = max(1, (16 << 20) // max(1, array[:1].nbytes))
      for i in range(0, array.shape[0], rows):
        self._file.write(np.ascontiguousarray(array[i:i + rows]).reshape(-1).view(np.uint8))
    self._next += 1

  def close(self) -> None:
    if self._next != len(self._specs):
      self.abort()
      raise ValueError(f"{self.path}: only {self._next} of {len(self._specs)} tensors written")
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()

  def abort(self) -> None:
    self._file.close()


def write_index(directory: str, shards: list[tuple[str, list[TensorSpec]]]) -> str | None:
  """model.safetensors.index.json for a sharded checkpoint (None for a single file)."""
  if len(shards) == 1:
    return None
  specs = [s for _, group in shards for s in group]
  index = {"metadata": {"total_parameters": sum(math.prod(s.shape) for s in specs),
                        "total_size": sum(s.nbytes for s in specs)},
           "weight_map": {s.key: name for name, group in shards for s in group}}
  path = os.path.join(directory, INDEX_FILE)
  with open(path, "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
    f.write("\n")
  return path
