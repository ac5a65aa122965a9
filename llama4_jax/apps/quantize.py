"""Quantise a float model directory (or training step / run) into a weight-only int8 / int4 model directory.

`quantize_model(src, dst, scheme, ...)` reads one stored leaf (one block of a stacked leaf) at a time, runs it
through an `io.quantize.Plan` and writes the result into a new model directory, atomically; llama4_jax.json
records the scheme, so `load(dst)` gives a quantised model. With `calib` (a text file; required by "gptq")
the quantizer sees calibration statistics of the file's first tokens: `calibration_hessians` (eager forwards of
the float model under `quant.calibrating`) collects the second moments H = sum x x^T of the inputs of every
quantised matmul of the MoE layers (per routed expert [E, D, D] of the inputs it sees and [E, I, I] of its down
projection's inputs; with the "mlp" target also the shared expert's [D, D] and [I, I]), held in .npy files
under a temporary directory, memory-mapped, so one leaf's statistics are in memory at a time. "clip" minimises
the output error through them (`quant.clip_ratios_calibrated`), "gptq" compensates rounding errors with them
(`quant.gptq`). The float model is needed once, for those forwards; a leaf without statistics (a dense MLP
layer) is quantised data-free.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
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


def calibration_hessians(model: Llama4, token_ids: np.ndarray, window: int = 256,
                         directory: str | None = None, shared: bool = True) -> dict[tuple, np.ndarray]:
  """{(leaf path..., block index): H}: sum over the calibration tokens `token_ids` (1-D) of x x^T, x the input
  of the leaf's matmul: per routed expert (gate_up [E, D, D] of its inputs x * score, down [E, I, I] of its
  swiglu activations) and, with `shared`, of the shared expert (gate and up: the same [D, D]; down [I, I]).
  float32; each one a memory-mapped .npy file under `directory` when given (else in memory). The model must
  be built with `Policy(scan_layers=False)` (eager forwards, one per window of tokens)."""
  cfg = model.cfg.text
  if model.text.policy.scan_layers:
    raise ValueError("calibration_hessians needs a model built with Policy(scan_layers=False) (an eager forward)")
  p = cfg.layer_period
  order = [(b, j) for b in range(cfg.num_hidden_layers // p) for j in range(p) if cfg.is_moe(b * p + j)]
  out: dict[tuple, np.ndarray] = {}
  calls = [0]

  def add(key, h):
    if key not in out:
      if directory is None:
        out[key] = np.zeros(h.shape, np.float32)
      else:
        name = os.path.join(directory, "_".join(map(str, key)) + ".npy")
        out[key] = np.lib.format.open_memmap(name, mode="w+", dtype=np.float32, shape=h.shape)
    out[key] += h

  def observer(x, idx, scores, gate_up, down):
    b, j = order[calls[0] % len(order)]
    calls[0] += 1
    key = ("text", "blocks", "layers", j, "ffn")
    hu, ha = quant.expert_input_hessians(x, idx, scores, gate_up)
    add((*key, "gate_up", b), hu)
    add((*key, "down", b), ha)
    if shared:
      mlp = model.text.blocks.layers[j].ffn.shared
      xs = np.asarray(x, np.float32)
      g, up = (np.asarray(getattr(mlp, n)[...][b], np.float32) for n in ("gate", "up"))
      a = quant.np_swiglu(xs @ g, xs @ up)
      hx = xs.T @ xs
      for n in ("gate", "up"):
        add((*key, "shared", n, b), hx)
      add((*key, "shared", "down", b), a.T @ a)

  ids = np.asarray(token_ids, np.int32).reshape(-1)
  with quant.calibrating(observer):
    for a in range(0, len(ids), window):
      model.text.forward(jnp.asarray(ids[None, a:a + window]), logits=False)
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
  tokens give the statistics of the "clip" search (output error instead of weight MSE) and of "gptq"
  (required there).
  Returns the llama4_jax.json `quant` record."""
  t0 = time.time()
  qio.check_method(method)
  source = load.resolve(src)
  if source.kind == "hf":
    raise CheckpointError(f"{source.path}: a HF directory; quantise it while converting "
                          f"(python -m tools.convert hf-to-orbax SRC DST --quantize {scheme})")
  if source.info.get("quant") or source.info.get("fp8"):
    raise quant.QuantError(f"{source.path}: already stored quantised ({source.info.get('quant') or 'fp8'}); "
                           "quantise the float model")
  if calib is not None and method == "rtn":
    raise quant.QuantError(f"calibration file {calib!r} is used by methods 'clip' and 'gptq', got method 'rtn'")
  if calib is None and method == "gptq":
    raise quant.QuantError("method 'gptq' needs calibration data: pass a text file (--calib FILE.txt)")
  convert.check_destination(os.path.abspath(os.fspath(dst)), source.path)
  cfg = source.config
  plan = qio.Plan.of(cfg, qio.serving_policy(scheme, group_size, scale_dtype, targets), method)
  reader = orbax_store.ParamReader(source.params_dir)
  float_state = nnx.state(abstract(cfg, Policy()), nnx.Param)
  model_dir.check_stored(reader, float_state)
  stats, calib_rec = {}, None
  with tempfile.TemporaryDirectory(prefix="llama4_jax_gptq_") as spill:
    if calib is not None:
      loaded = load.load(source.path, policy=Policy(scan_layers=False))
      ids = calibration_tokens(loaded, calib, calib_tokens)
      stats = calibration_hessians(loaded.model, ids, directory=spill, shared="mlp" in targets)
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

