"""Training low-rank adapters (LoRA) on a frozen base: W' = W + (alpha / r) * A @ B on the chosen weights.

The math (targets, `Spec`, `Adapted`, `delta`) is `llama4_jax.model.lora`; the parameter groups of a LoRA model
and their merge (`LoraLayout`, QLoRA on an int8 / int4 / FP8 base) and adapter directories are
`llama4_jax.io.adapters` (the names tests and tools use are re-exported here).

In training (`LoraParts`) the trainable group holds {"lora": adapters} (and the MoE routers when
`train_router`); the base sits in the frozen group, so optimizer state exists for the adapters only. `merge`
builds the model whose adapted weights are `Adapted` values: reading one (`w[...]`) gives W + scale * A @ B,
so inside the jitted step the product is formed in the scanned block that uses it (recomputed per step, its
gradient flowing to A and B only). `save_adapters` writes the adapters alone (Orbax + adapter_config.json),
`merged_params` / `save_merged` the base with the updates folded in (a model directory: `llama4_jax.load`
and `tools.convert orbax-to-hf` read it).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from llama4_jax import config as config_lib
from llama4_jax.config import LoraConfig
from llama4_jax.io import model_dir
from llama4_jax.io.adapters import (  # noqa: F401 (re-exported)
  ADAPTER_CONFIG,
  LoraLayout,
  is_adapter_dir,
  load_adapters,
  read_adapter_config,
)
from llama4_jax.model.lora import TARGETS, Adapted, LoraError, Spec  # noqa: F401 (re-exported)
from llama4_jax.train.state import ModelParts, _fill  # noqa: F401 (_fill re-exported)


@dataclasses.dataclass(frozen=True, eq=False)
class LoraParts(LoraLayout, ModelParts):
  """`ModelParts` of a LoRA run: `LoraLayout`'s groups, build, merge and merged parameters, with
  `ModelParts`' shardings and selection-bias paths."""


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


def save_merged(directory: str, parts: LoraLayout, params: dict, frozen: dict, cfg: config_lib.Llama4Config,
                overwrite: bool = False) -> str:
  """The base with the adapters folded in, as a model directory (`llama4_jax.load`, `tools.convert`)."""
  merged = jax.jit(parts.merged_params)(params, frozen)
  return model_dir.save_params(directory, jax.device_get(merged), cfg, overwrite=overwrite)
