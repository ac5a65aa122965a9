"""Parameter placement from the model's logical axis names: specs, shardings, sharded init, placement.

Everything here works on any NNX state whose variables carry logical axis names in their `out_sharding`
metadata, abstract (`nnx.eval_shape`, no allocation) or concrete, so the shardings of Scout and Maverick are
known before a byte is allocated.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.mesh import sizes_of
from sharding.rules import Rules


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _state(tree: Any) -> nnx.State:
  return tree if isinstance(tree, nnx.State) else nnx.state(tree)


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def logical_names(var: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axis names a variable was created with (its `out_sharding` metadata), or None."""
  meta = var.get_metadata()
  names = meta.get("out_sharding", meta.get("sharding_names"))
  return None if names is None else tuple(names)


def param_specs(tree: Any, rules: Rules, mesh: jax.sharding.Mesh | Mapping[str, int]
                ) -> tuple[nnx.State, list[str]]:
  """(state of PartitionSpec, notes). `tree` is a model or state, abstract or concrete. A dimension that
  its mesh axes do not divide is replicated (and noted); unknown names and collisions raise, naming the
  parameter."""
  sizes = sizes_of(mesh)
  notes: list[str] = []

  def one(path, var):
    names = logical_names(var)
    if names is None:
      return var.replace(P())
    spec, n = rules.resolve(names, var.shape, sizes, what=f"parameter {path_str(path)}")
    notes.extend(n)
    return var.replace(spec)

  return jax.tree_util.tree_map_with_path(one, _state(tree), is_leaf=_is_var), notes


def param_shardings(tree: Any, rules: Rules, mesh: jax.sharding.Mesh, warn: bool = True) -> nnx.State:
  """State of `NamedSharding` (same structure as the model's state), derived from the logical names.
  Replicated fallbacks are reported with one `UserWarning` when `warn`."""
  specs, notes = param_specs(tree, rules, mesh)
  if notes and warn:
    warnings.warn(f"{len(notes)} parameter dimension(s) replicated under rules {rules.name!r}:\n  "
                  + "\n  ".join(notes), stacklevel=2)
  return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, v.get_value())), specs, is_leaf=_is_var)


def shard_model(model: nnx.Module, rules: Rules, mesh: jax.sharding.Mesh) -> nnx.Module:
  """Moves an existing model's parameters to their shardings (in place; returns the model)."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, param_shardings(state, rules, mesh)))
  return model


def batch_sharding(rules: Rules, mesh: jax.sharding.Mesh, shape: tuple[int, ...]) -> NamedSharding:
  """Sharding of a [B, T, ...] batch array (token ids, targets, masks): act_batch x act_seq."""
  names = ("act_batch", "act_seq") + (None,) * (len(shape) - 2)
  spec, _ = rules.resolve(names[: len(shape)], shape, sizes_of(mesh), what="batch")
  return NamedSharding(mesh, spec)


def shard_bytes(shape: tuple[int, ...], dtype, spec: P, sizes: Mapping[str, int]) -> int:
  """Bytes of one device's shard of an array of `shape` placed by `spec` on a mesh of `sizes`."""
  n = 1
  for entry in spec:
    for ax in () if entry is None else (entry,) if isinstance(entry, str) else entry:
      n *= sizes[ax]
  return math.prod(shape) * jax.numpy.dtype(dtype).itemsize // n
