"""The whole Llama 4 model: text decoder, and (for multimodal configs) the vision tower and projector.

Early fusion (reference 2.8): every tile of every image of the batch goes through the vision tower
(`pixel_values` [n_tiles, 3, S, S], tiles in prompt order), the adapter features are projected to the text
width, and the k-th `<|patch|>` token (`cfg.image_token_index`) of the flattened (batch, sequence)
receives projected row k in place of its token embedding. Everything else is the text model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax.config import Llama4Config, Policy
from llama4_jax.model import cache as cache_lib
from llama4_jax.model.layers import einsum, normal, param
from llama4_jax.model.text import Output, TextModel
from llama4_jax.model.vision import VisionModel, check_image_tokens, merge_image_features


@dataclasses.dataclass
class Llama4Output(Output):
  """`Output` plus the adapter features of the images [n_tiles, tokens_per_tile, projector_output_dim]
  (HF `image_hidden_states`), None without images."""

  image_features: jax.Array | None = None


jax.tree_util.register_dataclass(Llama4Output, data_fields=["logits", "hidden", "router_logits", "cache",
                                                          "image_features"], meta_fields=[])


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


class Llama4(nnx.Module):
  """`Llama4ForConditionalGeneration` (or, with `cfg.vision is None`, `Llama4ForCausalLM`)."""

  def __init__(self, cfg: Llama4Config, policy: Policy, rngs: nnx.Rngs):
    self.cfg, self.policy = cfg, policy
    self.text = TextModel(cfg.text, policy, rngs)
    if cfg.vision is not None:
      v = cfg.vision
      self.vision = VisionModel(v, policy, rngs)
      self.projector = param(rngs, normal(v.initializer_range), (v.vision_output_dim, cfg.text.hidden_size),
                             ("vis_out", "embed"), policy.param_dtype)
    else:
      self.vision = None
      self.projector = None

  def image_features(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adapter outputs [n_tiles, tokens_per_tile, projector_output_dim] (HF `image_hidden_states`, the
    `last_hidden_state` of `get_image_features`) and their projection [n_tiles * tokens_per_tile, D]."""
    if self.vision is None:
      raise ValueError("this Llama4 has a text-only config (cfg.vision is None): it cannot take pixel_values")
    feats = self.vision(pixel_values)
    with jax.named_scope("projector"):
      projected = einsum("mO,OE->mE", feats.reshape(-1, feats.shape[-1]), self.projector[...], self.policy)
    return feats, projected

  def check_image_tokens(self, input_ids, pixel_values) -> None:
    """Host-side check (outside jit) that `input_ids` hold one `<|patch|>` token per projected feature row;
    ValueError naming both counts otherwise. `forward` runs it itself when `input_ids` are concrete."""
    n_tiles = pixel_values.shape[0]
    check_image_tokens(input_ids, n_tiles * self.cfg.vision.tokens_per_tile, self.cfg.image_token_index)

  def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, pixel_values=None,
              cache: cache_lib.KVCache | None = None, prefill: bool = False, last_only: bool = False,
              logits: bool = True) -> Llama4Output:
    """Logits and hidden states (and, with a `cache`, the updated cache: `TextModel.forward`); with
    `pixel_values` [n_tiles, 3, S, S] (any float dtype, cast to the policy dtype) the `<|patch|>` embeddings
    are replaced by the projected image features, in order over (batch, sequence). The token/feature count
    check needs concrete `input_ids`; under `jit` call `check_image_tokens` on the host first (a mismatch
    there would silently reuse feature rows)."""
    embeds, feats = self.embed(input_ids, pixel_values)
    out = self.text.forward(input_ids, attention_mask, position_ids, segment_ids, inputs_embeds=embeds,
                            cache=cache, prefill=prefill, last_only=last_only, logits=logits)
    return Llama4Output(out.logits, out.hidden, out.router_logits, out.cache, feats)

  def embed(self, input_ids, pixel_values=None) -> tuple[jax.Array, jax.Array | None]:
    """Input embeddings [B, T, D] with the image features merged in (early fusion), and the adapter features
    (None without `pixel_values`)."""
    embeds = self.text.embed_tokens(input_ids)
    if pixel_values is None:
      return embeds, None
    if self.vision is None:
      raise ValueError("this Llama4 has a text-only config (cfg.vision is None): it cannot take pixel_values")
    if _is_concrete(input_ids):
      self.check_image_tokens(input_ids, pixel_values)
    feats, projected = self.image_features(pixel_values)
    return merge_image_features(embeds, jnp.asarray(input_ids), projected, self.cfg.image_token_index), feats

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.KVCache:
    """An empty KV cache of the text decoder for `batch` rows of at most `max_len` tokens."""
    return self.text.init_cache(batch, max_len, dtype)

  def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
               pixel_values=None) -> jax.Array:
    """Logits [B, T, vocab] float32."""
    return self.forward(input_ids, attention_mask, position_ids, segment_ids, pixel_values).logits


def init(cfg: Llama4Config, policy: Policy, seed: int = 0, shardings=None) -> Llama4:
  """A randomly initialised model, made by one jitted program (not op by op). `shardings`: a state of
  shardings with the model's structure (`sharding.param_shardings(abstract(cfg, policy), rules, mesh)`):
  every parameter is then materialised directly in its sharding, no full copy on any device."""

  @functools.partial(jax.jit, out_shardings=shardings)
  def make(key):
    return nnx.split(Llama4(cfg, policy, nnx.Rngs(params=key)))[1]

  graphdef = nnx.graphdef(abstract(cfg, policy))
  return nnx.merge(graphdef, make(jax.random.key(seed)))


def abstract(cfg: Llama4Config, policy: Policy) -> Llama4:
  """Shapes, dtypes and logical axes of every parameter, no allocation."""
  return nnx.eval_shape(lambda: Llama4(cfg, policy, nnx.Rngs(0)))
