"""Mixture-of-experts math: the sigmoid top-k router and sparse (dropless) expert computation.

Letters: N tokens, D hidden, E experts, I expert width, c the gate/up pair (2), A = N * k assignments,
b tokens of a block.

Routing (reference 1.9), in order:
  1. logits = x @ router                         [N, E], in the activation dtype
  2. top-k on the raw logits                     indices [N, k]
  3. score = sigmoid(selected logit) in float32, cast back; no softmax, no renormalisation
  4. expert input = x * score                    (the score scales the INPUT of the expert)
  5. out = sum over the k assignments of Expert_e(x * score)   (the shared expert is added by the caller)

Expert weights: gate_up [E, D, 2, I] (index 0 = gate, 1 = up), down [E, I, D]; Expert_e(u) =
(silu(u @ gate_e) * (u @ up_e)) @ down_e. Either may be an `fp8.Stored` (FP8 values + per-output-channel
scales [E, 2, I] / [E, D]; inference only) or a `quant.Quantized` (int8 / packed int4 values + per-group
scales [E, groups, 2, I] / [E, groups, D]; inference only): every path slices or dequantises it like the array
it stands for.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import sharding
from llama4_jax.config import Policy
from llama4_jax.model import fp8, quant
from llama4_jax.model.layers import einsum, precision, swiglu

# Logical axis names of the routed expert weights, and the axis each one sums over (D, I).
GATE_UP_NAMES = ("experts", "embed", "gate_up", "expert_mlp")  # [E, D, 2, I]
DOWN_NAMES = ("experts", "expert_mlp", "embed")  # [E, I, D]
GATE_UP_CONTRACTED, DOWN_CONTRACTED = (1,), (1,)
GATE_UP_AXIS, DOWN_AXIS = -3, -2  # the same axes counted from the end (`quant.Quantized.axis`)


def route(x: jax.Array, router: jax.Array, k: int, policy: Policy, bias: jax.Array | None = None):
  """Returns (expert ids [N, k] int32, scores [N, k] in x.dtype, logits [N, E] float32).

  `bias` [E] (aux-loss-free balancing, training only) shifts the logits for the top-k *selection*;
  the score of a selected expert stays sigmoid of its unbiased logit, and the logits returned are
  unbiased."""
  logits = einsum("ND,DE->NE", x, router, policy, quantize=False)  # the router stays in the compute dtype
  if bias is None:
    top_logit, top_idx = jax.lax.top_k(logits, k)
  else:
    _, top_idx = jax.lax.top_k(logits.astype(jnp.float32) + bias.astype(jnp.float32), k)
    top_logit = jnp.take_along_axis(logits, top_idx, axis=-1)
  scores = jax.nn.sigmoid(top_logit.astype(jnp.float32)).astype(x.dtype)
  return top_idx.astype(jnp.int32), scores, logits.astype(jnp.float32)


def _gate_up(u, gate_up, policy):
  return einsum("...bD,...DcI->...bcI", u, gate_up, policy)


def _down(h, down, policy):
  """The down projection of the swiglu of gate/up projections h [..., b, 2, I]."""
  return einsum("...bI,...ID->...bD", swiglu(h[..., 0, :], h[..., 1, :]), down, policy)


def _expert_ffn(u: jax.Array, gate_up: jax.Array, down: jax.Array, policy: Policy) -> jax.Array:
  """One expert (or a batch of experts, with a leading axis on everything) on tokens u [..., b, D]."""
  return _down(_gate_up(u, gate_up, policy), down, policy)


def block_size(assignments: int, experts: int, max_block: int) -> int:
  """Token block of the grouped matmul: about the mean group size, a power of two in [8, max_block]."""
  target = max(8, -(-assignments // experts))
  return min(max_block, 1 << math.ceil(math.log2(target)))


def _block(a: jax.Array, i) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(a, i, keepdims=False)


def _block_weights(gate_up, down, e):
  """Expert e's weights (its values and scales, for `fp8.Stored` ones)."""
  return jax.tree.map(lambda w: _block(w, e), (gate_up, down))


def _runs(expert_blocks: jax.Array) -> jax.Array:
  """The first block of each expert: its blocks are contiguous and the experts in order."""
  return jnp.cumsum(expert_blocks) - expert_blocks


def _grouped_loop(slots, expert_blocks, gate_up, down, policy, keep_h: bool):
  """The forward: a loop over the experts, slicing each one's weights once, and inside it a loop over that
  expert's blocks (dynamic trip counts: blocks past the last used one cost nothing and stay zero); with
  `keep_h`, also each block's gate/up projection [n, b, 2, I] for the backward."""
  dt = jnp.dtype(policy.dtype)
  n, b, _ = slots.shape
  I = down.shape[-2]
  first = _runs(expert_blocks)
  out = jnp.zeros_like(slots, dtype=dt)  # *_like: inside shard_map the buffers vary over the axes slots do
  hs = jnp.zeros_like(slots, dtype=dt, shape=(n, b, 2, I)) if keep_h else None

  def expert(e, carry):
    w1, w2 = _block_weights(gate_up, down, e)

    def block(i, carry):
      out, hs = carry
      h = _gate_up(_block(slots, i), w1, policy)
      out = jax.lax.dynamic_update_index_in_dim(out, _down(h, w2, policy), i, 0)
      if keep_h:
        hs = jax.lax.dynamic_update_index_in_dim(hs, h, i, 0)
      return out, hs

    return jax.lax.fori_loop(first[e], first[e] + expert_blocks[e], block, carry)

  return jax.lax.fori_loop(0, expert_blocks.shape[0], expert, (out, hs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def grouped_ffn(slots: jax.Array, expert_blocks: jax.Array, gate_up: jax.Array, down: jax.Array,
                policy: Policy) -> jax.Array:
  """Expert FFN on token blocks: slots [n, b, D], expert e owning the next expert_blocks[e] blocks (experts in
  order, blocks contiguous); blocks past sum(expert_blocks) give zeros. Loops over the experts, slicing one
  expert's weights at a time, and over its blocks.

  The backward pass is written by hand, from the gate/up projections the forward kept: per block, the input
  gradient and the block's weight gradients (two matmuls each for the down and gate/up projections, twice the
  forward's work), summed per expert in float32 in the inner loop's carry and written once per expert
  (automatic differentiation of the dynamic weight slice would add a zero-padded [E, ...] gradient per block;
  adding into an [E, ...] accumulator per block reads and writes the expert's whole slice every block)."""
  return _grouped_loop(slots, expert_blocks, gate_up, down, policy, keep_h=False)[0]


def _grouped_fwd(slots, expert_blocks, gate_up, down, policy):
  out, hs = _grouped_loop(slots, expert_blocks, gate_up, down, policy, keep_h=True)
  return out, (slots, expert_blocks, gate_up, down, hs)


def _dot(a, b, contract: tuple[int, int], policy: Policy):
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision(policy),
                             preferred_element_type=jnp.dtype(policy.dtype))


def _block_vjp(u_t, h, gy, w1, w2, policy):
  """One block's (du, d_gate_up, d_down) from its input u_t [D, b] (transposed), kept gate/up projection h
  [b, 2, I] and output gradient gy [b, D]. Without an FP8 recipe, written out so that every matmul has a form
  XLA:CPU runs at full speed: the weight slice on the left in its stored layout (W @ g^T), the token operand of a
  weight gradient transposed beforehand (XLA:CPU otherwise copies the transposed [D, 2I] slice every block, or
  runs the contraction over the block's tokens at ~3/4 speed); with one, through `einsum`'s own gradient."""
  dt = jnp.dtype(policy.dtype)
  a, swiglu_vjp = jax.vjp(swiglu, h[:, 0], h[:, 1])
  if fp8.resolve(policy.fp8) != "off":
    da, d2 = jax.vjp(lambda a, w: einsum("...bI,...ID->...bD", a, w, policy), a, w2)[1](gy)
    du, d1 = jax.vjp(lambda u, w: _gate_up(u, w, policy), u_t.T, w1)[1](jnp.stack(swiglu_vjp(da), axis=1))
    return du, d1, d2
  D, _, I = w1.shape
  da = _dot(w2.astype(dt), gy, (1, 1), policy).T  # [b, I]
  dh = jnp.concatenate(swiglu_vjp(da), axis=-1)  # [b, 2I]
  du = _dot(w1.reshape(D, 2 * I).astype(dt), dh, (1, 1), policy).T  # [b, D]
  d1 = _dot(u_t.astype(dt), dh, (1, 0), policy).reshape(D, 2, I)
  return du, d1, _dot(a, gy, (0, 0), policy)  # d_down [I, D]


def _grouped_bwd(policy, res, g):
  """Per expert (its weights sliced once), per block of it, from the gate/up projection the forward kept: the
  input gradient, and the weight gradients summed in the inner loop from the expert's first block (no zeros to
  add to); the experts' sums are stacked by `scan`. An expert without blocks gets zeros."""
  slots, expert_blocks, gate_up, down, hs = res
  dt = jnp.dtype(policy.dtype)
  first = _runs(expert_blocks)
  slots_t = jnp.swapaxes(slots, 1, 2)  # [n, D, b], once: the weight gradients contract over the tokens

  def vjp(i, w1, w2):
    return _block_vjp(_block(slots_t, i), _block(hs, i), _block(g, i).astype(dt), w1, w2, policy)

  def expert(d_slots, e):
    w1, w2 = _block_weights(gate_up, down, e)

    def block(i, carry):
      d_slots, d1, d2 = carry
      du, b1, b2 = vjp(i, w1, w2)
      d_slots = jax.lax.dynamic_update_index_in_dim(d_slots, du.astype(d_slots.dtype), i, 0)
      return d_slots, d1 + b1.astype(d1.dtype), d2 + b2.astype(d2.dtype)

    def run(d_slots):
      du, d1, d2 = vjp(first[e], w1, w2)
      d_slots = jax.lax.dynamic_update_index_in_dim(d_slots, du.astype(d_slots.dtype), first[e], 0)
      init = (d_slots, d1.astype(jnp.float32), d2.astype(jnp.float32))
      return jax.lax.fori_loop(first[e] + 1, first[e] + expert_blocks[e], block, init)

    def empty(d_slots):
      return d_slots, jnp.zeros_like(w1, dtype=jnp.float32), jnp.zeros_like(w2, dtype=jnp.float32)

    d_slots, d1, d2 = jax.lax.cond(expert_blocks[e] > 0, run, empty, d_slots)
    return d_slots, (d1.astype(gate_up.dtype), d2.astype(down.dtype))

  d_slots, (d_gate_up, d_down) = jax.lax.scan(expert, jnp.zeros_like(slots), jnp.arange(expert_blocks.shape[0]))
  return d_slots, np.zeros(np.shape(expert_blocks), jax.dtypes.float0), d_gate_up, d_down


grouped_ffn.defvjp(_grouped_fwd, _grouped_bwd)


def _scaled(x: jax.Array, scores: jax.Array) -> jax.Array:
  """Each assignment's expert input x[token] * score [N * k, D], as a 2-D product: the gradient of the scores
  is then a row sum of a 2-D array (over a [N, k, D] broadcast, XLA:CPU's reduction took 3 ms instead of 0.3 ms
  for 2048 tokens, k = 1, D = 512)."""
  N, k = scores.shape
  rows = x if k == 1 else jnp.repeat(x, k, axis=0)
  return rows * scores.reshape(N * k, 1)


def sorted_experts(x: jax.Array, idx: jax.Array, scores: jax.Array, gate_up: jax.Array, down: jax.Array,
                   policy: Policy, expected_rows: int | None = None) -> jax.Array:
  """Sparse dropless experts: group assignments by expert, run each group in blocks of `b` tokens (sized from
  `expected_rows`, the assignments under balanced routing: default all of idx).

  1. Sort the A = N*k assignments by expert id (stable).
  2. Give each expert a run of slots padded up to a multiple of b; the total number of slots is at most
     A + E*(b-1), a static bound, so nothing is ever dropped whatever the imbalance.
  3. Loop over the experts, slicing each one's weights once, and over its blocks (dynamic trip counts):
     blocks past the last used one cost nothing. Work is ~(A + E*b) * D * I instead of N*E*D*I.
  4. Gather every assignment's output back and sum the k assignments of each token.
  """
  N, D = x.shape
  E = gate_up.shape[0]
  k = idx.shape[1]
  A = N * k
  b = block_size(expected_rows or A, E, policy.moe_block)
  n_blocks = -(-(A + E * (b - 1)) // b)
  flat_e = idx.reshape(A)
  order = jnp.argsort(flat_e, stable=True)
  sizes = jnp.bincount(flat_e, length=E)
  padded = -(-sizes // b) * b
  group_start = jnp.cumsum(sizes) - sizes
  slot_start = jnp.cumsum(padded) - padded
  e_sorted = flat_e[order]
  slot_of_sorted = slot_start[e_sorted] + jnp.arange(A) - group_start[e_sorted]
  slot = jnp.zeros((A,), jnp.int32).at[order].set(slot_of_sorted.astype(jnp.int32))  # slot per assignment

  # Inputs: each slot holds x[token] * score, or zeros.
  u = _scaled(x, scores)
  slots = jnp.zeros((n_blocks * b, D), x.dtype).at[slot].set(u)
  slots = slots.reshape(n_blocks, b, D)
  out = grouped_ffn(slots, (padded // b).astype(jnp.int32), gate_up, down, policy)
  y = out.reshape(n_blocks * b, D)[slot]  # [A, D]
  return y.reshape(N, k, D).sum(axis=1).astype(x.dtype)


def ragged_experts(x: jax.Array, idx: jax.Array, scores: jax.Array, gate_up: jax.Array, down: jax.Array,
                   policy: Policy, expected_rows: int | None = None) -> jax.Array:
  """Same function through `jax.lax.ragged_dot` on the sorted assignments (grouped-matmul kernels on
  TPU; a dense per-group fallback on CPU)."""
  N, D = x.shape
  E, _, _, I = gate_up.shape
  k = idx.shape[1]
  flat_e = idx.reshape(N * k)
  order = jnp.argsort(flat_e, stable=True)
  sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
  u = _scaled(x, scores)[order]
  dt = jnp.dtype(policy.dtype)
  act = lambda a: a.astype(dt)  # noqa: E731
  if isinstance(gate_up, fp8.Stored):  # stored FP8 experts: their scales, activations quantised per token
    gate_up, down = gate_up.dequantize(GATE_UP_CONTRACTED, dt), down.dequantize(DOWN_CONTRACTED, dt)
    act = lambda a: fp8.qdq_rows(a.astype(dt), (-1,), fp8.E4M3, fp8.ACTIVATION_UB)  # noqa: E731
  if isinstance(gate_up, quant.Quantized):  # integer experts: dequantised in the program, activations as they are
    gate_up, down = gate_up.dequantize(dt), down.dequantize(dt)
  prec = precision(policy)
  h = jax.lax.ragged_dot(act(u), gate_up.reshape(E, D, 2 * I).astype(dt), sizes, precision=prec)
  h = h.reshape(N * k, 2, I)
  y = jax.lax.ragged_dot(act(swiglu(h[:, 0], h[:, 1])), down.astype(dt), sizes, precision=prec)
  y = jnp.zeros_like(y).at[order].set(y)
  return y.reshape(N, k, D).sum(axis=1).astype(x.dtype)


def dense_experts(x: jax.Array, idx: jax.Array, scores: jax.Array, gate_up: jax.Array, down: jax.Array,
                  policy: Policy, expected_rows: int | None = None) -> jax.Array:
  """Test oracle: every expert on every token with a zero score where not selected (E times the work)."""
  E = gate_up.shape[0]
  s = jnp.zeros((x.shape[0], E), x.dtype)
  s = s.at[jnp.arange(x.shape[0])[:, None], idx].add(scores)  # [N, E]
  u = s.T[:, :, None] * x[None]  # [E, N, D]
  return _expert_ffn(u, gate_up, down, policy).sum(axis=0).astype(x.dtype)


EXPERT_IMPLS = {"sorted": sorted_experts, "ragged": ragged_experts, "dense": dense_experts}


def _without(names: tuple[str, ...], axes: tuple[int, ...]) -> tuple[str, ...]:
  return tuple(n for i, n in enumerate(names) if i not in axes)


def weight_names(gate_up, down=None) -> list[tuple[str | None, ...]]:
  """Logical names of the leaves of the routed weights `(gate_up, down)`, in `jax.tree.leaves` order (an
  `fp8.Stored` pair adds its scales: the weight's names less the contracted axis)."""
  if isinstance(gate_up, fp8.Stored):
    return [GATE_UP_NAMES, _without(GATE_UP_NAMES, GATE_UP_CONTRACTED), DOWN_NAMES,
            _without(DOWN_NAMES, DOWN_CONTRACTED)]
  if isinstance(gate_up, quant.Quantized):  # scales: the group axis keeps the contracted name (None if one group)
    return [GATE_UP_NAMES, _scale_names(GATE_UP_NAMES, gate_up), DOWN_NAMES, _scale_names(DOWN_NAMES, down)]
  return [GATE_UP_NAMES, DOWN_NAMES]


def _scale_names(names: tuple[str, ...], w: quant.Quantized) -> tuple[str | None, ...]:
  a = w.axis % len(names)
  return names if w.scale.shape[a] > 1 else names[:a] + (None,) + names[a + 1:]


def routed(x: jax.Array, idx: jax.Array, scores: jax.Array, gate_up, down, policy: Policy) -> jax.Array:
  """Routed-expert output [N, D] by `policy.moe_impl`, on one device or, inside a `sharding.use` block whose
  rules split the experts, through the expert-parallel dispatch (`sharding.dispatch`)."""
  def local(x, idx, scores, weights, expected_rows):
    return EXPERT_IMPLS[policy.moe_impl](x, idx, scores, *weights, policy, expected_rows)

  quant.observe(x, idx, scores, gate_up, down)  # calibration statistics (a no-op unless `quant.calibrating`)
  return sharding.routed_experts(local, x, idx, scores, (gate_up, down), weight_names(gate_up, down))
