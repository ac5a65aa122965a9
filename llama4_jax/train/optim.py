"""The optimiser: AdamW, linear warmup + cosine decay, global-norm clipping, decay mask by logical axes."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from llama4_jax.train.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Learning rate of step s = 0, 1, ...: linear warmup lr * (s + 1) / warmup_steps (no wasted first step),
  then a cosine from lr down to lr * min_lr_ratio at the last step (s = total_steps - 1)."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  base = optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
                                            decay_steps=max(total_steps, warmup + 1),
                                            end_value=cfg.lr * cfg.min_lr_ratio)

  def lr(step):
    return base(step + 1)

  return lr


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


def make(cfg: OptimConfig, total_steps: int, abstract_params: nnx.State) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW (moments in float32) with the decay mask of `abstract_params`."""
  adamw = optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask(abstract_params), mu_dtype="float32")
  if cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
  return adamw
