"""HF safetensors <-> Orbax conversion, streamed tensor by tensor, driven by the one key table (`hf_keys`).

`hf_to_orbax(src, dst)`: validates the HF directory first (files readable, every key present with the shape
and dtype the config implies, FP8 layouts included: `hf_read`), then reads one HF tensor at a time, applies
`Entry.to_ours`, and writes it into its leaf, or into its block of a stacked leaf, of an Orbax checkpoint
(`checkpoint.ParamWriter`). The result is a model directory (see `checkpoint`): `params/`, `config.json`,
`llama4_jax.json` and `assets/` (tokenizer, processor, generation config, license... of the source).

`orbax_to_hf(src, dst)`: the reverse: reads one block of one leaf at a time (`checkpoint.ParamReader`),
applies `Entry.to_hf`, appends it to a streamed safetensors shard (`hf_write`), and writes the index,
`config.json` and the assets back. `src` may be a model directory, a `Checkpointer` step directory or a
`Checkpointer` root (latest step; the config comes from the step's meta["config"]).

Peak host memory is about two copies of the largest single HF tensor (read buffer and transformed copy) plus
the fixed cost of the imports, whatever the number of layers. Output is atomic: everything is written into a
temporary sibling directory `.NAME.tmp-PID-XXXX` that is renamed to the destination at the end; an existing
destination is only replaced with `overwrite=True`, and only after the new one is complete. On any error the
temporary directory is removed; one left by a killed process is removed by the next conversion to the same
destination.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import time
import uuid
from typing import Iterator

import numpy as np
from flax import nnx

from llama4_jax import checkpoint as ckpt
from llama4_jax import hf_read, hf_keys, hf_write
from llama4_jax.config import ConfigError, Llama4Config, Policy, from_hf, save_hf
from llama4_jax.hf_load import CheckpointError, list_tensors
from llama4_jax.llama4 import abstract

log = logging.getLogger(__name__)

# Files of a HF model directory that are weights or rebuilt by the converter; everything else at the top level
# (tokenizer, processor and generation configs, chat template, README, LICENSE...) travels as an asset.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_REBUILT = {"config.json", hf_write.INDEX_FILE, "pytorch_model.bin.index.json"}


class ConversionError(RuntimeError):
  """A destination that cannot be written (exists, disk full, I/O error); the message names it."""


@dataclasses.dataclass
class Stats:
  tensors: int = 0
  bytes_written: int = 0
  seconds: float = 0.0

  def __str__(self) -> str:
    mb = self.bytes_written / 1e6
    rate = mb / max(self.seconds, 1e-9)
    return f"{self.tensors} tensors, {mb:.1f} MB written in {self.seconds:.1f} s ({rate:.1f} MB/s)"


# --------------------------------------------------------------------------------------------------
# Atomic destination


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


def _clean_stale(parent: str, name: str, dst: str) -> None:
  """Temporary directories of killed conversions to `dst` (their process is gone)."""
  pat = re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}$")
  for entry in os.listdir(parent):
    m = pat.match(entry)
    if not m or _pid_alive(int(m.group(2))):
      continue
    if m.group(1) == "old" and not os.path.lexists(dst):
      log.warning("%s: kept %s (the previous destination; the replacement was interrupted)", dst, entry)
      continue
    log.info("removing %s left by an interrupted conversion", os.path.join(parent, entry))
    _remove(os.path.join(parent, entry))


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
  """Yields a fresh temporary directory next to `dst`; renamed to `dst` when the block completes, removed
  if it raises."""
  dst = os.path.abspath(os.fspath(dst))
  parent, name = os.path.split(dst)
  if os.path.lexists(dst) and not overwrite:
    raise ConversionError(f"{dst}: destination exists (pass --overwrite to replace it)")
  os.makedirs(parent, exist_ok=True)
  _clean_stale(parent, name, dst)
  tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp = os.path.join(parent, f".{name}.tmp-{tag}")
  os.mkdir(tmp)
  try:
    yield tmp
    with _writing(dst, "the final rename"):
      _fsync_dir(tmp)
      if os.path.lexists(dst):
        old = os.path.join(parent, f".{name}.old-{tag}")
        os.rename(dst, old)
        os.rename(tmp, dst)
        _remove(old)
      else:
        os.rename(tmp, dst)
      _fsync_dir(parent)
  except BaseException:
    _remove(tmp)
    raise


@contextlib.contextmanager
def _writing(dst: str, what: str) -> Iterator[None]:
  """Turns write failures into ConversionError naming the destination and what was being written."""
  try:
    yield
  except (CheckpointError, ConversionError):
    raise
  except Exception as e:  # OSError from files; tensorstore reports I/O errors as ValueError
    full = isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e)
    reason = "no space left on device" if full else f"{type(e).__name__}: {e}"
    raise ConversionError(f"{dst}: writing {what} failed: {reason}") from e


def _copy_assets(src: str, dst: str) -> list[str]:
  """Copies the non-weight top-level files of `src` into `dst` (created if needed)."""
  copied = []
  if not os.path.isdir(src):
    return copied
  for entry in sorted(os.listdir(src)):
    path = os.path.join(src, entry)
    if (not os.path.isfile(path) or entry in _REBUILT or entry.endswith(_WEIGHT_SUFFIXES)
        or entry.startswith(".")):
      continue
    os.makedirs(dst, exist_ok=True)
    shutil.copy2(path, os.path.join(dst, entry))
    copied.append(entry)
  return copied


# --------------------------------------------------------------------------------------------------
# HF -> Orbax


def _dtype_name(dt: np.dtype) -> str:
  return np.dtype(dt).name


def _scale_leaf(path: tuple) -> tuple | None:
  """The scale leaf of an FP8-storable expert leaf path, else None."""
  for leaf, scale in hf_read.FP8_LEAVES.items():
    if path[:3] == ("text", "blocks", "layers") and tuple(path[-2:]) == leaf:
      return path[:-2] + scale
  return None


def _scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """gate_up [nb, E, D, 2, I] -> [nb, E, 2, I]; down [nb, E, I, D] -> [nb, E, D] (the contracted axis goes)."""
  return shape[:2] + shape[3:]


def hf_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None, keep_fp8: bool = False,
                overwrite: bool = False) -> Stats:
  """Converts a HF directory (plain, compressed-tensors FP8 or fbgemm_fp8) into an Orbax model directory.
  `dtype`: stored parameter dtype (default: the checkpoint's; bfloat16 for FP8 sources). `keep_fp8`: store
  the routed experts of an FP8 source as fp8 + scales (layout in `hf_read`) instead of dequantising them."""
  t0 = time.time()
  src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
  cfg = from_hf(src)
  with open(os.path.join(src, "config.json")) as f:
    layout = hf_read.layout_of(json.load(f))
  if keep_fp8 and layout is None:
    raise ConfigError(f"{src}/config.json: --keep-fp8 needs an FP8 checkpoint (no quantization_config)")
  tensors = list_tensors(src)
  sources = hf_read.sources(cfg, tensors, layout)
  out = ckpt.as_dtype(dtype or ("bfloat16" if layout else cfg.dtype))
  out_cfg = dataclasses.replace(cfg, dtype=_dtype_name(out))
  policy = Policy(param_dtype=out_cfg.dtype, dtype=out_cfg.dtype)
  leaves = {path: var.shape for path, var in nnx.to_flat_state(nnx.state(abstract(out_cfg, policy)))}
  by_path: dict[tuple, list] = {}
  for s in sources:
    by_path.setdefault(s.placement.path, []).append(s)
  if set(by_path) != set(leaves):
    missing = sorted(set(leaves) - set(by_path), key=str)
    raise CheckpointError(f"{src}: no tensor maps to parameter {ckpt.leaf_name(missing[0])}")
  fp8_leaves = {p for p in leaves if keep_fp8 and _scale_leaf(p) and all(map(hf_read.is_quantized, by_path[p]))}
  stats = Stats()
  with atomic_output(dst, overwrite) as tmp:
    with _writing(dst, "the parameter checkpoint"):
      writer = ckpt.ParamWriter(os.path.join(tmp, ckpt.PARAMS))
      for path, shape in leaves.items():
        stacked = by_path[path][0].placement.index is not None
        if path in fp8_leaves:
          writer.create(path, shape, hf_read.FP8, stacked)
          writer.create(_scale_leaf(path), _scale_shape(shape), np.float32, stacked)
        else:
          writer.create(path, shape, out, stacked)
    for s in sources:
      p = s.placement
      if p.path in fp8_leaves:
        q, scale = s.read_fp8()
        q = p.entry.to_ours(q, cfg)
        scale = scale.reshape(q.shape[:1] + q.shape[2:])
        items = [(p.path, q), (_scale_leaf(p.path), scale)]
      else:
        items = [(p.path, p.entry.to_ours(s.read(out), cfg).astype(out, copy=False))]
      for path, x in items:
        with _writing(dst, f"{ckpt.leaf_name(path)} (from {p.key})"):
          writer.write(path, x, p.index)
        stats.bytes_written += x.nbytes
      del items, x
      ckpt.release_memory()
      stats.tensors += 1
      if stats.tensors % 50 == 0:
        log.info("%d/%d tensors", stats.tensors, len(sources))
    with _writing(dst, "metadata, config and assets"):
      writer.finish()
      ckpt.write_model_files(tmp, out_cfg, hf_read.describe(layout) if fp8_leaves else None)
      _copy_assets(src, os.path.join(tmp, ckpt.ASSETS))
  stats.seconds = time.time() - t0
  return stats


# --------------------------------------------------------------------------------------------------
# Orbax -> HF


def resolve_orbax(src: str | os.PathLike) -> tuple[str, Llama4Config, dict, str]:
  """(params dir, config, llama4_jax.json info, directory holding assets/) of a model directory, a
  Checkpointer step directory or a Checkpointer root (its latest complete step)."""
  src = os.path.abspath(os.fspath(src))
  if not os.path.isdir(src):
    raise CheckpointError(f"{src}: no such directory")
  base = src
  if not os.path.exists(os.path.join(src, ckpt.PARAMS, "_METADATA")):
    steps = sorted((int(e) for e in os.listdir(src) if e.isdigit()
                    and os.path.exists(os.path.join(src, e, ckpt.PARAMS, "_METADATA"))), reverse=True)
    if not steps:
      raise CheckpointError(f"{src}: not an Orbax model directory ({ckpt.PARAMS}/_METADATA missing) "
                            "nor a Checkpointer directory with a complete step")
    base = os.path.join(src, str(steps[0]))
  config_path = os.path.join(base, ckpt.CONFIG)
  if os.path.exists(config_path):
    cfg = from_hf(config_path)
  else:
    meta_path = os.path.join(base, "meta", "metadata")
    meta = {}
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        meta = json.load(f)
    if "config" not in meta:
      raise CheckpointError(f"{base}: no {ckpt.CONFIG}, and no 'config' in the step's meta "
                            "(save it with Checkpointer.save(meta={'config': config.to_hf(cfg)}))")
    cfg = from_hf(meta["config"])
  return os.path.join(base, ckpt.PARAMS), cfg, ckpt.read_info(base), base


def orbax_to_hf(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
                max_shard_size: int | str = "5GB", overwrite: bool = False) -> Stats:
  """Exports an Orbax model (or training step) as a HF directory `from_pretrained` loads. `dtype`: tensor
  dtype (default: the stored one; bfloat16 for FP8-stored experts)."""
  t0 = time.time()
  dst = os.path.abspath(os.fspath(dst))
  params, cfg, _, base = resolve_orbax(src)
  reader = ckpt.ParamReader(params)
  # What the config implies, checked against what is stored before anything is written.
  stored_dtype = reader.shape_dtype(("text", "embed"))[1] if reader.has(("text", "embed")) else None
  out = ckpt.as_dtype(dtype) if dtype else stored_dtype
  if out is None or out == hf_read.FP8:
    out = ckpt.as_dtype("bfloat16")
  out_cfg = dataclasses.replace(cfg, dtype=_dtype_name(out))
  policy = Policy(param_dtype=out_cfg.dtype, dtype=out_cfg.dtype)
  want = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(abstract(out_cfg, policy)))}
  expected = set()
  for path, shape in want.items():
    scale = _scale_leaf(path)
    if scale is not None and reader.has(scale):
      expected.add(scale)
      if reader.shape_dtype(scale)[0] != _scale_shape(shape):
        raise CheckpointError(f"{params}: parameter {ckpt.leaf_name(scale)} has shape "
                              f"{list(reader.shape_dtype(scale)[0])}, the config implies {list(_scale_shape(shape))}")
    if not reader.has(path):
      raise CheckpointError(f"{params}: parameter {ckpt.leaf_name(path)} missing (the config implies it)")
    got, got_dtype = reader.shape_dtype(path)
    if got_dtype == hf_read.FP8 and not (scale is not None and reader.has(scale)):
      raise CheckpointError(f"{params}: parameter {ckpt.leaf_name(path)} is float8 without a scale leaf")
    if got != tuple(shape):
      raise CheckpointError(f"{params}: parameter {ckpt.leaf_name(path)} has shape {list(got)}, "
                            f"the config implies {list(shape)}")
    expected.add(tuple(str(k) for k in path))
  extra = sorted(set(reader.paths) - {tuple(str(k) for k in p) for p in expected})
  if extra:
    raise CheckpointError(f"{params}: stored parameter {ckpt.leaf_name(extra[0])} is not part of this config"
                          f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}")
  prefix = hf_keys.MULTIMODAL_TEXT_PREFIX if cfg.vision is not None else hf_keys.TEXT_ONLY_PREFIX
  places = {p.key: p for p in hf_keys.placements(cfg, prefix)}
  specs = [hf_write.TensorSpec(p.key, tuple(p.entry.hf_shape(cfg)), out) for p in places.values()]
  shards = hf_write.plan_shards(specs, max_shard_size)
  stats = Stats()
  with atomic_output(dst, overwrite) as tmp:
    for name, group in shards:
      path = os.path.join(tmp, name)
      with _writing(dst, name):
        writer = hf_write.SafetensorsWriter(path, group)
      try:
        for spec in group:
          p = places[spec.key]
          scale = _scale_leaf(p.path)
          if scale is not None and reader.has(scale):
            x = hf_read.dequantize_ours(p.path, reader.read(p.path, p.index), reader.read(scale, p.index), out)
          else:
            x = reader.read(p.path, p.index, out)
          y = p.entry.to_hf(x, cfg)
          with _writing(dst, f"{spec.key} into {name}"):
            writer.write(spec.key, y)
          del x, y
          ckpt.release_memory()
          stats.tensors += 1
          stats.bytes_written += spec.nbytes
          if stats.tensors % 50 == 0:
            log.info("%d/%d tensors", stats.tensors, len(specs))
        with _writing(dst, name):
          writer.close()
      except BaseException:
        writer.abort()
        raise
    with _writing(dst, "index, config and assets"):
      hf_write.write_index(tmp, shards)
      save_hf(out_cfg, tmp)
      _copy_assets(os.path.join(base, ckpt.ASSETS), tmp)
  stats.seconds = time.time() - t0
  return stats
