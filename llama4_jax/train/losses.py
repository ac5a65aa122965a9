"""Token cross-entropy under a loss mask, as sums (so micro-batches and shards add up exactly)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(target) over positions with mask 1, number of such positions); logits [B, T, V],
  targets / mask [B, T]. Computed in float32; masked positions contribute exactly 0 (also to the
  gradient), whatever their logits."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  m = mask.astype(jnp.float32)
  nll = jnp.where(m > 0, lse - target_logit, 0.0)
  return jnp.sum(nll * m), jnp.sum(m)
