"""Train state <-> `llama4_jax.io.checkpointer.Checkpointer` items.

Items of a step:
  params      every `nnx.Param` of the model (trainable and frozen together), the pure-dict layout of a
              model directory, so `llama4_jax.load` / `tools.convert orbax-to-hf` read a training step as is
  opt_state   {"optimizer": optax state, "bias": MoE selection biases, "step", "total_steps": int32,
               "rng": key data}
  data_state  {"process_count": n, "states": [iterator state of process 0, 1, ...]} (grain `get_state`)
  meta        {"config": HF config.json dict, "experiment": the Experiment as a dict, ...}
"""

from __future__ import annotations

import json

import jax
import numpy as np
from flax import nnx
from flax.nnx import traversals
from jax.experimental import multihost_utils

from llama4_jax.io.checkpointer import Checkpointer
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


def restore(ck: Checkpointer, parts: ModelParts, shardings: TrainState, abstract: TrainState,
            step: int | None = None) -> tuple[TrainState, dict, dict]:
  """(train state placed by `shardings`, this process's data-iterator state, meta) of `step` (latest)."""
  def target(tree, sh):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)

  params_t = merge_params(target(abstract.params, shardings.params), target(abstract.frozen, shardings.frozen))
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
