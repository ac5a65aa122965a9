"""Low-rank adapters (LoRA) on a frozen base, the math: W' = W + (alpha / r) * A @ B on the chosen weights.

Targets (`LoraConfig.targets`) and the weights they select in the text model:
  q, k, v, o   attention projections            [D, H, d] / [D, K, d] / [H, d, D]
  shared       the shared expert's gate, up, down [D, F] / [F, D]
  mlp          dense MLP layers' gate, up, down   [D, F] / [F, D]
  experts      routed experts, one adapter each   gate_up [E, D, 2, I], down [E, I, D]
Every weight is read as [batch..., in..., out...]: batch axes are the stacked "layers" and "experts"; the
input is the "embed" axis where a weight starts from it (q, k, v, gate, up, gate_up), else every axis but
the last ("embed": o, down). A is [batch..., in..., r] (normal, std 1/sqrt(fan_in)), B [batch..., r, out...]
(zeros, so training starts from the base), both carrying the base weight's logical names on their axes (the
rank axis has none): the sharding presets place them like the weight. Routed experts get per-expert pairs
[E, D, r] and [E, r, 2, I] (gate and up side by side, as the base stores them), [E, I, r] and [E, r, D].

`Adapted` is a weight as the forward of a LoRA model reads it: `w[...]` gives W + scale * A @ B, formed in
the scanned block that uses it; its base may be held in a serving form (QLoRA): int8 / int4
(`quant.Quantized`) or FP8 routed experts (`fp8.Stored`), dequantised when read.

Layers above: `llama4_jax.io.adapters` (which weights a stored base holds quantised, the parameter groups of a
LoRA model and their merge, adapter directories), `llama4_jax.train.lora` (training and saving them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import traversals

from llama4_jax import config as config_lib
from llama4_jax.config import LoraConfig
from llama4_jax.model import fp8, quant
from llama4_jax.model import moe as moe_lib

TARGETS = ("q", "k", "v", "o", "shared", "mlp", "experts")
_BATCH = ("layers", "experts")


class LoraError(ValueError):
  """A LoRA setting that cannot apply to the model; the message names the value."""


@dataclasses.dataclass(frozen=True)
class Spec:
  """One adapted weight: its path, target name, the [batch..., in..., out...] split and logical names."""

  path: tuple
  target: str
  batch: tuple[int, ...]
  fan_in: tuple[int, ...]
  fan_out: tuple[int, ...]
  names: tuple  # the weight's logical names, batch + in + out
  dtype: str
  rank: int
  stored: str = "float"  # how the frozen base holds the weight: "float", "int8", "int4" or "fp8"

  @property
  def a_shape(self) -> tuple[int, ...]:
    return (*self.batch, *self.fan_in, self.rank)

  @property
  def b_shape(self) -> tuple[int, ...]:
    return (*self.batch, self.rank, *self.fan_out)


def target_of(path: tuple, names: tuple) -> str | None:
  """The LoRA target a text-model weight belongs to (None: not adaptable)."""
  if not path or path[0] != "text":
    return None
  leaf = path[-1]
  if "attn" in path and leaf in ("q", "k", "v", "o"):
    return leaf
  if "shared" in path and leaf in ("gate", "up", "down"):
    return "shared"
  if len(path) >= 2 and path[-2] == "ffn":
    if "experts" in names and leaf in ("gate_up", "down"):
      return "experts"
    if leaf in ("gate", "up", "down"):
      return "mlp"
  return None


def _split_axes(shape: tuple[int, ...], names: tuple) -> tuple[tuple, tuple, tuple]:
  """(batch, in, out) dimensions of a weight (see the module docstring)."""
  nb = 0
  while nb < len(names) and names[nb] in _BATCH:
    nb += 1
  cut = nb + 1 if names[nb] == "embed" else len(shape) - 1
  return tuple(shape[:nb]), tuple(shape[nb:cut]), tuple(shape[cut:])


def find_specs(params: nnx.State, cfg: LoraConfig, stored: dict | None = None) -> tuple[Spec, ...]:
  """The adapted weights of a model's float parameter state (abstract is enough), checked against `cfg`.
  `stored`: weight path -> how the base holds it ("int8", "int4", "fp8"; absent: "float"), see
  `io.adapters.stored_forms`."""
  unknown = [t for t in cfg.targets if t not in TARGETS]
  if unknown:
    raise LoraError(f"lora.targets: unknown target(s) {', '.join(map(repr, unknown))}; valid: {', '.join(TARGETS)}")
  if not cfg.targets:
    raise LoraError("lora.targets is empty: name at least one of " + ", ".join(TARGETS))
  if cfg.rank < 1:
    raise LoraError(f"lora.rank={cfg.rank}: must be >= 1")
  specs, found = [], set()
  for path, var in nnx.to_flat_state(params):
    names = tuple(var.get_metadata().get("out_sharding") or ())
    t = target_of(path, names)
    if t is None or t not in cfg.targets:
      continue
    dt = jnp.dtype(var.dtype)
    if not jnp.issubdtype(dt, jnp.floating) or dt.itemsize == 1:
      raise LoraError(f"lora.targets: {'/'.join(map(str, path))} (target {t!r}) is {dt.name} in this template: "
                      "pass the float model's parameters (io.adapters.LoraLayout.build does so for a quantised or FP8 "
                      "base)")
    batch, fan_in, fan_out = _split_axes(tuple(var.shape), names)
    dim = min(math.prod(fan_in), math.prod(fan_out))
    if cfg.rank > dim:
      raise LoraError(f"lora.rank={cfg.rank} exceeds the dimension {dim} of {'/'.join(map(str, path))} (target "
                      f"{t!r}: in {fan_in}, out {fan_out}); choose lora.rank <= {dim}")
    specs.append(Spec(path, t, batch, fan_in, fan_out, names, dt.name, cfg.rank, (stored or {}).get(path, "float")))
    found.add(t)
  missing = [t for t in cfg.targets if t not in found]
  if missing:
    raise LoraError(f"lora.targets: {', '.join(map(repr, missing))} match(es) no weight of this model "
                    f"(it has: {', '.join(sorted(_present(params))) or 'none'})")
  return tuple(specs)


def _present(params: nnx.State) -> set[str]:
  return {t for path, var in nnx.to_flat_state(params)
          if (t := target_of(path, tuple(var.get_metadata().get("out_sharding") or ()))) is not None}


def _names(spec: Spec) -> tuple[tuple, tuple]:
  nb, ni = len(spec.batch), len(spec.fan_in)
  batch_n, in_n, out_n = spec.names[:nb], spec.names[nb: nb + ni], spec.names[nb + ni:]
  return (*batch_n, *in_n, None), (*batch_n, None, *out_n)


def adapter_template(specs: tuple[Spec, ...]) -> list[tuple[tuple, nnx.Param]]:
  """(path, abstract Param with logical names) of every adapter, under ("lora", *weight path, "a" | "b")."""
  out = []
  for s in specs:
    a_names, b_names = _names(s)
    for leaf, shape, names in (("a", s.a_shape, a_names), ("b", s.b_shape, b_names)):
      sds = jax.ShapeDtypeStruct(shape, jnp.dtype(s.dtype))
      out.append((("lora", *s.path, leaf), nnx.Param(sds, out_sharding=names, eager_sharding=False)))
  return out


def init_adapters(specs: tuple[Spec, ...], seed: int) -> dict:
  """{"lora": ...} pure dict: A ~ normal(0, 1/fan_in), B = 0."""
  key = jax.random.key(seed)
  flat = {}
  for i, s in enumerate(specs):
    std = 1.0 / math.sqrt(math.prod(s.fan_in))
    a = std * jax.random.normal(jax.random.fold_in(key, i), s.a_shape, jnp.float32)
    flat[("lora", *s.path, "a")] = a.astype(s.dtype)
    flat[("lora", *s.path, "b")] = jnp.zeros(s.b_shape, s.dtype)
  return traversals.unflatten_mapping(flat)


def delta(spec: Spec, a: jax.Array, b: jax.Array) -> jax.Array:
  """A @ B in the weight's layout [batch..., in..., out...], float32. The batch axes are A's (all of them, or
  those left inside the scanned layers)."""
  batch = a.shape[: a.ndim - len(spec.fan_in) - 1]
  a2 = a.astype(jnp.float32).reshape(*batch, math.prod(spec.fan_in), spec.rank)
  b2 = b.astype(jnp.float32).reshape(*batch, spec.rank, math.prod(spec.fan_out))
  d = jnp.einsum("...ir,...ro->...io", a2, b2, precision=jax.lax.Precision.HIGHEST)
  return d.reshape(*batch, *spec.fan_in, *spec.fan_out)


def quant_axis(path: tuple) -> int:
  """The contracted axis (from the end) of a stored int8 / int4 or FP8 weight, as the model declares it."""
  return moe_lib.GATE_UP_AXIS if path[-1] == "gate_up" else moe_lib.DOWN_AXIS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapted:
  """A weight as the forward of a LoRA run reads it: `w[...]` = the frozen base (an array, `quant.Quantized`
  or `fp8.Stored`) dequantised, plus scale * A @ B when adapted (`a`, `b`; None: the stored base alone), in
  `dtype`. A pytree whose leaves all carry the weight's batch axes, so the scanned layers slice it like the
  array it stands for and the float weight is built inside each block."""

  base: Any
  a: jax.Array | None
  b: jax.Array | None
  spec: Spec | None = dataclasses.field(metadata={"static": True}, default=None)
  scale: float = dataclasses.field(metadata={"static": True}, default=1.0)
  dtype: str = dataclasses.field(metadata={"static": True}, default="float32")
  axis: int = dataclasses.field(metadata={"static": True}, default=-2)  # an fp8.Stored base's contracted axis

  def base_weight(self) -> jax.Array:
    w = self.base
    if isinstance(w, quant.Quantized):
      return w.dequantize(jnp.float32)
    if isinstance(w, fp8.Stored):
      return fp8.dequantize(w.q, jnp.expand_dims(w.scale, self.axis), jnp.float32)
    return w

  def weight(self) -> jax.Array:
    w = self.base_weight()
    if self.a is None:
      return w.astype(self.dtype)
    return (w.astype(jnp.float32) + self.scale * delta(self.spec, self.a, self.b)).astype(self.dtype)

  def __getitem__(self, key) -> jax.Array:
    if key is not Ellipsis:
      raise IndexError(f"an adapted weight is read whole (w[...]), not with {key!r}")
    return self.weight()


def float_policy(policy: config_lib.Policy) -> config_lib.Policy:
  """The policy of the float model a quantised / FP8 base stands for."""
  return dataclasses.replace(policy, quant="none", expert_fp8=False)


def config_from_dict(d: dict) -> LoraConfig:
  """The LoraConfig of its JSON form (adapter_config.json, a checkpoint's meta experiment)."""
  return LoraConfig(**{**d, "targets": tuple(d["targets"])})


def stored_policy(run_policy: dict, policy: config_lib.Policy) -> config_lib.Policy:
  """`policy` with the base's storage fields (quantisation, FP8 experts) of a LoRA run's JSON policy: the form
  its checkpoints hold the frozen base in."""
  keys = ("quant", "quant_group", "quant_scale_dtype", "quant_targets", "expert_fp8")
  fields = {k: tuple(run_policy[k]) if isinstance(run_policy[k], list) else run_policy[k] for k in keys
            if k in run_policy}
  return dataclasses.replace(policy, **fields)
