"""Orbax checkpoints: training state (`Checkpointer`), converted models (`save_params` / `restore_params` /
`load_model`), and streaming slice-by-slice access to stored parameters (`ParamWriter` / `ParamReader`).

Parameters are stored as the *pure dict* of the model state: nested dicts of arrays,
`nnx.to_pure_dict(nnx.state(model, nnx.Param))`. An `nnx.State` passed in is converted to it. Stacked
(scanned) text layers live under integer keys (`text.blocks.layers.{j}`), which Orbax stores as strings.

Restoring: give a *target* with the structure, shapes, dtypes and shardings wanted, e.g.
`abstract_target(nnx.state(abstract(cfg, policy)), shardings, dtype)` (an `nnx.State` of
`jax.ShapeDtypeStruct`s with `sharding=`). Every device then reads only its own slice from storage (nothing
is gathered on one device), onto any mesh, casting to the target dtype. The result has the target's kind:
an `nnx.State` target gives an `nnx.State` (ready for `nnx.merge(graphdef, state)`), a pure dict gives a
pure dict. Without a target everything is restored as saved (shapes, dtypes) on the default device, as a
pure dict with string keys; `nnx.replace_by_pure_dict(state, restored)` accepts it.

On-disk layout of a converted model directory (`save_params`, `tools.convert hf-to-orbax`):
  params/          the Orbax checkpoint of the pure dict (what `ocp.StandardCheckpointer` writes)
  config.json      the HF config (`config.to_hf`), so the architecture travels with the weights
  llama4_jax.json  {"format": 1, "fp8": null | description of stored FP8 leaves (see `hf_read`)}
  assets/          tokenizer / processor / generation-config files of the HF source, copied verbatim
A `Checkpointer` directory holds one subdirectory per step with the items `params`, `opt_state` (Orbax
StandardSave), `data_state` and `meta` (JSON; `meta` always has "step").

`ParamWriter` writes the exact `params/` layout Orbax writes (OCDBT key-value store, zarr arrays, the
`_METADATA` tree file) with tensorstore, one slice of a stacked leaf at a time, so a converter never holds a
whole stacked leaf; `ParamReader` reads slices back from any such checkpoint (converted or training).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import itertools
import json
import math
import os
import shutil
import time
import uuid
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from llama4_jax import config as config_lib

PARAMS = "params"
CONFIG = "config.json"
INFO = "llama4_jax.json"
ASSETS = "assets"
FORMAT_VERSION = 1

_ITEMS = ("params", "opt_state", "data_state", "meta")
_METADATA = "_METADATA"
_CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
_STANDARD_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"


# --------------------------------------------------------------------------------------------------
# Pytree conversions


def _is_nnx(x) -> bool:
  return isinstance(x, (nnx.State, nnx.Variable))


def to_pure(tree: Any) -> Any:
  """`tree` with every `nnx.State` replaced by its pure dict and every `nnx.Variable` by its value."""
  def one(x):
    if isinstance(x, nnx.State):
      return nnx.to_pure_dict(x)
    return x.get_value() if isinstance(x, nnx.Variable) else x
  return jax.tree.map(one, tree, is_leaf=_is_nnx)


def _like(target: Any, restored: Any) -> Any:
  """Puts a pure restored tree back into the kind of `target` (States and Variables rebuilt)."""
  def one(t, r):
    if isinstance(t, nnx.State):
      out = jax.tree.map(lambda v: v, t)  # fresh Variables, the target is left untouched
      nnx.replace_by_pure_dict(out, r)
      return out
    return t.replace(r) if isinstance(t, nnx.Variable) else r
  return jax.tree.map(one, target, restored, is_leaf=_is_nnx)


def _abstract_leaf(x, dtype=None, sharding=None):
  sharding = sharding if sharding is not None else getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=sharding)


def abstract_target(state: Any, shardings: Any = None, dtype: Any = None) -> Any:
  """A restore target from an abstract (or concrete) state: `jax.ShapeDtypeStruct` leaves with the shardings
  of `shardings` (a tree of `jax.sharding.Sharding` with the same structure, e.g.
  `sharding.params.param_shardings`; default: the leaves' own, else the first device) and, if `dtype` is
  given, that dtype for every floating leaf."""
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def leaf(x, sh=None):
    sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
    sh = sh if sh is not None else (getattr(x, "sharding", None) or default)
    dt = dtype if dtype is not None and jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else None
    return _abstract_leaf(x, dt, sh)

  if shardings is None:
    return jax.tree.map(leaf, state)
  return jax.tree.map(leaf, state, shardings)


def _default_target(tree_metadata: Any) -> Any:
  """Restore target "as saved" on the default device, from Orbax's stored metadata tree."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def leaf(m):
    if hasattr(m, "shape") and hasattr(m, "dtype"):
      return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device)
    return m
  return jax.tree.map(leaf, tree_metadata)


def _pure_target(target: Any) -> Any:
  """Pure-dict target of ShapeDtypeStructs; leaves without a sharding go to the default device."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def leaf(x):
    if not hasattr(x, "shape"):
      return x
    return _abstract_leaf(x, sharding=getattr(x, "sharding", None) or device)
  return jax.tree.map(leaf, to_pure(target))


# --------------------------------------------------------------------------------------------------
# Training checkpoints


class Checkpointer:
  """Step checkpoints of a training run (Orbax `CheckpointManager`): parameters, optimizer state, the
  data-iterator state (a JSON-able dict, e.g. grain's `get_state()`) and small JSON metadata.

  Saves are asynchronous by default (`save` returns once arrays are copied off the accelerator; the write
  continues in the background; `wait()` blocks until it is on disk). Only the last `keep` steps are kept
  (`None`: all). A step directory appears only once complete (Orbax writes a temporary directory and renames
  it), so a crash mid-save leaves the previous steps intact; leftovers are removed on the next start."""

  def __init__(self, directory: str | os.PathLike, keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True)
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "data_state": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def save(self, step: int, params: Any, opt_state: Any = None, data_state: dict | None = None,
           meta: dict | None = None, force: bool = False) -> bool:
    """Saves one step; returns whether a save was started (False if the manager's policy skipped it).
    `params`/`opt_state`: pytrees of arrays (an `nnx.State` inside is stored as its pure dict).
    `meta` is stored with "step" added; put `config.to_hf(cfg)` under "config" so that
    `tools.convert orbax-to-hf` can export the step."""
    args = {"params": ocp.args.StandardSave(to_pure(params)),
            "meta": ocp.args.JsonSave({**(meta or {}), "step": int(step)})}
    if opt_state is not None:
      args["opt_state"] = ocp.args.StandardSave(to_pure(opt_state))
    if data_state is not None:
      args["data_state"] = ocp.args.JsonSave(data_state)
    return bool(self._mngr.save(int(step), args=ocp.args.Composite(**args), force=force))

  def restore(self, step: int | None = None, params_target: Any = None, opt_target: Any = None) -> dict:
    """{"step", "params", "opt_state", "data_state", "meta"} of `step` (default: the latest). Targets are
    abstract trees (`abstract_target`) giving shapes, dtypes (cast on read) and shardings; None restores as
    saved on the default device. Items that step does not have come back as None."""
    self.wait()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
    step_dir = os.path.join(self.directory, str(step))
    if step not in self.all_steps():
      raise FileNotFoundError(f"{step_dir}: no checkpoint for step {step} (steps: {self.all_steps()})")
    present = [i for i in _ITEMS if os.path.isdir(os.path.join(step_dir, i))]
    md = self._mngr.item_metadata(step)
    args = {}
    for item, target in (("params", params_target), ("opt_state", opt_target)):
      if item in present:
        tgt = _pure_target(target) if target is not None else _default_target(_tree_of(md[item]))
        args[item] = ocp.args.StandardRestore(tgt)
    for item in ("data_state", "meta"):
      if item in present:
        args[item] = ocp.args.JsonRestore()
    r = self._mngr.restore(step, args=ocp.args.Composite(**args))
    out = {"step": step, "params": None, "opt_state": None, "data_state": None, "meta": None}
    for item in present:
      out[item] = r[item]
    if params_target is not None and out["params"] is not None:
      out["params"] = _like(params_target, out["params"])
    if opt_target is not None and out["opt_state"] is not None:
      out["opt_state"] = _like(opt_target, out["opt_state"])
    return out

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _tree_of(item_metadata: Any) -> Any:
  """The tree of per-leaf metadata inside what Orbax returns for a StandardSave item."""
  return getattr(item_metadata, "tree", item_metadata)


# --------------------------------------------------------------------------------------------------
# Converted models


def write_model_files(directory: str, cfg: config_lib.Llama4Config, fp8: dict | None = None) -> None:
  """config.json and llama4_jax.json of a model directory."""
  config_lib.save_hf(cfg, directory)
  with open(os.path.join(directory, INFO), "w") as f:
    json.dump({"format": FORMAT_VERSION, "fp8": fp8}, f, indent=2)
    f.write("\n")


def read_info(directory: str) -> dict:
  path = os.path.join(directory, INFO)
  if not os.path.exists(path):
    return {"format": FORMAT_VERSION, "fp8": None}
  with open(path) as f:
    return json.load(f)


def save_params(directory: str | os.PathLike, params: Any, cfg: config_lib.Llama4Config | None = None) -> str:
  """Saves parameters (an `nnx.State` or pure dict) as a model directory (`params/`, and with `cfg` the
  config files that `tools.convert orbax-to-hf` and `load_model` need). Written to a temporary sibling and
  renamed: `directory` must not exist yet. Returns the directory."""
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory):
    raise FileExistsError(f"{directory}: already exists")
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  name = f".{os.path.basename(directory)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp = os.path.join(os.path.dirname(directory), name)
  os.mkdir(tmp)
  try:
    with ocp.StandardCheckpointer() as ck:
      ck.save(os.path.join(tmp, PARAMS), to_pure(params))
      ck.wait_until_finished()
    if cfg is not None:
      write_model_files(tmp, cfg, _fp8_record(params))
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def _fp8_record(params: Any) -> dict | None:
  """The `fp8` record of a model whose routed experts are held in FP8 (`Policy.expert_fp8`), else None."""
  from llama4_jax import hf_read  # deferred, as in load_model: hf_read imports the model

  scales = set(hf_read.FP8_LEAVES.values())
  return hf_read.describe("expert_fp8") if any(p[-2:] in scales for p in flat_leaves(params)) else None


def params_dir(directory: str | os.PathLike) -> str:
  """The Orbax params item of a model directory (`DIR/params`) or of a params checkpoint given directly."""
  directory = os.path.abspath(os.fspath(directory))
  sub = os.path.join(directory, PARAMS)
  if os.path.exists(os.path.join(sub, _METADATA)):
    return sub
  if os.path.exists(os.path.join(directory, _METADATA)):
    return directory
  raise FileNotFoundError(f"{directory}: no Orbax parameter checkpoint ({PARAMS}/{_METADATA} not found)")


def restore_params(directory: str | os.PathLike, target: Any = None) -> Any:
  """Parameters of a model directory (see the module docstring for targets and the result's kind)."""
  path = params_dir(directory)
  with ocp.StandardCheckpointer() as ck:
    if target is None:
      return ck.restore(path, _default_target(_tree_of(ck.metadata(path).item_metadata)))
    return _like(target, ck.restore(path, _pure_target(target)))


def load_model(directory: str | os.PathLike, policy: config_lib.Policy | None = None, shardings: Any = None):
  """A ready `Llama4` from a model directory (config.json + params/), placed by `shardings` (a state of
  shardings, e.g. `sharding.params.param_shardings`; default: the first device). `policy` defaults to the
  stored dtype (float32 parity settings for float32). A directory written with `--keep-fp8` loads with its
  routed experts in FP8 as stored (`Policy.expert_fp8` is switched on)."""
  from llama4_jax.llama4 import abstract  # deferred: keeps this module importable without the model

  directory = os.fspath(directory)
  cfg = config_lib.from_hf(os.path.join(directory, CONFIG))
  if policy is None:
    dt = "bfloat16" if cfg.dtype == "float16" else cfg.dtype
    policy = config_lib.Policy(param_dtype=dt, dtype=dt, matmul_precision="highest" if dt == "float32" else "default")
  if read_info(directory).get("fp8"):
    policy = dataclasses.replace(policy, expert_fp8=True)
  graphdef, state = nnx.split(abstract(cfg, policy))
  state = restore_params(directory, abstract_target(state, shardings))
  return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------------------------
# Streaming access to the stored arrays


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
    _write_json(os.path.join(self.directory, _METADATA),
                {"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
                 "store_array_data_equal_to_fill_value": True, "custom_metadata": None})
    _write_json(os.path.join(self.directory, _CHECKPOINT_METADATA),
                {"item_handlers": _STANDARD_HANDLER, "metrics": {}, "performance_metrics": {},
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

  def __init__(self, directory: str):
    self.directory = params_dir(directory)
    with open(os.path.join(self.directory, _METADATA)) as f:
      md = json.load(f)
    self._zarr3 = bool(md.get("use_zarr3", False))
    self._ocdbt = os.path.exists(os.path.join(self.directory, "manifest.ocdbt"))
    self._ctx = _context()
    self.paths: dict[tuple, str] = {}
    for entry in md["tree_metadata"].values():
      keys = tuple(k["key"] for k in entry["key_metadata"])
      self.paths[keys] = leaf_name(keys)
    self._open: dict[tuple, Any] = {}

  def _array(self, path: tuple):
    keys = tuple(str(k) for k in path)
    if keys not in self.paths:
      raise KeyError(f"{self.directory}: no stored parameter {leaf_name(keys)}")
    if keys not in self._open:
      spec = ts_utils.ArrayReadSpec(self.directory, self.paths[keys], use_zarr3=self._zarr3, use_ocdbt=self._ocdbt)
      self._open[keys] = ts.open(spec.json, context=self._ctx).result()
    return self._open[keys]

  def has(self, path: tuple) -> bool:
    return tuple(str(k) for k in path) in self.paths

  def shape_dtype(self, path: tuple) -> tuple[tuple[int, ...], np.dtype]:
    arr = self._array(path)
    return tuple(arr.shape), np.dtype(arr.dtype.numpy_dtype)

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
    for piece in _pieces(out.shape, chunks):
      if len(pending) >= in_flight:
        done, fut = pending.popleft()
        out[done] = fut.result()
      pending.append((piece, arr[piece].read()))
    while pending:
      done, fut = pending.popleft()
      out[done] = fut.result()
    return out


def release_memory() -> None:
  """Returns freed heap memory to the OS (glibc keeps large freed blocks in its per-thread arenas; over a
  conversion of many large tensors that retention, not live data, would dominate the peak RSS)."""
  if _LIBC is not None:
    _LIBC.malloc_trim(0)


def _libc():
  try:
    lib = ctypes.CDLL("libc.so.6")
    lib.malloc_trim  # noqa: B018  (glibc only)
    return lib
  except (OSError, AttributeError):
    return None


_LIBC = _libc()


def nbytes(shape: Iterable[int], dtype) -> int:
  return math.prod(shape) * np.dtype(dtype).itemsize


def as_dtype(name: str | np.dtype | None):
  """numpy dtype from a name ("bfloat16", "float8_e4m3fn", ...)."""
  if name is None:
    return None
  return np.dtype(jax.numpy.dtype(name))


def flat_leaves(tree: Any) -> Mapping[tuple, Any]:
  """{path tuple: leaf} of a pure dict (or `nnx.State`)."""
  pure = to_pure(tree)
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
    out[tuple(getattr(k, "key", getattr(k, "idx", k)) for k in kp)] = leaf
  return out
