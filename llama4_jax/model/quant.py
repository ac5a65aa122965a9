"""Weight-only integer formats for serving, behind the model's single matmul seam (`layers.einsum`).

A `Quantized` weight stands for a float weight W of the same rank. Along W's contracted axis (the one axis
a matmul sums over, `axis`, counted from the end so that slicing leading axes keeps it valid) the values
are cut into groups of G consecutive entries; each group of each output channel has one symmetric scale:

  W[..., g*G + j, ...] = float32(v[..., g*G + j, ...]) * scale[..., g, ...]

  "int8"  v in [-127, 127] stored as int8; one group spanning the whole axis (per output channel), scale =
          absmax * float32(1 / 127).
  "int4"  v in [-7, 7], G = `Policy.quant_group` (default 128), scale = absmax / 7 (times a clipping ratio
          <= 1 with the `clip` quantizer); stored packed two per byte as uint8 along the contracted axis:
          byte k holds v[2k] in its low nibble and v[2k+1] in its high one (two's complement). Packed bytes
          store and restore identically everywhere (Orbax, tensorstore, numpy); `jnp.int4` also runs on
          XLA:CPU but its host and storage layouts are one byte per value.

Scales are float32 (or bfloat16, `Policy.quant_scale_dtype`); the values are rounded with the stored
scale, so dequantising gives exactly the weights the quantizer meant. A matmul dequantises inside the
jitted program (`einsum`: unpack, scale, then an ordinary einsum in the compute dtype), which XLA fuses.

Quantizers: `quantize` (round-to-nearest, per-group absmax, optionally per-group clipping ratios); a per-group
search over clipping ratios, data-free (`clip_ratios`: the weighted weight error sum_d h_d (W - Q(W))_d^2, h all
ones by default: plain weight MSE) or on calibration inputs X (`clip_ratios_calibrated`: the output error
||X (W - Q(W))||^2 through H = X^T X, never above RTN's); and `gptq`, which rounds the contracted indices one by
one, spreading each rounding error over the indices not yet rounded through the calibration inputs' second
moments H = sum x x^T (per expert): it minimises the output error ||X (W - Q)||^2 with the correlations between
inputs, which a per-index weighting cannot see. For the routed experts `observe` reports the experts' inputs
while an eager forward runs under `calibrating`; `expert_input_hessians` turns them into the H of the expert
input and of the down projection's input.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("int8", "int4")
QMAX = {"int8": 127, "int4": 7}
DEFAULT_GROUP = 128
CLIP_RATIOS = tuple(np.round(np.linspace(1.0, 0.5, 26), 4).tolist())  # candidates of the clipping search
GPTQ_DAMP = 0.01  # GPTQ: H + GPTQ_DAMP * mean(diag H) * 1
GPTQ_BLOCK = 128  # GPTQ columns updated lazily per block (int8; int4 blocks are its groups)


class QuantError(ValueError):
  """A quantisation request that cannot be honoured; the message names the value."""


def check_scheme(scheme: str) -> str:
  if scheme not in SCHEMES:
    raise QuantError(f"unknown quantisation scheme {scheme!r}; expected one of {SCHEMES}")
  return scheme


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantized:
  """A weight-only integer weight (see the module docstring). A pytree over (q, scale), so it slices, shards
  and scans like the array it stands for, provided the leading (sliced) axes are shared by both leaves."""

  q: jax.Array  # int8 values (W's shape), or uint8 packed int4 pairs (W's shape, contracted axis halved)
  scale: jax.Array  # float32 / bfloat16, W's shape with the contracted axis replaced by its groups
  axis: int = dataclasses.field(metadata={"static": True}, default=-1)  # W's contracted axis, negative

  @property
  def scheme(self) -> str:
    return "int8" if self.q.dtype == jnp.int8 else "int4"

  @property
  def shape(self) -> tuple[int, ...]:
    """W's shape."""
    s = list(self.q.shape)
    s[self.axis] *= 1 if self.scheme == "int8" else 2
    return tuple(s)

  @property
  def group_size(self) -> int:
    return self.shape[self.axis] // self.scale.shape[self.axis]

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return dequantize(self.q, self.scale, self.axis, dtype)


def _pos(axis: int, ndim: int) -> int:
  return axis % ndim


def pack_int4(v: jax.Array, axis: int) -> jax.Array:
  """int8 values in [-8, 7] -> uint8, two per byte along `axis` (low nibble first)."""
  a = _pos(axis, v.ndim)
  n = v.shape[a]
  pairs = v.astype(jnp.uint8).reshape(v.shape[:a] + (n // 2, 2) + v.shape[a + 1:])
  lo, hi = jnp.take(pairs, 0, axis=a + 1), jnp.take(pairs, 1, axis=a + 1)
  return (lo & 0xF) | (hi << 4)


def unpack_int4(p: jax.Array, axis: int) -> jax.Array:
  """uint8 pairs -> int8 values (sign-extended nibbles), the axis twice as long."""
  a = _pos(axis, p.ndim)
  s = p.astype(jnp.int8)
  lo = jnp.left_shift(s, 4) >> 4  # arithmetic shifts sign-extend the nibble
  hi = s >> 4
  v = jnp.stack([lo, hi], axis=a + 1)
  return v.reshape(p.shape[:a] + (2 * p.shape[a],) + p.shape[a + 1:])


def _grouped(x: jax.Array, axis: int, groups: int) -> jax.Array:
  """x with `axis` split into (groups, G)."""
  a = _pos(axis, x.ndim)
  return x.reshape(x.shape[:a] + (groups, x.shape[a] // groups) + x.shape[a + 1:])


def dequantize(q: jax.Array, scale: jax.Array, axis: int, dtype=jnp.float32) -> jax.Array:
  v = q if q.dtype == jnp.int8 else unpack_int4(q, axis)
  a = _pos(axis, v.ndim)
  groups = scale.shape[a]
  w = _grouped(v, a, groups).astype(jnp.float32) * jnp.expand_dims(scale.astype(jnp.float32), a + 1)
  return w.reshape(v.shape).astype(dtype)


def group_count(shape: tuple[int, ...], axis: int, scheme: str, group_size: int | None) -> int:
  """Groups along `axis` (1 for int8, per output channel); QuantError unless the group size divides it."""
  n = shape[axis]
  if check_scheme(scheme) == "int8":
    return 1
  if group_size is None or group_size <= 0 or group_size % 2:
    raise QuantError(f"int4 group size must be a positive even number, got {group_size!r}")
  if n % group_size:
    raise QuantError(f"int4 group size {group_size} does not divide the contracted axis (size {n}) of a weight "
                     f"of shape {tuple(shape)}")
  return n // group_size


def _inv(qmax: int) -> np.float32:
  """1 / qmax in float32: scales are amax * (1 / qmax), one float32 product (bit-reproducible anywhere)."""
  return np.float32(1.0 / qmax)


def _absmax(w32: jax.Array, axis: int, groups: int) -> jax.Array:
  a = _pos(axis, w32.ndim)
  return jnp.max(jnp.abs(_grouped(w32, a, groups)), axis=a + 1)


def _round(w32: jax.Array, scale32: jax.Array, axis: int, qmax: int) -> jax.Array:
  """Integer values of w under per-group scales (float32, groups on `axis`), as int8: round(w * (1 / s)), half
  to even (XLA rewrites a division by a broadcast divisor into this product; written out, it is reproducible)."""
  a = _pos(axis, w32.ndim)
  g = _grouped(w32, a, scale32.shape[a]) * jnp.expand_dims(1.0 / scale32, a + 1)  # w * (1/s): what XLA computes
  return jnp.clip(jnp.round(g), -qmax, qmax).astype(jnp.int8).reshape(w32.shape)


def quantize(w: jax.Array, axis: int, scheme: str, group_size: int | None = DEFAULT_GROUP,
             scale_dtype="float32", ratios: jax.Array | None = None) -> Quantized:
  """Round-to-nearest symmetric quantisation of `w` with its contracted axis `axis`: scale = ratio * absmax
  / qmax per group (ratio 1 unless `ratios`, shaped like the scale, e.g. from `clip_ratios`), rounded to
  `scale_dtype` first; an all-zero group gets scale 1."""
  axis = axis - w.ndim if axis >= 0 else axis
  groups = group_count(w.shape, axis, scheme, group_size)
  qmax = QMAX[scheme]
  w32 = jnp.asarray(w).astype(jnp.float32)
  amax = _absmax(w32, axis, groups)
  if ratios is not None:
    amax = amax * ratios
  scale = jnp.where(amax > 0, amax * _inv(qmax), 1.0).astype(scale_dtype)
  v = _round(w32, scale.astype(jnp.float32), axis, qmax)
  return Quantized(v if scheme == "int8" else pack_int4(v, axis), scale, axis)


def clip_ratios(w: jax.Array, axis: int, scheme: str, group_size: int | None = DEFAULT_GROUP,
                h: jax.Array | None = None, candidates: tuple[float, ...] = CLIP_RATIOS,
                scale_dtype="float32") -> jax.Array:
  """Per-group clipping ratio (shaped like the scale) minimising sum over the group of h * (w - Q(w))^2,
  `h` broadcastable to w (the mean square of the matmul input per contracted index; default ones)."""
  axis = axis - w.ndim if axis >= 0 else axis
  groups = group_count(w.shape, axis, scheme, group_size)
  qmax = QMAX[scheme]
  w32 = jnp.asarray(w).astype(jnp.float32)
  h32 = jnp.ones_like(w32) if h is None else jnp.broadcast_to(jnp.asarray(h, jnp.float32), w32.shape)
  amax = _absmax(w32, axis, groups)
  a = _pos(axis, w32.ndim)

  def err(r):
    s = jnp.where(amax > 0, amax * r * _inv(qmax), 1.0).astype(scale_dtype).astype(jnp.float32)
    d = w32 - dequantize(_round(w32, s, axis, qmax), s, axis)
    return jnp.sum(_grouped(h32 * d * d, a, groups), axis=a + 1)

  errs = jax.lax.map(err, jnp.asarray(candidates, jnp.float32))  # [R, scale shape]
  return jnp.asarray(candidates, jnp.float32)[jnp.argmin(errs, axis=0)]


def _clip_rows(w: jax.Array, h: jax.Array, group: int, qmax: int, cands: jax.Array, scale_dtype):
  """Clipping ratios [R, groups] of one matrix w [R, n] (rows: output channels) under the output error
  d^T H d per row (d = w - Q(w)): every group starts at ratio 1 (RTN); then, group by group in order, each
  row takes the candidate minimising the error given its other groups as they stand (the cross terms with
  them included), so the error never exceeds RTN's."""
  R, n = w.shape
  groups = n // group
  amax = jnp.max(jnp.abs(w.reshape(R, groups, group)), axis=2)

  def qdq(x, am, r):  # x [R, G], am [R]: x rounded under scale am * r / qmax, back to floats
    s = jnp.where(am > 0, am * r * _inv(qmax), 1.0).astype(scale_dtype).astype(jnp.float32)
    return jnp.clip(jnp.round(x * (1.0 / s)[:, None]), -qmax, qmax) * s[:, None]

  d0 = w - jax.vmap(lambda x, am: qdq(x, am, 1.0), (1, 1), 1)(w.reshape(R, groups, group), amax).reshape(R, n)

  def one_group(g, carry):
    d, ratios = carry
    start = g * group
    wg = jax.lax.dynamic_slice_in_dim(w, start, group, axis=1)
    dg = jax.lax.dynamic_slice_in_dim(d, start, group, axis=1)
    hcol = jax.lax.dynamic_slice_in_dim(h, start, group, axis=1)  # H[:, group]
    hgg = jax.lax.dynamic_slice_in_dim(hcol, start, group, axis=0)
    cross = d @ hcol - dg @ hgg  # [R, G]: H times the other groups' errors
    am = amax[:, g]
    cand = jax.vmap(lambda r: wg - qdq(wg, am, r))(cands)  # [C, R, G]
    cost = jnp.sum((cand @ hgg) * cand, axis=2) + 2 * jnp.sum(cand * cross[None], axis=2)  # [C, R]
    best = jnp.argmin(cost, axis=0)
    d = jax.lax.dynamic_update_slice_in_dim(d, jnp.take_along_axis(cand, best[None, :, None], 0)[0], start, axis=1)
    return d, ratios.at[:, g].set(cands[best])

  return jax.lax.fori_loop(0, groups, one_group, (d0, jnp.ones((R, groups), jnp.float32)))[1]


@functools.partial(jax.jit, static_argnames=("axis", "group_size", "qmax", "scale_dtype"))
def _clip_full(w, h, cands, *, axis, group_size, qmax, scale_dtype):
  a = _pos(axis, w.ndim)
  lead, n, trail = w.shape[:a], w.shape[a], w.shape[a + 1:]
  L, R = int(np.prod(lead)), int(np.prod(trail))
  rows = jnp.moveaxis(w.astype(jnp.float32).reshape(L, n, R), 1, 2)  # [L, R, n]
  one = functools.partial(_clip_rows, group=group_size, qmax=qmax, cands=cands, scale_dtype=scale_dtype)
  r = jax.lax.map(lambda x: one(*x), (rows, h.astype(jnp.float32).reshape(L, n, n)))  # [L, R, groups]
  return jnp.moveaxis(r, 2, 1).reshape(lead + (n // group_size,) + trail)


def clip_ratios_calibrated(w: jax.Array, axis: int, scheme: str, group_size: int | None, h: np.ndarray,
                           candidates: tuple[float, ...] = CLIP_RATIOS, scale_dtype="float32") -> jax.Array:
  """Per-group clipping ratios (shaped like the scale) lowering the output error ||X (W - Q(W))||^2 on
  calibration inputs X, through H = X^T X [*w.shape[:axis], n, n] (as `gptq` takes it), cross terms between
  groups included: a pass over the groups from RTN (all ratios 1), never above RTN's error on that data."""
  axis = axis - w.ndim if axis >= 0 else axis
  groups = group_count(w.shape, axis, scheme, group_size)
  a = _pos(axis, w.ndim)
  n = w.shape[a]
  if np.shape(h) != w.shape[:a] + (n, n):
    raise QuantError(f"clip statistics of shape {np.shape(h)} do not fit a weight of shape {tuple(w.shape)} "
                     f"contracted on axis {axis} (expected {w.shape[:a] + (n, n)})")
  return _clip_full(jnp.asarray(w), jnp.asarray(h), jnp.asarray(candidates, jnp.float32), axis=axis,
                    group_size=n // groups, qmax=QMAX[scheme], scale_dtype=jnp.dtype(scale_dtype).name)


def gptq_factor(h: np.ndarray, damp: float = GPTQ_DAMP) -> np.ndarray:
  """The upper Cholesky factor U of (H + damp * mean(diag H) * 1)^-1 (U^T U = the inverse), float32, for
  each leading index of `h` [..., n, n]; a matrix with an all-zero diagonal (no data) is taken as identity."""
  h = np.array(h, np.float64)
  n = h.shape[-1]
  out = np.empty(h.shape, np.float32)
  for i in np.ndindex(h.shape[:-2]):
    m = h[i]
    mean = float(np.mean(np.diag(m)))
    m = np.eye(n) if not mean > 0 else m + damp * mean * np.eye(n)
    inv = np.linalg.inv(np.linalg.cholesky(m))  # L^-1, so H^-1 = L^-T L^-1
    out[i] = np.linalg.cholesky(inv.T @ inv).T
  return out


def _gptq_rows(w: jax.Array, u: jax.Array, block: int, qmax: int, grouped: bool, scale_dtype):
  """GPTQ of one matrix w [R, n] (rows: output channels, columns: the contracted index) with U [n, n].
  Columns are rounded in order; each one's error, divided by U[i, i], is taken off the later columns along
  U[i, i+1:], within the block column by column and past it by one matmul. `grouped`: each block is one
  group whose scale is set from the (updated) weights when it starts; else one scale per row from w."""
  R, n = w.shape
  col = jnp.arange(n)

  def scale_of(x):
    amax = jnp.max(jnp.abs(x), axis=1)
    return jnp.where(amax > 0, amax * _inv(qmax), 1.0).astype(scale_dtype)

  row_scale = scale_of(w)

  def one_block(b, carry):
    w, vals, scales = carry
    start = b * block
    wb = jax.lax.dynamic_slice_in_dim(w, start, block, axis=1)
    ub = jax.lax.dynamic_slice(u, (start, start), (block, block))
    s = scale_of(wb) if grouped else row_scale
    s32 = s.astype(jnp.float32)
    inv_s = 1.0 / s32

    def one_col(j, c):
      wb, vb, eb = c
      x = wb[:, j]
      v = jnp.clip(jnp.round(x * inv_s), -qmax, qmax)
      e = (x - v * s32) / ub[j, j]
      wb = wb - e[:, None] * jnp.where(jnp.arange(block) > j, ub[j], 0.0)[None, :]
      return wb, vb.at[:, j].set(v.astype(jnp.int8)), eb.at[:, j].set(e)

    init = (wb, jnp.zeros((R, block), jnp.int8), jnp.zeros((R, block), jnp.float32))
    _, vb, eb = jax.lax.fori_loop(0, block, one_col, init)
    rows = jax.lax.dynamic_slice_in_dim(u, start, block, axis=0)  # U[block, :], applied to the later columns
    w = w - eb @ jnp.where(col[None, :] >= start + block, rows, 0.0)
    vals = jax.lax.dynamic_update_slice_in_dim(vals, vb, start, axis=1)
    scales = jax.lax.dynamic_update_index_in_dim(scales, s, b, axis=1) if grouped else scales
    return w, vals, scales

  nb = n // block
  init = (w, jnp.zeros((R, n), jnp.int8), jnp.zeros((R, nb if grouped else 1), scale_dtype))
  _, vals, scales = jax.lax.fori_loop(0, nb, one_block, init)
  return vals, (scales if grouped else row_scale[:, None])


@functools.partial(jax.jit, static_argnames=("axis", "scheme", "group_size", "scale_dtype"))
def _gptq(w, u, *, axis, scheme, group_size, scale_dtype):
  a = _pos(axis, w.ndim)
  lead, n, trail = w.shape[:a], w.shape[a], w.shape[a + 1:]
  L, R = int(np.prod(lead)), int(np.prod(trail))
  rows = jnp.moveaxis(w.astype(jnp.float32).reshape(L, n, R), 1, 2)  # [L, R, n]
  grouped = scheme == "int4"
  block = group_size if grouped else math.gcd(n, GPTQ_BLOCK)
  one = functools.partial(_gptq_rows, block=block, qmax=QMAX[scheme], grouped=grouped, scale_dtype=scale_dtype)
  vals, scales = jax.lax.map(lambda x: one(*x), (rows, u.reshape(L, n, n)))  # one lead index (expert) at a time
  v = jnp.moveaxis(vals, 2, 1).reshape(w.shape)
  s = jnp.moveaxis(scales, 2, 1).reshape(lead + (scales.shape[-1],) + trail)
  return v, s


def gptq(w: jax.Array, axis: int, scheme: str, group_size: int | None = DEFAULT_GROUP, h: np.ndarray | None = None,
         scale_dtype="float32", damp: float = GPTQ_DAMP) -> Quantized:
  """GPTQ (Frantar et al. 2022): quantise the contracted axis of `w` index by index, each rounding error spread
  over the not yet quantised indices so as to minimise the output error ||X (W - Q)||^2 on calibration inputs
  X, through H = X^T X: `h` [*w.shape[:axis], n, n] (one per leading index, e.g. per expert), dampened by
  `damp` times its mean diagonal. int4: groups of `group_size` along the axis, each group's scale fixed from
  the updated weights when the group starts. `h` None (identity): the same bytes as `quantize` (RTN)."""
  axis = axis - w.ndim if axis >= 0 else axis
  group_count(w.shape, axis, scheme, group_size)
  a = _pos(axis, w.ndim)
  n = w.shape[a]
  if h is None:
    h = np.broadcast_to(np.eye(n, dtype=np.float32), w.shape[:a] + (n, n))
  h = np.asarray(h)
  if h.shape != w.shape[:a] + (n, n):
    raise QuantError(f"GPTQ statistics of shape {h.shape} do not fit a weight of shape {tuple(w.shape)} "
                     f"contracted on axis {axis} (expected {w.shape[:a] + (n, n)})")
  v, s = _gptq(jnp.asarray(w), jnp.asarray(gptq_factor(h, damp)), axis=axis, scheme=scheme,
               group_size=group_size if scheme == "int4" else None, scale_dtype=jnp.dtype(scale_dtype).name)
  return Quantized(v if scheme == "int8" else pack_int4(v, axis), s, axis)


def einsum(eqn: str, x: jax.Array, w: Quantized, dtype, precision=None, contracted: tuple[int, ...] = (),
           out_dtype=None) -> jax.Array:
  """x (already in the compute dtype) against a `Quantized` weight, dequantised to `dtype` in the program.
  `contracted`: the weight's summed axes in `eqn` (checked against the weight's own axis)."""
  if contracted:
    nd = len(w.q.shape)
    if tuple(_pos(c, nd) for c in contracted) != (_pos(w.axis, nd),):
      raise QuantError(f"{eqn!r}: a quantised weight contracts axis {w.axis}, the equation sums {contracted}")
  return jnp.einsum(eqn, x, w.dequantize(dtype), precision=precision, preferred_element_type=out_dtype or dtype)


def nbytes(shape: tuple[int, ...], axis: int, scheme: str, group_size: int | None, scale_dtype="float32") -> int:
  """Bytes of the values and scales of a weight of `shape` held as `scheme`."""
  n = int(np.prod(shape))
  groups = group_count(shape, axis, scheme, group_size)
  scales = n // shape[axis] * groups
  return (n if scheme == "int8" else n // 2) + scales * jnp.dtype(scale_dtype).itemsize


# --------------------------------------------------------------------------------------------------
# Calibration statistics of the routed experts


Observer = Callable[..., None]
_OBSERVER: contextvars.ContextVar[Observer | None] = contextvars.ContextVar("quant_observer", default=None)


@contextlib.contextmanager
def calibrating(observer: Observer):
  """Within the block, every routed-expert call (`moe.routed`) reports `observer(x, idx, scores, gate_up,
  down)` with concrete arrays, in layer order: run the forward eagerly (no jit) with `scan_layers=False`."""
  token = _OBSERVER.set(observer)
  try:
    yield
  finally:
    _OBSERVER.reset(token)


def observe(x, idx, scores, gate_up, down) -> None:
  obs = _OBSERVER.get()
  if obs is None:
    return
  if isinstance(x, jax.core.Tracer):  # under jit or scan: no concrete values to collect
    raise QuantError("calibration needs an eager forward (no jit) with Policy(scan_layers=False)")
  obs(x, idx, scores, gate_up, down)


def np_swiglu(g: np.ndarray, up: np.ndarray) -> np.ndarray:
  return g / (1 + np.exp(-g)) * up


def expert_input_hessians(x, idx, scores, gate_up) -> tuple[np.ndarray, np.ndarray]:
  """Per expert, the GPTQ statistics H = sum over its tokens of u u^T [E, D, D] (u = x * score, the expert's
  input) and of a a^T [E, I, I] (a = swiglu(u @ gate, u @ up), the down projection's input); float32."""
  x, idx, scores = (np.asarray(a, np.float32) for a in (x, idx, scores))
  gu = np.asarray(gate_up.dequantize() if isinstance(gate_up, Quantized) else gate_up, np.float32)
  E, D, I = gu.shape[0], gu.shape[1], gu.shape[-1]
  hu, ha = np.zeros((E, D, D), np.float32), np.zeros((E, I, I), np.float32)
  for e in range(E):
    tok, slot = np.nonzero(idx == e)
    if len(tok):
      u = x[tok] * scores[tok, slot][:, None]
      a = np_swiglu(u @ gu[e, :, 0], u @ gu[e, :, 1])
      hu[e], ha[e] = u.T @ u, a.T @ a
  return hu, ha
