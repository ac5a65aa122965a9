"""The safetensors format, both ways: the header (parsed and checked once per file), tensor reads, the directory
index, the dtype table, and streamed writing with shard planning.

A safetensors file is an 8-byte little-endian header length, a JSON header (`{key: {dtype, shape,
data_offsets}}` plus `__metadata__`, padded with spaces to a multiple of 8) and the raw tensor bytes.

Reading: `list_tensors(directory)` parses the header of every file of a single-file or sharded checkpoint and
checks it against the file (length field, JSON, dtypes, shapes, offsets inside the data section and not
overlapping) before anything else happens; `read(info)` then reads one tensor with one `np.fromfile` at its
offset (no memory map left resident), so reading a tensor costs exactly its size in host memory. A sharded
checkpoint's index may only name files inside its directory.

Writing: all shapes and dtypes are known before any weight is read, so the header is written first and each
tensor's bytes are appended as it is produced: only one tensor is ever in memory. Sharding follows
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
from typing import NamedTuple

import ml_dtypes
import numpy as np

from llama4_jax.io.validate import CheckpointError, Stored

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# The dtype table: safetensors name <-> numpy dtype.
DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
          "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
          "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "U8": np.dtype(np.uint8)}
NAMES = {dt: name for name, dt in DTYPES.items()}
FLOAT_NAMES = ("F32", "BF16", "F16")  # what plain (unquantised) checkpoints hold
FP8_NAME = "F8_E4M3"
MAX_HEADER = 100 << 20  # larger headers are refused (the release's are ~100 KB)


# --------------------------------------------------------------------------------------------------
# Reading


class TensorInfo(NamedTuple):
  """One tensor of a file, as its header describes it."""

  file: str
  shape: tuple[int, ...]
  dtype: str  # safetensors name
  offset: int  # absolute byte offset of its data in the file
  nbytes: int

  def stored(self) -> Stored:
    return Stored(self.file, self.shape, self.dtype)


_headers: dict[tuple, dict[str, TensorInfo]] = {}


def read_header(path: str) -> dict[str, TensorInfo]:
  """Every tensor of one file, its header checked against the file; cached per file version."""
  try:
    st = os.stat(path)
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
  key = (path, st.st_mtime_ns, st.st_size)
  if key not in _headers:
    _headers[key] = _parse_header(path, st.st_size)
  return _headers[key]


def _parse_header(path: str, size: int) -> dict[str, TensorInfo]:
  def bad(msg):
    return CheckpointError(f"{path}: unreadable safetensors file ({msg})")

  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise bad(f"{size} bytes: shorter than the 8-byte header length")
    n = int.from_bytes(raw, "little")
    if n > min(size - 8, MAX_HEADER):
      raise bad(f"header length field says {n} bytes, the file has {size - 8} after it")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise bad(f"header is not JSON: {e}") from None
  if not isinstance(header, dict):
    raise bad("header is not a JSON object")
  data_start, data_size = 8 + n, size - 8 - n
  out: dict[str, TensorInfo] = {}
  for k, v in header.items():
    if k == "__metadata__":
      continue
    try:
      dtype, shape, (start, end) = v["dtype"], tuple(v["shape"]), v["data_offsets"]
      ok = (dtype in DTYPES and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(start, int) and isinstance(end, int))
    except (TypeError, KeyError, ValueError):
      ok = False
    if not ok:
      raise bad(f"key {k!r}: malformed entry {v!r}" if not isinstance(v, dict) or v.get("dtype") in DTYPES else
                f"key {k!r}: dtype {v.get('dtype')!r} not supported (supported: {', '.join(DTYPES)})")
    want = math.prod(shape) * DTYPES[dtype].itemsize
    if not 0 <= start <= end or end - start != want:
      raise bad(f"key {k!r}: data_offsets {[start, end]} do not hold {dtype}{list(shape)} ({want} bytes)")
    if end > data_size:
      raise CheckpointError(f"{path}: truncated (or data_offsets past the end): key {k!r} ends at byte "
                            f"{data_start + end}, the file has {size}")
    out[k] = TensorInfo(path, shape, dtype, data_start + start, want)
  spans = sorted((t.offset, t.offset + t.nbytes, k) for k, t in out.items() if t.nbytes)
  for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
    if start < end:
      raise bad(f"keys {a!r} and {b!r} overlap")
  return out


def _hub_blobs(directory: str) -> str | None:
  """The `blobs/` folder of a HF hub cache repo when `directory` (resolved) is one of its snapshots
  (`models--org--name/snapshots/<revision>/`), else None."""
  snapshots, _ = os.path.split(directory)
  repo, base = os.path.split(snapshots)
  return os.path.join(repo, "blobs") if base == "snapshots" else None


def _within(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def inside(directory: str, name: str, listed_in: str | None = None) -> str:
  """The path of `name` (a file of a checkpoint directory, e.g. an index entry), refused with CheckpointError
  when it would read outside `directory`: an absolute name, a `..` part, or a symlink whose target lies
  outside it. The one allowed exception is the HF hub cache layout, where the files of
  `snapshots/<revision>/` are symlinks into the same repo's `blobs/`."""
  where = os.path.join(directory, listed_in) if listed_in else os.path.join(directory, name)
  parts = name.replace("\\", "/").split("/")
  if os.path.isabs(name) or ".." in parts:
    raise CheckpointError(f"{where}: file {name!r} lies outside the checkpoint directory (refused)")
  path = os.path.join(directory, name)
  root = os.path.realpath(directory)
  target = os.path.realpath(path)
  if not _within(target, root):
    blobs = _hub_blobs(root)
    if blobs is None or not _within(target, blobs):
      raise CheckpointError(f"{path}: a symlink to {target}, outside the checkpoint directory {root} (refused; only "
                            "the HF hub cache layout, snapshots/<revision>/ -> the repo's blobs/, may link out)")
  return path


def list_tensors(directory: str) -> dict[str, TensorInfo]:
  """Every tensor of a single-file or sharded checkpoint directory, every file's header checked."""
  directory = os.fspath(directory)
  index = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
      if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError("keys and file names must be strings")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
  elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
    weight_map, files = None, [SINGLE_FILE]
  else:
    raise CheckpointError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
  out: dict[str, TensorInfo] = {}
  for name in files:
    path = inside(directory, name, INDEX_FILE if weight_map is not None else None)
    if not os.path.exists(path):
      raise CheckpointError(f"{path}: shard named in {INDEX_FILE} is missing")
    for key, info in read_header(path).items():
      if key in out:
        raise CheckpointError(f"{path}: key {key!r} is also in {out[key].file}")
      out[key] = info
  if weight_map is not None:
    for key, name in weight_map.items():
      if key not in out:
        raise CheckpointError(f"{os.path.join(directory, name)}: key {key!r} listed in {INDEX_FILE} is not in it")
  return out


def read(info: TensorInfo, key: str) -> np.ndarray:
  """One tensor, read straight from its file into a fresh array."""
  count = math.prod(info.shape)
  try:
    x = np.fromfile(info.file, dtype=DTYPES[info.dtype], count=count, offset=info.offset)
  except OSError as e:
    raise CheckpointError(f"{info.file}: reading key {key!r} failed ({e})") from None
  if x.size != count:
    raise CheckpointError(f"{info.file}: truncated while reading key {key!r} ({x.size} of {count} elements)")
  return x.reshape(info.shape)


# --------------------------------------------------------------------------------------------------
# Writing


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
      if s.dtype not in NAMES:
        raise ValueError(f"{path}: key {s.key!r}: dtype {s.dtype} has no safetensors name")
      header[s.key] = {"dtype": NAMES[s.dtype], "shape": list(s.shape),
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
