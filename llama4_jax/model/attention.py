"""Attention math: masks, temperature tuning, grouped-query attention (global and chunk-local).

Letters: B batch, T queries, S keys, H query heads, K kv heads, G = H / K, d head_dim, C chunk,
n number of query blocks.

Masking is expressed per token, on both the query and the key side, by two integer arrays:
  seg   segment id, 0 = padding (never attended to). Packed rows carry 1, 2, 3... per document.
  mpos  mask position: the index used for causality and for the chunk grid.
        Unpacked rows: cache index minus the row's left-padding count (reference 1.7: the chunk grid
        starts at the first real token). Packed rows: the position inside the document.
A key k is visible from a query q iff seg_k != 0, seg_k == seg_q, mpos_k <= mpos_q and, on chunked
layers, mpos_k // C == mpos_q // C.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite: a fully masked (padding) query row yields a uniform, finite softmax


class TokenInfo(NamedTuple):
  """Per-token mask data of a sequence of queries or keys: [B, T] int32 each."""

  seg: jax.Array
  mpos: jax.Array


def allowed(q: TokenInfo, k: TokenInfo, chunk: int | None) -> jax.Array:
  """Boolean visibility [B, T, S] (see the module docstring)."""
  ok = (k.seg[:, None, :] != 0) & (k.seg[:, None, :] == q.seg[:, :, None])
  ok &= k.mpos[:, None, :] <= q.mpos[:, :, None]
  if chunk is not None:
    ok &= (k.mpos[:, None, :] // chunk) == (q.mpos[:, :, None] // chunk)
  return ok


def temperature(temp_pos: jax.Array, floor_scale: int, attn_scale: float) -> jax.Array:
  """Query scale of NoPE layers: 1 + attn_scale * log(1 + floor((p + 1) / floor_scale)), float32."""
  p = temp_pos.astype(jnp.float32)
  return 1.0 + attn_scale * jnp.log1p(jnp.floor((p + 1.0) / floor_scale))


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, ok: jax.Array, precision) -> jax.Array:
  """q [..., T, K, G, d], k/v [..., S, K, d], ok [..., T, S] -> [..., T, K, G, d]. Softmax in float32."""
  scale = q.shape[-1] ** -0.5
  s = jnp.einsum("...tkgd,...skd->...kgts", q, k, precision=precision,
                 preferred_element_type=jnp.float32) * scale
  s = jnp.where(ok[..., None, None, :, :], s, _NEG)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum("...kgts,...skd->...tkgd", p, v, precision=precision,
                    preferred_element_type=jnp.float32).astype(v.dtype)


def _grouped(q: jax.Array, n_kv: int) -> jax.Array:
  """[B, T, H, d] -> [B, T, K, G, d]: query head j uses kv head j // G."""
  B, T, H, d = q.shape
  return q.reshape(B, T, n_kv, H // n_kv, d)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_info: TokenInfo, k_info: TokenInfo,
              chunk: int | None, precision=None) -> jax.Array:
  """Dense attention with the exact mask: q [B, T, H, d], k/v [B, S, K, d] -> [B, T, H, d]. O(T*S)."""
  B, T, H, d = q.shape
  out = _attend(_grouped(q, k.shape[2]), k, v, allowed(q_info, k_info, chunk), precision)
  return out.reshape(B, T, H, d)


def _blocks(x: jax.Array, n: int, c: int) -> jax.Array:
  return x.reshape(x.shape[0], n, c, *x.shape[2:])


def chunk_local_attention(q: jax.Array, k: jax.Array, v: jax.Array, info: TokenInfo, chunk: int,
                          precision=None) -> jax.Array:
  """Chunked self-attention in O(T * 2C) instead of O(T^2).

  Under the chunk mask a query sees only keys whose mask position lies in its own chunk, hence at most
  C - 1 indices back. Splitting the sequence into blocks of C indices, block i therefore needs only key
  blocks i - 1 and i: each block attends to 2C keys with the exact mask. Requires mpos to increase by
  one per index inside a segment (true for left padding and for packed documents).
  """
  B, T, H, d = q.shape
  C = chunk
  pad = (-T) % C
  if pad:
    widths = [(0, 0), (0, pad)]
    q, k, v = (jnp.pad(a, widths + [(0, 0)] * 2) for a in (q, k, v))
    info = TokenInfo(jnp.pad(info.seg, widths), jnp.pad(info.mpos, widths))
  n = (T + pad) // C
  qb = _blocks(_grouped(q, k.shape[2]), n, C)  # [B, n, C, K, G, d]

  def with_previous(a):  # [B, n, C, ...] -> [B, n, 2C, ...]: block i-1 then block i
    a = _blocks(a, n, C)
    prev = jnp.concatenate([jnp.zeros_like(a[:, :1]), a[:, :-1]], axis=1)
    return jnp.concatenate([prev, a], axis=2)

  kb, vb = with_previous(k), with_previous(v)
  seg_k = with_previous(info.seg)  # zero-padded block -1 is padding
  mpos_k = with_previous(info.mpos)
  seg_q, mpos_q = _blocks(info.seg, n, C), _blocks(info.mpos, n, C)
  ok = (seg_k[:, :, None, :] != 0) & (seg_k[:, :, None, :] == seg_q[:, :, :, None])
  ok &= mpos_k[:, :, None, :] <= mpos_q[:, :, :, None]
  ok &= (mpos_k[:, :, None, :] // C) == (mpos_q[:, :, :, None] // C)
  out = _attend(qb, kb, vb, ok, precision)  # [B, n, C, K, G, d]
  return out.reshape(B, n * C, H, d)[:, :T]
