"""The whole Llama 4 model: text decoder, and (for multimodal configs) the vision tower and projector."""

from __future__ import annotations

import jax
from flax import nnx

from llama4_jax.config import Llama4Config, Policy
from llama4_jax.model import Output, TextModel


class Llama4(nnx.Module):
  """`Llama4ForConditionalGeneration` (or, with `cfg.vision is None`, `Llama4ForCausalLM`)."""

  def __init__(self, cfg: Llama4Config, policy: Policy, rngs: nnx.Rngs):
    self.cfg, self.policy = cfg, policy
    self.text = TextModel(cfg.text, policy, rngs)

  def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None) -> Output:
    return self.text.forward(input_ids, attention_mask, position_ids, segment_ids)

  def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None) -> jax.Array:
    """Logits [B, T, vocab] float32."""
    return self.forward(input_ids, attention_mask, position_ids, segment_ids).logits


def init(cfg: Llama4Config, policy: Policy, seed: int = 0) -> Llama4:
  """Random init under jit (one compiled program instead of op-by-op)."""

  @jax.jit
  def make(key):
    return nnx.split(Llama4(cfg, policy, nnx.Rngs(params=key)))[1]

  graphdef = nnx.graphdef(abstract(cfg, policy))
  return nnx.merge(graphdef, make(jax.random.key(seed)))


def abstract(cfg: Llama4Config, policy: Policy) -> Llama4:
  """Shapes, dtypes and logical axes of every parameter, no allocation."""
  return nnx.eval_shape(lambda: Llama4(cfg, policy, nnx.Rngs(0)))
