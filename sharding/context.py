"""The active sharding context: which rules and mesh `constrain` uses. Model code only calls `constrain`."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Sequence

import jax

_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("llama4_sharding", default=None)


@contextlib.contextmanager
def use(rules: Any, mesh: jax.sharding.Mesh) -> Iterator[None]:
  """Within this block, `constrain` places activations on `mesh` according to `rules`."""
  token = _ACTIVE.set((rules, mesh))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[Any, jax.sharding.Mesh] | None:
  """(rules, mesh) of the enclosing `use` block, or None."""
  return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical axis names; a no-op outside a `use` block."""
  ctx = _ACTIVE.get()
  if ctx is None:
    return x
  rules, mesh = ctx
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, rules.spec(names)))


def routed_experts(experts_fn, x, idx, scores, gate_up, down, policy):
  """The routed-expert computation of a MoE layer: `experts_fn(x, idx, scores, gate_up, down, policy)`
  on one device, or its expert-parallel form when the active rules shard experts over a mesh axis."""
  ctx = _ACTIVE.get()
  if ctx is None:
    return experts_fn(x, idx, scores, gate_up, down, policy)
  rules, mesh = ctx
  ep = getattr(rules, "expert_parallel", None)
  if ep is None:
    return experts_fn(x, idx, scores, gate_up, down, policy)
  return ep(mesh, experts_fn, x, idx, scores, gate_up, down, policy)
