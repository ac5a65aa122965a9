"""Meta's Llama 4 tokenizer: the tiktoken BPE `tokenizer.model` shipped in `llama_models`, offline.

The special-token table and the pre-tokenisation pattern are Meta's (imported from
`llama_models.llama4.tokenizer`, which needs only tiktoken); loading and encoding are ours.
Layout: 200000 BPE ranks, then 2048 special tokens (ids 200000..202047).
"""

from __future__ import annotations

import base64
import importlib.resources
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken
from llama_models.llama4 import tokenizer as meta_tokenizer

# tiktoken panics on very long inputs and slows down on long runs of (non-)whitespace
# (openai/tiktoken#195): pieces are kept below these sizes.
_MAX_PIECE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{_MAX_RUN_CHARS + 1},}}|\S{{{_MAX_RUN_CHARS + 1},}}")

INSTRUCT_EOS = ("<|end_of_text|>", "<|eom|>", "<|eot|>")


def bundled_model_path() -> Path:
  """Path of `tokenizer.model` inside the installed `llama_models` package."""
  return Path(str(importlib.resources.files("llama_models.llama4") / "tokenizer.model"))


def special_tokens(num_base_tokens: int) -> dict[str, int]:
  """Meta's special tokens, numbered after the BPE ranks, padded with reserved ones to 2048."""
  named = meta_tokenizer.BASIC_SPECIAL_TOKENS + meta_tokenizer.LLAMA4_SPECIAL_TOKENS
  total = meta_tokenizer.Tokenizer.num_reserved_special_tokens
  reserved = [f"<|reserved_special_token_{i}|>" for i in range(total - len(named))]
  return {tok: num_base_tokens + i for i, tok in enumerate(named + reserved)}


def load_ranks(path: Path) -> dict[bytes, int]:
  """Parses a tiktoken BPE file: one `base64(token) rank` pair per line."""
  ranks = {}
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
      except ValueError as e:
        raise ValueError(f"{path}:{line_no}: not a tiktoken BPE line: {line[:80]!r}") from e
  return ranks


def _pieces(text: str) -> Iterator[str]:
  """Cuts `text` at whitespace/non-whitespace boundaries into pieces tiktoken handles."""
  if len(text) <= _MAX_PIECE_CHARS and not _LONG_RUN.search(text):
    yield text
    return
  start = end = 0
  for run in re.finditer(r"\s+|\S+", text):
    if run.end() - start > _MAX_PIECE_CHARS and end > start:
      yield text[start:end]
      start = end
    for cut in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
      yield text[start:cut]
      start = cut
    end = run.end()
  if end > start:
    yield text[start:end]


class Llama4Tokenizer:
  """The real Llama 4 tokenizer (vocab 202048), loaded without network access."""

  def __init__(self, model_path: str | Path | None = None):
    path = Path(model_path) if model_path is not None else bundled_model_path()
    if not path.is_file():
      raise FileNotFoundError(f"{path}: Llama 4 tokenizer.model not found (pip install --no-deps llama-models)")
    ranks = load_ranks(path)
    self._special = special_tokens(len(ranks))
    self._encoding = tiktoken.Encoding(
        name=f"llama4:{path}",
        pat_str=meta_tokenizer.Tokenizer.O200K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=self._special,
    )
    self.vocab_size = len(ranks) + len(self._special)
    self.bos_id = self._special["<|begin_of_text|>"]
    self.eos_ids = tuple(self._special[t] for t in INSTRUCT_EOS)
    self.pad_id = self._special["<|finetune_right_pad|>"]
    self._end_of_text = self._special["<|end_of_text|>"]

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Special-token strings in `text` are plain text here; `eos` appends <|end_of_text|>."""
    ids = [self.bos_id] if bos else []
    for piece in _pieces(text):
      ids.extend(self._encoding.encode_ordinary(piece))
    if eos:
      ids.append(self._end_of_text)
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._encoding.decode([int(i) for i in ids])

  def token_id(self, special: str) -> int:
    try:
      return self._special[special]
    except KeyError:
      raise ValueError(f"{special!r} is not a Llama 4 special token") from None
