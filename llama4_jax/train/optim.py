"""The optimiser: AdamW, linear warmup + cosine decay, global-norm clipping, decay mask by logical axes.

AdamW is split in two: `make` returns the update *direction* (clip -> Adam moments -> + weight_decay *
param on the masked parameters), and the train step multiplies it by -learning_rate(step, total_steps).
The schedule is a traced function of the step and the total held in the train state, so a run whose
length is decided after it starts (`run.time_budget_s`) needs no recompilation, and a resumed run uses the
total it was started with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llama4_jax.train.config import OptimConfig


def learning_rate(cfg: OptimConfig, step: jax.Array, total_steps: jax.Array) -> jax.Array:
  """Learning rate of step s = 0, 1, ...: linear warmup lr * (s + 1) / warmup_steps (no wasted first step),
  then a cosine from lr at step warmup_steps - 1 down to lr * min_lr_ratio at the last step, total_steps - 1."""
  s = jnp.asarray(step, jnp.float32) + 1.0
  total = jnp.asarray(total_steps, jnp.float32)
  warmup = jnp.minimum(float(cfg.warmup_steps), jnp.maximum(total - 1.0, 0.0))
  peak, end = cfg.lr, cfg.lr * cfg.min_lr_ratio
  warm = peak * s / jnp.maximum(warmup, 1.0)
  progress = jnp.clip((s - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
  cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return jnp.where(s <= warmup, warm, cosine)


def decays(path: tuple, names: tuple[str | None, ...] | None, ndim: int) -> bool:
  """Weight decay applies to matrices only: not to norms (logical axis "norm"), biases (names ending in
  "bias") or any parameter with a single dimension besides the stacked "layers" axis."""
  names = names or ()
  if "norm" in names or str(path[-1]).endswith("bias"):
    return False
  return ndim - names.count("layers") >= 2


def decay_mask(abstract_params: nnx.State) -> dict:
  """Pure dict of bools with the structure of `abstract_params.to_pure_dict()`."""

  def one(path, var):
    meta = var.get_metadata()
    names = meta.get("out_sharding", meta.get("sharding_names"))
    return var.replace(decays(tuple(getattr(k, "key", k) for k in path), names, len(var.shape)))

  marked = jax.tree_util.tree_map_with_path(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(marked)


def make(cfg: OptimConfig, abstract_params: nnx.State) -> optax.GradientTransformation:
  """The AdamW update direction: clip by global norm, Adam (moments in float32), then add
  weight_decay * param where `decay_mask(abstract_params)` says so. Scale by -learning_rate to apply."""
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  parts += [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, mu_dtype="float32"),
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(abstract_params))]
  return optax.chain(*parts)
