"""The one declarative table between HF safetensors keys and our parameter paths, used in both directions.

Each `Entry` names an HF key (relative to the text/vision prefix, `{i}` = layer index), our path inside
the model state (`{j}` = position of the layer inside its scanned block), a layout transform and both
shapes as functions of the config. `to_ours` / `to_hf` apply the transform; the round trip is the
identity (tested). Scanned text layers live at `[block]` of a leaf stacked over blocks: layer i = block * p + j;
vision encoder layers at `[i]` of a leaf stacked over layers. The projector is the top-level "projector".

Transforms:
  "copy"       same array.
  "linear"     HF nn.Linear [out, in] -> ours [in, ...out]: transpose, then reshape to our shape.
  "reshape"    same element order, our shape (fused expert tensors: [E, D, 2I] -> [E, D, 2, I];
               vision q/k/v biases: [H*d] -> [H, d]).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from llama4_jax.config import Llama4Config, TextConfig, VisionConfig

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str  # HF key, relative to the text or vision prefix
  ours: str  # dotted path in our state
  transform: str  # "copy" | "linear" | "reshape"
  hf_shape: Callable[[Llama4Config], Shape]
  our_shape: Callable[[Llama4Config], Shape]
  where: str = "model"  # "model" (top), "layer" (every decoder / encoder layer), "dense", "moe" (by layer kind)

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


def _v(f: Callable[[VisionConfig], Shape]) -> Callable[[Llama4Config], Shape]:
  return lambda cfg: f(cfg.vision)


_Dv = lambda v: v.hidden_size  # noqa: E731
_Hd = lambda v: (v.num_attention_heads, v.head_dim)  # noqa: E731
_vec = _v(lambda v: (_Dv(v),))
# Vision tower (`Llama4VisionModel`, keys under VISION_PREFIX), our paths under "vision". HF biases of
# q/k/v are [H*d]; ours are [H, d] ("reshape"). Encoder layers are stacked one per index (no blocks).
VISION_PREFIX = "vision_model."
VISION: tuple[Entry, ...] = (
    Entry("patch_embedding.linear.weight", "patch", "linear",
          _v(lambda v: (_Dv(v), v.num_channels * v.patch_size ** 2)),
          _v(lambda v: (v.num_channels * v.patch_size ** 2, _Dv(v)))),
    Entry("class_embedding", "cls", "copy", _vec, _vec),
    Entry("positional_embedding_vlm", "pos", "copy",
          _v(lambda v: (v.grid ** 2 + 1, _Dv(v))), _v(lambda v: (v.grid ** 2 + 1, _Dv(v)))),
    Entry("layernorm_pre.weight", "pre_norm.weight", "copy", _vec, _vec),
    Entry("layernorm_pre.bias", "pre_norm.bias", "copy", _vec, _vec),
    Entry("layernorm_post.weight", "post_norm.weight", "copy", _vec, _vec),
    Entry("layernorm_post.bias", "post_norm.bias", "copy", _vec, _vec),
    Entry("model.layers.{i}.input_layernorm.weight", "attn_norm.weight", "copy", _vec, _vec, "layer"),
    Entry("model.layers.{i}.input_layernorm.bias", "attn_norm.bias", "copy", _vec, _vec, "layer"),
    Entry("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm.weight", "copy", _vec, _vec, "layer"),
    Entry("model.layers.{i}.post_attention_layernorm.bias", "mlp_norm.bias", "copy", _vec, _vec, "layer"),
    *(Entry(f"model.layers.{{i}}.self_attn.{n}_proj.weight", f"attn.{n}", "linear",
            _v(lambda v: (_Dv(v), _Dv(v))), _v(lambda v: (_Dv(v), *_Hd(v))), "layer") for n in "qkv"),
    *(Entry(f"model.layers.{{i}}.self_attn.{n}_proj.bias", f"attn.{n}_bias", "reshape",
            _vec, _v(_Hd), "layer") for n in "qkv"),
    Entry("model.layers.{i}.self_attn.o_proj.weight", "attn.o", "linear",
          _v(lambda v: (_Dv(v), _Dv(v))), _v(lambda v: (*_Hd(v), _Dv(v))), "layer"),
    Entry("model.layers.{i}.self_attn.o_proj.bias", "attn.o_bias", "copy", _vec, _vec, "layer"),
    Entry("model.layers.{i}.mlp.fc1.weight", "mlp.fc1", "linear",
          _v(lambda v: (v.intermediate_size, _Dv(v))), _v(lambda v: (_Dv(v), v.intermediate_size)), "layer"),
    Entry("model.layers.{i}.mlp.fc1.bias", "mlp.fc1_bias", "copy",
          _v(lambda v: (v.intermediate_size,)), _v(lambda v: (v.intermediate_size,)), "layer"),
    Entry("model.layers.{i}.mlp.fc2.weight", "mlp.fc2", "linear",
          _v(lambda v: (_Dv(v), v.intermediate_size)), _v(lambda v: (v.intermediate_size, _Dv(v))), "layer"),
    Entry("model.layers.{i}.mlp.fc2.bias", "mlp.fc2_bias", "copy", _vec, _vec, "layer"),
    # Pixel-shuffle adapter: fc1 input is the shuffled width hidden / r^2 (= intermediate_size).
    Entry("vision_adapter.mlp.fc1.weight", "adapter.fc1", "linear",
          _v(lambda v: (v.projector_input_dim, v.intermediate_size)),
          _v(lambda v: (v.intermediate_size, v.projector_input_dim))),
    Entry("vision_adapter.mlp.fc2.weight", "adapter.fc2", "linear",
          _v(lambda v: (v.projector_output_dim, v.projector_input_dim)),
          _v(lambda v: (v.projector_input_dim, v.projector_output_dim))),
)

# `Llama4MultiModalProjector` (full key; ours is the top-level "projector").
PROJECTOR = Entry("multi_modal_projector.linear_1.weight", "projector", "linear",
                  lambda c: (c.text.hidden_size, c.vision.vision_output_dim),
                  lambda c: (c.vision.vision_output_dim, c.text.hidden_size))


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


def vision_placements(cfg: Llama4Config) -> Iterator[Placement]:
  """Every vision-tower and projector tensor (multimodal configs only)."""
  for e in VISION:
    if e.where == "model":
      yield Placement(VISION_PREFIX + e.hf, ("vision",) + _split_path(e.ours), None, e)
      continue
    for i in range(cfg.vision.num_hidden_layers):
      yield Placement(VISION_PREFIX + e.hf.format(i=i), ("vision", "layers") + _split_path(e.ours), i, e)
  yield Placement(PROJECTOR.hf, _split_path(PROJECTOR.ours), None, PROJECTOR)


def placements(cfg: Llama4Config, text_prefix: str) -> list[Placement]:
  """All tensors of a checkpoint of this config: text, then (if `cfg.vision` is set) vision and projector."""
  out = list(text_placements(cfg, text_prefix))
  if cfg.vision is not None:
    out += vision_placements(cfg)
  return out
