"""Context parallelism: attention over a sequence split across the devices of one mesh axis (`act_seq`).

Letters: B batch, T global length, n devices on the axis, Tl = T / n local tokens, Th = Tl / 2, C chunk,
K kv heads, d head_dim. Device r holds tokens [r Tl, (r + 1) Tl) of every row; everything outside attention
(embeddings, norms, MLPs, the MoE) is local to the token, so only attention communicates.

Chunked (RoPE) layers. A query sees only keys of its own chunk, at most C - 1 indices back.
  * aligned rows (mask positions equal token indices: no padding, no packing) with Tl a multiple of C:
    every chunk lies on one device, and the layer runs locally with no communication at all;
  * otherwise the last h = ceil((C - 1) / Tl) blocks before each device travel to it (h `ppermute`s, one
    for the usual Tl >= C - 1) and the device attends over [those keys; its own] with the exact mask: a
    chunk that straddles a device boundary, a grid shifted by left padding, packed documents.
Global (NoPE) layers, by `SequenceDispatch.global_layers`:
  * "all_gather": keys and values of the whole sequence are gathered (one collective; memory T K d per
    device for the layer), the device attends its queries over them;
  * "ring": keys and values travel around the ring with `ppermute` (n - 1 hops), each hop's partial output
    merged by log-sum-exp; the backward pass sends dk / dv accumulators around with them (a custom VJP), so
    no device ever holds more than its own keys plus one visiting block. Causal load balancing: inside the
    layer the tokens are re-laid out zig-zag (device r holds halves r and 2n - 1 - r of the 2n halves: one
    early, one late), so every hop gives every device the same amount of unmasked work;
  * "auto": all_gather when n <= 2 or the gathered keys and values of the layer fit in
    `gather_limit_bytes`, else ring (and all_gather when Tl is odd: the zig-zag halves need an even Tl).
Decoding: the global layers' KV cache can be split along its slots (`act_cache`): each device writes the
slots it holds (`cache_write`) and attends over them, the partial outputs merged across devices by their
log-sum-exp (`cached_attention`). Chunked layers keep their ring of C slots, replicated.
The attention arithmetic is the model's (`SequenceKernel`): this module only moves blocks and merges.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.rules import Rules, SequenceDispatch


class SequenceKernel(Protocol):
  """The model's attention arithmetic, on local arrays: q [B, T, H, d], k / v [B, S, K, d], infos (segment
  ids, mask positions) [B, T] / [B, S], `starts` (index of the first query, of the first key) or None when
  the keys are the queries' own tokens."""

  def attend(self, q, k, v, q_info, k_info, chunk, starts):  # differentiable output [B, T, H, d]
    ...

  def forward(self, q, k, v, q_info, k_info, chunk, starts):  # (out, log-sum-exp [B, T, H]), no gradient
    ...

  def backward(self, q, k, v, q_info, k_info, out, lse, dout, chunk, starts):  # (dq, dk, dv) of one key part
    ...


def _entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def attention(rules: Rules, mesh: jax.sharding.Mesh, kernel: SequenceKernel, q, k, v, info, chunk: int | None,
              aligned: bool) -> jax.Array:
  """Self-attention of q [B, T, H, d], k / v [B, T, K, d] with token infos (seg, mpos) [B, T], the sequence
  split over the mesh axis of `act_seq` (module docstring). `aligned`: mask positions are token indices."""
  sizes = dict(mesh.shape)
  seq_axes = tuple(a for a in rules.axes("act_seq") if sizes[a] > 1)
  if not seq_axes:
    return kernel.attend(q, k, v, info, info, chunk, None)
  if len(seq_axes) > 1:
    raise NotImplementedError(f"rules {rules.name!r}: act_seq over several mesh axes {seq_axes}; use one")
  axis, n = seq_axes[0], sizes[seq_axes[0]]
  B, T = q.shape[:2]
  if T % n:
    raise ValueError(f"sequence length {T} is not divisible by the {axis!r} mesh axis ({n} devices): pad the "
                     f"sequence to a multiple of {n}")
  spec = lambda names, x: rules.resolve(names, x.shape, sizes, what="context-parallel attention")[0]  # noqa: E731
  q_spec = spec(("act_batch", "act_seq", "act_heads", None), q)
  kv_spec = spec(("act_batch", "act_seq", "act_kv_heads", None), k)
  i_spec = spec(("act_batch", "act_seq"), info[0])
  Tl = T // n
  if chunk is not None:
    body = functools.partial(_chunked, kernel=kernel, chunk=chunk, axis=axis, n=n, local=aligned and Tl % chunk == 0)
  else:
    mode = (rules.sequence or SequenceDispatch()).global_layers
    if mode == "auto":  # bytes of this device's gathered keys + values: the split over the other axes stays
      other = math.prod(sizes[a] for e in kv_spec if e is not None for a in ((e,) if isinstance(e, str) else e))
      gathered = 2 * k.size * k.dtype.itemsize * n // other
      mode = "all_gather" if n <= 2 or gathered <= (rules.sequence or SequenceDispatch()).gather_limit_bytes else "ring"
    if mode == "ring" and Tl % 2:
      mode = "all_gather"
    body = functools.partial(_ring_global if mode == "ring" else _gathered_global, kernel=kernel, axis=axis, n=n)
  return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, i_spec, i_spec), out_specs=q_spec,
                       check_vma=False)(q, k, v, info[0], info[1])


def _shift(x, axis: str, n: int, s: int):
  """What device r - s holds, on device r (zeros on devices r < s)."""
  return jax.lax.ppermute(x, axis, [(i, i + s) for i in range(n - s)])


def _chunked(q, k, v, seg, pos, *, kernel, chunk, axis, n, local):
  info = (seg, pos)
  if local:
    return kernel.attend(q, k, v, info, info, chunk, None)
  Tl = q.shape[1]
  h = min(n - 1, -(-(chunk - 1) // Tl))  # previous blocks holding keys a local query can see
  prev = [[_shift(x, axis, n, s) for x in (k, v, seg, pos)] for s in range(h, 0, -1)]
  ks, vs, segs, poss = ([p[i] for p in prev] + [x] for i, x in enumerate((k, v, seg, pos)))
  q0 = jax.lax.axis_index(axis) * Tl
  return kernel.attend(q, jnp.concatenate(ks, 1), jnp.concatenate(vs, 1), info,
                       (jnp.concatenate(segs, 1), jnp.concatenate(poss, 1)), chunk, (q0, q0 - h * Tl))


def _gathered_global(q, k, v, seg, pos, *, kernel, axis, n):
  gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=1, tiled=True)
  q0 = jax.lax.axis_index(axis) * q.shape[1]
  return kernel.attend(q, gather(k), gather(v), (seg, pos), (gather(seg), gather(pos)), None, (q0, 0))


# --------------------------------------------------------------------------------------------------
# Ring attention with a zig-zag layout


def _zigzag(xs, axis: str, n: int):
  """Contiguous -> zig-zag layout of [B, Tl, ...] arrays: half h of the 2n halves goes to device
  h (h < n) or 2n - 1 - h; device r ends with halves (r, 2n - 1 - r) in that order."""
  owner = lambda h: h if h < n else 2 * n - 1 - h  # noqa: E731
  r = jax.lax.axis_index(axis)
  out = []
  for x in xs:
    Th = x.shape[1] // 2
    a = jax.lax.ppermute(x[:, :Th], axis, [(i, owner(2 * i)) for i in range(n)])  # even halves
    b = jax.lax.ppermute(x[:, Th:], axis, [(i, owner(2 * i + 1)) for i in range(n)])  # odd halves
    even = r % 2 == 0  # half r is even for even r: it came in `a`, half 2n - 1 - r (odd) in `b`
    out.append(jnp.concatenate([jnp.where(even, a, b), jnp.where(even, b, a)], axis=1))
  return out


def _unzigzag(x, axis: str, n: int):
  """Inverse of `_zigzag` for one array."""
  owner = lambda h: h if h < n else 2 * n - 1 - h  # noqa: E731
  r = jax.lax.axis_index(axis)
  Th = x.shape[1] // 2
  first, second = x[:, :Th], x[:, Th:]  # halves r and 2n - 1 - r
  even = r % 2 == 0
  a, b = jnp.where(even, first, second), jnp.where(even, second, first)  # the even half, the odd half
  back_a = jax.lax.ppermute(a, axis, [(owner(2 * i), i) for i in range(n)])
  back_b = jax.lax.ppermute(b, axis, [(owner(2 * i + 1), i) for i in range(n)])
  return jnp.concatenate([back_a, back_b], axis=1)


def _halves(x):
  Th = x.shape[1] // 2
  return x[:, :Th], x[:, Th:]


def _half_starts(r, n: int, Th: int):
  return r * Th, (2 * n - 1 - r) * Th


def _merge(o, lse, o_p, lse_p):
  new = jnp.logaddexp(lse, lse_p)
  safe = jnp.where(jnp.isfinite(new), new, 0.0)
  w = lambda l: jnp.where(jnp.isfinite(l), jnp.exp(l - safe), 0.0)[..., None]  # noqa: E731
  return (o.astype(jnp.float32) * w(lse) + o_p.astype(jnp.float32) * w(lse_p)), new


def _rotate(xs, axis: str, n: int):
  return [jax.lax.ppermute(x, axis, [(i, (i + 1) % n) for i in range(n)]) for x in xs]


def _ring_forward(kernel, axis, n, q, k, v, seg, pos):
  me = jax.lax.axis_index(axis)
  Th = q.shape[1] // 2
  qh, qi = _halves(q), list(zip(_halves(seg), _halves(pos)))
  q_starts = _half_starts(me, n, Th)
  outs = [jnp.zeros(x.shape, jnp.float32) for x in qh]
  lses = [jnp.full(x.shape[:3], -jnp.inf, jnp.float32) for x in qh]
  held = [k, v, seg, pos]
  for step in range(n):
    src = (me - step) % n
    kh, vh = _halves(held[0]), _halves(held[1])
    ki = list(zip(_halves(held[2]), _halves(held[3])))
    k_starts = _half_starts(src, n, Th)
    for a in range(2):
      for b in range(2):
        o_p, l_p = kernel.forward(qh[a], kh[b], vh[b], qi[a], ki[b], None, (q_starts[a], k_starts[b]))
        outs[a], lses[a] = _merge(outs[a], lses[a], o_p, l_p)
    if step < n - 1:
      held = _rotate(held, axis, n)
  out = jnp.concatenate(outs, axis=1).astype(q.dtype)
  return out, jnp.concatenate(lses, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring(kernel, axis, n, q, k, v, seg, pos):
  return _ring_forward(kernel, axis, n, q, k, v, seg, pos)[0]


def _ring_fwd(kernel, axis, n, q, k, v, seg, pos):
  out, lse = _ring_forward(kernel, axis, n, q, k, v, seg, pos)
  return out, (q, k, v, seg, pos, out, lse)


def _ring_bwd(kernel, axis, n, res, dout):
  q, k, v, seg, pos, out, lse = res
  me = jax.lax.axis_index(axis)
  Th = q.shape[1] // 2
  qh, qi = _halves(q), list(zip(_halves(seg), _halves(pos)))
  oh, lh, dh = _halves(out), _halves(lse), _halves(dout)
  q_starts = _half_starts(me, n, Th)
  dq = [jnp.zeros(x.shape, jnp.float32) for x in qh]
  held = [k, v, seg, pos]
  dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for step in range(n):
    src = (me - step) % n
    kh, vh = _halves(held[0]), _halves(held[1])
    ki = list(zip(_halves(held[2]), _halves(held[3])))
    k_starts = _half_starts(src, n, Th)
    dkh, dvh = list(_halves(dk)), list(_halves(dv))
    for a in range(2):
      for b in range(2):
        gq, gk, gv = kernel.backward(qh[a], kh[b], vh[b], qi[a], ki[b], oh[a], lh[a], dh[a], None,
                                     (q_starts[a], k_starts[b]))
        dq[a] = dq[a] + gq
        dkh[b], dvh[b] = dkh[b] + gk, dvh[b] + gv
    dk, dv = jnp.concatenate(dkh, 1), jnp.concatenate(dvh, 1)
    dk, dv = _rotate([dk, dv], axis, n)  # n hops in all: each accumulator ends at its keys' device
    if step < n - 1:
      held = _rotate(held, axis, n)
  return (jnp.concatenate(dq, 1).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _ring_global(q, k, v, seg, pos, *, kernel, axis, n):
  zq, zk, zv, zs, zp = _zigzag([q, k, v, seg, pos], axis, n)
  return _unzigzag(_ring(kernel, axis, n, zq, zk, zv, zs, zp), axis, n)



# --------------------------------------------------------------------------------------------------
# A KV cache split along its slots (decoding at long context)


def _cache_axis(rules: Rules, sizes) -> str | None:
  axes = tuple(a for a in rules.axes("act_cache") if sizes[a] > 1)
  if len(axes) > 1:
    raise NotImplementedError(f"rules {rules.name!r}: act_cache over several mesh axes {axes}; use one")
  return axes[0] if axes else None


def cache_write(rules: Rules, mesh, buf: jax.Array, new: jax.Array, index) -> jax.Array:
  """`new` [B, T, ...] written at slots index .. index+T-1 of `buf` [B, S, ...] whose slots are split over the
  mesh axis of `act_cache`: each device writes the slots it holds (out-of-range rows are dropped), so the
  buffer is never gathered."""
  sizes = dict(mesh.shape)
  axis = _cache_axis(rules, sizes)
  names = ("act_batch", "act_cache") + (None,) * (buf.ndim - 2)
  b_spec = rules.resolve(names, buf.shape, sizes, what="KV cache")[0]
  n_spec = rules.resolve(("act_batch", None) + (None,) * (buf.ndim - 2), new.shape, sizes, what="KV cache")[0]

  def local(buf, new, index):
    S = buf.shape[1]
    start = index - jax.lax.axis_index(axis) * S
    slots = start + jnp.arange(new.shape[1])
    slots = jnp.where((slots >= 0) & (slots < S), slots, S)  # S: out of range, dropped
    return buf.at[:, slots].set(new.astype(buf.dtype), mode="drop")

  return jax.shard_map(local, mesh=mesh, in_specs=(b_spec, n_spec, P()), out_specs=b_spec,
                       check_vma=False)(buf, new, jnp.asarray(index, jnp.int32))


def cached_attention(rules: Rules, mesh, kernel: SequenceKernel, q, k_buf, v_buf, q_info, slot_info, index):
  """New queries q [B, T, H, d] (cache indices index ..) over cache slots k_buf / v_buf [B, S, K, d] split over
  the mesh axis of `act_cache`: each device attends over its slots (`kernel.forward`, empty future slots
  skipped whole), the partial outputs are merged across devices by their log-sum-exp."""
  sizes = dict(mesh.shape)
  axis = _cache_axis(rules, sizes)
  res = lambda names, x: rules.resolve(names, x.shape, sizes, what="KV cache")[0]  # noqa: E731
  q_spec = res(("act_batch", None, "act_heads", None), q)
  kv_spec = res(("act_batch", "act_cache", "act_kv_heads", None), k_buf)
  qi_spec, si_spec = res(("act_batch", None), q_info[0]), res(("act_batch", "act_cache"), slot_info[0])

  def local(q, k, v, qs, qp, ss, sp, index):
    start = jax.lax.axis_index(axis) * k.shape[1]
    out, lse = kernel.forward(q, k, v, (qs, qp), (ss, sp), None, (index, start))
    m = jax.lax.pmax(lse, axis)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - m), 0.0)
    total = jax.lax.psum(w, axis)
    num = jax.lax.psum(out.astype(jnp.float32) * w[..., None], axis)
    return jnp.where(total[..., None] > 0, num / jnp.where(total > 0, total, 1.0)[..., None], 0.0).astype(q.dtype)

  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, qi_spec, qi_spec, si_spec, si_spec, P()),
                       out_specs=q_spec, check_vma=False)(q, k_buf, v_buf, *q_info, *slot_info,
                                                          jnp.asarray(index, jnp.int32))
