"""The one declarative table between HF safetensors keys and our parameter paths, used in both directions.

Each `Entry` names an HF key (relative to the text/vision prefix, `{i}` = layer index), our path inside
the model state (`{j}` = position of the layer inside its scanned block), a layout transform and both
shapes as functions of the config. `to_ours` / `to_hf` apply the transform; the round trip is the
identity (tested). Scanned layers live at `[block]` of a leaf stacked over blocks: layer i = block * p + j.

Transforms:
  "copy"       same array.
  "linear"     HF nn.Linear [out, in] -> ours [in, ...out]: transpose, then reshape to our shape.
  "reshape"    same element order, our shape (fused expert tensors: [E, D, 2I] -> [E, D, 2, I]).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from llama4_jax.config import Llama4Config, TextConfig

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str  # HF key, relative to the text or vision prefix
  ours: str  # dotted path in our state
  transform: str  # "copy" | "linear" | "reshape"
  hf_shape: Callable[[Llama4Config], Shape]
  our_shape: Callable[[Llama4Config], Shape]
  where: str = "model"  # "model" (top), "layer" (every decoder layer), "dense", "moe" (by layer kind)

  def to_ours(self, x: np.ndarray, cfg: Llama4Config) -> np.ndarray:
    if self.transform == "linear":
      x = x.T
    return x.reshape(self.our_shape(cfg))

  def to_hf(self, x: np.ndarray, cfg: Llama4Config) -> np.ndarray:
    hf = self.hf_shape(cfg)
    if self.transform == "linear":
      return x.reshape(hf[::-1]).T
    return x.reshape(hf)


def _t(f: Callable[[TextConfig], Shape]) -> Callable[[Llama4Config], Shape]:
  return lambda cfg: f(cfg.text)


_D = lambda t: t.hidden_size  # noqa: E731
TEXT: tuple[Entry, ...] = (
    Entry("model.embed_tokens.weight", "embed", "copy",
          _t(lambda t: (t.vocab_size, _D(t))), _t(lambda t: (t.vocab_size, _D(t)))),
    Entry("model.norm.weight", "norm.weight", "copy", _t(lambda t: (_D(t),)), _t(lambda t: (_D(t),))),
    Entry("lm_head.weight", "lm_head", "linear",
          _t(lambda t: (t.vocab_size, _D(t))), _t(lambda t: (_D(t), t.vocab_size))),
    Entry("model.layers.{i}.input_layernorm.weight", "attn_norm.weight", "copy",
          _t(lambda t: (_D(t),)), _t(lambda t: (_D(t),)), "layer"),
    Entry("model.layers.{i}.post_attention_layernorm.weight", "ffn_norm.weight", "copy",
          _t(lambda t: (_D(t),)), _t(lambda t: (_D(t),)), "layer"),
    Entry("model.layers.{i}.self_attn.q_proj.weight", "attn.q", "linear",
          _t(lambda t: (t.num_attention_heads * t.head_dim, _D(t))),
          _t(lambda t: (_D(t), t.num_attention_heads, t.head_dim)), "layer"),
    Entry("model.layers.{i}.self_attn.k_proj.weight", "attn.k", "linear",
          _t(lambda t: (t.num_key_value_heads * t.head_dim, _D(t))),
          _t(lambda t: (_D(t), t.num_key_value_heads, t.head_dim)), "layer"),
    Entry("model.layers.{i}.self_attn.v_proj.weight", "attn.v", "linear",
          _t(lambda t: (t.num_key_value_heads * t.head_dim, _D(t))),
          _t(lambda t: (_D(t), t.num_key_value_heads, t.head_dim)), "layer"),
    Entry("model.layers.{i}.self_attn.o_proj.weight", "attn.o", "linear",
          _t(lambda t: (_D(t), t.num_attention_heads * t.head_dim)),
          _t(lambda t: (t.num_attention_heads, t.head_dim, _D(t))), "layer"),
    # Dense SwiGLU layers.
    Entry("model.layers.{i}.feed_forward.gate_proj.weight", "ffn.gate", "linear",
          _t(lambda t: (t.intermediate_size_mlp, _D(t))), _t(lambda t: (_D(t), t.intermediate_size_mlp)), "dense"),
    Entry("model.layers.{i}.feed_forward.up_proj.weight", "ffn.up", "linear",
          _t(lambda t: (t.intermediate_size_mlp, _D(t))), _t(lambda t: (_D(t), t.intermediate_size_mlp)), "dense"),
    Entry("model.layers.{i}.feed_forward.down_proj.weight", "ffn.down", "linear",
          _t(lambda t: (_D(t), t.intermediate_size_mlp)), _t(lambda t: (t.intermediate_size_mlp, _D(t))), "dense"),
    # MoE layers.
    Entry("model.layers.{i}.feed_forward.router.weight", "ffn.router", "linear",
          _t(lambda t: (t.num_local_experts, _D(t))), _t(lambda t: (_D(t), t.num_local_experts)), "moe"),
    Entry("model.layers.{i}.feed_forward.experts.gate_up_proj", "ffn.gate_up", "reshape",
          _t(lambda t: (t.num_local_experts, _D(t), 2 * t.intermediate_size)),
          _t(lambda t: (t.num_local_experts, _D(t), 2, t.intermediate_size)), "moe"),
    Entry("model.layers.{i}.feed_forward.experts.down_proj", "ffn.down", "copy",
          _t(lambda t: (t.num_local_experts, t.intermediate_size, _D(t))),
          _t(lambda t: (t.num_local_experts, t.intermediate_size, _D(t))), "moe"),
    Entry("model.layers.{i}.feed_forward.shared_expert.gate_proj.weight", "ffn.shared.gate", "linear",
          _t(lambda t: (t.intermediate_size, _D(t))), _t(lambda t: (_D(t), t.intermediate_size)), "moe"),
    Entry("model.layers.{i}.feed_forward.shared_expert.up_proj.weight", "ffn.shared.up", "linear",
          _t(lambda t: (t.intermediate_size, _D(t))), _t(lambda t: (_D(t), t.intermediate_size)), "moe"),
    Entry("model.layers.{i}.feed_forward.shared_expert.down_proj.weight", "ffn.shared.down", "linear",
          _t(lambda t: (_D(t), t.intermediate_size)), _t(lambda t: (t.intermediate_size, _D(t))), "moe"),
)

# Prefixes of the two on-disk layouts of the text model.
MULTIMODAL_TEXT_PREFIX = "language_model."
TEXT_ONLY_PREFIX = ""


@dataclasses.dataclass(frozen=True)
class Placement:
  """One HF tensor and where it goes in our state: `path` (a tuple of keys), and `index`, the block of a
  stacked (scanned) leaf, or None for unstacked leaves."""

  key: str
  path: tuple
  index: int | None
  entry: Entry


def _split_path(p: str) -> tuple:
  return tuple(int(x) if x.isdigit() else x for x in p.split("."))


def text_placements(cfg: Llama4Config, prefix: str) -> Iterator[Placement]:
  """Every text tensor of a checkpoint with `prefix` ("language_model." or "")."""
  t = cfg.text
  p = t.layer_period
  for e in TEXT:
    if e.where == "model":
      yield Placement(prefix + e.hf, ("text",) + _split_path(e.ours), None, e)
      continue
    for i in range(t.num_hidden_layers):
      if e.where == "moe" and not t.is_moe(i) or e.where == "dense" and t.is_moe(i):
        continue
      path = ("text", "blocks", "layers", i % p) + _split_path(e.ours)
      yield Placement(prefix + e.hf.format(i=i), path, i // p, e)


def placements(cfg: Llama4Config, text_prefix: str) -> list[Placement]:
  """All tensors of a checkpoint of this config (text; vision once the vision tower is added)."""
  return list(text_placements(cfg, text_prefix))
