"""FP8 matmuls behind the model's single matmul seam (`llama4_jax.layers.einsum`).

Both recipes are written as quantise-dequantise ("qdq") around an ordinary einsum: on Hopper / Blackwell
GPUs XLA rewrites `dot(convert(fp8) * scale, convert(fp8) * scale)` into a native FP8 GEMM with the scales
folded in; elsewhere (CPU, older GPUs) the same program runs in the compute dtype with identical numerics.

Recipes (`Policy.fp8`):
  "train"      per-tensor current scaling: activations and weights in float8_e4m3fn
               (scale = amax / 448) on the forward pass, output gradients in float8_e5m2
               (scale = amax / 57344) on the backward pass (custom VJP).
  "inference"  the FBGEMM scheme of the FP8 release (reference section 5): weights e4m3 with one scale
               per output channel (amax over the contracted axes / 448), activations e4m3 with one dynamic
               scale per token, its amax clipped to an upper bound of 1200.
  "auto"       "train" where the hardware has FP8 matmuls (NVIDIA compute capability >= 8.9, TPU v7),
               otherwise off; the choice is logged once.

Stored FP8 weights (`Policy.expert_fp8`, inference): the routed experts are kept in memory as the FP8
release keeps them, float8_e4m3fn values plus one float32 multiplier per output channel (`Stored`), half
the bytes of bfloat16. A matmul with a `Stored` weight uses those very scales (nothing is re-rounded) and
quantises its activations per token as in "inference", whatever `Policy.fp8` says.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
ACTIVATION_UB = 1200.0  # FBGEMM's upper bound on a token's activation amax


def _max(dtype) -> float:
  return float(jnp.finfo(dtype).max)


def quantize(x: jax.Array, dtype, scale: jax.Array) -> jax.Array:
  """x / scale, saturated to the fp8 range, rounded to `dtype`."""
  m = _max(dtype)
  return jnp.clip(x.astype(jnp.float32) / scale, -m, m).astype(dtype)


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  return (q.astype(jnp.float32) * scale).astype(dtype)


def _scale(amax: jax.Array, dtype) -> jax.Array:
  """Multiplier mapping the fp8 maximum onto amax (1 for an all-zero tensor)."""
  return jnp.where(amax > 0, amax / _max(dtype), 1.0).astype(jnp.float32)


def qdq_tensor(x: jax.Array, dtype) -> jax.Array:
  """Per-tensor current-scaling quantise-dequantise."""
  s = jax.lax.stop_gradient(_scale(jnp.max(jnp.abs(x.astype(jnp.float32))), dtype))
  return dequantize(quantize(x, dtype, s), s, x.dtype)


def _row_scale(x: jax.Array, axes: tuple[int, ...], dtype, ub: float | None = None) -> jax.Array:
  """One scale per slice over `axes` (kept as size-1 axes); `ub` clips the amax (activation upper bound)."""
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True)
  if ub is not None:
    amax = jnp.minimum(amax, ub)
  return jax.lax.stop_gradient(_scale(amax, dtype))


def qdq_rows(x: jax.Array, axes: tuple[int, ...], dtype, ub: float | None = None) -> jax.Array:
  """Quantise-dequantise with one scale per slice over `axes` (the contracted axes): per token for
  activations, per output channel for weights. `ub` clips the amax (activation upper bound)."""
  s = _row_scale(x, axes, dtype, ub)
  return dequantize(quantize(x, dtype, s), s, x.dtype)


class Stored(NamedTuple):
  """A weight held in FP8: W = float32(q) * scale, `scale` broadcast over W's contracted axes (the axes a
  matmul sums over, removed from `scale`'s shape): one multiplier per output channel. A pytree, so it
  slices, shards and scans like the array it stands for."""

  q: jax.Array  # float8_e4m3fn, W's shape
  scale: jax.Array  # float32, W's shape without the contracted axes

  @property
  def shape(self) -> tuple[int, ...]:
    return self.q.shape

  def dequantize(self, contracted: tuple[int, ...], dtype) -> jax.Array:
    return dequantize(self.q, jnp.expand_dims(self.scale, contracted), dtype)


def quantize_stored(w: jax.Array, contracted: tuple[int, ...]) -> Stored:
  """Per-output-channel e4m3 quantisation of a weight (FBGEMM's `quantize_fp8_per_row`: scale = amax / 448
  over the contracted axes)."""
  s = _row_scale(w, contracted, E4M3)
  return Stored(quantize(w, E4M3, s), jnp.squeeze(s, contracted))


def contracted_axes(eqn: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Axes of each operand of a two-operand einsum that are summed over (negative after a leading "...")."""
  inputs, out = eqn.replace(" ", "").split("->")
  specs = inputs.split(",")
  summed = (set(specs[0]) & set(specs[1])) - set(out) - {"."}

  def axes(spec):
    if spec.startswith("..."):
      spec = spec[3:]
      return tuple(i - len(spec) for i, c in enumerate(spec) if c in summed)
    return tuple(i for i, c in enumerate(spec) if c in summed)

  return axes(specs[0]), axes(specs[1])


def _dot(eqn, x, w, dtype, precision):
  return jnp.einsum(eqn, x, w, precision=precision, preferred_element_type=dtype).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def train_einsum(eqn: str, x: jax.Array, w: jax.Array, dtype, precision=None) -> jax.Array:
  """e4m3 forward operands, e5m2 output gradient, per-tensor current scaling."""
  return _dot(eqn, qdq_tensor(x, E4M3), qdq_tensor(w, E4M3), dtype, precision)


def _train_fwd(eqn, x, w, dtype, precision):
  xq, wq = qdq_tensor(x, E4M3), qdq_tensor(w, E4M3)
  return _dot(eqn, xq, wq, dtype, precision), (xq, wq)


def _train_bwd(eqn, dtype, precision, res, g):
  xq, wq = res
  _, vjp = jax.vjp(lambda a, b: _dot(eqn, a, b, dtype, precision), xq, wq)
  dx, dw = vjp(qdq_tensor(g, E5M2))
  return dx, dw


train_einsum.defvjp(_train_fwd, _train_bwd)


def inference_einsum(eqn: str, x: jax.Array, w: jax.Array, dtype, precision=None) -> jax.Array:
  """FBGEMM rowwise: per-token activation scales (amax clipped to 1200), per-output-channel weight scales."""
  ax, aw = contracted_axes(eqn)
  return _dot(eqn, qdq_rows(x, ax, E4M3, ACTIVATION_UB), qdq_rows(w, aw, E4M3), dtype, precision)


def stored_einsum(eqn: str, x: jax.Array, w: Stored, dtype, precision=None) -> jax.Array:
  """Activations quantised per token (amax clipped to 1200), the weight's stored fp8 values and scales."""
  ax, aw = contracted_axes(eqn)
  return _dot(eqn, qdq_rows(x, ax, E4M3, ACTIVATION_UB), w.dequantize(aw, dtype), dtype, precision)


def hardware_has_fp8(device: jax.Device | None = None) -> bool:
  """NVIDIA compute capability >= 8.9 (Ada, Hopper, Blackwell) or a TPU generation with FP8 (v7)."""
  d = device or jax.devices()[0]
  if d.platform == "gpu":
    cc = getattr(d, "compute_capability", None)
    try:
      return cc is not None and tuple(int(p) for p in str(cc).split(".")[:2]) >= (8, 9)
    except ValueError:
      return False
  if d.platform == "tpu":
    kind = d.device_kind.lower()
    return "v7" in kind or "7x" in kind
  return False


@functools.cache
def resolve(mode: str) -> str:
  """The recipe actually used for a Policy.fp8 value ("auto" decided by the hardware, logged once)."""
  if mode != "auto":
    return mode
  d = jax.devices()[0]
  chosen = "train" if hardware_has_fp8(d) else "off"
  log.warning("fp8=auto on %s (%s): %s", d.platform, d.device_kind,
              "using FP8 matmuls (e4m3 forward, e5m2 gradients)" if chosen == "train" else
              "no FP8 matmul support, using the compute dtype")
  return chosen


RECIPES = {"train": train_einsum, "inference": inference_einsum}
