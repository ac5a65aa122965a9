"""Memory-efficient (flash-style) attention in pure JAX, with the exact masks of `attention.py`.

Letters: B batch, T queries, S keys, K kv heads, G = H / K, d head_dim, C chunk; bq / bk the query / key
block, nq / nk their counts.

Forward, per query block (a `lax.scan` over the nq blocks):
  1. the key blocks it can see: all of them for cross attention; for self-attention (queries and keys are
     the same tokens) only blocks up to its last index (causality) and, on chunked layers, from its first
     index - (C - 1) on (a query sees at most C - 1 indices back). Visibility inside a segment implies
     index order and index distance < C, because mask positions grow by one per index there; so these
     index bounds skip only blocks the mask kills entirely, whatever the padding and packing.
  2. a `lax.fori_loop` over those blocks keeps the running max m, the running sum l and the unnormalised
     output in float32 (online softmax); every block's scores [B, K, G, bq, bk] are masked exactly, and a
     block whose mask is all false (another chunk of the grid, another document) is skipped at run time.
  3. out = acc / l and the log-sum-exp m + log l are saved. A query that sees no key (padding) gives zeros.
Backward (custom VJP): the same blocks are visited again; each block's probabilities are recomputed from
the saved log-sum-exp, dq is accumulated per query block, dk / dv in float32 for the whole sequence.
Memory is O((T + S) d) plus one block of scores, forward and backward; no [T, S] array ever exists.
On chunked layers the blocks are capped at the chunk (rounded down to a multiple of 8), so a query block
visits at most two key blocks and a small chunk does not pay for a large block's dead scores.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

DEFAULT_BLOCK = 512  # tokens per query / key block (capped at the padded sequence length)


def _block_size(n: int, want: int) -> int:
  """The block for a sequence of n tokens: `want`, or n rounded up to a multiple of 8 when shorter."""
  return min(want, -(-n // 8) * 8)


def _pad(x: jax.Array, n: int) -> jax.Array:
  pad = n - x.shape[1]
  return x if pad == 0 else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _visible(qs, qp, ks, kp, chunk):
  """[B, bq, bk] mask of one block pair from the tokens' segment ids and mask positions."""
  ok = (ks[:, None, :] != 0) & (ks[:, None, :] == qs[:, :, None]) & (kp[:, None, :] <= qp[:, :, None])
  if chunk is not None:
    ok &= (kp[:, None, :] // chunk) == (qp[:, :, None] // chunk)
  return ok


def _key_blocks(i, bq: int, bk: int, nk: int, chunk: int | None, starts):
  """[lo, hi) of the key blocks query block i can see (see the module docstring). `starts`: None (no index
  relation between queries and keys: every block), or the index of the first query and of the first key."""
  if starts is None:
    return 0, nk
  q0, k0 = starts
  first = q0 + i * bq
  lo = jnp.clip((first - (chunk - 1) - k0) // bk, 0, nk) if chunk is not None else 0
  return lo, jnp.clip((first + bq - 1 - k0) // bk + 1, 0, nk)


def _scores(qb, kb, scale, precision):
  return jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, precision=precision, preferred_element_type=jnp.float32) * scale


class _Static:
  """The static arguments, hashable for `custom_vjp`'s nondiff_argnums."""

  def __init__(self, chunk, bq, bk, indexed, precision):
    self.chunk, self.bq, self.bk, self.indexed, self.precision = chunk, bq, bk, indexed, precision
    self.key = (chunk, bq, bk, indexed, str(precision))

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _Static) and self.key == other.key


def _forward(st: _Static, q, k, v, qs, qp, ks, kp, starts):
  """(out [B, nq, bq, K, G, d] in v.dtype, lse [B, nq, K, G, bq] float32) of padded, grouped inputs."""
  B, nq, bq, K, G, d = q.shape
  bk, nk = st.bk, k.shape[1] // st.bk
  scale = d ** -0.5

  def q_block(_, i):
    qb, qsb, qpb = q[:, i], qs[:, i], qp[:, i]

    def k_block(j, carry):
      ok = _visible(qsb, qpb, jax.lax.dynamic_slice_in_dim(ks, j * bk, bk, 1),
                    jax.lax.dynamic_slice_in_dim(kp, j * bk, bk, 1), st.chunk)[:, None, None]

      def visit(carry):
        m, l, acc = carry
        kb = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
        vb = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
        s = jnp.where(ok, _scores(qb, kb, scale, st.precision), -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), vb, precision=st.precision,
                        preferred_element_type=jnp.float32)
        return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

      return jax.lax.cond(ok.any(), visit, lambda c: c, carry)  # blocks the mask kills cost nothing

    lo, hi = _key_blocks(i, bq, bk, nk, st.chunk, starts if st.indexed else None)
    init = (jnp.full((B, K, G, bq), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
            jnp.zeros((B, K, G, bq, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(lo, hi, k_block, init)
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    return None, (out.transpose(0, 3, 1, 2, 4).astype(v.dtype), lse)

  _, (out, lse) = jax.lax.scan(q_block, None, jnp.arange(nq))
  return jnp.moveaxis(out, 0, 1), jnp.moveaxis(lse, 0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(st: _Static, q, k, v, qs, qp, ks, kp, starts):
  return _forward(st, q, k, v, qs, qp, ks, kp, starts)[0]


def _attend_fwd(st, q, k, v, qs, qp, ks, kp, starts):
  out, lse = _forward(st, q, k, v, qs, qp, ks, kp, starts)
  return out, (q, k, v, qs, qp, ks, kp, starts, out, lse)


def _attend_bwd(st, res, dout):
  q, k, v, qs, qp, ks, kp, starts, out, lse = res
  dq, dk, dv = _backward(st, q, k, v, qs, qp, ks, kp, starts, out, lse, dout)
  return dq, dk, dv, None, None, None, None, None


def _backward(st: _Static, q, k, v, qs, qp, ks, kp, starts, out, lse, dout):
  """(dq, dk, dv) of padded, grouped inputs given the forward's out and log-sum-exp (the final ones, also when
  k / v are one part of the keys: ring attention sums the parts)."""
  B, nq, bq, K, G, d = q.shape
  bk, nk = st.bk, k.shape[1] // st.bk
  scale = d ** -0.5
  delta = jnp.einsum("bnqkgd,bnqkgd->bnkgq", dout.astype(jnp.float32), out.astype(jnp.float32))

  def q_block(carry, i):
    dk, dv = carry
    qb, qsb, qpb, dob = q[:, i], qs[:, i], qp[:, i], dout[:, i]
    lse_b, delta_b = lse[:, i], delta[:, i]
    lse_safe = jnp.where(jnp.isfinite(lse_b), lse_b, 0.0)

    def k_block(j, inner):
      ok = _visible(qsb, qpb, jax.lax.dynamic_slice_in_dim(ks, j * bk, bk, 1),
                    jax.lax.dynamic_slice_in_dim(kp, j * bk, bk, 1), st.chunk)[:, None, None]
      return jax.lax.cond(ok.any(), functools.partial(visit, j, ok), lambda c: c, inner)

    def visit(j, ok, inner):
      dq, dk, dv = inner
      kb = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
      vb = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
      p = jnp.where(ok, jnp.exp(_scores(qb, kb, scale, st.precision) - lse_safe[..., None]), 0.0)
      dv_j = jnp.einsum("bkgqs,bqkgd->bskd", p.astype(dob.dtype), dob, precision=st.precision,
                        preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqkgd,bskd->bkgqs", dob, vb, precision=st.precision, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_b[..., None]) * scale
      dq = dq + jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(kb.dtype), kb, precision=st.precision,
                           preferred_element_type=jnp.float32)
      dk_j = jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(qb.dtype), qb, precision=st.precision,
                        preferred_element_type=jnp.float32)
      add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
          acc, jax.lax.dynamic_slice_in_dim(acc, j * bk, bk, 1) + x, j * bk, 1)
      return dq, add(dk, dk_j), add(dv, dv_j)

    lo, hi = _key_blocks(i, bq, bk, nk, st.chunk, starts if st.indexed else None)
    dq, dk, dv = jax.lax.fori_loop(lo, hi, k_block, (jnp.zeros(qb.shape, jnp.float32), dk, dv))
    return (dk, dv), dq

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(q_block, (zeros, zeros), jnp.arange(nq))
  dq = jnp.moveaxis(dq, 0, 1).astype(q.dtype)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype)


_attend.defvjp(_attend_fwd, _attend_bwd)


class _Layout:
  """Padding and grouping of [B, T, H, d] queries and [B, S, K, d] keys into blocks, and back."""

  def __init__(self, q, k, q_info, k_info, chunk, precision, block_q, block_k, starts):
    B, T, H, d = q.shape
    S, K = k.shape[1], k.shape[2]
    self.B, self.T, self.H, self.d, self.K = B, T, H, d, K
    self.self_attn = q_info is k_info
    if chunk is not None:  # blocks no larger than the chunk: a query block then sees at most two key blocks
      block_q, block_k = (min(b, max(8, chunk // 8 * 8)) for b in (block_q, block_k))
    bq = _block_size(T, block_q)
    bk = bq if self.self_attn else _block_size(S, block_k)
    self.Tp, self.Sp = -(-T // bq) * bq, -(-S // bk) * bk
    if self.self_attn:
      self.Tp = self.Sp = max(self.Tp, self.Sp)
      starts = (0, 0) if starts is None else starts
    self.starts = None if starts is None else tuple(jnp.asarray(x, jnp.int32) for x in starts)
    self.st = _Static(chunk, bq, bk, starts is not None, precision)
    self.qs, self.qp = (_pad(a, self.Tp).reshape(B, self.Tp // bq, bq) for a in q_info)
    self.ks, self.kp = (_pad(a, self.Sp) for a in k_info)

  def queries(self, x):  # [B, T, H, d] -> [B, nq, bq, K, G, d]
    return _pad(x, self.Tp).reshape(self.B, self.Tp // self.st.bq, self.st.bq, self.K, self.H // self.K, x.shape[-1])

  def keys(self, x):
    return _pad(x, self.Sp)

  def out(self, x):  # [B, nq, bq, K, G, d] -> [B, T, H, d]
    return x.reshape(self.B, self.Tp, self.H, x.shape[-1])[:, :self.T]

  def lse_out(self, lse):  # [B, nq, K, G, bq] -> [B, T, H]
    return lse.transpose(0, 1, 4, 2, 3).reshape(self.B, self.Tp, self.H)[:, :self.T]

  def lse_in(self, lse):  # [B, T, H] -> [B, nq, K, G, bq]
    x = _pad(lse, self.Tp).reshape(self.B, self.Tp // self.st.bq, self.st.bq, self.K, self.H // self.K)
    return x.transpose(0, 1, 3, 4, 2)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_info, k_info, chunk: int | None,
              precision=None, block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK, starts=None) -> jax.Array:
  """Exact masked attention in blocks: q [B, T, H, d], k/v [B, S, K, d] -> [B, T, H, d] (module docstring).
  `q_info` / `k_info`: (segment ids, mask positions) [B, T] / [B, S] (`attention.TokenInfo`). `starts`: the
  token indices of the first query and the first key when both lie on one index line (visibility implies
  key index <= query index, closer than the chunk), which lets whole key blocks be skipped; self-attention
  (`q_info is k_info`) is (0, 0)."""
  lay = _Layout(q, k, q_info, k_info, chunk, precision, block_q, block_k, starts)
  out = _attend(lay.st, lay.queries(q), lay.keys(k), lay.keys(v), lay.qs, lay.qp, lay.ks, lay.kp, lay.starts)
  return lay.out(out)


def forward(q, k, v, q_info, k_info, chunk, precision=None, block: int = DEFAULT_BLOCK, starts=None):
  """(out [B, T, H, d], log-sum-exp [B, T, H] float32, -inf where no key is visible) of `attention`, without
  a gradient: the part of ring attention over one device's keys (`sharding.sequence`)."""
  lay = _Layout(q, k, q_info, k_info, chunk, precision, block, block, starts)
  out, lse = _forward(lay.st, lay.queries(q), lay.keys(k), lay.keys(v), lay.qs, lay.qp, lay.ks, lay.kp, lay.starts)
  return lay.out(out), lay.lse_out(lse)


def backward(q, k, v, q_info, k_info, out, lse, dout, chunk, precision=None, block: int = DEFAULT_BLOCK,
             starts=None):
  """(dq, dk, dv) of one part of the keys given the final `out` and log-sum-exp of all parts (`forward`'s
  layout): the backward of ring attention sums these over the parts."""
  lay = _Layout(q, k, q_info, k_info, chunk, precision, block, block, starts)
  dq, dk, dv = _backward(lay.st, lay.queries(q), lay.keys(k), lay.keys(v), lay.qs, lay.qp, lay.ks, lay.kp,
                         lay.starts, lay.queries(out), lay.lse_in(lse), lay.queries(dout))
  return lay.out(dq), dk[:, :k.shape[1]], dv[:, :k.shape[1]]


def block_flops(T: int, chunk: int | None, block: int = DEFAULT_BLOCK) -> float:
  """Fraction of the T x T score blocks self-attention visits (causal and chunk skipping), for benchmarks."""
  b = _block_size(T, block if chunk is None else min(block, max(8, chunk // 8 * 8)))
  n = math.ceil(T / b)
  visited = 0
  for i in range(n):
    lo = max(i * b - (chunk - 1), 0) // b if chunk is not None else 0
    visited += min((i * b + b - 1) // b + 1, n) - lo
  return visited / (n * n)
