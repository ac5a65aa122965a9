"""Generation with the KV cache against transformers `generate` (greedy, eager, float32), token for token.

Tiny random models (tests/hf_ref.py: O(1) weights) with attention_chunk_size 8 and floor_scale 4: prompts of
9..26 tokens and 64 generated tokens cross many chunk boundaries (the ring buffer wraps every 8 tokens) and
temperature tuning is active on the NoPE layers. Batches are left-padded with different prompt lengths.
Every comparison also checks that transformers' top-2 logit margin stays far above our float32 error, so an
agreement is not luck and a disagreement would not be a near tie.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import hf_ref
from llama4_jax import config as C
from llama4_jax import load
from llama4_jax.apps import generate as G
from llama4_jax.model import cache as cache_lib

N_NEW = 64
EOS = 2  # the tiny configs' eos id; the batches below contain a row that emits it
BOI, EOI, TILE_X, TILE_Y, IMAGE = 300, 301, 304, 305, 310


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """transformers on a loaded 2-core box: one thread is ~20x faster than two contending ones."""
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  cache = {}

  def get(name):
    if name not in cache:
      cfg = {"scout": C.TINY_SCOUT, "maverick": C.TINY_MAVERICK}[name]
      d = tmp_path_factory.mktemp(name)
      ref = hf_ref.build(cfg, str(d), seed=0)
      cache[name] = (ref, load(d, dtype="float32").model)
    return cache[name]

  return get


def left_padded(lengths, seed, width=None):
  rs = np.random.RandomState(seed)
  width = width or max(lengths)
  ids = np.zeros((len(lengths), width), np.int64)
  mask = np.zeros_like(ids)
  for b, n in enumerate(lengths):
    ids[b, width - n:] = rs.randint(3, 300, n)
    mask[b, width - n:] = 1
  return ids, mask


def hf_generate(ref, ids, mask, pixel_values=None, n=N_NEW):
  extra = {} if pixel_values is None else {"pixel_values": torch.as_tensor(pixel_values)}
  with torch.no_grad():
    out = ref.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=n,
                       do_sample=False, eos_token_id=[EOS], pad_token_id=0, output_scores=True,
                       return_dict_in_generate=True, **extra)
  tokens = out.sequences[:, ids.shape[1]:].numpy()
  scores = torch.stack(out.scores, 1).numpy()  # [B, n, V]
  top2 = np.sort(scores, axis=-1)[..., -2:]
  live = tokens != 0  # rows still generating (pad is emitted after the stop)
  margin = float((top2[..., 1] - top2[..., 0])[live].min())
  return tokens, margin


def assert_same_generation(ours, ref, ids, mask, pixel_values=None, **kw):
  want, margin = hf_generate(ref, ids, mask, pixel_values)
  got = G.generate(ours, ids, mask, pixel_values=pixel_values, max_new_tokens=N_NEW, stop_ids=[EOS], pad_id=0,
                   **kw)
  assert margin > 1e-4, f"near tie in transformers' logits (top-2 margin {margin:.2e}): pick another seed"
  assert got.tokens.shape == want.shape
  np.testing.assert_array_equal(got.tokens, want)
  return got, want


# Prompt seeds chosen so that one row emits eos midway (step 30 / 28) while the others run all 64 steps.
@pytest.mark.parametrize("name,seed", [("scout", 18), ("maverick", 11)])
def test_greedy_batch_matches_transformers(pairs, name, seed):
  """Left-padded batch, prompts of 26, 17 and 9 tokens (two longer than the chunk), 64 new tokens."""
  ref, ours = pairs(name)
  ids, mask = left_padded([26, 17, 9], seed=seed)
  got, want = assert_same_generation(ours, ref, ids, mask)
  assert got.tokens.shape[1] == N_NEW
  # the row that emitted eos kept emitting pad, and lengths/stopped report it
  for b in range(ids.shape[0]):
    hits = np.flatnonzero(want[b] == EOS)
    if hits.size:
      assert got.stopped[b] and got.lengths[b] == hits[0] + 1
      assert (got.tokens[b, hits[0] + 1:] == 0).all()
    else:
      assert not got.stopped[b] and got.lengths[b] == N_NEW
  assert got.stopped.any() and not got.stopped.all(), "the batch should exercise a per-row stop"


@pytest.mark.parametrize("name,seed", [("scout", 18), ("maverick", 11)])
@pytest.mark.parametrize("prefill_chunk", [3, 8, 11])
def test_chunked_prefill_matches_transformers(pairs, name, seed, prefill_chunk):
  """The prompt in slices of 3 (the padding of the short rows fills whole slices), 8 (= the attention chunk)
  and 11 (slices straddle chunk boundaries) tokens: the same tokens as transformers' one-shot prefill."""
  ref, ours = pairs(name)
  ids, mask = left_padded([26, 17, 9], seed=seed)
  assert_same_generation(ours, ref, ids, mask, prefill_chunk=prefill_chunk)


def test_prefill_slices():
  assert G.prefill_slices(26, 8) == [(0, 8), (8, 16), (16, 24), (24, 26)]
  assert G.prefill_slices(8, 8) == [(0, 8)]
  with pytest.raises(ValueError, match="prefill_chunk must be >= 1, got 0"):
    G.prefill_slices(8, 0)


def test_length_past_max_position_embeddings_is_refused(pairs):
  _, ours = pairs("scout")
  limit = ours.cfg.text.max_position_embeddings
  with pytest.raises(ValueError, match=f"a prompt of {limit} tokens \\+ max_new_tokens=2 exceeds "
                                       f"max_position_embeddings={limit}"):
    G.generate(ours, np.ones((1, limit), np.int32), max_new_tokens=2)
  with pytest.raises(ValueError, match=f"KV cache of {limit + 1} tokens exceeds max_position_embeddings={limit}"):
    ours.init_cache(1, limit + 1, jnp.float32)
  with pytest.raises(ValueError, match=f"sequence of {limit + 1} tokens exceeds max_position_embeddings"):
    jax.eval_shape(lambda ids: ours(ids), jax.ShapeDtypeStruct((1, limit + 1), jnp.int32))


@pytest.mark.parametrize("prefill_chunk", [None, 5])
def test_image_prompt_matches_transformers(pairs, prefill_chunk):
  """Two rows, each with an image (3 tiles as 1x2 + global, then 1 tile), left-padded; prefill with
  pixel_values (in one piece, or in 5-token slices: image features merged once, then sliced), then text-only
  decoding."""
  ref, ours = pairs("scout")
  tpt = C.TINY_SCOUT.vision.tokens_per_tile
  patch = C.TINY_SCOUT.image_token_index

  def image(rows, cols):
    if rows * cols == 1:
      return [BOI, IMAGE] + [patch] * tpt + [EOI]
    out = [BOI]
    for _ in range(rows):
      for x in range(cols):
        out += [patch] * tpt + ([TILE_X] if x < cols - 1 else [])
      out.append(TILE_Y)
    return out + [IMAGE] + [patch] * tpt + [EOI]

  rows = [[1, 7, 8] + image(1, 2) + [20, 21, 22, 23], [1, 9] + image(1, 1) + [30, 31, 32, 33, 34]]
  width = max(len(r) for r in rows)
  ids = np.zeros((2, width), np.int64)
  mask = np.zeros_like(ids)
  for b, r in enumerate(rows):
    ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
  side = C.TINY_SCOUT.vision.image_size
  pv = np.random.RandomState(3).uniform(-1, 1, (4, 3, side, side)).astype(np.float32)
  assert_same_generation(ours, ref, ids, mask, pixel_values=pv, prefill_chunk=prefill_chunk)


@pytest.fixture(scope="module")
def cached_steps():
  """A jitted cached step (one compilation per shape)."""
  @nnx.jit(static_argnames=("prefill",))
  def step(text, ids, cache, mask, prefill):
    out = text.forward(ids, mask, cache=cache, prefill=prefill)
    return out.logits, out.cache
  return step


def test_decode_equals_full_forward(pairs, cached_steps):
  """Prefill 21 tokens, then 1-token steps and one 3-token step, against one full forward (transformers'
  generate positions): every logit within 1e-4, over 35 positions (4 chunks), left padding included."""
  _, ours = pairs("scout")
  text = ours.text
  ids, mask = left_padded([35, 29], seed=2)
  pos = np.where(mask != 0, np.cumsum(mask, -1) - 1, 0)
  full = np.asarray(nnx.jit(lambda t, i, a, p: t(i, attention_mask=a, position_ids=p))(text, ids, mask, pos))
  P = 21
  cache = text.init_cache(2, 64, jnp.float32)
  logits, cache = cached_steps(text, ids[:, :P], cache, mask[:, :P], True)
  outs = [np.asarray(logits)]
  for t in range(P, 32):
    logits, cache = cached_steps(text, ids[:, t:t + 1], cache, None, False)
    outs.append(np.asarray(logits))
  logits, cache = cached_steps(text, ids[:, 32:35], cache, None, False)
  outs.append(np.asarray(logits))
  got = np.concatenate(outs, axis=1)
  keep = mask.astype(bool)
  assert np.abs(got - full)[keep].max() <= 1e-4
  assert int(cache.index) == 35


def test_prefill_leaves_the_visible_keys_in_the_ring(pairs, cached_steps):
  """A 21-token prompt with chunk 8: the ring holds exactly the last 8 cache indices (13..20), with the
  keys of a full forward, and the next token (index 21, chunk 16..23) finds all of 16..20 there."""
  _, ours = pairs("scout")
  text = ours.text
  ids, mask = left_padded([21, 18], seed=4)
  cache = text.init_cache(2, 64, jnp.float32)
  _, cache = cached_steps(text, ids, cache, mask, True)
  W = text.cfg.attention_chunk_size
  assert cache.ring_size == W and cache.max_len == 64
  lp = np.array([0, 3])
  mpos = np.asarray(cache.ring.mpos)
  for b in range(2):
    slots = (np.arange(13, 21)) % W
    np.testing.assert_array_equal(mpos[b, slots], np.arange(13, 21) - lp[b])
  seg = np.asarray(cache.ring.seg)
  assert seg[0].all() and seg[1].all()  # indices 13..20 are real tokens of both rows
  np.testing.assert_array_equal(np.asarray(cache.full.seg)[:, :21], mask)
  assert not np.asarray(cache.full.seg)[:, 21:].any()


def test_cache_bounded_on_chunked_layers():
  """Chunked layers keep W = min(C, max_len) slots whatever the length; global layers grow with it."""
  cfg = C.TINY_SCOUT.text
  kinds = [r for r, _ in cfg.layer_kinds[:cfg.layer_period]]
  for max_len in (8, 64, 1024, 100_000):
    c = cache_lib.abstract(cfg, 2, max_len, jnp.float32)
    for use_rope, (k, v) in zip(kinds, c.kv):
      S = min(8, max_len) if use_rope else max_len
      assert k.shape == v.shape == (cfg.num_hidden_layers // cfg.layer_period, 2, S, 2, 16)
    kv = sum(x.size * 4 for layer in c.kv for x in layer)
    assert kv == 2 * cache_lib.kv_bytes(cfg, max_len, "float32")
  # Scout at full size (nothing allocated): 36 chunked layers bounded by 8192 positions, 12 global.
  scout = C.SCOUT.text
  per = 2 * 8 * 128 * 2  # k and v, 8 kv heads, head_dim 128, bf16: 4096 bytes per layer and token
  assert cache_lib.kv_bytes(scout, 8192) == per * 48 * 8192
  assert cache_lib.kv_bytes(scout, 1 << 20) == per * (12 * (1 << 20) + 36 * 8192)
  c = cache_lib.abstract(scout, 1, 1 << 20, jnp.bfloat16)
  assert sum(x.size * 2 for layer in c.kv for x in layer) == cache_lib.kv_bytes(scout, 1 << 20)


def test_logit_processing_matches_transformers_warpers():
  from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
  )
  logits = np.random.RandomState(0).normal(0, 3, (4, 320)).astype(np.float32)
  for s in (G.Sampling(0.7), G.Sampling(1.0, top_k=5), G.Sampling(0.6, top_p=0.9),
            G.Sampling(1.3, top_k=40, top_p=0.5), G.Sampling(1.0, top_p=0.01)):
    warpers = LogitsProcessorList()
    warpers.append(TemperatureLogitsWarper(s.temperature))
    if s.top_k:
      warpers.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1:
      warpers.append(TopPLogitsWarper(s.top_p))
    want = warpers(None, torch.as_tensor(logits)).numpy()
    got = np.asarray(G.process_logits(jnp.asarray(logits), s))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


def test_sampling_keeps_to_the_allowed_set():
  logits = jnp.asarray(np.random.RandomState(1).normal(0, 2, (2, 50)).astype(np.float32))
  keys = jax.random.split(jax.random.key(0), 200)
  top_k3 = G.Sampling(1.0, top_k=3)
  draw = jax.jit(jax.vmap(lambda k: G.choose(logits, k, top_k3)))
  top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  got = np.asarray(draw(keys))
  for b in range(2):
    assert set(got[:, b]) <= set(top3[b]) and len(set(got[:, b])) > 1
  greedy = np.asarray(jnp.argmax(logits, -1))
  for s in (G.Sampling(1.0, top_k=1), G.Sampling(0.8, top_p=1e-6)):
    np.testing.assert_array_equal(np.asarray(G.choose(logits, keys[0], s)), greedy)


def test_streaming_and_sampling_loop(pairs):
  """`stream` yields one [B] array per step as they come, equal to `generate`'s; sampled runs are
  reproducible by seed; `max_new_tokens` bounds the steps."""
  _, ours = pairs("scout")
  ids, mask = left_padded([26, 17, 9], seed=18)
  steps = list(G.stream(ours, ids, mask, max_new_tokens=N_NEW, stop_ids=[EOS], pad_id=0))
  assert all(s.shape == (3,) for s in steps)
  seen = []
  g = G.generate(ours, ids, mask, max_new_tokens=N_NEW, stop_ids=[EOS], pad_id=0,
                 callback=lambda i, t: seen.append((i, t.copy())))
  np.testing.assert_array_equal(np.stack(steps, 1), g.tokens)
  assert [i for i, _ in seen] == list(range(len(steps)))
  s = G.Sampling(0.9, top_k=20, top_p=0.95)
  a = G.generate(ours, ids, mask, max_new_tokens=N_NEW, sampling=s, seed=3, stop_ids=(), pad_id=0)
  b = G.generate(ours, ids, mask, max_new_tokens=N_NEW, sampling=s, seed=3, stop_ids=(), pad_id=0)
  c = G.generate(ours, ids, mask, max_new_tokens=N_NEW, sampling=s, seed=4, stop_ids=(), pad_id=0)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert a.tokens.shape == (3, N_NEW) and (a.tokens != c.tokens).any()
  assert G.generate(ours, ids, mask, max_new_tokens=5, stop_ids=(), pad_id=0, cache_multiple=128).tokens.shape == (3, 5)


class CharTokenizer:
  """Characters as ids 20..275, the chat and image specials at the tiny configs' ids; eos 2, pad 0."""

  SPECIAL = {"<|begin_of_text|>": 1, "<|end_of_text|>": 2, "<|header_start|>": 3, "<|header_end|>": 4,
             "<|eot|>": 2, "<|image_start|>": BOI, "<|image_end|>": EOI, "<|tile_x_separator|>": TILE_X,
             "<|tile_y_separator|>": TILE_Y, "<|image|>": IMAGE, "<|patch|>": C.TINY_SCOUT.image_token_index}
  vocab_size, bos_id, eos_ids, pad_id = 320, 1, (2,), 0

  def encode(self, text, *, bos=False, eos=False):
    return [1] * bos + [20 + ord(c) % 256 for c in text] + [2] * eos

  def decode(self, ids):
    return "".join(chr(i - 20) if 20 <= i < 276 else f"<{i}>" for i in ids)

  def token_id(self, special):
    return self.SPECIAL[special]


def test_chat_image_prompt_through_build_inputs(pairs):
  """`generate_text`: chat format + an image (preprocessed into 1x2 tiles + global) via `prompt.build_inputs`,
  streamed text; the same tokens as transformers `generate` on those inputs."""
  from llama4_jax.data.prompt import build_inputs

  ref, ours = pairs("scout")
  tok = CharTokenizer()
  image = np.random.RandomState(0).randint(0, 256, (40, 90, 3), np.uint8)
  prompt = "Look: <|image|> What is it?"
  inputs = build_inputs(tok, [prompt], [image], C.TINY_SCOUT.vision, chat=True)
  assert inputs.pixel_values.shape[0] == 3 and inputs.input_ids[0, 0] == 1
  want, margin = hf_generate(ref, inputs.input_ids.astype(np.int64), inputs.attention_mask.astype(np.int64),
                             inputs.pixel_values.astype(np.float32), n=24)
  assert margin > 1e-4
  pieces = []
  text = G.generate_text(ours, tok, prompt, [image], chat=True, max_new_tokens=24,
                         on_text=lambda row, piece: pieces.append(piece))[0]
  cut = [t for t in want[0] if t != 0]
  if EOS in cut:
    cut = cut[:cut.index(EOS)]
  assert text == tok.decode(cut) == "".join(pieces)
