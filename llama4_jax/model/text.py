"""Llama 4 text decoder as thin Flax NNX modules over the pure functions of attention/moe/rope/layers.

Letters (as in docs/DESIGN.md): B batch, T length, D hidden, H query heads, K kv heads, d head_dim,
F mlp width, E experts, I expert width, V vocab, N = B*T tokens.

Layers repeat with period p = `TextConfig.layer_period` (4 for Scout and Maverick: three RoPE/chunked
layers then one NoPE/global layer; MoE every layer or every other). A `Block` holds p layers; the model
holds L/p blocks stacked on a leading "layers" axis and runs them with `jax.lax.scan`, so compile time
does not grow with depth.

One forward serves training, evaluation, prefill and decoding: `TextModel.forward` without a cache runs a
whole sequence; with a `cache.KVCache` the tokens continue the cached ones (`prefill`: the cache is empty)
and the updated cache comes back in `Output.cache`.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import sharding
from llama4_jax.config import Policy, TextConfig
from llama4_jax.model import attention as attn_lib
from llama4_jax.model import cache as cache_lib
from llama4_jax.model import fp8, quant, rope
from llama4_jax.model import moe as moe_lib
from llama4_jax.model.layers import einsum, fp8_param, normal, ones, param, precision, quant_param, rms_norm, swiglu
from sharding import constrain


class Context(NamedTuple):
  """Per-forward data shared by every layer (computed once at the top)."""

  cos: jax.Array  # [B, T, d/2] RoPE angles of the rope positions
  sin: jax.Array
  temp: jax.Array  # [B, T] float32 query scale of NoPE layers
  q_info: attn_lib.TokenInfo
  k_info: attn_lib.TokenInfo
  step: cache_lib.Step | None = None  # KV-cache bookkeeping of a cached forward (cache.py), else None
  packed: bool = False  # static: rows hold packed documents (segment ids given)
  aligned: bool = False  # static: mask positions are the token indices (no padding mask, no packing)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, policy: Policy, rngs: nnx.Rngs):
    self.weight = param(rngs, ones, (dim,), ("norm",), policy.param_dtype)
    self.eps = eps
    self.dtype = policy.dtype

  def __call__(self, x):
    """Residual-stream input (any dtype) -> normalised activations in the compute dtype."""
    return rms_norm(x, self.weight[...], self.eps, self.dtype)


class Attention(nnx.Module):
  """GQA self-attention. RoPE layers: interleaved RoPE, optional qk RMS-norm, chunk-local mask.
  NoPE layers: no positions, temperature-scaled queries, global causal mask."""

  def __init__(self, cfg: TextConfig, use_rope: bool, policy: Policy, rngs: nnx.Rngs):
    D, H, K, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    init, dt = normal(cfg.initializer_range), policy.param_dtype
    self.q = param(rngs, init, (D, H, d), ("embed", "q_heads", "head_dim"), dt)
    self.k = param(rngs, init, (D, K, d), ("embed", "kv_heads", "head_dim"), dt)
    self.v = param(rngs, init, (D, K, d), ("embed", "kv_heads", "head_dim"), dt)
    self.o = param(rngs, init, (H, d, D), ("q_heads", "head_dim", "embed"), dt)
    self.use_rope = use_rope
    self.qk_norm = cfg.use_qk_norm and use_rope
    self.temperature = cfg.attn_temperature_tuning and not use_rope
    self.chunk = cfg.attention_chunk_size if use_rope else None
    self.eps = cfg.rms_norm_eps
    self.policy = policy

  def __call__(self, x: jax.Array, ctx: Context, kv: cache_lib.LayerKV | None = None):
    """Output [B, T, D]; with this layer's cache `kv` (a cached forward) also the updated cache."""
    p = self.policy
    q = constrain(einsum("BTD,DHd->BTHd", x, self.q[...], p), ("act_batch", "act_seq", "act_heads", None))
    k = constrain(einsum("BTD,DKd->BTKd", x, self.k[...], p), ("act_batch", "act_seq", "act_kv_heads", None))
    v = constrain(einsum("BTD,DKd->BTKd", x, self.v[...], p), ("act_batch", "act_seq", "act_kv_heads", None))
    if self.use_rope:
      q, k = rope.apply(q, ctx.cos, ctx.sin), rope.apply(k, ctx.cos, ctx.sin)
    if self.qk_norm:
      q, k = rms_norm(q, None, self.eps), rms_norm(k, None, self.eps)
    if self.temperature:
      q = (q.astype(jnp.float32) * ctx.temp[:, :, None, None]).astype(q.dtype)
    prec = precision(p)
    if kv is not None and not ctx.step.prefill:
      out, kv = cache_lib.attend(q, k, v, kv, ctx.q_info, ctx.step, self.chunk, prec, p.attention_block)
    else:
      kernel = attn_lib.Kernel(p.attention_impl, ctx.packed, prec, p.attention_block)
      out = sharding.sequence_attention(kernel, q, k, v, ctx.q_info, self.chunk, ctx.aligned)
    if kv is not None and ctx.step.prefill:
      kv = cache_lib.store(kv, k, v, ctx.step, ring=self.chunk is not None)
    out = einsum("BTHd,HdD->BTD", out, self.o[...], p)
    return out if kv is None else (out, kv)


class MLP(nnx.Module):
  """SwiGLU feed-forward: dense layers (width intermediate_size_mlp) and the shared expert (width I)."""

  def __init__(self, dim: int, width: int, init_std: float, policy: Policy, rngs: nnx.Rngs):
    init, dt = normal(init_std), policy.param_dtype
    self.gate = param(rngs, init, (dim, width), ("embed", "mlp"), dt)
    self.up = param(rngs, init, (dim, width), ("embed", "mlp"), dt)
    self.down = param(rngs, init, (width, dim), ("mlp", "embed"), dt)
    self.gate_qscale = self.up_qscale = self.down_qscale = nnx.data(None)
    if policy.quant != "none" and "mlp" in policy.quant_targets:  # integers in place, per-group scales beside
      self.gate, self.gate_qscale = quant_param(self.gate, -2, policy)
      self.up, self.up_qscale = quant_param(self.up, -2, policy)
      self.down, self.down_qscale = quant_param(self.down, -2, policy)
    self.policy = policy

  def _w(self, name: str):
    w, s = getattr(self, name)[...], getattr(self, f"{name}_qscale")
    return w if s is None else quant.Quantized(w, s[...], -2)

  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.policy
    h = swiglu(einsum("...D,DF->...F", x, self._w("gate"), p), einsum("...D,DF->...F", x, self._w("up"), p))
    return einsum("...F,FD->...D", h, self._w("down"), p)


class SelectionBias(nnx.Variable):
  """Per-expert bias added to the router logits for top-k selection only (aux-loss-free balancing).
  Not an `nnx.Param`: no gradient flows to it, and HF checkpoints (which lack it) load unchanged."""


class MoE(nnx.Module):
  """Sigmoid top-k router, sparse routed experts (score on the expert input), shared expert always on.

  `selection_bias` is None (the released model) unless `enable_selection_bias` attaches a
  `SelectionBias`: the training-time bias of aux-loss-free load balancing (see `moe.route`).
  """

  def __init__(self, cfg: TextConfig, policy: Policy, rngs: nnx.Rngs):
    D, E, I = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
    init, dt = normal(cfg.initializer_range), policy.param_dtype
    self.router = param(rngs, init, (D, E), ("embed", "router"), dt)
    self.gate_up = param(rngs, init, (E, D, 2, I), moe_lib.GATE_UP_NAMES, dt)
    self.down = param(rngs, init, (E, I, D), moe_lib.DOWN_NAMES, dt)
    self.gate_up_scale = self.down_scale = nnx.data(None)
    if policy.expert_fp8:  # FP8 values in place, one float32 scale per output channel beside them
      self.gate_up, self.gate_up_scale = fp8_param(self.gate_up, moe_lib.GATE_UP_CONTRACTED)
      self.down, self.down_scale = fp8_param(self.down, moe_lib.DOWN_CONTRACTED)
    self.gate_up_qscale = self.down_qscale = nnx.data(None)
    if policy.quant != "none" and "experts" in policy.quant_targets:  # integers in place, per-group scales beside
      self.gate_up, self.gate_up_qscale = quant_param(self.gate_up, moe_lib.GATE_UP_AXIS, policy)
      self.down, self.down_qscale = quant_param(self.down, moe_lib.DOWN_AXIS, policy)
    self.shared = MLP(D, I, cfg.initializer_range, policy, rngs)
    self.top_k = cfg.num_experts_per_tok
    self.policy = policy
    self.selection_bias = nnx.data(None)

  def enable_selection_bias(self) -> None:
    """Attaches a zero `SelectionBias` [..., E] (leading axes: those of the stacked router, if any)."""
    if self.selection_bias is None:
      shape = self.router.shape[:-2] + self.router.shape[-1:]
      self.selection_bias = SelectionBias(jnp.zeros(shape, jnp.float32))

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    B, T, D = x.shape
    xt = x.reshape(B * T, D)
    with jax.named_scope("router"):
      bias = None if self.selection_bias is None else self.selection_bias[...]
      idx, scores, logits = moe_lib.route(xt, self.router[...], self.top_k, self.policy, bias)
    with jax.named_scope("experts"):
      gate_up, down = self.gate_up[...], self.down[...]
      if self.gate_up_scale is not None:
        gate_up, down = fp8.Stored(gate_up, self.gate_up_scale[...]), fp8.Stored(down, self.down_scale[...])
      if self.gate_up_qscale is not None:
        gate_up = quant.Quantized(gate_up, self.gate_up_qscale[...], moe_lib.GATE_UP_AXIS)
        down = quant.Quantized(down, self.down_qscale[...], moe_lib.DOWN_AXIS)
      routed = moe_lib.routed(xt, idx, scores, gate_up, down, self.policy)
    with jax.named_scope("shared_expert"):
      shared = self.shared(xt)
    return (shared + routed).reshape(B, T, D), logits


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: TextConfig, use_rope: bool, is_moe: bool, policy: Policy, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, policy, rngs)
    self.attn = Attention(cfg, use_rope, policy, rngs)
    self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, policy, rngs)
    if is_moe:
      self.ffn = MoE(cfg, policy, rngs)
    else:
      self.ffn = MLP(cfg.hidden_size, cfg.intermediate_size_mlp, cfg.initializer_range, policy, rngs)
    self.is_moe = is_moe

  def __call__(self, h: jax.Array, ctx: Context, kv: cache_lib.LayerKV | None = None):
    """(h, router logits or None), plus the updated layer cache when `kv` is given."""
    with jax.named_scope("attention"):
      a = self.attn(self.attn_norm(h), ctx, kv)
      if kv is not None:
        a, kv = a
      h = h + a.astype(h.dtype)
    with jax.named_scope("moe" if self.is_moe else "mlp"):
      out = self.ffn(self.ffn_norm(h))
    router_logits = None
    if self.is_moe:
      out, router_logits = out
    h = constrain(h + out.astype(h.dtype), ("act_batch", "act_seq", "act_embed"))
    return (h, router_logits) if kv is None else (h, router_logits, kv)


class Block(nnx.Module):
  """One period of the layer pattern (p consecutive layers)."""

  def __init__(self, cfg: TextConfig, policy: Policy, rngs: nnx.Rngs):
    kinds = cfg.layer_kinds[: cfg.layer_period]
    self.layers = nnx.List([DecoderLayer(cfg, r, m, policy, rngs) for r, m in kinds])

  def __call__(self, h: jax.Array, ctx: Context, kv: tuple[cache_lib.LayerKV, ...] | None = None):
    """(h, stacked router logits or None), plus the updated per-layer caches when `kv` is given."""
    router_logits, new_kv = [], []
    for i, layer in enumerate(self.layers):
      if kv is None:
        h, rl = layer(h, ctx)
      else:
        h, rl, layer_kv = layer(h, ctx, kv[i])
        new_kv.append(layer_kv)
      if rl is not None:
        router_logits.append(rl)
    rl = jnp.stack(router_logits) if router_logits else None
    return (h, rl) if kv is None else (h, rl, tuple(new_kv))


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass
class Output:
  """Forward results: logits [B, T, V] float32, final hidden [B, T, D], router logits of every MoE layer
  in layer order [L_moe, N, E] float32 (None if the model has no MoE layer), and the updated KV cache of a
  cached forward (else None)."""

  logits: jax.Array
  hidden: jax.Array
  router_logits: jax.Array | None
  cache: cache_lib.KVCache | None = None


jax.tree_util.register_dataclass(Output, data_fields=["logits", "hidden", "router_logits", "cache"],
                                 meta_fields=[])


class TextModel(nnx.Module):
  """Embeddings, L decoder layers (scanned blocks), final norm, untied lm_head."""

  def __init__(self, cfg: TextConfig, policy: Policy, rngs: nnx.Rngs):
    self.cfg, self.policy = cfg, policy
    init, dt = normal(cfg.initializer_range), policy.param_dtype
    self.embed = param(rngs, init, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt)
    n_blocks = cfg.num_hidden_layers // cfg.layer_period

    @nnx.split_rngs(splits=n_blocks)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(r):
      return Block(cfg, policy, r)

    self.blocks = make_blocks(rngs)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, policy, rngs)
    self.lm_head = param(rngs, init, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt)

  def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
    h = jnp.take(self.embed[...], input_ids, axis=0).astype(self.policy.residual_dtype)
    return constrain(h, ("act_batch", "act_seq", "act_embed"))

  def context(self, input_ids: jax.Array, attention_mask=None, position_ids=None, segment_ids=None,
              cache: cache_lib.KVCache | None = None, prefill: bool = False) -> Context:
    """Positions and mask data (see attention.py). Unpacked rows follow transformers exactly: RoPE uses
    `position_ids` (default arange), temperature tuning uses the token index, the chunk grid starts at the
    first non-padding token. Packed rows (`segment_ids` given) use `position_ids` for all three.
    With a `cache` (the tokens continue the cached ones; `prefill`: the cache is empty) the indices are
    cache indices and RoPE positions default to transformers' `generate` ones (cache.py, `begin`)."""
    B, T = input_ids.shape
    check_length(self.cfg, T if cache is None else cache.max_len, "sequence" if cache is None else "KV cache")
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    step = None
    if cache is not None:
      if segment_ids is not None:
        raise ValueError("packed sequences (segment_ids) cannot run with a KV cache")
      step, info = cache_lib.begin(cache, attention_mask, B, T, prefill)
      rope_pos = step.rope_pos if position_ids is None else jnp.asarray(position_ids, jnp.int32)
      temp_pos = step.temp_pos
    elif segment_ids is not None:
      if position_ids is None:
        raise ValueError("packed sequences (segment_ids) need position_ids restarting at 0 in each segment")
      pos = jnp.asarray(position_ids, jnp.int32)
      info = attn_lib.TokenInfo(jnp.asarray(segment_ids, jnp.int32), pos)
      rope_pos = temp_pos = pos
    else:
      mask = jnp.ones((B, T), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
      left_pad = jnp.sum(jnp.cumsum(mask, axis=-1) == 0, axis=-1, keepdims=True).astype(jnp.int32)
      info = attn_lib.TokenInfo(mask, idx - left_pad)
      rope_pos = idx if position_ids is None else jnp.asarray(position_ids, jnp.int32)
      temp_pos = idx
    cos, sin = rope.angles(rope_pos, rope.text_inv_freq(self.cfg))
    temp = attn_lib.temperature(temp_pos, self.cfg.floor_scale, self.cfg.attn_scale)
    packed = segment_ids is not None
    aligned = attention_mask is None and not packed and (cache is None or prefill)
    return Context(cos, sin, temp, info, info, step, packed, aligned)

  def run_layers(self, h: jax.Array, ctx: Context, kv=None):
    """(h, router logits [L_moe, N, E] or None, updated kv or None). With `kv` (`KVCache.kv`: per layer of a
    block, (k, v) stacked over blocks) and a cached `ctx`, the blocks are scanned with their caches."""
    graphdef, state = nnx.split(self.blocks)
    if kv is not None:
      def cached(h, xs):
        h, rl, block_kv = nnx.merge(graphdef, xs[0])(h, ctx, xs[1])
        return h, (rl, block_kv)

      h, (rl, kv) = jax.lax.scan(cached, h, (state, kv))
    else:
      def body(h, block_state):
        return nnx.merge(graphdef, block_state)(h, ctx)

      if self.policy.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT[self.policy.remat], prevent_cse=not self.policy.scan_layers)
      if self.policy.scan_layers:
        h, rl = jax.lax.scan(body, h, state)
      else:
        outs = []
        n = jax.tree.leaves(state)[0].shape[0]
        for i in range(n):
          h, r = body(h, jax.tree.map(operator.itemgetter(i), state))
          outs.append(r)
        rl = None if outs[0] is None else jnp.stack(outs)
    if rl is not None:  # [n_blocks, moe_per_block, N, E] -> [L_moe, N, E] in layer order
      rl = rl.reshape(-1, *rl.shape[2:])
    return h, rl, kv

  def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, inputs_embeds=None,
              cache: cache_lib.KVCache | None = None, prefill: bool = False, last_only: bool = False,
              logits: bool = True) -> Output:
    """Logits of `input_ids` [B, T] (or of their `inputs_embeds` [B, T, D], e.g. with image features merged).

    With a `cache` (`init_cache`) the tokens continue the cached ones and `Output.cache` is the updated
    cache; `prefill` requires an empty cache. The cache must have room: index + T <= max_len (checked by the
    caller; a global write past the end would be clamped by XLA). `last_only`: logits and hidden state of
    the last position only ([B, 1, ...]), as a decoder needs. `logits=False`: no lm_head (`Output.logits` is
    None), for a loss that computes them a slice at a time (`train.losses.chunked_cross_entropy_sum`)."""
    ctx = self.context(input_ids, attention_mask, position_ids, segment_ids, cache, prefill)
    h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    h, rl, kv = self.run_layers(h, ctx, None if cache is None else cache.kv)
    if last_only:
      h = h[:, -1:]
    h = self.norm(h)
    new_cache = None if cache is None else cache_lib.finish(cache, kv, ctx.step, input_ids.shape[1])
    return Output(self.logits(h) if logits else None, h, rl, new_cache)

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.KVCache:
    """An empty KV cache for `batch` rows of at most `max_len` tokens."""
    check_length(self.cfg, max_len, "KV cache")
    return cache_lib.init(self.cfg, batch, max_len, dtype)

  def logits(self, h: jax.Array) -> jax.Array:
    """Final-norm hidden states [B, T, D] -> logits [B, T, V] float32 (the untied lm_head)."""
    logits = einsum("BTD,DV->BTV", h, self.lm_head[...], self.policy, out_dtype=jnp.float32,
                    quantize=self.policy.fp8_lm_head)
    return constrain(logits, ("act_batch", "act_seq", "act_vocab"))

  def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None) -> jax.Array:
    return self.forward(input_ids, attention_mask, position_ids, segment_ids).logits


def check_length(cfg: TextConfig, length: int, what: str) -> None:
  """ValueError when `length` tokens exceed the config's `max_position_embeddings` (the reference does not
  check; a position past it is outside what the config declares, so it is refused rather than extrapolated)."""
  if length > cfg.max_position_embeddings:
    raise ValueError(f"{what} of {length} tokens exceeds max_position_embeddings={cfg.max_position_embeddings} "
                     f"of the config; raise max_position_embeddings to run longer sequences")


def enable_selection_bias(model: nnx.Module) -> None:
  """Attaches a zero `SelectionBias` to every MoE layer of `model` (in place): the state of aux-loss-free
  load balancing, for training or to load a checkpoint trained with it."""
  for _, module in nnx.iter_graph(model):
    if isinstance(module, MoE):
      module.enable_selection_bias()
