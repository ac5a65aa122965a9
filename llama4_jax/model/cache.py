"""KV cache for prefill + incremental decoding: static shapes, stacked over layer blocks like the parameters.
The cached forward itself is the model's (`text.TextModel.forward(..., cache=...)`); this module holds the
cache data and its bookkeeping, write and attend math.

Letters: B batch, T new tokens, S cache slots, W ring slots, K kv heads, d head_dim, C chunk, n blocks.

Layout. `KVCache.kv` holds one (k, v) pair per layer of a scanned block (the layer period p), each stacked
over the L/p blocks: [n, B, S, K, d]. The slot count depends on the layer kind:
  chunked (RoPE) layers  a ring of W = min(attention_chunk_size, max_len) slots, cache index i in slot i mod W.
                         A query sees only keys of its own chunk, at most C - 1 indices back, so C slots hold
                         every key a later token can still see: memory is bounded whatever the length.
  global (NoPE) layers   S = max_len slots, cache index i in slot i.
With `dtype` "int8" (`init`) each buffer is an `Int8KV`: int8 values [n, B, S, K, d] and one float32 scale per
token and kv head [n, B, S, K] (absmax over d / 127: `quantize_kv`), quantised when written and dequantised
to the queries' dtype when attended (the prefill attends over its own float keys, as in the float cache).

Every layer of a kind writes the same indices, so each slot's mask data (`attention.TokenInfo`: seg, mpos)
is stored once per kind (`ring`, `full`) and attention applies the exact mask of attention.py to cached
keys. Empty slots have seg 0 and are never visible.

Indices follow transformers' DynamicCache and `generate`: the cache index counts every token written, left
padding included (`index` is the next one). A row's mask position is its cache index minus its left padding
(`left_pad`, fixed at prefill), so the chunk grid starts at its first real token; temperature tuning uses
the cache index; RoPE positions default to `generate`'s cumsum(attention_mask) - 1 (0 on padding), which
for later tokens continues as mpos.

A step of T new tokens:
  prefill (empty cache)  attention over the new tokens alone, by the full-sequence code path (prefill logits
                         equal `TextModel.forward` bit for bit), then the keys are stored (a ring keeps the
                         last W of them: exactly the ones later tokens can see).
  T == 1                 the key is written first, then the query attends over the slots (the ring slot it
                         overwrites held index i - W, which lies in an earlier chunk).
  T > 1                  ring layers attend over [old slots; new keys], then write; global layers write, then
                         attend over the slots.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import sharding
from llama4_jax.config import TextConfig
from llama4_jax.model import attention as attn_lib
from llama4_jax.model import blockwise
from llama4_jax.model.attention import TokenInfo
from sharding import constrain

INT8_MAX = 127


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8KV:
  """A cache buffer held as int8 values and per-token-per-head scales: x[..., s, k, :] = q[..., s, k, :] *
  scale[..., s, k]. A pytree; leading axes (blocks, batch, slots) index both leaves alike."""

  q: jax.Array  # int8 [..., S, K, d]
  scale: jax.Array  # float32 [..., S, K]

  def dequantize(self, dtype) -> jax.Array:
    return (self.q.astype(jnp.float32) * self.scale[..., None]).astype(dtype)


def quantize_kv(x: jax.Array) -> Int8KV:
  """Symmetric int8 over the last axis (head_dim) of x [..., K, d]: scale = absmax * float32(1 / 127) (1 for an
  all-zero vector), values round(x * (1 / scale)) half to even, in [-127, 127]."""
  x32 = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x32), axis=-1)
  scale = jnp.where(amax > 0, amax * np.float32(1.0 / INT8_MAX), 1.0)
  q = jnp.clip(jnp.round(x32 * (1.0 / scale)[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return Int8KV(q, scale)


Buffer = jax.Array | Int8KV
LayerKV = tuple[Buffer, Buffer]  # (k, v) of one layer: [B, S, K, d] (inside the scan) or [n, B, S, K, d]


def is_int8(dtype) -> bool:
  return jnp.dtype(dtype) == jnp.int8


def values(buf: Buffer, dtype) -> jax.Array:
  """A buffer's keys or values in `dtype` (an `Int8KV` dequantised; a float buffer as stored)."""
  return buf.dequantize(dtype) if isinstance(buf, Int8KV) else buf


class KVCache(NamedTuple):
  """The decoding state of a batch (a pytree of arrays; shapes fixed by `init`)."""

  kv: tuple[LayerKV, ...]  # per layer of a block: (k, v) [n_blocks, B, S, K, d], S = W (chunked) or max_len
  ring: TokenInfo  # [B, W] mask data of the ring slots
  full: TokenInfo  # [B, max_len] mask data of the global slots
  index: jax.Array  # [] int32: cache index of the next token
  left_pad: jax.Array  # [B] int32: left padding of each row (set at prefill)

  @property
  def max_len(self) -> int:
    return self.full.seg.shape[1]

  @property
  def ring_size(self) -> int:
    return self.ring.seg.shape[1]


class Step(NamedTuple):
  """Bookkeeping of one cached forward, shared by every layer (carried in `text.Context.step`)."""

  index: jax.Array  # [] cache index of the first new token
  prefill: bool  # static: the cache is empty, attend over the new tokens only
  ring_old: TokenInfo  # ring slot data before this step's write
  ring: TokenInfo  # ring slot data after it
  full: TokenInfo  # global slot data after it
  left_pad: jax.Array  # [B]
  rope_pos: jax.Array  # [B, T] default RoPE positions (generate's)
  temp_pos: jax.Array  # [B, T] temperature-tuning positions (cache indices)


def ring_size(cfg: TextConfig, max_len: int) -> int:
  return min(cfg.attention_chunk_size, max_len)


def init(cfg: TextConfig, batch: int, max_len: int, dtype) -> KVCache:
  """An empty cache for `batch` rows of at most `max_len` tokens (prompt, padding and generation); `dtype` a
  float dtype, or "int8" (`Int8KV` buffers: int8 values, float32 scales per token and kv head)."""
  p = cfg.layer_period
  n = cfg.num_hidden_layers // p
  W = ring_size(cfg, max_len)
  K, d = cfg.num_key_value_heads, cfg.head_dim

  def slots(use_rope, *shape, dtype=dtype):
    if use_rope:
      return jnp.zeros((n, batch, W) + shape, dtype)
    names = (None, "act_batch", "act_cache", "act_kv_heads", None)[: 3 + len(shape)]
    return constrain(jnp.zeros((n, batch, max_len) + shape, dtype), names)

  def buf(use_rope):
    if is_int8(dtype):
      return Int8KV(slots(use_rope, K, d), slots(use_rope, K, dtype=jnp.float32))
    return slots(use_rope, K, d)

  kv = tuple((buf(r), buf(r)) for r, _ in cfg.layer_kinds[:p])
  zeros = lambda S: jnp.zeros((batch, S), jnp.int32)  # noqa: E731
  full = tuple(constrain(zeros(max_len), ("act_batch", "act_cache")) for _ in range(2))
  return KVCache(kv, TokenInfo(zeros(W), zeros(W)), TokenInfo(*full), jnp.zeros((), jnp.int32),
                 jnp.zeros((batch,), jnp.int32))


def abstract(cfg: TextConfig, batch: int, max_len: int, dtype) -> KVCache:
  """Shapes and dtypes of `init`'s cache, nothing allocated."""
  return jax.eval_shape(lambda: init(cfg, batch, max_len, dtype))


def kv_bytes(cfg: TextConfig, length: int, dtype="bfloat16") -> int:
  """K/V bytes of one sequence of `length` tokens: 2*K*d*itemsize * (L_global*length + L_chunked*min(length, C));
  "int8": 2*K*(d + 4) per layer and token (values and float32 scales). (The slot mask data adds 8 bytes per
  slot per kind, not per layer.)"""
  K, d = cfg.num_key_value_heads, cfg.head_dim
  per_layer_token = 2 * K * (d + 4) if is_int8(dtype) else 2 * K * d * jnp.dtype(dtype).itemsize
  chunked = sum(cfg.rope_flags)
  full = cfg.num_hidden_layers - chunked
  return per_layer_token * (full * length + chunked * min(length, cfg.attention_chunk_size))


# --------------------------------------------------------------------------------------------------
# Writes and attention


def write(buf: Buffer, new: jax.Array, index: jax.Array, ring: bool) -> Buffer:
  """`new` [B, T, ...] written into `buf` [B, S, ...] at cache indices index .. index+T-1 (slots modulo S on
  a ring, which keeps the last S of them); an `Int8KV` buffer takes `quantize_kv(new)`."""
  if isinstance(buf, Int8KV):
    q = quantize_kv(new)
    return Int8KV(write(buf.q, q.q, index, ring), write(buf.scale, q.scale, index, ring))
  S, T = buf.shape[1], new.shape[1]
  new = new.astype(buf.dtype)
  if not ring:
    return sharding.cache_write(buf, new, index)  # slots split over devices under context parallelism
  if T > S:
    new, index, T = new[:, T - S:], index + (T - S), S
  if T == 1:
    return jax.lax.dynamic_update_slice_in_dim(buf, new, index % S, axis=1)
  return buf.at[:, (index + jnp.arange(T)) % S].set(new)


def store(kv: LayerKV, k: jax.Array, v: jax.Array, step: Step, ring: bool) -> LayerKV:
  return write(kv[0], k, step.index, ring), write(kv[1], v, step.index, ring)


def attend(q, k, v, kv: LayerKV, q_info: TokenInfo, step: Step, chunk: int | None, precision,
           block: int = blockwise.DEFAULT_BLOCK):
  """Attention of the new queries over the cached and the new keys, and the updated layer cache.
  q [B, T, H, d], k/v [B, T, K, d]; `chunk` None for a global layer. Global layers attend blockwise over the
  slots (slot = cache index: the empty slots after the new tokens are skipped whole, so a step costs what
  the history costs, and a slice of a chunked prefill never holds a [T, max_len] score array); ring layers
  over [the ring; the new keys]."""
  ring = chunk is not None
  T = q.shape[1]
  if ring and T > 1:
    old_k, old_v = values(kv[0], k.dtype), values(kv[1], v.dtype)
    keys = jnp.concatenate([old_k, k.astype(old_k.dtype)], axis=1)
    vals = jnp.concatenate([old_v, v.astype(old_v.dtype)], axis=1)
    info = TokenInfo(*(jnp.concatenate([a, b], axis=1) for a, b in zip(step.ring_old, q_info)))
    out = blockwise.attention(q, keys, vals, q_info, info, chunk, precision, block, block)
    return out, store(kv, k, v, step, ring)
  kv = store(kv, k, v, step, ring)
  keys, vals = values(kv[0], q.dtype), values(kv[1], q.dtype)
  if ring:
    return attn_lib.attention(q, keys, vals, q_info, step.ring, chunk, precision), kv
  kernel = attn_lib.Kernel("blockwise", False, precision, block)
  return sharding.cached_attention(kernel, q, keys, vals, q_info, step.full, step.index), kv


# --------------------------------------------------------------------------------------------------
# Steps


def begin(cache: KVCache, attention_mask, B: int, T: int, prefill: bool) -> tuple[Step, TokenInfo]:
  """Step bookkeeping and the new tokens' mask data. `attention_mask` [B, T] (None: all ones) marks left
  padding: at prefill, and in the later slices of a chunked prefill (a row whose cached tokens are all
  padding keeps counting its leading zeros); decoded tokens are real (transformers' `generate` appends
  ones)."""
  mask = jnp.ones((B, T), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  idx = cache.index + jnp.arange(T, dtype=jnp.int32)
  leading = jnp.sum(jnp.cumsum(mask, axis=-1) == 0, axis=-1).astype(jnp.int32)
  if prefill:
    left_pad = leading
  else:
    left_pad = jnp.where(cache.left_pad == cache.index, cache.left_pad + leading, cache.left_pad)
  info = TokenInfo(mask, idx[None, :] - left_pad[:, None])
  ring = TokenInfo(*(write(a, b, cache.index, ring=True) for a, b in zip(cache.ring, info)))
  full = TokenInfo(*(write(a, b, cache.index, ring=False) for a, b in zip(cache.full, info)))
  rope_pos = jnp.where(mask != 0, info.mpos, 0)
  temp_pos = jnp.broadcast_to(idx, (B, T))
  return Step(cache.index, prefill, cache.ring, ring, full, left_pad, rope_pos, temp_pos), info


def finish(cache: KVCache, kv: tuple[LayerKV, ...], step: Step, T: int) -> KVCache:
  return KVCache(tuple(kv), step.ring, step.full, step.index + T, step.left_pad)
