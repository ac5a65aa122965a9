"""The active sharding context: which rules and mesh `constrain` and `routed_experts` use.

Model code calls only `constrain(x, names)` and `routed_experts(...)`; outside a `use` block both are plain
single-device math. The context is read while a function is traced, so jit the function inside the block
(a jitted function traced outside it keeps its unconstrained trace).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Callable, Iterator, Sequence

import jax
from jax.sharding import NamedSharding

from sharding import dispatch, sequence
from sharding.rules import Rules


@dataclasses.dataclass(frozen=True)
class _Active:
  rules: Rules
  mesh: jax.sharding.Mesh
  on_drop: Callable[[float], None] | None


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("llama4_sharding", default=None)


@contextlib.contextmanager
def use(rules: Rules, mesh: jax.sharding.Mesh, on_drop: Callable[[float], None] | None = None) -> Iterator[None]:
  """Within this block, activations are placed on `mesh` by `rules`, and routed experts split over a mesh
  axis travel by `rules.dispatch`. `on_drop(fraction)` receives, every step, the fraction of assignments a
  capacity-limited dispatch dropped. Also makes `mesh` the current JAX mesh (`jax.set_mesh`)."""
  token = _ACTIVE.set(_Active(rules, mesh, on_drop))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical axis names; a no-op outside a `use` block.
  A dimension its mesh axes do not divide (e.g. a batch of 1 at decode time) is left replicated."""
  ctx = _ACTIVE.get()
  if ctx is None:
    return x
  spec, _ = ctx.rules.resolve(names, x.shape, dict(ctx.mesh.shape), what="activation")
  return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


def routed_experts(local_fn: dispatch.LocalExperts, x: jax.Array, idx: jax.Array, scores: jax.Array, weights,
                   names: Sequence[tuple[str, ...]]) -> jax.Array:
  """The routed-expert output [N, D] of one MoE layer (see `sharding.dispatch.LocalExperts` for `local_fn`,
  `weights` and `names`): `local_fn` on every token outside a `use` block or when the rules have no
  dispatch, else the expert-parallel dispatch (shard_map + all_to_all) of `sharding.dispatch`."""
  ctx = _ACTIVE.get()
  if ctx is None or ctx.rules.dispatch is None:
    return local_fn(x, idx, scores, weights, idx.size)
  return dispatch.routed_experts(ctx.rules, ctx.mesh, local_fn, x, idx, scores, weights, names, ctx.on_drop)


def sequence_attention(kernel: sequence.SequenceKernel, q: jax.Array, k: jax.Array, v: jax.Array, info,
                       chunk: int | None, aligned: bool) -> jax.Array:
  """Self-attention of one layer (`kernel.attend` on the whole sequence), or, inside a `use` block whose rules
  split the sequence (`act_seq`), context-parallel attention (`sharding.sequence`). `info`: (segment ids,
  mask positions) [B, T]; `aligned`: mask positions equal token indices (no padding, no packing)."""
  ctx = _ACTIVE.get()
  if ctx is None or not ctx.rules.axes("act_seq"):
    return kernel.attend(q, k, v, info, info, chunk, None)
  return sequence.attention(ctx.rules, ctx.mesh, kernel, q, k, v, info, chunk, aligned)


def cache_write(buf: jax.Array, new: jax.Array, index) -> jax.Array:
  """`new` [B, T, ...] written into the slots index .. of a (global-layer) cache buffer [B, S, ...], split
  over its slots inside a `use` block whose rules map `act_cache` (`sharding.sequence.cache_write`)."""
  ctx = _ACTIVE.get()
  if ctx is None or not ctx.rules.axes("act_cache"):
    return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), index, axis=1)
  return sequence.cache_write(ctx.rules, ctx.mesh, buf, new, index)


def cached_attention(kernel: sequence.SequenceKernel, q, k_buf, v_buf, q_info, slot_info, index) -> jax.Array:
  """New queries (cache indices index ..) over the global cache slots (slot = cache index): `kernel.attend`
  with the index offsets, or split over the slots (`sharding.sequence.cached_attention`)."""
  ctx = _ACTIVE.get()
  if ctx is None or not ctx.rules.axes("act_cache"):
    return kernel.attend(q, k_buf, v_buf, q_info, slot_info, None, (index, 0))
  return sequence.cached_attention(ctx.rules, ctx.mesh, kernel, q, k_buf, v_buf, q_info, slot_info, index)
