"""Train state <-> `llama4_jax.io.checkpointer.Checkpointer` items.

Items of a step:
  params      every `nnx.Param` of the model (trainable and frozen together), the pure-dict layout of a
              model directory, so `llama4_jax.load` / `tools.convert orbax-to-hf` read a training step as is
  opt_state   {"optimizer": optax state, "bias": MoE selection biases, "step", "total_steps": int32,
               "rng": key data}
  data_state  {"process_count": n, "states": [iterator state of process 0, 1, ...]} (grain `get_state`)
  meta        {"config": HF config.json dict, "experiment": the Experiment as a dict, ...}

`restore` first refuses a step written by another model (`check_same_model`: architecture fields of the meta
config, parameter names and shapes), with an error naming the step and the first difference.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx
from flax.nnx import traversals
from jax.experimental import multihost_utils

from llama4_jax import config as config_lib
from llama4_jax.io import orbax_store
from llama4_jax.io.checkpointer import Checkpointer, read_meta
from llama4_jax.io.validate import CheckpointError, Validator
from llama4_jax.train.state import ModelParts, TrainState


def merge_params(params: dict, frozen: dict) -> dict:
  """The full parameter pure dict from the trainable and frozen groups (disjoint paths)."""
  flat = {**traversals.flatten_mapping(params), **traversals.flatten_mapping(frozen)}
  return traversals.unflatten_mapping(flat)


def split_params(parts: ModelParts, full: dict) -> tuple[dict, dict]:
  """Inverse of `merge_params` (paths decided by the templates)."""
  flat = traversals.flatten_mapping(full)
  def take(template):
    return traversals.unflatten_mapping({p: flat[p] for p in traversals.flatten_mapping(nnx.to_pure_dict(template))})
  return take(parts.params), take(parts.frozen)


def gather_data_state(state: dict) -> dict:
  """Every process's iterator state (identical layout on one process)."""
  n = jax.process_count()
  if n == 1:
    return {"process_count": 1, "states": [state]}
  raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([raw.size], np.int32))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: raw.size] = raw
  rows = multihost_utils.process_allgather(padded)
  return {"process_count": n,
          "states": [json.loads(bytes(rows[i][: int(sizes[i][0])]).decode()) for i in range(n)]}


def local_data_state(saved: dict) -> dict:
  n = jax.process_count()
  if saved["process_count"] != n:
    raise ValueError(f"the checkpoint's data state was written by {saved['process_count']} processes, this run "
                     f"has {n}: resume with the same number of hosts")
  return saved["states"][jax.process_index()]


def save(ck: Checkpointer, state: TrainState, data_state: dict, meta: dict, force: bool = False) -> bool:
  opt = {"optimizer": state.opt_state, "bias": state.bias, "step": state.step, "total_steps": state.total_steps,
         "rng": state.rng}
  return ck.save(int(state.step), merge_params(state.params, state.frozen), opt, gather_data_state(data_state),
                 meta, force=force)


_NOT_ARCHITECTURE = ("dtype", "torch_dtype", "transformers_version")  # config.json keys a resume may change


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    elif k not in _NOT_ARCHITECTURE:
      out[prefix + k] = v
  return out


def _model_config(parts: ModelParts, abstract: TrainState) -> config_lib.Llama4Config | None:
  """The architecture of the model `parts.merge` builds (traced abstractly: nothing is computed)."""
  found = []
  jax.eval_shape(lambda p, f, b: found.append(getattr(parts.merge(p, f, b), "cfg", None)), abstract.params,
                 abstract.frozen, abstract.bias)
  return found[0]


def check_same_model(step_dir: str, parts: ModelParts, abstract: TrainState, params_target: dict) -> None:
  """Refuses to resume a step written by another model: its meta config (every architecture field) and its
  stored parameters (names and shapes) must be those of the model being trained. CheckpointError naming
  the step directory and the first differing field or parameter."""
  meta = read_meta(step_dir)
  cfg = _model_config(parts, abstract) if "config" in meta else None
  if cfg is not None:
    now = json.loads(json.dumps(config_lib.to_hf(cfg)))  # as meta stores it (tuples become lists)
    saved, now = _flat(meta["config"]), _flat(now)
    diff = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if diff:
      more = f" (and {len(diff) - 1} more: {', '.join(diff[1:6])})" if len(diff) > 1 else ""
      raise CheckpointError(
          f"{step_dir}: resuming with a changed model config: {diff[0]} is {saved.get(diff[0])!r} in the checkpoint, "
          f"{now.get(diff[0])!r} now{more}. Resume with the checkpoint's model config, or start a new run (another "
          "name, or run.init_from to start from its parameters)")
  expected = {orbax_store.leaf_name(p): (x.shape, (*_FLOATS, x.dtype.name))
              for p, x in traversals.flatten_mapping(params_target).items()}
  v = Validator(orbax_store.ParamReader(os.path.join(step_dir, "params")).stored(), os.path.join(step_dir, "params"),
                what="parameter")
  v.need_all(expected)
  v.finish(why="the model being trained")


_FLOATS = ("float32", "bfloat16", "float16")


def restore(ck: Checkpointer, parts: ModelParts, shardings: TrainState, abstract: TrainState,
            step: int | None = None) -> tuple[TrainState, dict, dict]:
  """(train state placed by `shardings`, this process's data-iterator state, meta) of `step` (latest), once
  `check_same_model` has passed."""
  def target(tree, sh):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)

  params_t = merge_params(target(abstract.params, shardings.params), target(abstract.frozen, shardings.frozen))
  step = ck.latest_step() if step is None else step
  if step is not None:
    check_same_model(os.path.join(ck.directory, str(step)), parts, abstract, params_t)
  opt_t = {"optimizer": target(abstract.opt_state, shardings.opt_state),
           "bias": target(abstract.bias, shardings.bias),
           "step": target(abstract.step, shardings.step),
           "total_steps": target(abstract.total_steps, shardings.total_steps),
           "rng": target(abstract.rng, shardings.rng)}
  r = ck.restore(step, params_target=params_t, opt_target=opt_t)
  params, frozen = split_params(parts, r["params"])
  o = r["opt_state"]
  state = TrainState(step=o["step"], total_steps=o["total_steps"], params=params, frozen=frozen, bias=o["bias"],
                     opt_state=o["optimizer"], rng=o["rng"])
  return state, local_data_state(r["data_state"]), r["meta"]
