"""Llama 4 vision tower (`Llama4VisionModel`): unfold patch embedding, ViT encoder with 2-D RoPE, pixel
shuffle and the adapter MLP; plus the early-fusion merge (the projector weight itself lives in `Llama4`).

Letters: n tiles, t tokens of a tile (grid^2 patches + 1 CLS, or after pixel shuffle grid^2 r^2), s keys
(= t), D vision width, H heads, d head_dim, F encoder MLP width (= shuffled width hidden / r^2),
P patch features (channels * patch^2), A adapter width (projector_input_dim), O adapter output width
(projector_output_dim = vision_output_dim), E text hidden size, m projected feature rows (n * tokens).

Per tile (reference section 2):
  x = patches(pixels) @ W_patch                  # [n, grid^2, D]
  x = concat([x, cls]) + pos;  x = LN_pre(x)     # CLS appended LAST, pos row grid^2 is the CLS row
  x = EncoderLayer_l(x), l < num_hidden_layers   # pre-LN, bidirectional, biased q/k/v/o, 2-D RoPE
  x = LN_post(x)[:, :-1]                         # drop CLS
  a = GELU(GELU(pixel_shuffle(x) @ fc1) @ fc2)   # [n, grid^2 r^2, O] = HF `image_hidden_states`
  projected = a @ W_proj                         # [n * grid^2 r^2, E], no bias, no activation

The encoder layers are stacked on a leading "layers" axis and run with `jax.lax.scan` (a Python loop when
`policy.scan_layers` is off). LayerNorms use `norm_eps`; transformers ignores that field and always uses
1e-5, the value of every released config.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax.config import Policy, VisionConfig
from llama4_jax.model import rope
from llama4_jax.model.layers import einsum, normal, ones, param, precision, zeros

# --------------------------------------------------------------------------------------------------
# Pure functions


def patchify(pixels: jax.Array, patch: int) -> jax.Array:
  """[N, C, S, S] -> [N, (S/patch)^2, C*patch^2]: `torch.nn.Unfold(patch, stride=patch)` transposed.

  Patches are row-major over the grid (p = py * grid + px); inside a patch the features are channel-major,
  f = c * patch^2 + ky * patch + kx.
  """
  n, c, h, w = pixels.shape
  gh, gw = h // patch, w // patch
  x = pixels.reshape(n, c, gh, patch, gw, patch)
  return x.transpose(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * patch * patch)


def append_class_token(x: jax.Array, cls: jax.Array) -> jax.Array:
  """[N, grid^2, D] -> [N, grid^2 + 1, D] with the class embedding as the LAST token."""
  return jnp.concatenate([x, jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))], axis=1)


def drop_class_token(x: jax.Array) -> jax.Array:
  """Inverse of `append_class_token`: removes the last token."""
  return x[:, :-1]


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """Affine LayerNorm over the last axis, computed in float32, cast back to the activation dtype."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, in float32."""
  return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def rope_table(cfg: VisionConfig) -> tuple[jax.Array, jax.Array]:
  """The 2-D vision RoPE of one tile as cos, sin [grid^2 + 1, head_dim/2] (float32), see
  `rope.vision_angles`: with F = head_dim/2 complex pairs and w_j = theta^(-2j/F), j < F/2,

    angle[t, m]       = (col(t) + 1) * w_m          m < F/2     (column, 1-based)
    angle[t, F/2 + m] = (row(t) + 1) * w_m                      (row, 1-based)
    angle[CLS, :]     = 0                                       (CLS is the last token)

  for patch token t = row * grid + col. Applied to q and k exactly like the text RoPE: pair m is
  (x[2m], x[2m+1]), rotated in float32.
  """
  cos, sin = rope.vision_angles(cfg)
  return jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32)


def pixel_shuffle(x: jax.Array, ratio: float) -> jax.Array:
  """Merges each n x n block of neighbouring patches (n = 1/ratio) into one token of n^2 times the width.

  x [N, g*g, C] (row-major patch grid of side g) -> [N, (g/n)^2, n^2 * C] with the exact index map of
  transformers' `pixel_shuffle` (reference 2.6):

    out[t, i * (g/n) + j, (dy * n + dx) * C + c] = x[t, (n*i + dy) * g + (n*j + dx), c]

  i.e. output tokens are row-major over the grid of blocks, and inside a token the n^2 source patches
  come in row-major order (top-left, top-right, bottom-left, bottom-right for n = 2), each one a
  contiguous C-slice.
  """
  N, P, C = x.shape
  g = int(round(P ** 0.5))
  n = int(round(1 / ratio))
  assert g * g == P and g % n == 0, (P, ratio)
  x = x.reshape(N, g // n, n, g // n, n, C)  # [t, i, dy, j, dx, c]
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(N, (g // n) ** 2, n * n * C)


def bidirectional_attention(q: jax.Array, k: jax.Array, v: jax.Array, precision) -> jax.Array:
  """Unmasked multi-head attention: q, k, v [N, T, H, d] -> [N, T, H, d]; scale d^-0.5, softmax in float32."""
  s = jnp.einsum("nthd,nshd->nhts", q, k, precision=precision,
                 preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum("nhts,nshd->nthd", p, v, precision=precision,
                    preferred_element_type=jnp.float32).astype(v.dtype)


def merge_image_features(embeds: jax.Array, input_ids: jax.Array, features: jax.Array,
                         image_token: int) -> jax.Array:
  """Early fusion: the k-th `image_token` of the flattened (batch, sequence) receives `features[k]`.

  embeds [B, T, E], input_ids [B, T], features [m, E]. Static shapes (jit-friendly): the row of each token is
  the running count of image tokens before it; other tokens keep their embedding. The caller checks that
  the number of image tokens equals m (`check_image_tokens`); extra tokens would repeat the last row.
  """
  B, T, E = embeds.shape
  if features.shape[0] == 0:
    return embeds
  mask = (input_ids == image_token).reshape(B * T)
  rows = jnp.clip(jnp.cumsum(mask.astype(jnp.int32)) - 1, 0, features.shape[0] - 1)
  picked = jnp.take(features.astype(embeds.dtype), rows, axis=0)
  return jnp.where(mask[:, None], picked, embeds.reshape(B * T, E)).reshape(B, T, E)


def check_image_tokens(input_ids, n_features: int, image_token: int) -> None:
  """Host-side check that the prompt holds exactly one image token per projected feature row.

  Raises ValueError naming both counts. `input_ids` must be concrete (call this outside `jit`).
  """
  n_tokens = int(np.sum(np.asarray(input_ids) == image_token))
  if n_tokens != n_features:
    raise ValueError(f"image features and image tokens do not match: the prompt has {n_tokens} image tokens "
                     f"(id {image_token}) but the images give {n_features} feature rows")


# --------------------------------------------------------------------------------------------------
# Modules


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, policy: Policy, rngs: nnx.Rngs):
    self.weight = param(rngs, ones, (dim,), ("norm",), policy.param_dtype)
    self.bias = param(rngs, zeros, (dim,), ("norm",), policy.param_dtype)
    self.eps = eps

  def __call__(self, x):
    return layer_norm(x, self.weight[...], self.bias[...], self.eps)


class VisionAttention(nnx.Module):
  """Bidirectional multi-head self-attention with biases and 2-D RoPE on q and k (no GQA)."""

  def __init__(self, cfg: VisionConfig, policy: Policy, rngs: nnx.Rngs):
    D, H, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    init, dt = normal(cfg.initializer_range), policy.param_dtype
    self.q = param(rngs, init, (D, H, d), ("vis_embed", "vis_heads", "vis_head_dim"), dt)
    self.k = param(rngs, init, (D, H, d), ("vis_embed", "vis_heads", "vis_head_dim"), dt)
    self.v = param(rngs, init, (D, H, d), ("vis_embed", "vis_heads", "vis_head_dim"), dt)
    self.o = param(rngs, init, (H, d, D), ("vis_heads", "vis_head_dim", "vis_embed"), dt)
    self.q_bias = param(rngs, zeros, (H, d), ("vis_heads", "vis_head_dim"), dt)
    self.k_bias = param(rngs, zeros, (H, d), ("vis_heads", "vis_head_dim"), dt)
    self.v_bias = param(rngs, zeros, (H, d), ("vis_heads", "vis_head_dim"), dt)
    self.o_bias = param(rngs, zeros, (D,), ("vis_embed",), dt)
    self.policy = policy

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    p = self.policy
    q = einsum("ntD,DHd->ntHd", x, self.q[...], p) + self.q_bias[...].astype(p.dtype)
    k = einsum("ntD,DHd->ntHd", x, self.k[...], p) + self.k_bias[...].astype(p.dtype)
    v = einsum("ntD,DHd->ntHd", x, self.v[...], p) + self.v_bias[...].astype(p.dtype)
    q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
    out = bidirectional_attention(q, k, v, precision(p))
    return einsum("ntHd,HdD->ntD", out, self.o[...], p) + self.o_bias[...].astype(p.dtype)


class VisionMLP(nnx.Module):
  """fc1 + bias -> exact GELU -> fc2 + bias."""

  def __init__(self, cfg: VisionConfig, policy: Policy, rngs: nnx.Rngs):
    D, F = cfg.hidden_size, cfg.intermediate_size
    init, dt = normal(cfg.initializer_range), policy.param_dtype
    self.fc1 = param(rngs, init, (D, F), ("vis_embed", "vis_mlp"), dt)
    self.fc1_bias = param(rngs, zeros, (F,), ("vis_mlp",), dt)
    self.fc2 = param(rngs, init, (F, D), ("vis_mlp", "vis_embed"), dt)
    self.fc2_bias = param(rngs, zeros, (D,), ("vis_embed",), dt)
    self.policy = policy

  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.policy
    h = gelu(einsum("ntD,DF->ntF", x, self.fc1[...], p) + self.fc1_bias[...].astype(p.dtype))
    return einsum("ntF,FD->ntD", h, self.fc2[...], p) + self.fc2_bias[...].astype(p.dtype)


class EncoderLayer(nnx.Module):
  """Pre-LN transformer layer: x + Attn(LN1(x)), then x + MLP(LN2(x))."""

  def __init__(self, cfg: VisionConfig, policy: Policy, rngs: nnx.Rngs):
    self.attn_norm = LayerNorm(cfg.hidden_size, cfg.norm_eps, policy, rngs)
    self.attn = VisionAttention(cfg, policy, rngs)
    self.mlp_norm = LayerNorm(cfg.hidden_size, cfg.norm_eps, policy, rngs)
    self.mlp = VisionMLP(cfg, policy, rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), cos, sin)
    return x + self.mlp(self.mlp_norm(x))


class Adapter(nnx.Module):
  """`Llama4VisionPixelShuffleMLP`: pixel shuffle, then bias-free fc1 -> GELU -> fc2 -> GELU."""

  def __init__(self, cfg: VisionConfig, policy: Policy, rngs: nnx.Rngs):
    init, dt = normal(cfg.initializer_range), policy.param_dtype
    # fc1's input is the shuffled width hidden / r^2, which the config requires to equal intermediate_size.
    self.fc1 = param(rngs, init, (cfg.intermediate_size, cfg.projector_input_dim), ("vis_mlp", "vis_adapter"), dt)
    self.fc2 = param(rngs, init, (cfg.projector_input_dim, cfg.projector_output_dim), ("vis_adapter", "vis_out"), dt)
    self.ratio = cfg.pixel_shuffle_ratio
    self.policy = policy

  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.policy
    h = gelu(einsum("ntF,FA->ntA", pixel_shuffle(x, self.ratio), self.fc1[...], p))
    return gelu(einsum("ntA,AO->ntO", h, self.fc2[...], p))


class VisionModel(nnx.Module):
  """Tiles [N, C, S, S] -> adapter features [N, tokens_per_tile, projector_output_dim]."""

  def __init__(self, cfg: VisionConfig, policy: Policy, rngs: nnx.Rngs):
    self.cfg, self.policy = cfg, policy
    D, dt = cfg.hidden_size, policy.param_dtype
    init = normal(cfg.initializer_range)
    n_patch = cfg.num_channels * cfg.patch_size ** 2
    self.patch = param(rngs, init, (n_patch, D), ("vis_patch", "vis_embed"), dt)
    self.cls = param(rngs, init, (D,), ("vis_embed",), dt)
    self.pos = param(rngs, init, (cfg.grid ** 2 + 1, D), ("vis_pos", "vis_embed"), dt)
    self.pre_norm = LayerNorm(D, cfg.norm_eps, policy, rngs)

    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(r):
      return EncoderLayer(cfg, policy, r)

    self.layers = make_layers(rngs)
    self.post_norm = LayerNorm(D, cfg.norm_eps, policy, rngs)
    self.adapter = Adapter(cfg, policy, rngs)

  def encode(self, pixel_values: jax.Array) -> jax.Array:
    """Encoder output after `layernorm_post`, CLS dropped: [N, grid^2, D]."""
    cfg, p = self.cfg, self.policy
    pixels = jnp.asarray(pixel_values).astype(p.dtype)
    want = (cfg.num_channels, cfg.image_size, cfg.image_size)
    if pixels.ndim != 4 or pixels.shape[1:] != want:
      raise ValueError(f"pixel_values must be [n_tiles, {', '.join(map(str, want))}], got {list(pixels.shape)}")
    x = einsum("ntP,PD->ntD", patchify(pixels, cfg.patch_size), self.patch[...], p)
    x = append_class_token(x, self.cls[...]) + self.pos[...].astype(p.dtype)
    x = self.pre_norm(x)
    cos, sin = rope_table(cfg)
    cos, sin = cos[None], sin[None]  # [1, T, d/2]: the same table for every tile
    graphdef, state = nnx.split(self.layers)

    def body(h, layer_state):
      return nnx.merge(graphdef, layer_state)(h, cos, sin), None

    if self.policy.scan_layers:
      x, _ = jax.lax.scan(body, x, state)
    else:
      for i in range(cfg.num_hidden_layers):
        x, _ = body(x, jax.tree.map(operator.itemgetter(i), state))
    return drop_class_token(self.post_norm(x))

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    with jax.named_scope("vision"):
      with jax.named_scope("encoder"):
        x = self.encode(pixel_values)
      with jax.named_scope("adapter"):
        return self.adapter(x)
