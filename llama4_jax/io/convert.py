"""HF safetensors <-> Orbax conversion, streamed tensor by tensor, driven by the one key table (`hf_keys`).

`hf_to_orbax(src, dst)`: validates the HF directory first (files readable, every key present with the shape
and dtype the config implies, FP8 layouts included: `hf_sources`), then reads one HF tensor at a time,
applies `Entry.to_ours`, and writes it into its leaf, or into its block of a stacked leaf, of an Orbax
checkpoint (`orbax_store.ParamWriter`). The result is a model directory (`model_dir`): `params/`,
`config.json`, `llama4_jax.json` and `assets/` (tokenizer, processor, generation config, license... of the
source).

`orbax_to_hf(src, dst)`: the reverse: `src` is anything `load.resolve` knows but a HF directory (a model
directory, a training step, a run); its stored leaves are validated against the config (`model_dir.
check_stored`), then one block of one leaf at a time is read (`orbax_store.ParamReader`), transformed by
`Entry.to_hf` and appended to a streamed safetensors shard (`safetensors`); the index, `config.json` and the
assets follow.

Peak host memory is about two copies of the largest single HF tensor (read buffer and transformed copy) plus
the fixed cost of the imports, whatever the number of layers. Output is atomic (`atomic.atomic_dir`): an
existing destination is only replaced with `overwrite=True`, and only after the new one is complete; an
output that is the input, lies inside it or contains it is refused (`check_destination`). Every tensor is
checked for NaN / inf on its way through (`check_finite`): a warning naming it, or with `strict` a refusal.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import shutil
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax.config import ConfigError, Policy, save_hf
from llama4_jax.io import hf_keys, hf_sources, model_dir, orbax_store
from llama4_jax.io import quantize as qio
from llama4_jax.io import safetensors as st
from llama4_jax.io.atomic import atomic_dir, writing
from llama4_jax.io.load import resolve
from llama4_jax.io.validate import CheckpointError, check_finite
from llama4_jax.model.llama4 import abstract

log = logging.getLogger(__name__)

# Files of a HF model directory that are weights or rebuilt by the converter; everything else at the top level
# (tokenizer, processor and generation configs, chat template, README, LICENSE...) travels as an asset.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_REBUILT = {"config.json", st.INDEX_FILE, "pytorch_model.bin.index.json"}
_AS_IS = "converted as they are (--strict refuses)"  # what becomes of NaN / inf values without --strict


@dataclasses.dataclass
class Stats:
  tensors: int = 0
  bytes_written: int = 0
  seconds: float = 0.0

  def __str__(self) -> str:
    mb = self.bytes_written / 1e6
    rate = mb / max(self.seconds, 1e-9)
    return f"{self.tensors} tensors, {mb:.1f} MB written in {self.seconds:.1f} s ({rate:.1f} MB/s)"


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


def _as_dtype(name: str | None) -> np.dtype | None:
  """numpy dtype from a name ("bfloat16", "float8_e4m3fn", ...)."""
  return None if name is None else np.dtype(jnp.dtype(name))


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


def _scale_leaf(path: tuple) -> tuple | None:
  """The scale leaf of an FP8-storable expert leaf path, else None."""
  for leaf, scale in hf_sources.FP8_LEAVES.items():
    if path[:3] == ("text", "blocks", "layers") and tuple(path[-2:]) == leaf:
      return path[:-2] + scale
  return None


def _scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """gate_up [nb, E, D, 2, I] -> [nb, E, 2, I]; down [nb, E, I, D] -> [nb, E, D] (the contracted axis goes)."""
  return shape[:2] + shape[3:]


def check_destination(dst: str, *inputs: str) -> None:
  """Refuses an output directory that is an input, lies inside one (the input would change under the
  conversion, and a re-run would read the output), or contains one (`--overwrite` would delete it)."""
  d = os.path.realpath(dst)
  for src in inputs:
    s = os.path.realpath(src)
    if d == s:
      raise CheckpointError(f"{dst}: the output directory is the input directory; choose another output")
    if d.startswith(s + os.sep):
      raise CheckpointError(f"{dst}: the output directory lies inside the input directory {src}; choose one outside")
    if s.startswith(d + os.sep):
      raise CheckpointError(f"{dst}: the output directory contains the input {src} (replacing it would delete the "
                            "input); choose another output")


def hf_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None, keep_fp8: bool = False,
                overwrite: bool = False, strict: bool = False, quantize: str | None = None, group_size: int = 128,
                method: str = "rtn") -> Stats:
  """Converts a HF directory (plain, compressed-tensors FP8 or fbgemm_fp8) into an Orbax model directory.
  `dtype`: stored parameter dtype (default: the checkpoint's; bfloat16 for FP8 sources). `keep_fp8`: store
  the routed experts of an FP8 source as fp8 + scales (layout in `hf_sources`) instead of dequantising them.
  A tensor with NaN / inf values is converted with a warning naming it; `strict` refuses it.
  `quantize` "int8" | "int4": store the routed experts as weight-only integers (`io.quantize`; int4 groups of
  `group_size` along the contracted axis; `method` "rtn" or data-free "clip"), quantised from float32 reads."""
  t0 = time.time()
  source = resolve(src)
  if source.kind != "hf":
    raise CheckpointError(f"{source.path}: a {source.kind} directory, not a HF one (config.json + *.safetensors)")
  src, dst, cfg, layout = source.path, os.path.abspath(os.fspath(dst)), source.config, source.layout
  check_destination(dst, src)
  if keep_fp8 and layout is None:
    raise ConfigError(f"{src}/config.json: --keep-fp8 needs an FP8 checkpoint (no quantization_config)")
  tensors = st.list_tensors(src)
  sources = hf_sources.sources(cfg, tensors, layout)
  out = _as_dtype(dtype or ("bfloat16" if layout else cfg.dtype))
  out_cfg = dataclasses.replace(cfg, dtype=out.name)
  leaves = {path: var.shape for path, var in nnx.to_flat_state(nnx.state(abstract(out_cfg, Policy())))}
  by_path: dict[tuple, list] = {}
  for s in sources:
    by_path.setdefault(s.placement.path, []).append(s)
  if set(by_path) != set(leaves):
    missing = sorted(set(leaves) - set(by_path), key=str)
    raise CheckpointError(f"{src}: no tensor maps to parameter {orbax_store.leaf_name(missing[0])}")
  fp8_leaves = {p for p in leaves if keep_fp8 and _scale_leaf(p) and all(map(hf_sources.is_quantized, by_path[p]))}
  if quantize is not None and keep_fp8:
    raise ConfigError(f"--quantize {quantize} and --keep-fp8 both given: choose one format for the routed experts")
  if quantize is not None and method == "gptq":
    raise ConfigError("--method gptq needs calibration data: convert to a float model directory, then "
                      "python -m tools.convert quantize SRC DST --method gptq --calib FILE.txt")
  plan = None if quantize is None else qio.Plan.of(out_cfg, qio.serving_policy(quantize, group_size), method)
  stats = Stats()
  with atomic_dir(dst, overwrite) as tmp:
    with writing(dst, "the parameter checkpoint"):
      writer = orbax_store.ParamWriter(os.path.join(tmp, model_dir.PARAMS))
      for path, shape in leaves.items():
        stacked = by_path[path][0].placement.index is not None
        if path in fp8_leaves:
          writer.create(path, shape, hf_sources.FP8, stacked)
          writer.create(_scale_leaf(path), _scale_shape(shape), np.float32, stacked)
        elif plan is None or not plan.create(writer, path, stacked):
          writer.create(path, shape, out, stacked)
    for s in sources:
      p = s.placement
      if p.path in fp8_leaves:
        q, scale = s.read_fp8()
        q = p.entry.to_ours(q, cfg)
        scale = scale.reshape(q.shape[:1] + q.shape[2:])
        items = [(p.path, q), (_scale_leaf(p.path), scale)]
      elif plan is not None and p.path in plan.leaves:
        items = plan.items(p.path, p.entry.to_ours(s.read(np.dtype(np.float32)), cfg))
      else:
        items = [(p.path, p.entry.to_ours(s.read(out), cfg).astype(out, copy=False))]
      for path, x in items:
        check_finite(x, f"{tensors[s.keys[0]].file}: key {p.key!r}", strict, _AS_IS)
        with writing(dst, f"{orbax_store.leaf_name(path)} (from {p.key})"):
          writer.write(path, x, p.index)
        stats.bytes_written += x.nbytes
      del items, x
      release_memory()
      stats.tensors += 1
      if stats.tensors % 50 == 0:
        log.info("%d/%d tensors", stats.tensors, len(sources))
    with writing(dst, "metadata, config and assets"):
      writer.finish()
      model_dir.write_model_files(tmp, out_cfg, hf_sources.describe(layout) if fp8_leaves else None,
                                  None if plan is None else qio.record(plan.policy, method))
      _copy_assets(src, os.path.join(tmp, model_dir.ASSETS))
  stats.seconds = time.time() - t0
  return stats


# --------------------------------------------------------------------------------------------------
# Orbax -> HF


def _lora_export_hint(source) -> str:
  """Why a LoRA step / adapter directory is not exported as it is, and what to export instead."""
  what = "LoRA adapters" if source.kind == "adapter" else "a LoRA run's step (adapters + frozen base)"
  merged = os.path.join(source.run_dir, "merged") if source.run_dir else None
  if merged and os.path.isdir(merged):
    return f"{what}: export the run's merged model instead: orbax-to-hf {merged} OUT"
  return (f"{what}, which orbax-to-hf does not merge (it streams tensor by tensor): save the merged model first, "
          "`m = llama4_jax.load(DIR).model; llama4_jax.io.model_dir.save_params(MERGED, nnx.state(m, nnx.Param), "
          "m.cfg)`, then export MERGED")


def orbax_to_hf(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
                max_shard_size: int | str = "5GB", overwrite: bool = False, strict: bool = False) -> Stats:
  """Exports an Orbax model directory, training step or run (its latest step) as a HF directory
  `from_pretrained` loads. `dtype`: tensor dtype (default: the stored one; bfloat16 for FP8-stored experts).
  A parameter with NaN / inf values is exported with a warning naming it; `strict` refuses it."""
  t0 = time.time()
  dst = os.path.abspath(os.fspath(dst))
  source = resolve(src)
  if source.kind == "hf":
    raise CheckpointError(f"{source.path}: already a HF directory; orbax-to-hf takes a model directory, a "
                          "training step or a run")
  if source.lora:
    raise CheckpointError(f"{source.path}: {_lora_export_hint(source)}")
  check_destination(dst, source.path, source.directory)
  cfg = source.config
  reader = orbax_store.ParamReader(source.params_dir)
  fp8 = any(reader.has(("text", "blocks", "layers", j) + scale) for j in range(cfg.text.layer_period)
            for scale in hf_sources.FP8_LEAVES.values())
  # What the config implies, checked against what is stored before anything is written.
  policy = qio.policy_for(source.info if source.kind == "model" else {}, Policy(expert_fp8=fp8), source.path)
  model_dir.check_stored(reader, nnx.state(abstract(cfg, policy)))
  out = _as_dtype(dtype) if dtype else reader.shape_dtype(("text", "embed"))[1]
  if out == hf_sources.FP8:
    out = _as_dtype("bfloat16")
  out_cfg = dataclasses.replace(cfg, dtype=out.name)
  prefix = hf_keys.MULTIMODAL_TEXT_PREFIX if cfg.vision is not None else hf_keys.TEXT_ONLY_PREFIX
  places = {p.key: p for p in hf_keys.placements(cfg, prefix)}
  specs = [st.TensorSpec(p.key, tuple(p.entry.hf_shape(cfg)), out) for p in places.values()]
  shards = st.plan_shards(specs, max_shard_size)
  stats = Stats()
  with atomic_dir(dst, overwrite) as tmp:
    for name, group in shards:
      path = os.path.join(tmp, name)
      with writing(dst, name):
        writer = st.SafetensorsWriter(path, group)
      try:
        for spec in group:
          p = places[spec.key]
          scale = _scale_leaf(p.path)
          if fp8 and scale is not None:
            x = hf_sources.dequantize_ours(p.path, reader.read(p.path, p.index), reader.read(scale, p.index), out)
          elif policy.quant != "none" and reader.has(qio.scale_path(p.path)):  # int8 / int4: exported dequantised
            x = qio.dequantize_leaf(p.path, reader.read(p.path, p.index), reader.read(qio.scale_path(p.path), p.index),
                                    out)
          else:
            x = reader.read(p.path, p.index, out)
          block = "" if p.index is None else f" block {p.index}"
          check_finite(x, f"{source.params_dir}: parameter {orbax_store.leaf_name(p.path)}{block} (HF key "
                       f"{spec.key!r})", strict, _AS_IS)
          y = p.entry.to_hf(x, cfg)
          with writing(dst, f"{spec.key} into {name}"):
            writer.write(spec.key, y)
          del x, y
          release_memory()
          stats.tensors += 1
          stats.bytes_written += spec.nbytes
          if stats.tensors % 50 == 0:
            log.info("%d/%d tensors", stats.tensors, len(specs))
        with writing(dst, name):
          writer.close()
      except BaseException:
        writer.abort()
        raise
    with writing(dst, "index, config and assets"):
      st.write_index(tmp, shards)
      save_hf(out_cfg, tmp)
      if source.assets_dir and source.kind == "model":
        _copy_assets(source.assets_dir, tmp)
  stats.seconds = time.time() - t0
  return stats
