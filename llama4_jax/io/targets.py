"""Parameters as Orbax stores them, and restore targets.

Parameters are stored as the *pure dict* of the model state: nested dicts of arrays,
`nnx.to_pure_dict(nnx.state(model, nnx.Param))`. An `nnx.State` passed in is converted to it. Stacked
(scanned) text layers live under integer keys (`text.blocks.layers.{j}`), which Orbax stores as strings.

Restoring: give a *target* with the structure, shapes, dtypes and shardings wanted, e.g.
`abstract_target(nnx.state(abstract(cfg, policy)), shardings, dtype)` (an `nnx.State` of
`jax.ShapeDtypeStruct`s with `sharding=`). Every device then reads only its own slice from storage (nothing
is gathered on one device), onto any mesh, casting to the target dtype. The result has the target's kind
(`like`): an `nnx.State` target gives an `nnx.State` (ready for `nnx.merge(graphdef, state)`), a pure dict
gives a pure dict. Without a target everything is restored as saved (`default_target`: shapes, dtypes) on
the default device, as a pure dict with string keys; `nnx.replace_by_pure_dict(state, restored)` accepts it.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
from flax import nnx
from flax.nnx import traversals


def _is_nnx(x) -> bool:
  return isinstance(x, (nnx.State, nnx.Variable))


def _default_device() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def to_pure(tree: Any) -> Any:
  """`tree` with every `nnx.State` replaced by its pure dict and every `nnx.Variable` by its value."""
  def one(x):
    if isinstance(x, nnx.State):
      return nnx.to_pure_dict(x)
    return x.get_value() if isinstance(x, nnx.Variable) else x
  return jax.tree.map(one, tree, is_leaf=_is_nnx)


def like(target: Any, restored: Any) -> Any:
  """Puts a pure restored tree back into the kind of `target` (States and Variables rebuilt)."""
  def one(t, r):
    if isinstance(t, nnx.State):
      out = jax.tree.map(lambda v: v, t)  # fresh Variables, the target is left untouched
      nnx.replace_by_pure_dict(out, r)
      return out
    return t.replace(r) if isinstance(t, nnx.Variable) else r
  return jax.tree.map(one, target, restored, is_leaf=_is_nnx)


def fill(template: nnx.State, pure: Mapping) -> nnx.State:
  """A state with the Variables of `template` holding the values of the pure dict `pure` (any leaf: arrays, or
  pytrees such as `model.lora.Adapted`); `template` is left untouched."""
  flat = traversals.flatten_mapping(pure)
  return nnx.from_flat_state([(path, var.replace(flat[path])) for path, var in nnx.to_flat_state(template)])


def _abstract_leaf(x, dtype=None, sharding=None):
  sharding = sharding if sharding is not None else getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=sharding)


def abstract_target(state: Any, shardings: Any = None, dtype: Any = None) -> Any:
  """A restore target from an abstract (or concrete) state: `jax.ShapeDtypeStruct` leaves with the shardings
  of `shardings` (a tree of `jax.sharding.Sharding` with the same structure, e.g.
  `sharding.params.param_shardings`; default: the leaves' own, else the first device) and, if `dtype` is
  given, that dtype for every floating leaf."""
  default = _default_device()

  def leaf(x, sh=None):
    sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
    sh = sh if sh is not None else (getattr(x, "sharding", None) or default)
    dt = dtype if dtype is not None and jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else None
    return _abstract_leaf(x, dt, sh)

  if shardings is None:
    return jax.tree.map(leaf, state)
  return jax.tree.map(leaf, state, shardings)


def default_target(tree_metadata: Any) -> Any:
  """Restore target "as saved" on the default device, from Orbax's stored metadata tree."""
  device = _default_device()

  def leaf(m):
    if hasattr(m, "shape") and hasattr(m, "dtype"):
      return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device)
    return m
  return jax.tree.map(leaf, tree_metadata)


def pure_target(target: Any) -> Any:
  """Pure-dict target of ShapeDtypeStructs; leaves without a sharding go to the default device."""
  device = _default_device()

  def leaf(x):
    if not hasattr(x, "shape"):
      return x
    return _abstract_leaf(x, sharding=getattr(x, "sharding", None) or device)
  return jax.tree.map(leaf, to_pure(target))


def flat_leaves(tree: Any) -> Mapping[tuple, Any]:
  """{path tuple: leaf} of a pure dict (or `nnx.State`)."""
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(to_pure(tree))[0]:
    out[tuple(getattr(k, "key", getattr(k, "idx", k)) for k in kp)] = leaf
  return out
