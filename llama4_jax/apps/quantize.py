"""Quantise a float model directory (or training step / run) into a weight-only int8 / int4 model directory.

`quantize_model(src, dst, scheme, ...)` reads one stored leaf (one block of a stacked leaf) at a time, runs it
through an `io.quantize.Plan` and writes the result into a new model directory, atomically; llama4_jax.json
records the scheme, so `load(dst)` gives a quantised model. With `calib` (a text file) the "clip" search of
the routed experts is weighted by calibration statistics: the mean square, per expert and contracted index,
of the inputs each expert sees (and of its down projection's inputs) on the file's first tokens
(`calibration_stats`: eager forwards of the float model, `quant.calibrating`). Only the statistics ([E, D] and
[E, I] per MoE layer) are kept; the float model is needed once, for those forwards.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax.config import Policy
from llama4_jax.io import convert, load, model_dir, orbax_store
from llama4_jax.io import quantize as qio
from llama4_jax.io.atomic import atomic_dir, writing
from llama4_jax.io.validate import CheckpointError
from llama4_jax.model import quant
from llama4_jax.model.llama4 import Llama4, abstract

log = logging.getLogger(__name__)

_TOKENIZERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
               "generation_config.json")


def calibration_stats(model: Llama4, token_ids: np.ndarray, window: int = 256) -> dict[tuple, np.ndarray]:
  """{(leaf path..., block index): h}: the mean square of the routed experts' inputs on `token_ids` (1-D), per
  expert and contracted index, normalised to mean 1 per expert, shaped to broadcast against one block of the
  leaf ([E, D, 1, 1] for gate_up, [E, I, 1] for down); an expert no token reached gets ones (weight MSE).
  The model must be built with `Policy(scan_layers=False)`: one eager forward per window of tokens."""
  cfg = model.cfg.text
  if model.text.policy.scan_layers:
    raise ValueError("calibration_stats needs a model built with Policy(scan_layers=False) (an eager forward)")
  p = cfg.layer_period
  order = [(b, j) for b in range(cfg.num_hidden_layers // p) for j in range(p) if cfg.is_moe(b * p + j)]
  sums: dict[tuple, list] = {}
  calls = [0]

  def observer(x, idx, scores, gate_up, down):
    key = order[calls[0] % len(order)]
    calls[0] += 1
    stats = quant.expert_input_stats(x, idx, scores, gate_up, down)
    acc = sums.setdefault(key, [0.0, 0.0, 0.0])
    sums[key] = [a + s for a, s in zip(acc, stats)]

  ids = np.asarray(token_ids, np.int32).reshape(-1)
  with quant.calibrating(observer):
    for a in range(0, len(ids), window):
      model.text.forward(jnp.asarray(ids[None, a:a + window]), logits=False)
  out = {}
  for (b, j), (hu, ha, n) in sums.items():
    for name, h in (("gate_up", hu), ("down", ha)):
      mean = np.where(n[:, None] > 0, h / np.maximum(n, 1)[:, None], 1.0)
      mean = mean / np.maximum(mean.mean(axis=1, keepdims=True), 1e-30) + 1e-3
      out[("text", "blocks", "layers", j, "ffn", name, b)] = mean[..., None, None] if name == "gate_up" else (
          mean[..., None])
  return out


def calibration_tokens(loaded: load.Loaded, path: str, n: int) -> np.ndarray:
  """The first `n` tokens of a text file, with the model's tokenizer."""
  if loaded.tokenizer is None:
    raise CheckpointError(f"{loaded.source.path}: calibration needs a tokenizer stored with the model")
  with open(path) as f:
    return np.asarray(loaded.tokenizer.encode(f.read(), bos=True)[:n], np.int32)


def quantize_model(src: str | os.PathLike, dst: str | os.PathLike, scheme: str, group_size: int = quant.DEFAULT_GROUP,
                   method: str = "rtn", calib: str | None = None, calib_tokens: int = 512,
                   scale_dtype: str = "float32", targets: tuple[str, ...] = ("experts",),
                   overwrite: bool = False) -> dict:
  """Writes the quantised model directory `dst` of a float model directory, training step or run `src`
  (HF directories: `convert.hf_to_orbax(..., quantize=...)`). `calib`: a text file whose first `calib_tokens`
  tokens weight the "clip" search of the routed experts. Returns the llama4_jax.json `quant` record."""
  t0 = time.time()
  qio.check_method(method)
  source = load.resolve(src)
  if source.kind == "hf":
    raise CheckpointError(f"{source.path}: a HF directory; quantise it while converting "
                          f"(python -m tools.convert hf-to-orbax SRC DST --quantize {scheme})")
  if source.info.get("quant") or source.info.get("fp8"):
    raise quant.QuantError(f"{source.path}: already stored quantised ({source.info.get('quant') or 'fp8'}); "
                           "quantise the float model")
  if calib is not None and method != "clip":
    raise quant.QuantError(f"calibration file {calib!r} is used by method 'clip' only, got method {method!r}")
  convert.check_destination(os.path.abspath(os.fspath(dst)), source.path)
  cfg = source.config
  plan = qio.Plan.of(cfg, qio.serving_policy(scheme, group_size, scale_dtype, targets), method)
  reader = orbax_store.ParamReader(source.params_dir)
  float_state = nnx.state(abstract(cfg, Policy()), nnx.Param)
  model_dir.check_stored(reader, float_state)
  stats, calib_rec = {}, None
  if calib is not None:
    loaded = load.load(source.path, policy=Policy(scan_layers=False))
    ids = calibration_tokens(loaded, calib, calib_tokens)
    stats = calibration_stats(loaded.model, ids)
    calib_rec = {"file": os.path.abspath(calib), "tokens": int(len(ids))}
    del loaded
  rec = qio.record(plan.policy, method, calib_rec)
  write_quantized(reader, [p for p, _ in nnx.to_flat_state(float_state)], plan, stats, dst, cfg, rec, source,
                  overwrite)
  log.info("quantised %s -> %s (%s, %s) in %.1f s", source.path, dst, scheme, method, time.time() - t0)
  return rec


def write_quantized(reader: orbax_store.ParamReader, paths: list[tuple], plan: qio.Plan, stats: dict, dst, cfg,
                    rec: dict, source: load.Source, overwrite: bool) -> str:
  """The model directory `dst`: every leaf of `paths` read from `reader`, block by block, through `plan`."""
  dst = os.path.abspath(os.fspath(dst))

  def blocks(path):
    return range(reader.shape_dtype(path)[0][0]) if tuple(path[:2]) == ("text", "blocks") else [None]

  with atomic_dir(dst, overwrite) as tmp:
    writer = orbax_store.ParamWriter(os.path.join(tmp, model_dir.PARAMS))
    for path in paths:
      stacked = tuple(path[:2]) == ("text", "blocks")
      if not plan.create(writer, path, stacked):
        shape, dtype = reader.shape_dtype(path)
        writer.create(path, shape, dtype, stacked)
    for path in paths:
      for b in blocks(path):
        for p, v in plan.items(path, reader.read(path, b), stats.get((*path, b))):
          with writing(dst, orbax_store.leaf_name(p)):
            writer.write(p, v, b)
        convert.release_memory()
    with writing(dst, "metadata, config and assets"):
      writer.finish()
      model_dir.write_model_files(tmp, cfg, None, quant=rec)
      _copy_tokenizer(source, os.path.join(tmp, model_dir.ASSETS))
  return dst


def _copy_tokenizer(source: load.Source, dst: str) -> None:
  """The source's assets (a model directory's all; a run's tokenizer files only)."""
  d = source.assets_dir
  if not d or not os.path.isdir(d):
    return
  for name in sorted(os.listdir(d)):
    path = os.path.join(d, name)
    if os.path.isfile(path) and (source.kind == "model" or name in _TOKENIZERS):
      os.makedirs(dst, exist_ok=True)
      shutil.copy2(path, os.path.join(dst, name))

