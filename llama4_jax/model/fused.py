"""Fused attention kernels: cuDNN flash attention on GPU (`jax.nn.dot_product_attention`) and Pallas splash
attention on TPU, driven with the exact masks of `attention.py` where the kernels can express them.

Letters: B batch, T length, H query heads, K kv heads, G = H / K, d head_dim, C chunk, n real tokens of a row.

The kernels know index-based masks only (causal, chunked-causal, segment ids), while the model's masks use
mask positions: the chunk grid starts at each row's first real token (left padding shifts it) and packed
documents restart it. So, for a row whose real tokens are one contiguous run (left and/or right padding):
  1. the row is rolled left by its left padding: real token i sits at index i, its mask position;
  2. global layers run causal attention over the first n keys; chunked layers (cuDNN) fold the chunks into
     the batch ([B, T/C, C]: each chunk an independent causal sequence of at most C real tokens), or use
     splash's chunked-causal mask;
  3. the output is rolled back and padding rows are set to zero (as every implementation returns them).
Packed rows (segment ids given): splash runs global layers with its segment ids (causality by index is exact
inside a document); cuDNN has no segment ids and chunk grids restart per document, so those layers run the
blockwise kernel instead (`attention.attend` decides; the choice is logged once). A mask with holes (not
one run of ones) is detected at run time and sent to the blockwise kernel (`lax.cond`), never computed
wrong.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

_LANE = 128  # splash block sizes are multiples of this


def _runs(seg: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(left padding [B], real tokens n [B], whether every row's real tokens are one contiguous run)."""
  real = seg != 0
  n = real.sum(-1).astype(jnp.int32)
  left = jnp.argmax(real, axis=-1).astype(jnp.int32)
  idx = jnp.arange(seg.shape[1])
  inside = (idx[None] >= left[:, None]) & (idx[None] < (left + n)[:, None])
  return left, n, jnp.all(real == inside)


def _roll(x: jax.Array, shift: jax.Array) -> jax.Array:
  """Row b of x [B, T, ...] rolled left by shift[b]."""
  idx = (jnp.arange(x.shape[1])[None] + shift[:, None]) % x.shape[1]
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def cudnn(q, k, v, seg, chunk: int | None, implementation: str = "cudnn") -> jax.Array:
  """Rows with one contiguous run of real tokens (see the module docstring): q [B, T, H, d], k/v [B, T, K, d],
  seg [B, T] -> [B, T, H, d]. `implementation="xla"` runs the same layout on any backend (the CPU tests)."""
  B, T, H, d = q.shape
  left, n, _ = _runs(seg)
  qr, kr, vr = (_roll(x, left) for x in (q, k, v))
  attend = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=implementation)
  if chunk is None:
    out = attend(qr, kr, vr, query_seq_lengths=n, key_value_seq_lengths=n)
  else:
    nc = -(-T // chunk)
    pad = nc * chunk - T

    def fold(x):
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
      return x.reshape(B * nc, chunk, *x.shape[2:])

    lens = jnp.clip(n[:, None] - jnp.arange(nc)[None] * chunk, 1, chunk).reshape(B * nc)  # >= 1: kernels want it
    out = attend(fold(qr), fold(kr), fold(vr), query_seq_lengths=lens, key_value_seq_lengths=lens)
    out = out.reshape(B, nc * chunk, H, d)[:, :T]
  out = _roll(out, -left)
  return jnp.where((seg != 0)[..., None, None], out, 0).astype(v.dtype)


def splash(q, k, v, seg, chunk: int | None, packed: bool, interpret: bool = False) -> jax.Array:
  """Pallas splash attention (TPU; `interpret=True` runs it anywhere, slowly): q [B, T, H, d], k/v [B, T, K, d],
  seg [B, T] -> [B, T, H, d]. Unpacked rows are rolled as in the module docstring; packed rows (global layers
  only) keep their layout and pass their segment ids."""
  B, T, H, d = q.shape
  K = k.shape[2]
  if packed and chunk is not None:
    raise ValueError("splash: chunked layers of packed rows go to the blockwise kernel (attention.attend)")
  left = jnp.zeros((B,), jnp.int32) if packed else _runs(seg)[0]
  qr, kr, vr, sr = (_roll(x, left) for x in (q * (d ** -0.5), k, v, seg))
  Tp = -(-T // _LANE) * _LANE
  pad = lambda x: jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
  qr, kr, vr, sr = pad(qr), pad(kr), pad(vr), pad(sr)
  G = H // K
  mask = sm.CausalMask((Tp, Tp)) if chunk is None else sm.ChunkedCausalMask((Tp, Tp), chunk_size=chunk)
  b = max(x for x in (512, 256, _LANE) if Tp % x == 0)
  blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                         block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([mask] * G), block_sizes=blocks, interpret=interpret)

  def one(qg, kg, vg, s):  # qg [G, Tp, d], kg / vg [Tp, d], s [Tp]
    return kernel(qg, kg, vg, segment_ids=sk.SegmentIds(q=s, kv=s))

  qg = qr.reshape(B, Tp, K, G, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, Tp, d]
  kg, vg = kr.transpose(0, 2, 1, 3), vr.transpose(0, 2, 1, 3)  # [B, K, Tp, d]
  per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
  out = jax.vmap(per_head, in_axes=(0, 0, 0, 0))(qg, kg, vg, sr)  # [B, K, G, Tp, d]
  out = out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, H, d)[:, :T]
  out = _roll(out, -left)
  return jnp.where((seg != 0)[..., None, None], out, 0).astype(v.dtype)


def contiguous(seg: jax.Array) -> jax.Array:
  """Whether every row's real tokens form one run (what the fused layouts need), as a traced bool."""
  return _runs(seg)[2]

