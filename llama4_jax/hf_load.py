"""Loading the HF safetensors release format into a ready model (`load_hf`).

Everything is validated before a byte of weights is read (files present and readable, every expected key
there with the right shape and dtype, no unexpected key), so a bad checkpoint fails with an error naming
the key and file and nothing is loaded half. Tensors are then read one at a time (`safe_open`) straight
into the arrays of the model, optionally sharded: each device shard is filled by a callback that reads
only the tensors it needs, so peak host memory is about the final parameters plus one tensor.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from llama4_jax import hf_keys
from llama4_jax.config import ConfigError, Llama4Config, Policy, from_hf
from llama4_jax.llama4 import Llama4, abstract

log = logging.getLogger(__name__)

# numpy lacks the fp8 dtypes that safetensors looks up by name.
for _name in ("float8_e4m3fn", "float8_e5m2"):
  if not hasattr(np, _name):
    setattr(np, _name, getattr(ml_dtypes, _name))

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded; the message names the file and key."""


class TensorInfo(collections.namedtuple("TensorInfo", "file shape dtype")):
  """Where a tensor lives and what its header says."""


def list_tensors(directory: str) -> dict[str, TensorInfo]:
  """Header of every tensor of a single-file or sharded checkpoint, checking every file opens."""
  index = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
    files = sorted(set(weight_map.values()))
  elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
    weight_map, files = None, [SINGLE_FILE]
  else:
    raise CheckpointError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
  out: dict[str, TensorInfo] = {}
  for name in files:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      raise CheckpointError(f"{path}: shard named in {INDEX_FILE} is missing")
    try:
      with safe_open(path, framework="np") as f:
        for key in f.keys():
          sl = f.get_slice(key)
          out[key] = TensorInfo(path, tuple(sl.get_shape()), sl.get_dtype())
    except CheckpointError:
      raise
    except Exception as e:  # safetensors raises its own error types for bad headers / truncation
      raise CheckpointError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None
    _check_size(path)
  if weight_map is not None:
    for key, name in weight_map.items():
      if key not in out:
        raise CheckpointError(f"{os.path.join(directory, name)}: key {key!r} listed in {INDEX_FILE} is not in it")
  return out


_DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "U8": 1}


def _check_size(path: str) -> None:
  """The data section must hold every tensor the header declares (catches truncated downloads)."""
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
  size = os.path.getsize(path)
  if size < 8 + n + end:
    raise CheckpointError(f"{path}: truncated: header declares {8 + n + end} bytes, file has {size}")


def text_prefix(keys) -> str:
  """"language_model." for the multimodal layout, "" for the text-only `Llama4ForCausalLM` one."""
  return hf_keys.MULTIMODAL_TEXT_PREFIX if any(
      k.startswith(hf_keys.MULTIMODAL_TEXT_PREFIX) for k in keys) else hf_keys.TEXT_ONLY_PREFIX


_VISION_KEY_PREFIXES = (hf_keys.VISION_PREFIX, hf_keys.PROJECTOR.hf)


def plan(cfg: Llama4Config, tensors: Mapping[str, TensorInfo], allowed_dtypes=FLOAT_DTYPES):
  """Validates the checkpoint against the config; returns the placements to read.

  A multimodal config needs the vision tower and projector in the checkpoint (a text-only
  `Llama4ForCausalLM` checkpoint is refused). A text-only config (`cfg.vision is None`) reads only the text
  part of a multimodal checkpoint; its vision tensors are left out, and logged."""
  prefix = text_prefix(tensors)
  vision_keys = sorted(k for k in tensors if k.startswith(_VISION_KEY_PREFIXES))
  if cfg.vision is not None and not vision_keys:
    where = os.path.dirname(next(iter(tensors.values())).file) if tensors else "checkpoint"
    raise CheckpointError(f"{where}: the config is multimodal but the checkpoint has no vision_model. / "
                          "multi_modal_projector. tensors (a text-only Llama4ForCausalLM checkpoint?); "
                          "load it with a text-only config (vision=None)")
  places = hf_keys.placements(cfg, prefix)
  expected = {p.key for p in places}
  skipped = vision_keys if cfg.vision is None else []
  unexpected = sorted(k for k in tensors if k not in expected and k not in skipped)
  if unexpected:
    raise CheckpointError(f"{tensors[unexpected[0]].file}: unexpected key {unexpected[0]!r}"
                          f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''} for this config")
  missing = sorted(expected - set(tensors))
  if missing:
    raise CheckpointError(f"key {missing[0]!r} missing from the checkpoint"
                          f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
  for p in places:
    info = tensors[p.key]
    want = p.entry.hf_shape(cfg)
    if info.shape != want:
      raise CheckpointError(f"{info.file}: key {p.key!r} has shape {list(info.shape)}, the config implies {list(want)}")
    if info.dtype not in allowed_dtypes:
      raise CheckpointError(f"{info.file}: key {p.key!r} has dtype {info.dtype}, expected one of {sorted(allowed_dtypes)}")
  if skipped:
    log.info("text-only config: %d vision tower / projector tensors of the checkpoint are not loaded", len(skipped))
  return places


def read_tensor(info: TensorInfo, key: str) -> np.ndarray:
  try:
    with safe_open(info.file, framework="np") as f:
      return f.get_tensor(key)
  except Exception as e:
    raise CheckpointError(f"{info.file}: reading key {key!r} failed ({type(e).__name__}: {e})") from None


def _leaf_builder(places: list, cfg: Llama4Config, tensors, dtype) -> Callable[[Any], np.ndarray]:
  """Callback for `jax.make_array_from_callback`: the requested slice of one (possibly stacked) leaf."""
  stacked = places[0].index is not None
  by_block = {p.index: p for p in places}

  def read(p):
    return p.entry.to_ours(read_tensor(tensors[p.key], p.key), cfg).astype(dtype)

  def callback(index):
    if not stacked:
      return read(places[0])[index]
    blocks = range(*index[0].indices(len(by_block)))
    return np.stack([read(by_block[b])[index[1:]] for b in blocks])

  return callback


def load_state(cfg: Llama4Config, directory: str, policy: Policy, shardings=None):
  """Our parameter state (an `nnx.State`) from a HF directory, optionally placed by `shardings` (a state
  of `jax.sharding.Sharding` with the model's structure; default: the first device)."""
  tensors = list_tensors(directory)
  places = plan(cfg, tensors)
  graphdef, abs_state = nnx.split(abstract(cfg, policy))
  by_leaf: dict[tuple, list] = collections.defaultdict(list)
  for p in places:
    by_leaf[p.path].append(p)
  flat = dict(nnx.to_flat_state(abs_state))
  if set(by_leaf) != set(flat):
    missing = sorted(set(flat) - set(by_leaf), key=str)
    raise CheckpointError(f"{directory}: no tensor maps to parameter {'.'.join(map(str, missing[0]))}")
  shard_flat = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  dtype = jnp.dtype(policy.param_dtype)
  leaves = []
  for path, var in flat.items():
    sh = shard_flat[path] if path in shard_flat else default
    sh = sh.value if isinstance(sh, nnx.Variable) else sh
    arr = jax.make_array_from_callback(var.shape, sh, _leaf_builder(by_leaf[path], cfg, tensors, dtype))
    leaves.append((path, var.replace(arr)))
  return graphdef, nnx.from_flat_state(leaves)


def load_hf(path: str | os.PathLike, dtype: str | None = None, policy: Policy | None = None,
            shardings=None, text_only: bool = False) -> Llama4:
  """A ready `Llama4` from a HF model directory (single or sharded safetensors, multimodal or text-only
  layout, fp32/bf16/fp16 files). `dtype` sets parameters and compute (default: the checkpoint's dtype,
  float16 read as bfloat16); `policy` overrides it entirely. `text_only` builds the text model alone from
  a multimodal checkpoint (config with `vision=None`, vision tensors not read)."""
  directory = os.fspath(path)
  cfg = from_hf(directory)
  if text_only:
    cfg = dataclasses.replace(cfg, vision=None)
  if policy is None:
    dt = dtype or ("bfloat16" if cfg.dtype == "float16" else cfg.dtype)
    if dt not in ("float32", "bfloat16"):
      raise ConfigError(f"load_hf: dtype {dt!r} not supported (float32 or bfloat16)")
    policy = Policy(param_dtype=dt, dtype=dt, matmul_precision="highest" if dt == "float32" else "default")
  graphdef, state = load_state(cfg, directory, policy, shardings)
  return nnx.merge(graphdef, state)
