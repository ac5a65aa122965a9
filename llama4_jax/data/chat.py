"""Llama 4 chat rendering for SFT: token ids plus a loss mask on the assistant's replies.

Each turn is `<|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>` after one leading
`<|begin_of_text|>`; the pieces are tokenised separately, as Meta's `ChatFormat` does. The loss
mask is 1 exactly on the tokens of assistant contents and their closing `<|eot|>`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llama4_jax.data.sources import Message
from llama4_jax.data.tokenizers import Tokenizer

_ROLE_NAMES = {"tool": "ipython"}  # how Llama 4 names the tool role in headers


def render_chat(messages: Sequence[Message], tokenizer: Tokenizer) -> dict[str, np.ndarray]:
  """{"tokens", "loss_mask"} (int32, same length) of one conversation."""
  header_start = tokenizer.token_id("<|header_start|>")
  header_end = tokenizer.token_id("<|header_end|>")
  eot = tokenizer.token_id("<|eot|>")
  tokens = [tokenizer.token_id("<|begin_of_text|>")]
  mask = [0]
  for m in messages:
    header = [header_start, *tokenizer.encode(_ROLE_NAMES.get(m.role, m.role)), header_end, *tokenizer.encode("\n\n")]
    body = [*tokenizer.encode(m.content), eot]
    trained = 1 if m.role == "assistant" else 0
    tokens += header + body
    mask += [0] * len(header) + [trained] * len(body)
  return {"tokens": np.asarray(tokens, np.int32), "loss_mask": np.asarray(mask, np.int32)}
