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


def chunked_cross_entropy_sum(logits_fn, hidden: jax.Array, targets: jax.Array, mask: jax.Array,
                              chunk: int) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy_sum(logits_fn(hidden), ...)` computing the logits `chunk` tokens at a time (a rematerialised
  scan over slices of the sequence), so a long sequence never holds [B, T, V] float32 logits nor their
  gradient: hidden [B, T, D], `logits_fn` [B, t, D] -> [B, t, V]. `chunk` 0 or >= T: one piece."""
  B, T = targets.shape
  if not chunk or T <= chunk:
    return cross_entropy_sum(logits_fn(hidden), targets, mask)
  n = -(-T // chunk)
  pad = n * chunk - T
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets, mask = (jnp.pad(x, ((0, 0), (0, pad))) for x in (targets, mask))
  split = lambda x: jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)  # noqa: E731

  @jax.checkpoint
  def piece(carry, xs):
    h, t, m = xs
    ce, tok = cross_entropy_sum(logits_fn(h), t, m)
    return (carry[0] + ce, carry[1] + tok), None

  zero = jnp.zeros((), jnp.float32)
  (ce, tok), _ = jax.lax.scan(piece, (zero, zero), (split(hidden), split(targets), split(mask)))
  return ce, tok
