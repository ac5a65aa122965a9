"""Shared building blocks: parameter creation with logical axes, the matmul seam, RMSNorm, SwiGLU."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax.config import Policy
from llama4_jax.model import fp8, quant

Init = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]

_PRECISION = {"default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH,
              "highest": jax.lax.Precision.HIGHEST}


def precision(policy: Policy) -> jax.lax.Precision:
  """`policy.matmul_precision` as a `jax.lax.Precision`: every dot of the model (weights, attention scores,
  grouped experts, vision) uses it."""
  return _PRECISION[policy.matmul_precision]


def normal(std: float) -> Init:
  return jax.nn.initializers.normal(stddev=std)


def ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def param(rngs: nnx.Rngs, init: Init, shape: Sequence[int], axes: Sequence[str], dtype: str) -> nnx.Param:
  """An `nnx.Param` carrying logical axis names; placement is left to `sharding/`."""
  assert len(axes) == len(shape), (axes, shape)
  value = init(rngs.params(), tuple(shape), jnp.dtype(dtype))
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def fp8_param(p: nnx.Param, contracted: tuple[int, ...]) -> tuple[nnx.Param, nnx.Param]:
  """A weight Param quantised per output channel (`fp8.quantize_stored`): the float8_e4m3fn values under the
  weight's logical names, and the float32 scales under those names less the contracted axes."""
  names = tuple(p.get_metadata()["out_sharding"])
  w = fp8.quantize_stored(p[...], contracted)
  kept = tuple(n for i, n in enumerate(names) if i not in contracted)
  return (nnx.Param(w.q, out_sharding=names, eager_sharding=False),
          nnx.Param(w.scale, out_sharding=kept, eager_sharding=False))


def quant_param(p: nnx.Param, axis: int, policy: Policy) -> tuple[nnx.Param, nnx.Param]:
  """A weight Param held as `policy.quant` integers (`quant.quantize`, round-to-nearest): the values under the
  weight's logical names (packed int4 halve the contracted axis), and the scales under the same names, the
  contracted axis becoming its groups (unnamed when there is a single group: per output channel)."""
  names = tuple(p.get_metadata()["out_sharding"])
  w = quant.quantize(p[...], axis, policy.quant, policy.quant_group, policy.quant_scale_dtype)
  a = axis % len(names)
  kept = names if w.scale.shape[a] > 1 else names[:a] + (None,) + names[a + 1:]
  return (nnx.Param(w.q, out_sharding=names, eager_sharding=False),
          nnx.Param(w.scale, out_sharding=kept, eager_sharding=False))


def dtype_of(policy: Policy) -> jnp.dtype:
  return jnp.dtype(policy.dtype)


def einsum(eqn: str, x: jax.Array, w: jax.Array, policy: Policy, out_dtype=None, quantize: bool = True) -> jax.Array:
  """Every weight matmul of the model goes through here: the seam for FP8 recipes and precision choices.

  `x` is the activation, `w` the weight (an array, an `fp8.Stored` FP8 weight with its scales, or a
  `quant.Quantized` integer weight, dequantised inside the program, activations untouched).
  `quantize=False` keeps a matmul out of FP8 (the lm_head unless `policy.fp8_lm_head`)."""
  dt, out = dtype_of(policy), out_dtype or dtype_of(policy)
  prec = precision(policy)
  if isinstance(w, quant.Quantized):
    return quant.einsum(eqn, x.astype(dt), w, dt, prec, fp8.contracted_axes(eqn)[1], out).astype(out)
  if isinstance(w, fp8.Stored):
    return fp8.stored_einsum(eqn, x.astype(dt), w, out, prec).astype(out)
  recipe = fp8.resolve(policy.fp8) if quantize else "off"
  if recipe != "off":
    return fp8.RECIPES[recipe](eqn, x.astype(dt), w.astype(dt), out, prec).astype(out)
  return jnp.einsum(eqn, x.astype(dt), w.astype(dt), precision=prec, preferred_element_type=out).astype(out)


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float, out_dtype=None) -> jax.Array:
  """Normalise in float32, cast to the activation dtype (default: x's), then scale (no `1 + w` offset)."""
  dt = out_dtype or x.dtype
  x32 = x.astype(jnp.float32)
  y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(dt)
  return y if weight is None else y * weight.astype(dt)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  return jax.nn.silu(gate) * up
