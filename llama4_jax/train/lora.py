"""Low-rank adapters (LoRA) on a frozen base: W' = W + (alpha / r) * A @ B on the chosen weights.

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

In training (`LoraParts`) the trainable group holds {"lora": adapters} (and the MoE routers when
`train_router`); the base sits in the frozen group, so optimizer state exists for the adapters only. The
merge adds the low-rank products to the base inside the jitted step (the product is recomputed per step and
its gradient flows to A and B only). `save_adapters` writes the adapters alone (Orbax + adapter_config.json),
`merged_params` / `save_merged` the base with the updates folded in (a model directory: `llama4_jax.load`
and `tools.convert orbax-to-hf` read it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import traversals

from llama4_jax import config as config_lib
from llama4_jax.io import model_dir
from llama4_jax.model.text import SelectionBias
from llama4_jax.train.config import LoraConfig
from llama4_jax.train.state import ModelParts, _fill

TARGETS = ("q", "k", "v", "o", "shared", "mlp", "experts")
ADAPTER_CONFIG = "adapter_config.json"
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


def find_specs(params: nnx.State, cfg: LoraConfig) -> tuple[Spec, ...]:
  """The adapted weights of a model's parameter state (abstract is enough), checked against `cfg`."""
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
      raise LoraError(f"lora.targets: {'/'.join(map(str, path))} (target {t!r}) is stored as {dt.name} (a quantised "
                      "or FP8 base); adapters need a float base: load it in bfloat16 / float32 or drop the target")
    batch, fan_in, fan_out = _split_axes(tuple(var.shape), names)
    dim = min(math.prod(fan_in), math.prod(fan_out))
    if cfg.rank > dim:
      raise LoraError(f"lora.rank={cfg.rank} exceeds the dimension {dim} of {'/'.join(map(str, path))} (target "
                      f"{t!r}: in {fan_in}, out {fan_out}); choose lora.rank <= {dim}")
    specs.append(Spec(path, t, batch, fan_in, fan_out, names, jnp.dtype(var.dtype).name, cfg.rank))
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
  """A @ B in the weight's layout [batch..., in..., out...], float32."""
  a2 = a.astype(jnp.float32).reshape(*spec.batch, math.prod(spec.fan_in), spec.rank)
  b2 = b.astype(jnp.float32).reshape(*spec.batch, spec.rank, math.prod(spec.fan_out))
  d = jnp.einsum("...ir,...ro->...io", a2, b2, precision=jax.lax.Precision.HIGHEST)
  return d.reshape(*spec.batch, *spec.fan_in, *spec.fan_out)


def apply(specs: tuple[Spec, ...], scale: float, base: dict, adapters: dict) -> dict:
  """`base` (a full parameter pure dict) with W + scale * A @ B on every adapted weight."""
  flat = dict(traversals.flatten_mapping(base))
  ad = traversals.flatten_mapping(adapters)
  for s in specs:
    w = flat[s.path]
    d = delta(s, ad[("lora", *s.path, "a")], ad[("lora", *s.path, "b")])
    flat[s.path] = (w.astype(jnp.float32) + scale * d).astype(w.dtype)
  return traversals.unflatten_mapping(flat)


def _is_router(path: tuple) -> bool:
  return path[-1] == "router"


def _sub(flat: dict, keep) -> dict:
  return traversals.unflatten_mapping({p: v for p, v in flat.items() if keep(p)})


@dataclasses.dataclass(frozen=True, eq=False)
class LoraParts(ModelParts):
  """`ModelParts` of a LoRA run: params = {"lora": adapters} (+ routers), frozen = the rest of the base;
  `merge` builds the model with the adapters folded into the base weights."""

  base: nnx.State = None  # abstract template of every base nnx.Param
  specs: tuple[Spec, ...] = ()
  scale: float = 1.0  # alpha / rank
  lora: LoraConfig = LoraConfig()

  @classmethod
  def build(cls, model: nnx.Module, cfg: LoraConfig) -> LoraParts:
    """The templates of a (possibly abstract) model under `cfg`; LoraError on a bad target or rank."""
    graphdef, params, bias = nnx.split(model, nnx.Param, SelectionBias)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    specs = find_specs(abstract, cfg)
    base_flat = nnx.to_flat_state(abstract)
    train = [(p, v) for p, v in base_flat if cfg.train_router and _is_router(p)]
    frozen = [(p, v) for p, v in base_flat if not (cfg.train_router and _is_router(p))]
    trainable = nnx.from_flat_state(adapter_template(specs) + train)
    return cls(graphdef, trainable, nnx.from_flat_state(frozen),
               jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), bias),
               base=abstract, specs=specs, scale=cfg.alpha / cfg.rank, lora=cfg)

  def split_values(self, model: nnx.Module, seed: int) -> tuple[dict, dict, dict]:
    """(params, frozen, bias) pure dicts of a concrete base model: fresh adapters + routers, the rest frozen."""
    _, params, bias = nnx.split(model, nnx.Param, SelectionBias)
    flat = traversals.flatten_mapping(nnx.to_pure_dict(params))
    trainable = self.lora.train_router
    train = _sub(flat, lambda p: trainable and _is_router(p))
    frozen = _sub(flat, lambda p: not (trainable and _is_router(p)))
    return {**init_adapters(self.specs, seed), **train}, frozen, nnx.to_pure_dict(bias)

  def merged_params(self, params: dict, frozen: dict) -> dict:
    """The full parameter pure dict with the adapters folded in."""
    flat = {**traversals.flatten_mapping(params), **traversals.flatten_mapping(frozen)}
    adapters = _sub(flat, lambda p: p[0] == "lora")
    base = _sub(flat, lambda p: p[0] != "lora")
    return apply(self.specs, self.scale, base, adapters)

  def merge(self, params: dict, frozen: dict, bias: dict) -> nnx.Module:
    return nnx.merge(self.graphdef, _fill(self.base, self.merged_params(params, frozen)), _fill(self.bias, bias))


def adapters_of(params: dict) -> dict:
  return {"lora": params["lora"]}


def adapter_bytes(params: dict) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(adapters_of(params)))


def save_adapters(directory: str, params: dict, cfg: LoraConfig, base: str = "", overwrite: bool = False) -> str:
  """The adapters alone as an Orbax parameter checkpoint (`directory/params`) plus adapter_config.json (the
  LoRA config, the base it adapts). Refuses an existing directory unless `overwrite`."""
  directory = model_dir.save_params(directory, jax.device_get(adapters_of(params)), overwrite=overwrite)
  record = {"lora": dataclasses.asdict(cfg), "base": base, "bytes": adapter_bytes(params)}
  record["lora"]["targets"] = list(cfg.targets)
  tmp = os.path.join(directory, ADAPTER_CONFIG + ".tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, os.path.join(directory, ADAPTER_CONFIG))
  return directory


def read_adapter_config(directory: str) -> tuple[LoraConfig, dict]:
  with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
    record = json.load(f)
  c = dict(record["lora"])
  c["targets"] = tuple(c["targets"])
  return LoraConfig(**c), record


def load_adapters(directory: str) -> tuple[LoraConfig, dict]:
  """(config, {"lora": adapters} pure dict) written by `save_adapters`."""
  cfg, _ = read_adapter_config(directory)
  return cfg, model_dir.restore_params(directory)


def save_merged(directory: str, parts: LoraParts, params: dict, frozen: dict, cfg: config_lib.Llama4Config,
                overwrite: bool = False) -> str:
  """The base with the adapters folded in, as a model directory (`llama4_jax.load`, `tools.convert`)."""
  merged = jax.jit(parts.merged_params)(params, frozen)
  return model_dir.save_params(directory, jax.device_get(merged), cfg, overwrite=overwrite)
