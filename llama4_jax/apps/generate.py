"""Autoregressive generation, the one sampler of the project: prefill + compiled one-token decode steps over
the model's KV-cached forward (`Llama4.forward(..., cache=...)`, `model/cache.py`).

Semantics follow transformers' `generate` (greedy or sampling, eager attention), token for token in float32:
  * a batch is left-padded (`attention_mask` 0 on padding); positions, chunk grid and temperature tuning
    are those of cache.py;
  * logits are processed like transformers' warpers, in its order: temperature, top-k, top-p; then argmax
    (greedy, `temperature == 0`) or a categorical draw;
  * a row stops once it emits one of `stop_ids` (that token is kept); afterwards it emits `pad_id`. The
    loop ends when every row stopped or after `max_new_tokens` steps.

`stream` yields each step's tokens as they come (the next step is already dispatched while the host reads
them); `generate` collects them. The compiled functions are cached per (model structure, shapes,
sampling): one compilation per batch/prompt/cache shape.

Images: `pixel_values` (all tiles of all images, in `<|patch|>` order; see `prompt.build_inputs`) go
through the vision tower once, at prefill, and replace the `<|patch|>` embeddings (early fusion).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax.data.chat import prompt_list, prompt_messages, render_chat
from llama4_jax.data.prompt import build_inputs
from llama4_jax.model import cache as cache_lib
from llama4_jax.model.llama4 import Llama4


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a token is picked from the logits (transformers' warpers, same order and tie rules)."""

  temperature: float = 0.0  # 0: greedy argmax; else logits / temperature, then a categorical draw
  top_k: int = 0  # keep the k largest logits (ties at the k-th kept); 0: off
  top_p: float = 1.0  # nucleus: drop the least likely tokens whose total mass is <= 1 - top_p; 1: off

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


GREEDY = Sampling()


def process_logits(logits: jax.Array, s: Sampling) -> jax.Array:
  """Logits [B, V] -> float32 logits with -inf on removed tokens, as transformers' `TemperatureLogitsWarper`,
  `TopKLogitsWarper` and `TopPLogitsWarper` (min_tokens_to_keep 1) compute them: top-p sorts ascending and
  removes the tokens whose cumulative probability is <= 1 - top_p, always keeping the most likely one."""
  x = logits.astype(jnp.float32)
  if not s.greedy and s.temperature != 1.0:
    x = x / s.temperature
  if s.top_k > 0 and s.top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if s.top_p < 1.0:
    order = jnp.argsort(x, axis=-1)  # ascending
    cum = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1), axis=-1)
    remove_sorted = (cum <= 1.0 - s.top_p).at[..., -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(remove_sorted)
    x = jnp.where(remove, -jnp.inf, x)
  return x


def choose(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """Next tokens [B] int32 from logits [B, V]."""
  if s.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, process_logits(logits, s), axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# Compiled steps


class Decoding(NamedTuple):
  """Loop state between steps (device arrays)."""

  cache: cache_lib.KVCache
  tokens: jax.Array  # [B] int32: the tokens just produced
  done: jax.Array  # [B] bool: the row has emitted a stop token
  key: jax.Array  # PRNG key of the next draw


def _pick(done, key, logits, sampling, stop_ids, pad_id):
  key, sub = jax.random.split(key)
  nxt = choose(logits[:, -1], sub, sampling)
  nxt = jnp.where(done, pad_id, nxt)
  done = done | jnp.isin(nxt, jnp.asarray(stop_ids, jnp.int32))
  return nxt, done, key


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "stop_ids", "pad_id", "max_len", "cache_dtype"))
def _prefill(graphdef, state, input_ids, attention_mask, pixel_values, key, *, sampling, stop_ids, pad_id,
             max_len, cache_dtype):
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(input_ids.shape[0], max_len, cache_dtype)
  out = model.forward(input_ids, attention_mask, pixel_values=pixel_values, cache=cache, prefill=True,
                      last_only=True)
  done = jnp.zeros(input_ids.shape[:1], bool)
  nxt, done, key = _pick(done, key, out.logits, sampling, stop_ids, pad_id)
  return Decoding(out.cache, nxt, done, key)


# Chunked prefill: the prompt runs through the cached forward a slice at a time (cache.py's T > 1 steps), so
# prefill activations are those of one slice whatever the prompt length. Three compiled shapes at most.


@functools.partial(jax.jit, static_argnames=("graphdef", "batch", "max_len", "cache_dtype"))
def _empty_cache(graphdef, state, *, batch, max_len, cache_dtype):
  return nnx.merge(graphdef, state).init_cache(batch, max_len, cache_dtype)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embeddings(graphdef, state, input_ids, pixel_values):
  return nnx.merge(graphdef, state).embed(input_ids, pixel_values)[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "prefill"), donate_argnames=("cache",))
def _prefill_slice(graphdef, state, input_ids, attention_mask, embeds, cache, *, prefill):
  out = nnx.merge(graphdef, state).text.forward(input_ids, attention_mask, inputs_embeds=embeds, cache=cache,
                                                prefill=prefill, last_only=True)
  return out.logits, out.cache


@functools.partial(jax.jit, static_argnames=("sampling", "stop_ids", "pad_id"))
def _first_token(logits, key, *, sampling, stop_ids, pad_id):
  return _pick(jnp.zeros(logits.shape[:1], bool), key, logits, sampling, stop_ids, pad_id)


def prefill_slices(T: int, chunk: int) -> list[tuple[int, int]]:
  """[start, end) of each prefill slice: whole `chunk`s first (the first one fills the empty cache), the rest
  last, so the one `prefill=True` slice (full-sequence attention: under context parallelism its length must
  divide the `context` axis) is a whole chunk whenever the prompt is longer than one."""
  if chunk < 1:
    raise ValueError(f"prefill_chunk must be >= 1, got {chunk}")
  cuts = list(range(0, T, chunk)) + [T]
  return list(zip(cuts[:-1], cuts[1:]))


def _chunked_prefill(graphdef, state, input_ids, mask, pixel_values, key, *, chunk, sampling, stop_ids, pad_id,
                     max_len, cache_dtype) -> Decoding:
  B, T = input_ids.shape
  cache = _empty_cache(graphdef, state, batch=B, max_len=max_len, cache_dtype=cache_dtype)
  # text only: each slice embeds its own tokens; with images the merged embeddings are made once
  embeds = None if pixel_values is None else _embeddings(graphdef, state, input_ids, pixel_values)
  mask = jnp.ones((B, T), jnp.int32) if mask is None else mask
  for i, (a, b) in enumerate(prefill_slices(T, chunk)):
    logits, cache = _prefill_slice(graphdef, state, input_ids[:, a:b], mask[:, a:b],
                                   None if embeds is None else embeds[:, a:b], cache, prefill=i == 0)
  nxt, done, key = _first_token(logits, key, sampling=sampling, stop_ids=stop_ids, pad_id=pad_id)
  return Decoding(cache, nxt, done, key)


@functools.lru_cache(maxsize=16)
def _decoder(graphdef, sampling, stop_ids, pad_id):
  """The jitted decode step of one model structure and sampling setup, made once: the static arguments are
  hashed once per `stream`, not at every step (an NNX graphdef's hash costs ~0.5 ms)."""

  def step(state, cache, tokens, done, key):
    out = nnx.merge(graphdef, state).forward(tokens[:, None], cache=cache, last_only=True)
    nxt, done, key = _pick(done, key, out.logits, sampling, stop_ids, pad_id)
    return Decoding(out.cache, nxt, done, key)

  return jax.jit(step, donate_argnums=(1,))


# --------------------------------------------------------------------------------------------------
# Loops


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _defaults(model, stop_ids, pad_id) -> tuple[tuple[int, ...], int]:
  if not isinstance(model, Llama4):
    raise TypeError(f"generation takes a Llama4 model (llama4_jax.load / init), got {type(model).__name__}")
  cfg = model.cfg.text
  stops = tuple(cfg.eos_token_id) if stop_ids is None else tuple(int(t) for t in stop_ids)
  pad = (cfg.pad_token_id if cfg.pad_token_id is not None else 0) if pad_id is None else int(pad_id)
  return stops, pad


def stream(model, input_ids, attention_mask=None, *, pixel_values=None, max_new_tokens: int = 64,
           sampling: Sampling = GREEDY, stop_ids: Sequence[int] | None = None, pad_id: int | None = None,
           seed: int | jax.Array = 0, cache_dtype=None, cache_multiple: int = 64,
           prefill_chunk: int | None = None) -> Iterator[np.ndarray]:
  """Yields the [B] int32 tokens of each step (at most `max_new_tokens` steps).

  `model`: a `Llama4`. `seed`: an int or a PRNG key. `input_ids` [B, T] left-padded,
  `attention_mask` [B, T] (None: no padding). `stop_ids` default to the config's eos ids (the instruct set
  200001/200007/200008 for the release), `pad_id` to its pad id. The cache holds T + max_new_tokens tokens
  rounded up to `cache_multiple` (fewer recompilations; unused slots are masked), capped at the config's
  `max_position_embeddings` (which T + max_new_tokens must not exceed), in `cache_dtype` (default: the
  compute dtype; "int8": int8 keys and values with a float32 scale per token and kv head, `cache.Int8KV`,
  about half the bytes of bfloat16). `prefill_chunk`: run a prompt longer than this in slices of this many
  tokens (chunked prefill: activations bounded by the slice, the same tokens as one prefill up to float rounding; under
  context parallelism pick a multiple of the `context` axis)."""
  if max_new_tokens < 1:
    return
  stops, pad = _defaults(model, stop_ids, pad_id)
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  if pixel_values is not None:
    model.check_image_tokens(np.asarray(input_ids), pixel_values)
    pixel_values = jnp.asarray(pixel_values)
  need, limit = input_ids.shape[1] + max_new_tokens, model.cfg.text.max_position_embeddings
  if need > limit:
    raise ValueError(f"a prompt of {input_ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds "
                     f"max_position_embeddings={limit} of the config")
  max_len = min(_round_up(need, cache_multiple), limit)
  graphdef, state = nnx.split(model)
  kw = dict(graphdef=graphdef, sampling=sampling, stop_ids=stops, pad_id=pad, max_len=max_len,
            cache_dtype=jnp.dtype(cache_dtype or model.policy.dtype).name)
  key = jax.random.key(seed) if isinstance(seed, int) else seed
  if prefill_chunk is not None and input_ids.shape[1] > prefill_chunk:
    d = _chunked_prefill(state=state, input_ids=input_ids, mask=mask, pixel_values=pixel_values, key=key,
                         chunk=int(prefill_chunk), **kw)
  else:
    d = _prefill(state=state, input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, key=key, **kw)
  decode = _decoder(graphdef, sampling, stops, pad)
  for step in range(max_new_tokens):
    last = step + 1 == max_new_tokens
    tokens, done = d.tokens, d.done
    if not last:  # dispatch the next step before reading this one (the cache buffers are donated)
      d = decode(state, d.cache, tokens, done, d.key)
    host_done = np.asarray(done)
    yield np.asarray(tokens)
    if last or host_done.all():
      return


@dataclasses.dataclass
class Generation:
  """Result of `generate`: tokens [B, n] (n steps run; `pad_id` after a row's stop token), the number of
  tokens of each row up to and including its stop token, whether it stopped, and timings."""

  tokens: np.ndarray
  lengths: np.ndarray
  stopped: np.ndarray
  prefill_s: float
  decode_s: float

  @property
  def decode_tokens_per_s(self) -> float:
    """Generated tokens per second after the first one (batch rows counted, padding after a stop too)."""
    n = self.tokens.shape[1] - 1
    return self.tokens.shape[0] * n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


def generate(model, input_ids, attention_mask=None, *, callback: Callable[[int, np.ndarray], Any] | None = None,
             stop_ids: Sequence[int] | None = None, pad_id: int | None = None, **kw) -> Generation:
  """Runs `stream` to the end; `callback(step, tokens)` sees each step's [B] tokens as they come."""
  stops, pad = _defaults(model, stop_ids, pad_id)
  out, stopped = [], None
  t0 = time.perf_counter()
  t_first = None
  for i, tok in enumerate(stream(model, input_ids, attention_mask, stop_ids=stops, pad_id=pad, **kw)):
    if t_first is None:
      t_first = time.perf_counter()
    out.append(tok)
    stopped = np.isin(tok, stops) if stopped is None else stopped | np.isin(tok, stops)
    if callback is not None:
      callback(i, tok)
  t1 = time.perf_counter()
  B = np.shape(input_ids)[0]
  tokens = np.stack(out, axis=1) if out else np.zeros((B, 0), np.int32)
  stopped = np.zeros(B, bool) if stopped is None else stopped
  is_stop = np.isin(tokens, stops)
  lengths = np.where(stopped, is_stop.argmax(axis=1) + 1, tokens.shape[1])
  t_first = t1 if t_first is None else t_first
  return Generation(tokens, lengths, stopped, t_first - t0, t1 - t_first)


# --------------------------------------------------------------------------------------------------
# Text in, text out


def generate_text(model, tokenizer, prompts, images=None, *, chat: bool = True, max_new_tokens: int = 128,
                  sampling: Sampling = GREEDY, on_text: Callable[[int, str], Any] | None = None,
                  details: bool = False, **kw):
  """Completions of `prompts` (strings or message lists; `<|image|>` marks images, see `prompt.build_inputs`).

  `chat`: wrap each prompt in the chat format with the assistant header (else: bos + the raw text).
  `on_text(row, piece)` streams the decoded text of each row as it grows. Stops at the tokenizer's eos ids
  (the instruct set for Llama 4). Returns the texts, or with `details` (texts, `Generation`)."""

  prompts = prompt_list(prompts)
  cfg = model.cfg
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  if images:
    if cfg.vision is None:
      raise ValueError("image prompts need a multimodal Llama4 model")
    inputs = build_inputs(tokenizer, prompts, images, cfg.vision, chat=chat, pad_id=pad)
    ids, mask, pixels = inputs.input_ids, inputs.attention_mask, inputs.pixel_values
  else:
    rows = []
    for b, p in enumerate(prompts):
      try:
        if chat:  # the chat renderer SFT trains with (`chat.render_chat`)
          rows.append(render_chat(prompt_messages(p), tokenizer, add_generation_prompt=True)["tokens"])
        else:  # raw text after bos: any tokenizer (no chat special tokens needed)
          rows.append(tokenizer.encode(p, bos=tokenizer.bos_id is not None))
      except (ValueError, TypeError) as e:
        raise ValueError(f"prompt {b}: {e}") from None
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
      ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    pixels = None
  stops = tuple(tokenizer.eos_ids) or None
  kept: list[list[int]] = [[] for _ in prompts]
  shown = [""] * len(prompts)
  done = [False] * len(prompts)

  def on_step(_, toks):
    for b, t in enumerate(toks):
      if done[b]:
        continue
      if stops and int(t) in stops:
        done[b] = True
        continue
      kept[b].append(int(t))
      if on_text is not None:
        s = tokenizer.decode(kept[b])
        if not s.endswith("\ufffd"):  # wait for the rest of a multi-byte character
          on_text(b, s[len(shown[b]):])
          shown[b] = s

  gen = generate(model, ids, mask, pixel_values=pixels, max_new_tokens=max_new_tokens, sampling=sampling,
                 stop_ids=stops, pad_id=pad, callback=on_step, **kw)
  texts = [tokenizer.decode(k) for k in kept]
  return (texts, gen) if details else texts
