"""The int8 KV cache (`cache.Int8KV`: int8 keys / values, one float32 scale per token and kv head): its bytes
against a NumPy quantisation written here, greedy decoding against the float cache (one device, chunked
prefill, the global cache split over 8 devices), and its size in `kv_bytes` and the serving planner."""

from __future__ import annotations

import dataclasses
import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sharding
from llama4_jax import config as C
from llama4_jax.apps import generate as G
from llama4_jax.apps import plan as plan_lib
from llama4_jax.model import cache as cache_lib
from llama4_jax.model import llama4
from sharding import rules as R

# one chunked RoPE layer (attention chunk 8), one global NoPE layer with temperature tuning
CFG = dataclasses.replace(C.TINY_SCOUT, vision=None, text=dataclasses.replace(
    C.TINY_SCOUT.text, num_hidden_layers=2, no_rope_layer_interval=2))
B, T = 2, 24  # prompts longer than the chunk: the ring wraps


def ref_quantize_kv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(int8 values, float32 scales) of x [..., d]: absmax over d times float32(1/127), 1 for a zero vector."""
  x = x.astype(np.float32)
  amax = np.abs(x).max(-1)
  s = np.where(amax > 0, amax * np.float32(1.0 / 127), np.float32(1.0)).astype(np.float32)
  v = np.clip(np.round(x * (np.float32(1.0) / s)[..., None]), -127, 127).astype(np.int8)
  return v, s


def test_quantize_kv_matches_numpy_reference():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((2, 5, 3, 16)) * rng.uniform(0.01, 30, (2, 5, 3, 1))).astype(np.float32)
  x[0, 1, 2] = 0.0  # an all-zero head vector
  q = cache_lib.quantize_kv(jnp.asarray(x))
  v, s = ref_quantize_kv(x)
  assert q.q.dtype == jnp.int8 and q.scale.dtype == jnp.float32 and q.scale.shape == (2, 5, 3)
  assert np.asarray(q.q).tobytes() == v.tobytes() and np.asarray(q.scale).tobytes() == s.tobytes()
  np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), v.astype(np.float32) * s[..., None])
  err = np.abs(np.asarray(q.dequantize(jnp.float32)) - x)
  assert np.all(err <= s[..., None] / 2 * (1 + 1e-6))


@functools.cache
def _model(moe_impl: str = "sorted"):
  graph, state = nnx.split(llama4.init(CFG, C.Policy(attention_block=16, moe_impl=moe_impl), seed=0))
  return nnx.merge(graph, helpers.randomise(state, 1))


def _prompts(seed: int):
  ids = np.random.default_rng(seed).integers(3, CFG.text.vocab_size, (B, T))
  mask = np.ones((B, T), np.int32)
  ids[0, :5], mask[0, :5] = 0, 0  # a left-padded row
  return ids, mask


def test_int8_cache_stores_the_numpy_quantisation_of_the_float_cache():
  """After a prefill, every written slot of the int8 cache holds exactly the NumPy quantisation of what the
  float cache holds there (both are written from the same float keys and values)."""
  model = _model()
  ids, mask = _prompts(0)
  run = jax.jit(lambda c: model.forward(jnp.asarray(ids), jnp.asarray(mask), cache=c, prefill=True).cache)
  f = run(model.init_cache(B, 64, jnp.float32))
  q = run(model.init_cache(B, 64, "int8"))
  W = cache_lib.ring_size(CFG.text, 64)
  for (fk, fv), (qk, qv), (rope_layer, _) in zip(f.kv, q.kv, CFG.text.layer_kinds):
    written = W if rope_layer else T  # the ring keeps the last W of the T tokens; global slots 0..T-1
    for fb, qb in ((fk, qk), (fv, qv)):
      assert isinstance(qb, cache_lib.Int8KV) and qb.q.dtype == jnp.int8 and qb.scale.dtype == jnp.float32
      assert qb.q.shape == fb.shape and qb.scale.shape == fb.shape[:-1]
      v, s = ref_quantize_kv(np.asarray(fb)[:, :, :written])
      assert np.asarray(qb.q)[:, :, :written].tobytes() == v.tobytes()
      assert np.asarray(qb.scale)[:, :, :written].tobytes() == s.tobytes()
  np.testing.assert_array_equal(np.asarray(q.full.seg), np.asarray(f.full.seg))


def _teacher_forced(cache_dtype, seed: int, prefill_chunk: int | None, tokens: np.ndarray | None, n: int = 12):
  """Logits [n, B, V] of n decode steps after a prefill (in slices of `prefill_chunk`: later slices take the
  cached-attention path), fed `tokens` [B, n] (None: the greedy ones of this cache)."""
  model = _model()
  ids, mask = _prompts(seed)
  fwd = jax.jit(lambda c, i, m, prefill: model.forward(i, m, cache=c, prefill=prefill, last_only=True),
                static_argnames="prefill")
  step = prefill_chunk or T
  c, out = model.init_cache(B, 64, cache_dtype), None
  for a in range(0, T, step):
    out = fwd(c, jnp.asarray(ids[:, a:a + step]), jnp.asarray(mask[:, a:a + step]), prefill=a == 0)
    c = out.cache
  logits = []
  for i in range(n):
    logits.append(np.asarray(out.logits[:, -1]))
    nxt = logits[-1].argmax(-1) if tokens is None else tokens[:, i]
    out = fwd(c, jnp.asarray(nxt, jnp.int32)[:, None], None, prefill=False)
    c = out.cache
  return np.stack(logits)


@pytest.mark.parametrize("prefill_chunk", [None, 5])
def test_int8_cache_decoding_follows_the_float_cache(prefill_chunk):
  """Three batches of prompts, 12 decode steps past the ring's wrap, one prefill or 5-token slices (ring layers
  then attend over the dequantised ring and the new float keys), both caches fed the float cache's greedy
  tokens: every step's logits within 1% of their range of the float cache's, and the same greedy token wherever
  the float cache's top two logits are further apart than twice that step's largest logit difference (on this
  random model some steps are near ties: int8 rounding may then pick the other token, as float rounding could)."""
  decided = 0
  for seed in range(3):
    f = _teacher_forced(jnp.float32, seed, prefill_chunk, None)
    greedy = f.argmax(-1).T  # [B, n]
    q = _teacher_forced("int8", seed, prefill_chunk, greedy)
    err = np.abs(q - f).max(-1)  # [n, B]
    assert np.all(err < 0.01 * (f.max(-1) - f.min(-1))) and err.max() > 0, err.max()
    top2 = np.sort(f, -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 2 * err
    np.testing.assert_array_equal(q.argmax(-1)[clear], f.argmax(-1)[clear])
    decided += int(clear.sum())
  assert decided >= 0.8 * 3 * 12 * B  # most steps are clear: the check is not vacuous


def test_int8_cache_greedy_generation():
  """`generate(cache_dtype="int8")`: the same tokens as stepping the int8 cache by hand."""
  ids, mask = _prompts(0)
  got = G.generate(_model(), ids, mask, max_new_tokens=12, stop_ids=[-1], pad_id=0, cache_dtype="int8").tokens
  np.testing.assert_array_equal(got, _teacher_forced("int8", 0, None, None).argmax(-1).T)


def test_int8_cache_split_over_the_context_axis():
  """The global layers' int8 buffers (values and scales) split on their slots over 8 devices: the same tokens
  as the int8 cache on one device (all-experts MoE: the experts' dispatch is not what this test is about)."""
  mesh = sharding.make_mesh(sharding.MeshConfig(context=8, fsdp=1))
  ids, mask = _prompts(0)
  ids, mask = np.concatenate([ids, ids], 1), np.concatenate([mask, np.ones_like(mask)], 1)  # 48: 6 per device

  def greedy(rules=None, **kw):
    run = lambda: G.generate(_model("dense"), ids, mask, max_new_tokens=10, stop_ids=[-1], pad_id=0,  # noqa: E731
                             cache_dtype="int8", **kw).tokens
    if rules is None:
      return run()
    with sharding.use(rules, mesh):
      return run()

  want = greedy()
  np.testing.assert_array_equal(greedy(sharding.CONTEXT_PARALLEL), want)
  np.testing.assert_array_equal(greedy(sharding.CONTEXT_PARALLEL, prefill_chunk=16), want)
  with sharding.use(sharding.CONTEXT_PARALLEL, mesh):
    cache = jax.jit(lambda: _model("dense").init_cache(B, 64, "int8"))()
  full = [kv[0] for kv, (rope_layer, _) in zip(cache.kv, CFG.text.layer_kinds) if not rope_layer]
  assert full and all(b.q.sharding.spec[2] == "context" and b.scale.sharding.spec[2] == "context" for b in full)


def test_kv_bytes_count_int8_values_and_scales():
  for max_len in (8, 64):
    c = cache_lib.abstract(CFG.text, 2, max_len, "int8")
    got = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(c.kv))
    assert got == 2 * cache_lib.kv_bytes(CFG.text, max_len, "int8")
  scout = C.SCOUT.text
  K, d = scout.num_key_value_heads, scout.head_dim
  assert cache_lib.kv_bytes(scout, 1 << 20, "int8") == 2 * K * (d + 4) * (12 * (1 << 20) + 36 * 8192)
  assert cache_lib.kv_bytes(scout, 1 << 20, "int8") * 256 == cache_lib.kv_bytes(scout, 1 << 20) * (128 + 4)


def test_serving_plan_counts_the_int8_kv_cache():
  """Scout int4 serving at 128K tokens: the int8 cache's KV bytes are 2 K (d + 4) per layer and token, plus one
  global layer's dequantised bf16 keys and values, instead of 2 K d 2."""
  cfg, rules = C.SCOUT, R.preset("data_parallel")
  sizes = {a: 1 for a in sharding.MeshConfig(data=1).sizes_dict()}  # one device
  policy = C.Policy(param_dtype="bfloat16", dtype="bfloat16", matmul_precision="default", quant="int4",
                    quant_targets=("experts", "mlp"))
  t = cfg.text
  K, d, L, seq = t.num_key_value_heads, t.head_dim, t.num_hidden_layers, 1 << 17
  work = plan_lib.Workload(batch=1, seq=seq, train=False)
  acts = {dt: plan_lib.activation_bytes(cfg, policy, rules, sizes, dataclasses.replace(work, kv_cache_dtype=dt))[0]
          for dt in ("", "bfloat16", "int8")}
  n_rope = sum(t.rope_flags)
  cached = n_rope * t.attention_chunk_size + (L - n_rope) * seq
  assert acts[""] == acts["bfloat16"]
  assert acts["bfloat16"] - acts["int8"] == pytest.approx(cached * 2 * K * (2 * d - d - 4) - seq * 2 * K * d * 2,
                                                          abs=2)
