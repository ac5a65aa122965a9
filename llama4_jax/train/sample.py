"""A small sampler for the end of a training run: full forward per token, no KV cache.

The token buffer has a fixed length (prompt + new tokens), so one program is compiled; positions after
the current one hold padding that causal attention never lets earlier positions see.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax.data.tokenizers import Tokenizer


def sample(model: nnx.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
           seed: int | jax.Array = 0, bos: bool = True) -> str:
  """Continuation of `prompt` (decoded, prompt excluded). Temperature 0 is greedy; stops at an eos id."""
  ids = tokenizer.encode(prompt, bos=bos and tokenizer.bos_id is not None)
  n0, total = len(ids), len(ids) + max_new_tokens
  buf = np.zeros((1, total), np.int32)
  buf[0, :n0] = ids
  graphdef, state = nnx.split(model)
  key = jax.random.key(seed) if isinstance(seed, int) else seed

  @jax.jit
  def next_token(state, buf, t, key):
    logits = nnx.merge(graphdef, state)(buf)[0]
    last = jax.lax.dynamic_index_in_dim(logits, t - 1, keepdims=False)
    if temperature <= 0:
      return jnp.argmax(last).astype(jnp.int32)
    return jax.random.categorical(key, last / temperature).astype(jnp.int32)

  out = []
  for t in range(n0, total):
    key, sub = jax.random.split(key)
    tok = int(next_token(state, buf, t, sub))
    if tok in tokenizer.eos_ids:
      break
    buf[0, t] = tok
    out.append(tok)
  return tokenizer.decode(out)
