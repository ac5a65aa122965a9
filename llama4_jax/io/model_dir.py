"""The model directory: a converted or saved model, architecture and weights together.

  params/          the Orbax checkpoint of the parameters' pure dict (`targets`; what
                   `ocp.StandardCheckpointer` writes, or `orbax_store.ParamWriter` streams)
  config.json      the HF config (`config.to_hf`), so the architecture travels with the weights
  llama4_jax.json  {"format": 1, "fp8": null | description of stored FP8 leaves (see `hf_sources`),
                    "quant": the weight-only int8 / int4 scheme, present only when quantised (see `quantize`)}
  assets/          tokenizer / processor / generation-config files of the HF source, copied verbatim

`save_params` writes one atomically; `check_stored` is the validation of stored leaves against a model (used
by the loader and `orbax_to_hf`); `restore_params` restores into any target (`targets`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from llama4_jax import config as config_lib
from llama4_jax.io import hf_sources, orbax_store, quantize, targets
from llama4_jax.io.atomic import atomic_dir
from llama4_jax.io.checkpointer import tree_of
from llama4_jax.io.validate import CheckpointError, Validator

PARAMS = "params"
CONFIG = "config.json"
INFO = "llama4_jax.json"
ASSETS = "assets"
FORMAT_VERSION = 1
_FLOATS = ("float32", "bfloat16", "float16")  # float leaves restore into any of these (cast on read)


def write_model_files(directory: str, cfg: config_lib.Llama4Config, fp8: dict | None = None,
                      quant: dict | None = None) -> None:
  """config.json and llama4_jax.json of a model directory (being written inside `atomic_dir`)."""
  config_lib.save_hf(cfg, directory)
  with open(os.path.join(directory, INFO), "w") as f:
    json.dump({"format": FORMAT_VERSION, "fp8": fp8, **({"quant": quant} if quant else {})}, f, indent=2)
    f.write("\n")


def read_info(directory: str) -> dict:
  """llama4_jax.json of a model directory (the defaults when absent)."""
  path = os.path.join(directory, INFO)
  if not os.path.exists(path):
    return {"format": FORMAT_VERSION, "fp8": None}
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
  if not isinstance(info, dict):
    raise CheckpointError(f"{path}: expected a JSON object, got {type(info).__name__}")
  return info


def save_params(directory: str | os.PathLike, params: Any, cfg: config_lib.Llama4Config | None = None,
                overwrite: bool = False) -> str:
  """Saves parameters (an `nnx.State` or pure dict) as a model directory (`params/`, and with `cfg` the
  config files that `tools.convert orbax-to-hf` and `load` need), atomically (`atomic_dir`): an existing
  `directory` is replaced only with `overwrite`. Returns the directory."""
  directory = os.path.abspath(os.fspath(directory))
  with atomic_dir(directory, overwrite) as tmp:
    with ocp.StandardCheckpointer() as ck:
      ck.save(os.path.join(tmp, PARAMS), targets.to_pure(params))
      ck.wait_until_finished()
    if cfg is not None:
      write_model_files(tmp, cfg, _fp8_record(params), quantize.record_of(params))
  return directory


def _fp8_record(params: Any) -> dict | None:
  """The `fp8` record of a model whose routed experts are held in FP8 (`Policy.expert_fp8`), else None."""
  scales = set(hf_sources.FP8_LEAVES.values())
  return (hf_sources.describe("expert_fp8") if any(p[-2:] in scales for p in targets.flat_leaves(params))
          else None)


def params_dir(directory: str | os.PathLike) -> str:
  """The Orbax params item of a model or step directory (`DIR/params`), or a params checkpoint itself."""
  directory = os.path.abspath(os.fspath(directory))
  for d in (os.path.join(directory, PARAMS), directory):
    if orbax_store.is_params_dir(d):
      return d
  raise CheckpointError(f"{directory}: no Orbax parameter checkpoint ({PARAMS}/{orbax_store.METADATA} not found)")


def check_stored(reader: orbax_store.ParamReader, state: nnx.State, ignore_prefixes: tuple[str, ...] = ()) -> None:
  """Every leaf of `state` (abstract is enough) stored with its shape (float leaves in any float dtype,
  FP8 values and their float32 scales exactly), and no other leaf stored (but those named with one of
  `ignore_prefixes`, e.g. the vision tower when loading the text model alone)."""
  expected = {}
  for path, var in nnx.to_flat_state(state):
    dt = jnp.dtype(var.dtype)
    dtypes = _FLOATS if jnp.issubdtype(dt, jnp.floating) and dt.itemsize > 1 and path[-1] not in (
        "gate_up_scale", "down_scale") and not str(path[-1]).endswith(quantize.SUFFIX) else (dt.name,)
    expected[orbax_store.leaf_name(path)] = (var.shape, dtypes)
  v = Validator(reader.stored(), reader.directory, what="parameter")
  v.need_all(expected)
  v.finish(ignore=[n for n in v.stored if n.startswith(ignore_prefixes)] if ignore_prefixes else ())


def restore_params(directory: str | os.PathLike, target: Any = None) -> Any:
  """Parameters of a model or step directory (see `targets` for targets and the result's kind)."""
  path = params_dir(directory)
  with ocp.StandardCheckpointer() as ck:
    if target is None:
      return ck.restore(path, targets.default_target(tree_of(ck.metadata(path).item_metadata)))
    return targets.like(target, ck.restore(path, targets.pure_target(target)))
