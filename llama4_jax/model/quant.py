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

Quantizers: `quantize` (round-to-nearest, per-group absmax, optionally per-group clipping ratios) and
`clip_ratios`, a per-group search over clipping ratios minimising the weighted squared output error
sum_d h_d (W - Q(W))_d^2, with h the mean square of the matmul's input per contracted index (calibration
activations; all ones without data: plain weight MSE). For the routed experts `observe` collects h per expert
(of the expert input and of the down projection's input) while an eager forward runs under `calibrating`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("int8", "int4")
QMAX = {"int8": 127, "int4": 7}
DEFAULT_GROUP = 128
CLIP_RATIOS = tuple(np.round(np.linspace(1.0, 0.5, 26), 4).tolist())  # candidates of the clipping search


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


def expert_input_stats(x, idx, scores, gate_up, down) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per expert: (sum of u^2 over its tokens [E, D], sum of a^2 [E, I] with a = swiglu(u @ gate, u @ up) the
  down projection's input, token counts [E]); u = x * score, as the experts see it. float32 weights."""
  x, idx, scores = (np.asarray(a, np.float32) for a in (x, idx, scores))
  gu = np.asarray(gate_up.dequantize() if isinstance(gate_up, Quantized) else gate_up, np.float32)
  E, D = gu.shape[0], gu.shape[1]
  hu, ha, n = np.zeros((E, D)), np.zeros((E, gu.shape[-1])), np.zeros(E)
  for e in range(E):
    tok, slot = np.nonzero(idx == e)
    if not len(tok):
      continue
    u = x[tok] * scores[tok, slot][:, None]
    g, up = u @ gu[e, :, 0], u @ gu[e, :, 1]
    a = g / (1 + np.exp(-g)) * up
    hu[e], ha[e], n[e] = (u * u).sum(0), (a * a).sum(0), len(tok)
  return hu, ha, n
