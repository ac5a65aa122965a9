"""The active sharding context: which rules and mesh `constrain` and `routed_experts` use.

Model code calls only `constrain(x, names)` and `routed_experts(...)`; both are no-ops (plain
single-device math) outside a `use` block. The context is read while a function is traced, so jit
the function inside the block (a jitted function traced outside it keeps its unconstrained trace).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Sequence

import jax
from jax.sharding import NamedSharding

_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("llama4_sharding", default=None)


@contextlib.contextmanager
def use(rules: Any, mesh: jax.sharding.Mesh) -> Iterator[None]:
  """Within this block, activations are placed on `mesh` by `rules`, and MoE layers dispatch their
  experts by `rules.expert_parallel`. Also makes `mesh` the current JAX mesh (`jax.set_mesh`)."""
  token = _ACTIVE.set((rules, mesh))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[Any, jax.sharding.Mesh] | None:
  """(rules, mesh) of the enclosing `use` block, or None."""
  return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical axis names; a no-op outside a `use` block.
  A dimension its mesh axes do not divide (e.g. a batch of 1 at decode time) is left replicated."""
  ctx = _ACTIVE.get()
  if ctx is None:
    return x
  rules, mesh = ctx
  spec, _ = rules.resolve(names, x.shape, dict(mesh.shape), what="activation")
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def routed_experts(experts_fn, x, idx, scores, gate_up, down, policy):
  """The routed-expert computation of a MoE layer: `experts_fn(x, idx, scores, gate_up, down, policy)`
  on one device, or `rules.expert_parallel(mesh, ...)` (shard_map + all_to_all) inside a `use` block."""
  ctx = _ACTIVE.get()
  if ctx is None:
    return experts_fn(x, idx, scores, gate_up, down, policy)
  rules, mesh = ctx
  ep = getattr(rules, "expert_parallel", None)
  if ep is None:
    return experts_fn(x, idx, scores, gate_up, down, policy)
  return ep(mesh, experts_fn, x, idx, scores, gate_up, down, policy)
