"""Parameter counts from the abstract model (`jax.eval_shape`: nothing is allocated)."""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from llama4_jax.config import FP32, Llama4Config, Policy
from llama4_jax.model.llama4 import abstract


@dataclasses.dataclass(frozen=True)
class ParamCount:
  total: int  # every parameter
  text: int  # text decoder
  vision: int  # vision tower, adapter and projector
  active: int  # text parameters used per token: routed experts count k of E


def count_params(cfg: Llama4Config, policy: Policy = FP32) -> ParamCount:
  text = vision = inactive = 0
  k, E = cfg.text.num_experts_per_tok, cfg.text.num_local_experts
  for path, var in nnx.to_flat_state(nnx.state(abstract(cfg, policy), nnx.Param)):
    n = int(np.prod(var.shape))
    if path[0] == "text":
      text += n
      if "experts" in (var.get_metadata().get("out_sharding") or ()):
        inactive += n * (E - k) // E
    else:
      vision += n
  return ParamCount(total=text + vision, text=text, vision=vision, active=text - inactive)
