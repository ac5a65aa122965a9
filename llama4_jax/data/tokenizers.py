"""The tokenizer protocol every part of the tree codes against, and `load_tokenizer`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from llama4_jax.data.hf_tokenizer import HFTokenizer
from llama4_jax.data.llama4_tiktoken import Llama4Tokenizer

LLAMA4 = "llama4"  # `load_tokenizer` spec for Meta's tiktoken tokenizer shipped in `llama_models`


@runtime_checkable
class Tokenizer(Protocol):
  """What the model, the data pipeline and generation need from a tokenizer."""

  vocab_size: int
  bos_id: int | None
  eos_ids: tuple[int, ...]  # any of these ends a generation
  pad_id: int | None

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Ids of `text`; special-token strings inside `text` are encoded as plain text."""
    ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def token_id(self, special: str) -> int:
    """Id of a special token such as "<|header_start|>"; ValueError naming it if unknown."""
    ...


def load_tokenizer(spec: str | Path) -> Tokenizer:
  """Loads a tokenizer offline.

  `spec` is "llama4" (Meta's Llama 4 tiktoken BPE from the `llama_models` package), a
  `tokenizer.json` (HF `tokenizers` format, e.g. one written by `train_bpe`), a tiktoken
  `tokenizer.model` (Meta's format), or a directory holding one of those two.
  """
  if str(spec) == LLAMA4:
    return Llama4Tokenizer()
  path = Path(spec)
  if path.is_dir():
    for name in ("tokenizer.json", "tokenizer.model"):
      if (path / name).is_file():
        return load_tokenizer(path / name)
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such tokenizer file (or pass {LLAMA4!r})")
  if path.suffix == ".json":
    return HFTokenizer.from_file(path)
  if path.suffix == ".model":
    return Llama4Tokenizer(path)
  raise ValueError(f"{path}: unknown tokenizer format (expected a .json or a tiktoken .model file)")
