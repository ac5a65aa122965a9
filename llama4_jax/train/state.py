"""The train state as plain pytrees, and the bridge between it and the NNX model.

The model is split once into a graph definition and three groups of variables, kept as pure dicts
(nested dicts of arrays, the `nnx.to_pure_dict(state)` layout) so that optax, jit shardings and
Orbax see ordinary pytrees:
  params  trainable `nnx.Param`s
  frozen  `nnx.Param`s not trained (the vision tower and projector with `freeze_vision`)
  bias    `SelectionBias` variables of the MoE layers (aux-loss-free balancing; empty when off)
`ModelParts.merge` rebuilds the module from them (inside jit too).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import traversals

import sharding
from llama4_jax.io.targets import fill as _fill
from llama4_jax.model.text import SelectionBias


def trainable_filter(freeze_vision: bool):
  """Parameters that get gradients: every `nnx.Param`, minus the vision tower and projector if frozen."""
  if not freeze_vision:
    return nnx.Param
  return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision")), nnx.Not(nnx.PathContains("projector")))


def _abstract(state: nnx.State) -> nnx.State:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelParts:
  """Graph definition + abstract templates (shapes, dtypes, logical-axis metadata) of the three groups."""

  graphdef: Any
  params: nnx.State
  frozen: nnx.State
  bias: nnx.State

  @classmethod
  def split(cls, model: nnx.Module, freeze_vision: bool = False) -> tuple["ModelParts", dict, dict, dict]:
    """(parts, params, frozen, bias) of a concrete model; the last three as pure dicts."""
    graphdef, params, frozen, bias = nnx.split(model, trainable_filter(freeze_vision), nnx.Param, SelectionBias)
    parts = cls(graphdef, _abstract(params), _abstract(frozen), _abstract(bias))
    return parts, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen), nnx.to_pure_dict(bias)

  def merge(self, params: dict, frozen: dict, bias: dict) -> nnx.Module:
    return nnx.merge(self.graphdef, _fill(self.params, params), _fill(self.frozen, frozen), _fill(self.bias, bias))

  def shardings(self, rules, mesh) -> tuple[dict, dict, dict]:
    """NamedShardings (pure dicts) of the three groups under `rules` on `mesh`; the bias is replicated."""
    def of(template):
      if not jax.tree.leaves(template):
        return {}
      return nnx.to_pure_dict(sharding.param_shardings(template, rules, mesh, warn=False))

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return of(self.params), of(self.frozen), jax.tree.map(lambda _: replicated, nnx.to_pure_dict(self.bias))

  def moe_bias_paths(self) -> list[tuple]:
    """Paths of the selection biases in layer order (their rows stack to [L_moe, E])."""
    return sorted((p for p, _ in nnx.to_flat_state(self.bias)), key=_layer_order)


def _layer_order(path: tuple) -> tuple[int, ...]:
  return tuple(k for k in path if isinstance(k, int))


def stack_bias(parts: ModelParts, bias: dict) -> jax.Array | None:
  """[L_moe, E] in the order of the model's router logits, or None when balancing is off. Each stored
  bias is [n_blocks, E] (one row per scanned block); layer index = block * moe_per_block + position."""
  paths = parts.moe_bias_paths()
  if not paths:
    return None
  flat = traversals.flatten_mapping(bias)
  rows = jnp.stack([flat[p] for p in paths], axis=1)  # [n_blocks, moe_per_block, E]
  return rows.reshape(-1, rows.shape[-1])


def unstack_bias(parts: ModelParts, stacked: jax.Array) -> dict:
  """Inverse of `stack_bias`."""
  paths = parts.moe_bias_paths()
  rows = stacked.reshape(-1, len(paths), stacked.shape[-1])
  flat = {p: rows[:, i] for i, p in enumerate(paths)}
  return traversals.unflatten_mapping(flat)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  total_steps: jax.Array  # int32 scalar: the run's length (the learning-rate schedule ends there)
  params: dict  # trainable parameters
  frozen: dict  # parameters without updates
  bias: dict  # MoE selection biases (empty when aux-loss-free balancing is off)
  opt_state: Any  # optax state of `params`
  rng: jax.Array  # uint32 key data of the run's random stream (sampling); saved and restored with the rest
