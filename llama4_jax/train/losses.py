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
  # The target's logit by a compare against the vocabulary index (fused into one pass over the logits, and
  # its gradient an elementwise select), not a gather, whose gradient scatters into a zeroed [B, T, V].
  hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None].astype(jnp.int32)
  target_logit = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
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


# --------------------------------------------------------------------------------------------------
# Distillation


def distill_sums(student: jax.Array, teacher: jax.Array, teacher_idx: jax.Array | None, targets: jax.Array,
                 mask: jax.Array, temperature: float) -> dict:
  """Masked sums of one chunk: "ce" (student -log p(target)), "kl" (KL(p_t^T || p_s^T) at temperature T),
  "tokens". Student logits [B, T, V]. Teacher: full logits [B, T, V] with `teacher_idx` None (then also
  "teacher_ce"), or its top-k logits [B, T, k] at vocabulary ids `teacher_idx` [B, T, k] (the teacher's
  distribution renormalised over its top k; k = V gives the full KL). Float32; masked positions give 0."""
  s = student.astype(jnp.float32)
  t = teacher.astype(jnp.float32)
  m = mask.astype(jnp.float32)
  ce, tokens = cross_entropy_sum(s, targets, mask)
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  if teacher_idx is not None:
    log_ps = jnp.take_along_axis(log_ps, teacher_idx.astype(jnp.int32), axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  out = {"ce": ce, "kl": jnp.sum(jnp.where(m > 0, kl, 0.0) * m), "tokens": tokens}
  if teacher_idx is None:
    out["teacher_ce"] = cross_entropy_sum(t, targets, mask)[0]
  return out


def chunked_distill_sums(logits_fn, hidden: jax.Array, teacher_fn, teacher_in: tuple, targets: jax.Array,
                         mask: jax.Array, chunk: int, temperature: float) -> dict:
  """`distill_sums` over the sequence `chunk` tokens at a time (as `chunked_cross_entropy_sum`): student
  logits `logits_fn(hidden[:, t0:t1])`, teacher `teacher_fn(*[x[:, t0:t1] for x in teacher_in])` ->
  (teacher logits, top-k ids or None). Neither [B, T, V] tensor is held whole."""
  B, T = targets.shape

  def sums(h, t, m, tin):
    logits_t, idx = teacher_fn(*tin)
    return distill_sums(logits_fn(h), logits_t, idx, t, m, temperature)

  if not chunk or T <= chunk:
    return sums(hidden, targets, mask, teacher_in)
  n = -(-T // chunk)
  pad = n * chunk - T

  def split(x):
    if pad:
      x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def piece(carry, xs):
    h, t, m, tin = xs
    out = sums(h, t, m, tin)
    return jax.tree.map(jnp.add, carry, out), None

  xs = (split(hidden), split(targets), split(mask), tuple(split(x) for x in teacher_in))
  shapes = jax.eval_shape(lambda x: sums(*jax.tree.map(lambda a: a[0], x)), xs)
  zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  out, _ = jax.lax.scan(piece, zero, xs)
  return out
