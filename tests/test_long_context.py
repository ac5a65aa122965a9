"""Long context: every attention implementation against the dense oracle (forward and gradients, padding,
packing, >= 3 chunk boundaries), the fused-kernel layouts, the implementation choice and its errors, and
context parallelism on 8 simulated devices (chunk tails across device boundaries, ring and all-gather global
layers) against the single-device result."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sharding
from llama4_jax import config as C
from llama4_jax.model import attention as A
from llama4_jax.model import blockwise as BW
from llama4_jax.model import fused, llama4

HI = jax.lax.Precision.HIGHEST
B, T, H, K, D = 2, 70, 4, 2, 16
CHUNK = 8  # 70 tokens cross 8 chunk boundaries


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _qkv(seed=0, t=T):
  r = np.random.RandomState(seed)
  return tuple(jnp.asarray(r.randn(B, t, n, D), jnp.float32) for n in (H, K, K))


def _infos(t=T):
  """Row 0: left padding (the chunk grid shifts by 5) and right padding; row 1: three packed documents."""
  seg = np.ones((B, t), np.int32)
  pos = np.tile(np.arange(t), (B, 1))
  seg[0, :5], seg[0, t - 4:] = 0, 0
  pos[0] = np.arange(t) - 5
  cuts = [0, 27, 49, t]
  for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
    seg[1, a:b], pos[1, a:b] = i + 1, np.arange(b - a)
  return A.TokenInfo(jnp.asarray(seg), jnp.asarray(pos)), seg


INFO, SEG = _infos()
BW_ATTENTION, A_ATTENTION = BW.attention, A.attention  # the originals, for tests that patch them
REAL = (SEG != 0)[:, :, None, None]


def _loss_grads(fn, q, k, v, w):
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("chunk", [None, CHUNK])
@pytest.mark.parametrize("block", [8, 16, 24, 512])
def test_blockwise_equals_dense(chunk, block):
  q, k, v = _qkv()
  dense = functools.partial(A.attention, q_info=INFO, k_info=INFO, chunk=chunk, precision=HI)
  blocks = functools.partial(BW.attention, q_info=INFO, k_info=INFO, chunk=chunk, precision=HI, block_q=block,
                             block_k=block)
  want, got = dense(q, k, v), jax.jit(blocks)(q, k, v)
  assert rel(got * REAL, want * REAL) <= 2e-6
  assert not np.asarray(got)[~np.asarray(SEG != 0)].any()  # padding rows: zeros, as every implementation
  w = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32) * REAL
  for g, r in zip(_loss_grads(blocks, q, k, v, w), _loss_grads(dense, q, k, v, w)):
    assert rel(g, r) <= 2e-6


def test_blockwise_parts_merge_like_ring_attention():
  """Keys in two parts with their index offsets (`starts`): partial outputs merged by log-sum-exp, and the
  partial backwards summed, give the whole attention and its gradients."""
  q, k, v = _qkv(2)
  w = jnp.asarray(np.random.RandomState(3).randn(*q.shape), jnp.float32) * REAL
  for chunk in (None, CHUNK):
    full = BW.attention(q, k, v, INFO, INFO, chunk, HI, 16, 16)
    parts = [(a, b, A.TokenInfo(INFO.seg[:, a:b], INFO.mpos[:, a:b])) for a, b in ((0, 33), (33, T))]
    outs = [BW.forward(q, k[:, a:b], v[:, a:b], INFO, ki, chunk, HI, 16, (0, a)) for a, b, ki in parts]
    lse = jnp.logaddexp(outs[0][1], outs[1][1])
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    out = sum(jnp.where(jnp.isfinite(l), jnp.exp(l - safe), 0)[..., None] * o for o, l in outs)
    assert rel(out * REAL, full * REAL) <= 2e-6
    grads = [BW.backward(q, k[:, a:b], v[:, a:b], INFO, ki, out, lse, w, chunk, HI, 16, (0, a)) for a, b, ki in parts]
    want = _loss_grads(lambda q, k, v, c=chunk: BW.attention(q, k, v, INFO, INFO, c, HI, 16, 16), q, k, v, w)
    got = (grads[0][0] + grads[1][0], jnp.concatenate([grads[0][1], grads[1][1]], 1),
           jnp.concatenate([grads[0][2], grads[1][2]], 1))
    for g, r in zip(got, want):
      assert rel(g, r) <= 2e-6


def test_blockwise_skips_the_blocks_the_masks_kill():
  assert BW.block_flops(8192, None, 512) == pytest.approx(136 / 256)  # causal: the lower triangle of 16 x 16
  assert BW.block_flops(32768, 8192, 512) < 0.3  # chunked: a band of 17 blocks of 64
  assert BW.block_flops(1024, None, 512) == 0.75


@pytest.mark.parametrize("chunk", [None, CHUNK])
def test_fused_layouts_equal_dense(chunk):
  """The roll / fold layouts the cuDNN and splash kernels run on (cuDNN's through
  jax.nn.dot_product_attention's XLA implementation, splash in Pallas interpret mode)."""
  q, k, v = _qkv(4)
  seg = np.ones((B, T), np.int32)
  seg[0, :5], seg[1, 60:] = 0, 0  # left padding, right padding: one run of real tokens per row
  left = np.argmax(seg != 0, -1)
  info = A.TokenInfo(jnp.asarray(seg), jnp.asarray(np.arange(T)[None] - left[:, None]))
  real = (seg != 0)[:, :, None, None]
  want = A.attention(q, k, v, info, info, chunk, HI) * real
  assert rel(fused.cudnn(q, k, v, info.seg, chunk, implementation="xla"), want) <= 2e-6
  assert rel(fused.splash(q, k, v, info.seg, chunk, packed=False, interpret=True), want) <= 2e-6
  if chunk is None:  # packed rows: splash keeps the layout and passes segment ids
    assert rel(fused.splash(q, k, v, INFO.seg, None, packed=True, interpret=True) * REAL,
               A.attention(q, k, v, INFO, INFO, None, HI) * REAL) <= 2e-6
  holed = seg.copy()
  holed[1, 30:33] = 0  # a mask with a hole: the fused layouts cannot hold it, `attend` sends it blockwise
  assert bool(fused.contiguous(info.seg)) and not bool(fused.contiguous(jnp.asarray(holed)))


def test_implementation_choice_and_errors():
  assert A.resolve("auto", "cpu") == "blockwise"
  assert A.resolve("auto", "gpu") == "cudnn" and A.resolve("auto", "tpu") == "splash"
  with pytest.raises(ValueError, match="attention_impl='cudnn' needs a GPU.*'cpu'"):
    A.resolve("cudnn", "cpu")


def test_auto_on_cpu_picks_by_key_count(monkeypatch):
  """`auto` on CPU: xla's one score matrix for self-attention over few keys, blockwise past AUTO_XLA_KEYS
  (and for attention over other keys than the queries' own); both exact."""
  ran = []
  monkeypatch.setattr(BW, "attention", lambda *a, **k: ran.append("blockwise") or BW_ATTENTION(*a, **k))
  monkeypatch.setattr(A, "attention", lambda *a, **k: ran.append("xla") or A_ATTENTION(*a, **k))
  q, k, v = _qkv()
  ref = A_ATTENTION(q, k, v, INFO, INFO, CHUNK, HI)
  for keys, want in ((T, "xla"), (T - 1, "blockwise")):
    monkeypatch.setattr(A, "AUTO_XLA_KEYS", keys)
    ran.clear()
    out = A.attend(q, k, v, INFO, INFO, None, "auto", packed=True, precision=HI)
    assert ran == [want]
    assert rel(out * REAL, A_ATTENTION(q, k, v, INFO, INFO, None, HI) * REAL) < 2e-6
  ran.clear()
  other = A.TokenInfo(INFO.seg, INFO.mpos)  # equal values, not the queries' own info: a cache-like call
  out = A.attend(q, k, v, INFO, other, CHUNK, "auto", packed=True, precision=HI)
  assert ran == ["blockwise"] and rel(out * REAL, ref * REAL) < 2e-6
  with pytest.raises(C.ConfigError, match="policy.attention_impl.*'flash'"):
    C.Policy(attention_impl="flash")


# --------------------------------------------------------------------------------------------------
# The model: every implementation, and context parallelism on 8 devices


def _two_layers(cfg):  # one chunked RoPE layer, one global NoPE layer with temperature tuning
  return dataclasses.replace(cfg, vision=None, text=dataclasses.replace(cfg.text, num_hidden_layers=2,
                                                                         no_rope_layer_interval=2))


CFG = _two_layers(C.TINY_SCOUT)
MT = 48  # 8 devices: 6 tokens each, the chunk of 8 straddles every device boundary


def _batch():
  r = np.random.RandomState(5)
  ids = r.randint(0, 300, (B, MT))
  seg = np.ones((B, MT), np.int32)
  pos = np.tile(np.arange(MT), (B, 1))
  seg[0, 41:] = 0  # a padded tail
  for i, (a, b) in enumerate(((0, 20), (20, 33), (33, MT))):  # three documents, crossing devices
    seg[1, a:b], pos[1, a:b] = i + 1, np.arange(b - a)
  return jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pos)


def _loss(model, ids, seg, pos):
  logits = model.forward(ids, position_ids=pos, segment_ids=seg).logits
  return jnp.sum(jnp.sin(logits) * (seg > 0)[..., None]), logits


@functools.cache
def _model(impl: str):
  m = llama4.init(CFG, C.Policy(attention_impl=impl, attention_block=16), seed=0)
  return nnx.split(m)


def _run(impl: str, rules=None, mesh=None):
  graphdef, state = _model(impl)
  step = jax.jit(jax.value_and_grad(lambda st, *b: _loss(nnx.merge(graphdef, st), *b), has_aux=True))
  if rules is None:
    (_, logits), grads = step(state, *_batch())
  else:
    with sharding.use(rules, mesh):
      (_, logits), grads = step(state, *_batch())
  return logits, grads


@functools.cache
def _reference():
  return _run("blockwise")


@pytest.mark.parametrize("impl", ["xla", "dense", "splash"])
def test_model_implementations_agree(impl):
  want_logits, want_grads = _reference()
  logits, grads = _run(impl)
  keep = np.asarray(_batch()[1] > 0)
  assert rel(np.asarray(logits)[keep], np.asarray(want_logits)[keep]) <= 2e-6
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert rel(g, r) <= 2e-6


LAYOUTS = [  # (mesh, global-layer dispatch)
    (dict(fsdp=4, context=2), "all_gather"), (dict(fsdp=4, context=2), "ring"),
    (dict(fsdp=2, context=4), "ring"), (dict(context=8, fsdp=1), "ring"), (dict(context=8, fsdp=1), "all_gather"),
    (dict(context=2, fsdp=2, expert=2), "ring"),
]


@pytest.mark.parametrize("mesh,mode", LAYOUTS, ids=lambda x: str(x))
def test_context_parallel_equals_one_device(mesh, mode):
  want_logits, want_grads = _reference()
  rules = dataclasses.replace(sharding.CONTEXT_PARALLEL, sequence=sharding.SequenceDispatch(global_layers=mode))
  logits, grads = _run("blockwise", rules, sharding.make_mesh(sharding.MeshConfig(**mesh)))
  keep = np.asarray(_batch()[1] > 0)
  assert rel(np.asarray(logits)[keep], np.asarray(want_logits)[keep]) <= 1e-5
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert rel(g, r) <= 1e-5


def _sequence_hlo(chunk, aligned, t, n=8):
  mesh = sharding.make_mesh(sharding.MeshConfig(context=n, fsdp=8 // n))
  kernel = A.Kernel("blockwise", False, HI, 16)
  q, k, v = _qkv(6, t)
  info = A.TokenInfo(jnp.ones((B, t), jnp.int32), jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t)))
  fn = functools.partial(sharding.sequence_attention, kernel, info=info, chunk=chunk, aligned=aligned)
  with sharding.use(sharding.CONTEXT_PARALLEL, mesh):
    out = jax.jit(fn)(q, k, v)
    hlo = jax.jit(fn).lower(q, k, v).compile().as_text()
  want = A.attention(q, k, v, info, info, chunk, HI)
  return rel(out, want), hlo


def test_aligned_chunks_need_no_communication():
  """Chunk-aligned rows whose local length is a multiple of the chunk: every chunk is one device's, no
  collective at all; a chunk straddling a device boundary costs one collective-permute."""
  err, hlo = _sequence_hlo(CHUNK, True, 8 * 16)  # 16 tokens per device, chunk 8
  assert err <= 2e-6 and "collective-permute" not in hlo and "all-gather" not in hlo
  err, hlo = _sequence_hlo(CHUNK, True, 8 * 12)  # 12 tokens per device: chunks straddle boundaries
  assert err <= 2e-6 and hlo.count("collective-permute-start") + hlo.count("collective-permute(") >= 1


def test_context_axis_must_divide_the_sequence():
  mesh = sharding.make_mesh(sharding.MeshConfig(context=8, fsdp=1))
  q, k, v = _qkv(7, 20)
  info = A.TokenInfo(jnp.ones((B, 20), jnp.int32), jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), (B, 20)))
  with sharding.use(sharding.CONTEXT_PARALLEL, mesh):
    with pytest.raises(ValueError, match="sequence length 20 is not divisible by the 'context' mesh axis"):
      sharding.sequence_attention(A.Kernel("blockwise", False), q, k, v, info, CHUNK, False)


def test_chunked_cross_entropy_equals_the_whole():
  from llama4_jax.train.losses import chunked_cross_entropy_sum, cross_entropy_sum

  r = np.random.RandomState(8)
  h = jnp.asarray(r.randn(B, 37, 16), jnp.float32)
  w = jnp.asarray(r.randn(16, 50), jnp.float32)
  targets = jnp.asarray(r.randint(0, 50, (B, 37)))
  mask = jnp.asarray(r.rand(B, 37) > 0.3, jnp.int32)
  fn = lambda h: jnp.einsum("btd,dv->btv", h, w, precision=HI)  # noqa: E731
  whole = jax.value_and_grad(lambda h: cross_entropy_sum(fn(h), targets, mask)[0])(h)
  for chunk in (8, 16, 36):
    part = jax.value_and_grad(lambda h, c=chunk: chunked_cross_entropy_sum(fn, h, targets, mask, c)[0])(h)
    assert rel(part[0], whole[0]) <= 1e-6 and rel(part[1], whole[1]) <= 1e-6


# --------------------------------------------------------------------------------------------------
# Decoding: the global layers' cache split over `context`, chunked prefill


def _greedy(rules=None, mesh=None, **kw):
  from llama4_jax.apps import generate as G

  model = nnx.merge(*_model("blockwise"))
  ids = np.random.RandomState(9).randint(3, 300, (B, MT))
  mask = np.ones((B, MT), np.int32)
  ids[0, :13], mask[0, :13] = 0, 0  # a left-padded row
  run = lambda: G.generate(model, ids, mask, max_new_tokens=12, stop_ids=[-1], pad_id=0, **kw).tokens  # noqa: E731
  if rules is None:
    return run()
  with sharding.use(rules, mesh):
    return run()


@pytest.mark.parametrize("prefill_chunk", [None, 16])
def test_sequence_sharded_cache_generates_the_same_tokens(prefill_chunk):
  """Greedy decoding with the global cache split over 8 devices (each step attends to its slots locally and
  the partial softmaxes merge by log-sum-exp), the prompt prefilled context-parallel in one piece or in
  16-token slices, equals single-device decoding token for token; the cache buffers are split on their slots."""
  mesh = sharding.make_mesh(sharding.MeshConfig(context=8, fsdp=1))
  want = _greedy()
  got = _greedy(sharding.CONTEXT_PARALLEL, mesh, prefill_chunk=prefill_chunk)
  np.testing.assert_array_equal(got, want)
  model = nnx.merge(*_model("blockwise"))
  with sharding.use(sharding.CONTEXT_PARALLEL, mesh):
    cache = jax.jit(lambda: model.init_cache(B, 64, jnp.float32))()
  full_k = [kv[0] for kv, (rope_layer, _) in zip(cache.kv, CFG.text.layer_kinds) if not rope_layer]
  assert full_k and all(k.sharding.spec[2] == "context" for k in full_k)
  assert cache.full.seg.sharding.spec[1] == "context"


def test_chunked_prefill_equals_one_prefill():
  """Slices of 5, 8 and 20 tokens (across the attention chunk of 8 and the left padding of row 0) leave the
  same next tokens as one prefill."""
  want = _greedy()
  for chunk in (5, 8, 20):
    np.testing.assert_array_equal(_greedy(prefill_chunk=chunk), want)
