"""Tokenizers in the HF `tokenizers` format (`tokenizer.json`), and byte-level BPE training.

`train_bpe` builds the small tokenizers of from-scratch experiments: byte-level BPE (every
string round-trips exactly) whose special tokens carry the Llama 4 names, so chat rendering
and generation treat it and the real Llama 4 tokenizer alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|finetune_right_pad|>"
# Special tokens of a trained BPE, ids 0..6 in this order.
BPE_SPECIAL_TOKENS = (BOS, EOS, PAD, "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>")
# Tokens that end a generation, when present in the vocabulary.
EOS_CANDIDATES = (EOS, "<|eom|>", "<|eot|>")


class HFTokenizer:
  """A `tokenizers.Tokenizer` behind the project's Tokenizer protocol.

  bos/pad/eos are found by their Llama 4 names; a vocabulary without them has
  `bos_id = pad_id = None` and empty `eos_ids`.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self._tok = tokenizer
    # Special-token strings inside user text are encoded as text, as in Llama4Tokenizer.
    self._tok.encode_special_tokens = True
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_id = tokenizer.token_to_id(BOS)
    self.pad_id = tokenizer.token_to_id(PAD)
    self.eos_ids = tuple(i for t in EOS_CANDIDATES if (i := tokenizer.token_to_id(t)) is not None)

  @classmethod
  def from_file(cls, path: str | Path) -> HFTokenizer:
    return cls(tokenizers.Tokenizer.from_file(str(path)))

  def save(self, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    self._tok.save(str(path))

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """`eos` appends `eos_ids[0]` (<|end_of_text|> when present)."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if bos:
      ids.insert(0, self._required(self.bos_id, BOS))
    if eos:
      ids.append(self._required(self.eos_ids[0] if self.eos_ids else None, EOS))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_id(self, special: str) -> int:
    return self._required(self._tok.token_to_id(special), special)

  def _required(self, token_id: int | None, token: str) -> int:
    if token_id is None:
      raise ValueError(f"{token!r} is not in this tokenizer's vocabulary")
    return token_id


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path | None = None) -> HFTokenizer:
  """Trains a byte-level BPE of `vocab_size` tokens (specials included); saves it to `path`."""
  if vocab_size < 256 + len(BPE_SPECIAL_TOKENS):
    raise ValueError(f"vocab_size={vocab_size} is below the 256 bytes + {len(BPE_SPECIAL_TOKENS)} specials")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(BPE_SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  result = HFTokenizer(tok)
  if path is not None:
    result.save(path)
  return result


def train_bpe_files(files: Sequence[str | Path], vocab_size: int, path: str | Path | None = None) -> HFTokenizer:
  """`train_bpe` on the contents of text files (UTF-8), one document per file."""
  return train_bpe((Path(f).read_text(encoding="utf-8") for f in files), vocab_size, path)
