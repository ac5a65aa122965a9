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

import dataclasses
import functools
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from llama4_jax.config import ATTENTION_IMPLS
from llama4_jax.model import blockwise, fused

log = logging.getLogger(__name__)

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
  """q [..., T, K, G, d], k/v [..., S, K, d], ok [..., T, S] -> [..., T, K, G, d]. Softmax in float32.

  The scores are laid out [..., K, T, G, S], the order a matmul batched over the KV heads gives them (the
  query rows (t, g) of one KV head together): a [..., K, G, T, S] layout cost XLA:CPU a transposing copy of
  the scores, and of their gradient, each way (the dense and chunked train step of one layer 11-12% slower
  at 1024 tokens)."""
  scale = q.shape[-1] ** -0.5
  s = jnp.einsum("...tkgd,...skd->...ktgs", q, k, precision=precision,
                 preferred_element_type=jnp.float32) * scale
  s = jnp.where(ok[..., None, :, None, :], s, _NEG)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum("...ktgs,...skd->...tkgd", p, v, precision=precision,
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


# --------------------------------------------------------------------------------------------------
# Choosing the implementation


_FUSED = {"gpu": "cudnn", "tpu": "splash"}


# "auto" without a fused kernel (CPU) runs self-attention over at most this many keys by xla: there its one
# score matrix is small and a train step is faster than blockwise's loops (docs/BENCHMARKS.md, long context:
# blockwise train step 0.86x xla at 2k tokens, 2.2x at 8k).
AUTO_XLA_KEYS = 2048


@functools.cache
def resolve(impl: str, platform: str) -> str:
  """The implementation `Policy.attention_impl` means on `platform` ("cpu", "gpu", "tpu"): "auto" is the fused
  kernel of the backend (cuDNN on GPU, splash on TPU), else blockwise (which `attend` turns into xla where
  the keys are few: `AUTO_XLA_KEYS`); logged once. "cudnn" off a GPU is an
  error; "splash" off a TPU runs in Pallas interpret mode (slow: for tests), with a warning."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"policy.attention_impl={impl!r}: unknown; choose one of {ATTENTION_IMPLS}")
  if impl == "auto":
    chosen = _FUSED.get(platform, "blockwise")
    log.warning("attention_impl=auto on %s: %s", platform, chosen if chosen != "blockwise" else
                f"blockwise (xla for self-attention over at most {AUTO_XLA_KEYS} keys)")
    return chosen
  if impl == "cudnn" and platform != "gpu":
    raise ValueError(f"policy.attention_impl='cudnn' needs a GPU, this backend is {platform!r} "
                     "(use 'auto' or 'blockwise')")
  if impl == "splash" and platform != "tpu":
    log.warning("attention_impl=splash on %s: the Pallas kernel runs interpreted (slow; for tests)", platform)
  return impl


@functools.cache
def _note(msg: str) -> None:
  log.warning(msg)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_info: TokenInfo, k_info: TokenInfo, chunk: int | None,
           impl: str, packed: bool, precision=None, block: int = blockwise.DEFAULT_BLOCK) -> jax.Array:
  """Attention by implementation `impl` (`Policy.attention_impl`, resolved for the backend), exact masks
  whatever it is: q [B, T, H, d], k/v [B, S, K, d] -> [B, T, H, d]. `packed`: the rows hold packed documents
  (segment ids given), which the fused kernels cannot always express (see `fused`); those layers, and
  attention over other keys than the queries' own (a cache), run blockwise."""
  requested, impl = impl, resolve(impl, jax.default_backend())
  self_attn = q_info is k_info
  if requested == "auto" and impl == "blockwise" and self_attn and k.shape[1] <= AUTO_XLA_KEYS:
    impl = "xla"
  if impl == "dense":
    return attention(q, k, v, q_info, k_info, chunk, precision)
  if impl == "xla":
    if chunk is not None and self_attn and q.shape[1] > 2 * chunk:
      return chunk_local_attention(q, k, v, q_info, chunk, precision)
    return attention(q, k, v, q_info, k_info, chunk, precision)

  def blocks(q, k, v):
    return blockwise.attention(q, k, v, q_info, k_info, chunk, precision, block, block)

  if impl == "blockwise" or not self_attn:
    return blocks(q, k, v)
  if packed and (impl == "cudnn" or chunk is not None):
    _note(f"attention {impl}: {'chunked' if chunk else 'global'} layers of packed rows run blockwise "
          f"({'no segment ids in cuDNN' if impl == 'cudnn' else 'the chunk grid restarts per document'})")
    return blocks(q, k, v)
  if impl == "cudnn":
    def kernel(q, k, v):
      return fused.cudnn(q, k, v, q_info.seg, chunk)
  else:
    interpret = jax.default_backend() != "tpu"

    def kernel(q, k, v):
      return fused.splash(q, k, v, q_info.seg, chunk, packed, interpret)
  if packed:
    return kernel(q, k, v)
  return jax.lax.cond(fused.contiguous(q_info.seg), kernel, blocks, q, k, v)


@dataclasses.dataclass(frozen=True)
class Kernel:
  """The model's attention arithmetic as `sharding.sequence_attention` calls it (`sharding.sequence.
  SequenceKernel`): infos are (segment ids, mask positions) pairs; `starts` (first query index, first key
  index) marks attention over other keys than the queries' own (a neighbour's chunk tail, a ring block)."""

  impl: str  # Policy.attention_impl
  packed: bool  # rows hold packed documents
  precision: Any = None
  block: int = blockwise.DEFAULT_BLOCK

  def attend(self, q, k, v, q_info, k_info, chunk, starts):
    qi = TokenInfo(*q_info)
    ki = qi if k_info is q_info else TokenInfo(*k_info)
    if starts is None:
      return attend(q, k, v, qi, ki, chunk, self.impl, self.packed, self.precision, self.block)
    return blockwise.attention(q, k, v, qi, ki, chunk, self.precision, self.block, self.block, starts)

  def forward(self, q, k, v, q_info, k_info, chunk, starts):
    return blockwise.forward(q, k, v, q_info, k_info, chunk, self.precision, self.block, starts)

  def backward(self, q, k, v, q_info, k_info, out, lse, dout, chunk, starts):
    return blockwise.backward(q, k, v, q_info, k_info, out, lse, dout, chunk, self.precision, self.block, starts)
