"""Weight helpers shared by several test files (imported as `helpers`, like `hf_ref`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals

from llama4_jax import config as C
from sharding import params as sp


def randomise(state: nnx.State, seed: int) -> nnx.State:
  """Every float weight redrawn at O(1) activation scale (the 0.02 init gives near-uniform logits, too close
  to call greedily, and makes quantisation errors ~0)."""
  rng = np.random.default_rng(seed)

  def one(var):
    names = sp.logical_names(var)
    fan_in = [d for d, n in zip(var.shape, names) if n not in ("layers", "experts")][0]
    z = rng.standard_normal(var.shape)
    w = 1.0 + 0.2 * z if "norm" in names else z if names[0] == "vocab" else z / np.sqrt(fan_in)
    return var.replace(jnp.asarray(w * (3.0 if "router" in names else 1.0), var.dtype))

  return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def random_lora_b(params: dict, seed: int = 1) -> dict:
  """LoRA parameters with non-zero B (a trained-looking update; B starts at zero)."""
  flat = traversals.flatten_mapping(params)
  rng = np.random.default_rng(seed)
  for p, v in flat.items():
    if p[0] == "lora" and p[-1] == "b":
      flat[p] = jnp.asarray(rng.standard_normal(v.shape) * 0.05, v.dtype)
  return traversals.unflatten_mapping(flat)


def two_layers(cfg: C.Llama4Config) -> C.Llama4Config:
  """A tiny preset cut to one period of two layers (one chunked RoPE layer, one global NoPE layer), text only."""
  text = dataclasses.replace(cfg.text, num_hidden_layers=2, no_rope_layer_interval=2, no_rope_layers=(),
                             moe_layers=None)
  return dataclasses.replace(cfg, text=text, vision=None)


TWO_LAYER_MODELS = {"scout": two_layers(C.TINY_SCOUT), "maverick": two_layers(C.TINY_MAVERICK)}
