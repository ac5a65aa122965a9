"""LoRA on a stored base: which weights a base holds in a serving form, the parameter groups of a LoRA model
(`LoraLayout`) and their merge, and adapter directories (adapter_config.json + params/).

A frozen base may be held in its serving form (QLoRA): int8 / int4 (`quant.Quantized`, `Policy.quant`) or FP8
routed experts (`fp8.Stored`, `Policy.expert_fp8`). The frozen group then keeps the stored values and scales
untouched; `merge` builds the float model's graph (the same config, a float policy) whose adapted or stored
weights are `model.lora.Adapted` values: the forward reads `w[...]` = dequantised base (+ scale * A @ B when
adapted), one scanned block at a time (the float copy of a weight is transient). The adapters have the float
policy's parameter dtype; `merged_params` dequantises (the merged model is a float model).

An adapter directory is written by `train.lora.save_adapters` and read here (`read_adapter_config`,
`load_adapters`); `llama4_jax.load` applies it to the base it records.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import traversals

from llama4_jax.config import LoraConfig
from llama4_jax.io import model_dir, targets
from llama4_jax.io import quantize as quantize_io
from llama4_jax.model import fp8, llama4, quant
from llama4_jax.model.lora import (
  Adapted,
  Spec,
  adapter_template,
  config_from_dict,
  find_specs,
  float_policy,
  init_adapters,
  quant_axis,
)
from llama4_jax.model.text import SelectionBias, enable_selection_bias

ADAPTER_CONFIG = "adapter_config.json"
FP8_SCALE = "_scale"  # the per-output-channel multipliers of an FP8-stored weight sit beside it as <name>_scale


def stored_forms(stored: nnx.State) -> dict:
  """Weight path -> "int8" / "int4" / "fp8" for every weight a (possibly abstract) base holds in a serving
  form: int values with `<name>_qscale` scales beside them, or float8 values with `<name>_scale`."""
  flat = dict(nnx.to_flat_state(stored))
  out = {}
  for path, var in flat.items():
    if quantize_io.scale_path(path) in flat:
      out[path] = "int8" if jnp.dtype(var.dtype) == jnp.int8 else "int4"
    elif jnp.dtype(var.dtype) == fp8.E4M3 and path[:-1] + (f"{path[-1]}{FP8_SCALE}",) in flat:
      out[path] = "fp8"
  return out


def _stored_weight(flat: dict, path: tuple, form: str):
  """The base weight at `path` as the forward takes it from the frozen values (`flat`)."""
  if form in ("int8", "int4"):
    return quant.Quantized(flat[path], flat[quantize_io.scale_path(path)], quant_axis(path))
  if form == "fp8":
    return fp8.Stored(flat[path], flat[path[:-1] + (f"{path[-1]}{FP8_SCALE}",)])
  return flat[path]


def _abstract(state: nnx.State) -> nnx.State:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _is_router(path: tuple) -> bool:
  return path[-1] == "router"


def _sub(flat: dict, keep) -> dict:
  return traversals.unflatten_mapping({p: v for p, v in flat.items() if keep(p)})


@dataclasses.dataclass(frozen=True, eq=False)
class LoraLayout:
  """The parameter groups of a LoRA model: params = {"lora": adapters} (+ routers), frozen = the rest of the
  base (as stored: float, int8 / int4 or FP8), bias = the MoE selection biases (abstract templates); `merge`
  builds the float model reading base + adapters per block. `train.lora.LoraParts` is this as the
  `train.state.ModelParts` of a run."""

  graphdef: Any
  params: nnx.State
  frozen: nnx.State
  bias: nnx.State
  base: nnx.State = None  # abstract template of every float nnx.Param (the model `merge` builds)
  specs: tuple[Spec, ...] = ()
  scale: float = 1.0  # alpha / rank
  lora: LoraConfig = LoraConfig()
  stored: tuple = ()  # (weight path, "int8" | "int4" | "fp8") of the weights the frozen base holds quantised

  @classmethod
  def build(cls, model: nnx.Module, cfg: LoraConfig) -> LoraLayout:
    """The templates of a (possibly abstract) model under `cfg`; LoraError on a bad target or rank. A model
    holding int8 / int4 / FP8 weights keeps them so in the frozen group; `graphdef` and `base` are then those
    of its float twin (`float_policy`)."""
    graphdef, params, bias = nnx.split(model, nnx.Param, SelectionBias)
    abstract = _abstract(params)
    forms = stored_forms(abstract)
    float_base = abstract
    if forms:
      twin = llama4.abstract(model.cfg, float_policy(model.policy))
      if jax.tree.leaves(bias):
        enable_selection_bias(twin)
      graphdef, twin_params, _ = nnx.split(twin, nnx.Param, SelectionBias)
      float_base = _abstract(twin_params)
    specs = find_specs(float_base, cfg, forms)
    base_flat = nnx.to_flat_state(abstract)
    train = [(p, v) for p, v in base_flat if cfg.train_router and _is_router(p)]
    frozen = [(p, v) for p, v in base_flat if not (cfg.train_router and _is_router(p))]
    trainable = nnx.from_flat_state(adapter_template(specs) + train)
    return cls(graphdef, trainable, nnx.from_flat_state(frozen), _abstract(bias), base=float_base, specs=specs,
               scale=cfg.alpha / cfg.rank, lora=cfg, stored=tuple(sorted(forms.items())))

  def split_values(self, model: nnx.Module, seed: int) -> tuple[dict, dict, dict]:
    """(params, frozen, bias) pure dicts of a concrete base model: fresh adapters + routers, the rest frozen."""
    _, params, bias = nnx.split(model, nnx.Param, SelectionBias)
    flat = traversals.flatten_mapping(nnx.to_pure_dict(params))
    trainable = self.lora.train_router
    train = _sub(flat, lambda p: trainable and _is_router(p))
    frozen = _sub(flat, lambda p: not (trainable and _is_router(p)))
    return {**init_adapters(self.specs, seed), **train}, frozen, nnx.to_pure_dict(bias)

  def forward_values(self, params: dict, frozen: dict) -> dict:
    """Pure dict over the float model's parameters: plain arrays, and an `Adapted` for every adapted weight
    and every weight the base holds quantised."""
    flat = {**traversals.flatten_mapping(params), **traversals.flatten_mapping(frozen)}
    specs, forms = {s.path: s for s in self.specs}, dict(self.stored)
    out = {}
    for path, var in nnx.to_flat_state(self.base):
      w, s = _stored_weight(flat, path, forms.get(path, "float")), specs.get(path)
      if s is None and path not in forms:
        out[path] = w
        continue
      a, b = (None, None) if s is None else (flat[("lora", *path, "a")], flat[("lora", *path, "b")])
      out[path] = Adapted(w, a, b, s, self.scale, jnp.dtype(var.dtype).name, quant_axis(path))
    return traversals.unflatten_mapping(out)

  def merged_params(self, params: dict, frozen: dict) -> dict:
    """The full float parameter pure dict with the adapters folded in (a quantised base dequantised)."""
    return jax.tree.map(lambda v: v.weight() if isinstance(v, Adapted) else v, self.forward_values(params, frozen),
                        is_leaf=lambda v: isinstance(v, Adapted))

  def merge(self, params: dict, frozen: dict, bias: dict) -> nnx.Module:
    """The float model whose adapted / quantised weights are `Adapted` values (built per block when read)."""
    values = self.forward_values(params, frozen)
    return nnx.merge(self.graphdef, targets.fill(self.base, values), targets.fill(self.bias, bias))


def is_adapter_dir(directory: str) -> bool:
  """Whether `directory` holds LoRA adapters saved alone (it has adapter_config.json)."""
  return os.path.isfile(os.path.join(directory, ADAPTER_CONFIG))


def read_adapter_config(directory: str) -> tuple[LoraConfig, dict]:
  """(LoRA config, the whole record: "lora", "base", "bytes") of an adapter directory's adapter_config.json."""
  with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
    record = json.load(f)
  return config_from_dict(record["lora"]), record


def load_adapters(directory: str) -> tuple[LoraConfig, dict]:
  """(config, {"lora": adapters} pure dict) written by `train.lora.save_adapters`."""
  cfg, _ = read_adapter_config(directory)
  return cfg, model_dir.restore_params(directory)
