"""Expert-parallel routed experts: tokens travel to the devices that hold their experts and back.

Letters: N local tokens, k experts per token, A = N*k local assignments, D hidden, E global experts,
El = E/n experts per device, n devices on the expert mesh axis, C slots per destination.

`routed_experts` wraps one MoE layer's routed-expert computation in `jax.shard_map` over the whole mesh:
  * tokens (x, ids, scores) are split over the token axes: the mesh axes of `act_tokens` (or
    `act_batch` + `act_seq`), plus the expert axis if the batch is not already split over it;
  * expert weights are split over the expert axis on E (and over the tensor axis on I when the rules
    split `expert_mlp`), and gathered over every other axis (FSDP: one all-gather per layer, whose
    transpose is the reduce-scatter of the gradient).

Per device (`_dispatch_padded`), in order:
  1. Each assignment's destination is `expert // El`, its local expert id `expert % El`.
  2. Assignments are ranked within their destination (stable sort); rank r goes to slot r of that
     destination's block of C rows in a send buffer [n*C, D] (plus the local ids and scores).
  3. `all_to_all` over the expert axis: block d goes to device d; the receive buffer [n*C, D] holds
     every source's block for this device's experts.
  4. The model's local experts function (`LocalExperts`: the sparse grouped path on the local weight
     slice) runs on the received rows. Empty slots carry the id El ("no expert"), which it leaves out of
     its groups at no matmul cost; their outputs are masked to zero.
  5. A second `all_to_all` returns the outputs to their sources, in the same slots; each assignment
     reads its row back and the k assignments of a token are summed.
  6. With the expert width split over the tensor axis, the partial sums are `psum`-ed over it
     (SwiGLU is elementwise in I, so splitting I is exact).

Dropless sizing: C = A (every local assignment could go to one device), so nothing is ever dropped
whatever the routing. Cost: send and receive buffers of n*A*D elements each (n times the balanced
load), both ways, and the receiving side's grouped matmul scans n*A/b blocks of which only the live
ones (about A/b under balance) do work. For Maverick-like training (k=1, 8192 local tokens, D=5120,
bf16) on n=8 that is 8*8192*5120*2 B = 0.67 GB per buffer, about 4 buffers live in forward and backward.
`mode="capacity"` sets C = ceil(capacity_factor * A / n) instead (memory / n) and reports the fraction
of dropped assignments; `mode="ragged"` sends only real rows with `jax.lax.ragged_all_to_all` (the
receive buffer keeps the n*A worst case; GPU/TPU only, untested on this CPU-only box).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.rules import AxisCollision, ExpertDispatch, Rules

# The collective of mode "ragged" (a module attribute so that tests can substitute a CPU emulation).
ragged_all_to_all = jax.lax.ragged_all_to_all


class LocalExperts(Protocol):
  """The routed-expert computation on one device's rows, supplied by the model.

  `local_fn(x [R, D], idx [R, k], scores [R, k], weights, expected_rows) -> [R, D]`: `weights` is any pytree of
  arrays whose leaves all carry the experts on axis 0 (E, or E/n inside the dispatch, for the local slice);
  an id equal to that local count means "no expert" and must give zeros at no matmul cost. `expected_rows`
  is the number of assignments the rows hold under balanced routing (the dispatch's receive buffer is n times
  larger): the model sizes its token blocks from it."""

  def __call__(self, x: jax.Array, idx: jax.Array, scores: jax.Array, weights, expected_rows: int) -> jax.Array:
    ...


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _spec_entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def routed_experts(rules: Rules, mesh: jax.sharding.Mesh, local_fn: LocalExperts, x: jax.Array, idx: jax.Array,
                   scores: jax.Array, weights, names: Sequence[tuple[str, ...]],
                   on_drop: Callable[[float], None] | None = None) -> jax.Array:
  """Routed-expert output [N, D] of tokens x [N, D] with expert ids / scores [N, k] (global arrays),
  computed inside `shard_map` as described in the module docstring. `names`: the logical axis names of
  every leaf of `weights` (in `jax.tree.leaves` order); "experts" and "expert_mlp" are the axes the
  dispatch keeps split, every other axis is gathered."""
  ep = rules.dispatch or ExpertDispatch()
  sizes = dict(mesh.shape)
  leaves, treedef = jax.tree.flatten(weights)
  if len(leaves) != len(names):
    raise ValueError(f"routed experts: {len(leaves)} weight arrays but {len(names)} name tuples")
  e_axes, f_axes = (), ()
  for w, n in zip(leaves, names):
    spec, _ = rules.resolve(n, w.shape, sizes, what=f"routed experts weight {n}")
    if n[0] != "experts":
      raise ValueError(f"routed experts weight {n}: the experts must be axis 0")
    e_axes = _axes(spec[0])
    if "expert_mlp" in n:
      f_axes = _axes(spec[n.index("expert_mlp")])
  if len(e_axes) > 1:
    raise NotImplementedError(f"rules {rules.name!r}: experts over several mesh axes {e_axes}; use one")
  e_axis = e_axes[0] if e_axes and sizes[e_axes[0]] > 1 else None
  n_dev = sizes[e_axis] if e_axis else 1

  tok_names = rules.axes("act_tokens") or rules.axes("act_batch") + rules.axes("act_seq")
  tok_axes = tuple(a for a in tok_names if sizes[a] > 1)
  if e_axis and e_axis not in tok_axes:
    tok_axes += (e_axis,)  # split each data shard's tokens over the expert devices (minor: a local slice)
  clash = set(tok_axes) & set(f_axes)
  if clash:
    raise AxisCollision(f"rules {rules.name!r}: tokens and expert_mlp both split over {sorted(clash)}")

  N = x.shape[0]
  m = math.prod(sizes[a] for a in tok_axes)
  pad = -N % m
  valid = jnp.arange(N + pad) < N
  if pad:
    x = jnp.pad(x, ((0, pad), (0, 0)))
    idx = jnp.pad(idx, ((0, pad), (0, 0)))
    scores = jnp.pad(scores, ((0, pad), (0, 0)))

  tok = _spec_entry(tok_axes)
  w_e, w_f = _spec_entry((e_axis,) if e_axis else ()), _spec_entry(f_axes)
  w_specs = jax.tree.unflatten(treedef, [P(*(w_e if a == "experts" else w_f if a == "expert_mlp" else None
                                              for a in n)) for n in names])
  body = functools.partial(_local, local_fn=local_fn, ep=ep, e_axis=e_axis, n=n_dev, f_axes=f_axes,
                           tok_axes=tok_axes)
  y, dropped = jax.shard_map(
      body, mesh=mesh,
      in_specs=(P(tok, None), P(tok, None), P(tok, None), P(tok), w_specs),
      out_specs=(P(tok, None), P()), check_vma=True,
  )(x, idx, scores, valid, weights)
  if ep.mode == "capacity" and on_drop is not None:
    jax.debug.callback(on_drop, dropped)
  return y[:N] if pad else y


def _local(x, idx, scores, valid, weights, *, local_fn, ep, e_axis, n, f_axes, tok_axes):
  """One device's share (inside shard_map). Returns (routed output [N, D], global dropped fraction)."""
  A, El = idx.size, jax.tree.leaves(weights)[0].shape[0]
  live = jnp.repeat(valid, idx.shape[1])
  axes = tuple(dict.fromkeys(tok_axes + ((e_axis,) if e_axis else ()) + f_axes))
  x, scores, weights = jax.tree.map(lambda a: _varying(a, axes), (x, scores, weights))
  if n == 1:
    y = local_fn(x, jnp.where(valid[:, None], idx, El), scores, weights, A)
    dropped = jnp.zeros((), jnp.int32)
  else:
    def local(rows, ids, sc):  # the receive buffer is n times the expected load: block size from A
      return local_fn(rows, ids, sc, weights, A)

    if ep.mode == "ragged":
      y = _dispatch_ragged(x, idx, scores, live, El, local, e_axis, n, axes)
      dropped = jnp.zeros((), jnp.int32)
    else:
      cap = A if ep.mode == "dropless" else max(1, math.ceil(ep.capacity_factor * A / n))
      y, dropped = _dispatch_padded(x, idx, scores, live, El, local, e_axis, n, cap)
  if f_axes:  # partial sums over the expert width: reduce in float32
    y = jax.lax.psum(y.astype(jnp.float32), f_axes).astype(x.dtype)
  total = jnp.sum(live, dtype=jnp.int32)
  if tok_axes:
    dropped, total = jax.lax.psum(dropped, tok_axes), jax.lax.psum(total, tok_axes)
  return y, dropped.astype(jnp.float32) / jnp.maximum(total, 1).astype(jnp.float32)


def _varying(a: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """`a` marked as varying over every mesh axis of the body, here at its top. Otherwise JAX marks it
  where it first meets a varying value -- inside the data-dependent `lax.cond` of the grouped matmul --
  and the transposed psum of the backward pass lands inside that cond: devices that skip the branch
  never join the collective and the others wait forever."""
  aval = jax.typeof(a)
  varying = aval.mat.varying if hasattr(aval, "mat") else aval.vma  # `mat` since jax 0.10, `vma` before
  missing = tuple(ax for ax in axes if ax not in varying)
  return jax.lax.pcast(a, missing, to="varying") if missing else a


def _destinations(idx, live, El, n):
  """Per assignment: destination device (n for dead ones), local expert id, and the stable sort order
  and row counts by destination."""
  flat = idx.reshape(-1)
  dest = jnp.where(live, flat // El, n)
  local_id = flat % El
  order = jnp.argsort(dest, stable=True)
  counts = jnp.bincount(dest, length=n).astype(jnp.int32)  # dead assignments (dest n) are not counted
  return dest, local_id, order, counts


def _dispatch_padded(x, idx, scores, live, El, local, e_axis, n, cap):
  """Steps 1-5 with fixed-size blocks of `cap` rows per destination (`all_to_all`)."""
  N, D = x.shape
  k = idx.shape[1]
  A = N * k
  dest, local_id, order, counts = _destinations(idx, live, El, n)
  starts = jnp.cumsum(counts) - counts
  rank_sorted = jnp.arange(A, dtype=jnp.int32) - starts[jnp.minimum(dest[order], n - 1)]
  rank = jnp.zeros((A,), jnp.int32).at[order].set(rank_sorted)
  keep = live & (rank < cap)
  slot = jnp.where(keep, dest * cap + rank, n * cap)  # n*cap: out of range, dropped by the scatters
  token = jnp.arange(A) // k

  send_x = jnp.zeros((n * cap, D), x.dtype).at[slot].set(x[token], mode="drop")
  send_e = jnp.full((n * cap,), El, jnp.int32).at[slot].set(local_id, mode="drop")
  send_s = jnp.zeros((n * cap,), scores.dtype).at[slot].set(scores.reshape(A), mode="drop")
  a2a = functools.partial(jax.lax.all_to_all, axis_name=e_axis, split_axis=0, concat_axis=0, tiled=True)
  recv_x, recv_e, recv_s = a2a(send_x), a2a(send_e), a2a(send_s)

  y_recv = local(recv_x, recv_e[:, None], recv_s[:, None])
  y_recv = jnp.where((recv_e < El)[:, None], y_recv, 0)
  y_back = a2a(y_recv)
  y = jnp.where(keep[:, None], y_back[jnp.minimum(slot, n * cap - 1)], 0)
  dropped = jnp.sum(live & ~keep, dtype=jnp.int32)
  return y.reshape(N, k, D).sum(axis=1).astype(x.dtype), dropped


def _dispatch_ragged(x, idx, scores, live, El, local, e_axis, n, axes):
  """Steps 1-5 with `ragged_all_to_all`: only real rows travel. The receive buffer keeps the dropless
  worst case (n*A rows). Offsets: source s's rows for device d land at sum_{s' < s} count[s', d] in d's
  buffer, so every receive buffer is contiguous, in source order."""
  N, D = x.shape
  k = idx.shape[1]
  A = N * k
  dest, local_id, order, counts = _destinations(idx, live, El, n)
  in_off = jnp.cumsum(counts) - counts  # where each destination's rows start in my sorted operand
  token = order // k
  op_x, op_e, op_s = x[token], local_id[order], scores.reshape(A)[order]

  all_counts = jax.lax.all_gather(counts, e_axis)  # [source, destination]
  me = jax.lax.axis_index(e_axis)
  out_off = (jnp.cumsum(all_counts, axis=0) - all_counts)[me]  # my rows' offset in each receiver's buffer
  recv_sizes = all_counts[:, me]  # rows each source sends me
  recv_off = jnp.cumsum(recv_sizes) - recv_sizes  # where they sit in my receive buffer
  back_off = (jnp.cumsum(all_counts, axis=1) - all_counts)[:, me]  # = source s's in_off[me]

  rows = n * A
  in_off, counts, out_off, recv_sizes, recv_off, back_off = (
      _varying(a, axes) for a in (in_off, counts, out_off, recv_sizes, recv_off, back_off))
  send = functools.partial(ragged_all_to_all, input_offsets=in_off, send_sizes=counts, output_offsets=out_off,
                           recv_sizes=recv_sizes, axis_name=e_axis)
  recv_x = send(op_x, _varying(jnp.zeros((rows, D), x.dtype), axes))
  recv_e = send(_varying(op_e, axes), _varying(jnp.full((rows,), El, jnp.int32), axes))
  recv_s = send(op_s, _varying(jnp.zeros((rows,), scores.dtype), axes))

  y_recv = local(recv_x, recv_e[:, None], recv_s[:, None])
  y_recv = jnp.where((recv_e < El)[:, None], y_recv, 0)
  y_sorted = ragged_all_to_all(y_recv, _varying(jnp.zeros((A, D), y_recv.dtype), axes), recv_off, recv_sizes,
                               back_off, counts, axis_name=e_axis)
  y = jnp.zeros((A, D), y_sorted.dtype).at[order].set(y_sorted)
  y = jnp.where(live[:, None], y, 0)
  return y.reshape(N, k, D).sum(axis=1).astype(x.dtype)
