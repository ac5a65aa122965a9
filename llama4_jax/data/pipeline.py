"""Token examples -> packed, shuffled, checkpointable grain datasets of fixed-shape batches.

Steps:
  1. A document becomes an *example* `{"tokens", "loss_mask"}` (int32, same length), where
     `loss_mask[i] = 1` if token i is trained as a prediction (`text_example`, `chat.render_chat`).
  2. Next-token pairs are formed inside each document, then cut into pieces of at most `seq_len`
     (`shifted_pieces`). Since targets are shifted before packing, the target of a document's
     last input is that document's own last token: no target ever belongs to another document,
     so no cross-document target needs masking. A document longer than `seq_len` continues in
     later pieces, each restarting positions at 0 (a long conversation loses earlier context).
  3. Pieces are shuffled (a fresh order every epoch), first-fit packed into rows of `seq_len`
     (`grain.experimental.FirstFitPackIterDataset`: a piece is never split, rows are padded), and
     batched.

A batch is a dict of numpy arrays, each `[batch, seq_len]`:
  inputs, targets    int32  token ids (0 on padding)
  segment_ids        int32  1, 2, 3... per piece within the row, 0 on padding
  positions          int32  position inside the piece, restarting at 0 for every piece
  loss_mask          float32  1 where `targets` is trained: not padding, and (SFT) assistant tokens

Iterate with `it = iter(dataset)`; `it.get_state()` / `it.set_state(state)` checkpoint it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import grain
import numpy as np

from llama4_jax.data.chat import render_chat
from llama4_jax.data.sources import Message
from llama4_jax.data.tokenizers import Tokenizer

_PACKED = ("inputs", "targets", "loss_mask")
_MIN_BINS = 32  # default packing bins: enough to fill rows well with short (SFT) pieces


def text_example(text: str, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
  """A pretraining document: bos + text + eos (when the tokenizer has them), every token trained."""
  tokens = tokenizer.encode(text, bos=tokenizer.bos_id is not None, eos=bool(tokenizer.eos_ids))
  mask = np.ones(len(tokens), np.int32)
  mask[:1] = 0  # the first token is never predicted
  return {"tokens": np.asarray(tokens, np.int32), "loss_mask": mask}


def tokenize_texts(texts: Iterable[str], tokenizer: Tokenizer) -> list[dict[str, np.ndarray]]:
  return [text_example(t, tokenizer) for t in texts]


def tokenize_chats(conversations: Iterable[Sequence[Message]], tokenizer: Tokenizer) -> list[dict[str, np.ndarray]]:
  return [render_chat(c, tokenizer) for c in conversations]


def shifted_pieces(examples: Iterable[dict[str, np.ndarray]], seq_len: int) -> list[dict[str, np.ndarray]]:
  """`{"inputs", "targets", "loss_mask"}` pieces of <= seq_len next-token pairs, in document order.

  A document of n tokens gives n - 1 pairs, each target appearing in exactly one piece. Pieces
  with nothing to train on (e.g. only a user turn) are dropped.
  """
  pieces = []
  for ex in examples:
    tokens, mask = ex["tokens"], ex["loss_mask"]
    for start in range(0, len(tokens) - 1, seq_len):
      stop = min(start + seq_len, len(tokens) - 1)
      piece = {
          "inputs": tokens[start:stop],
          "targets": tokens[start + 1 : stop + 1],
          "loss_mask": mask[start + 1 : stop + 1],
      }
      if piece["loss_mask"].any():
        pieces.append(piece)
  return pieces


def _batch_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames the packer's output into the batch format of the module docstring."""
  segment_ids = packed["inputs_segment_ids"]
  return {
      "inputs": packed["inputs"],
      "targets": packed["targets"],
      "segment_ids": segment_ids,
      "positions": packed["inputs_positions"],
      "loss_mask": ((packed["loss_mask"] != 0) & (segment_ids > 0)).astype(np.float32),
  }


def _packed(ds: grain.IterDataset, seq_len: int, num_bins: int, seed: int, shuffle_bins: bool) -> grain.IterDataset:
  packed = grain.experimental.FirstFitPackIterDataset(
      ds,
      length_struct={k: seq_len for k in _PACKED},
      num_packing_bins=num_bins,
      seed=seed,
      shuffle_bins=shuffle_bins,
  )
  return packed.map(_batch_row)


def train_dataset(
    examples: Sequence[dict[str, np.ndarray]],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    num_packing_bins: int | None = None,
    num_workers: int = 0,
) -> grain.IterDataset:
  """Shuffled, packed full batches; endless unless `num_epochs` is given. Deterministic in `seed`.

  `num_workers > 0` packs in worker processes, each over its own slice of the pieces (so the
  batches differ from the 0-worker ones); callers then need a `__main__` guard and
  `absl.flags.FLAGS.mark_as_parsed()`. On a 2-core machine, keep 0.
  """
  pieces = shifted_pieces(examples, seq_len)
  if not pieces:
    raise ValueError("no trainable tokens in the examples")
  ds = grain.MapDataset.source(pieces).shuffle(seed=seed).repeat(num_epochs).to_iter_dataset()
  ds = _packed(ds, seq_len, num_packing_bins or max(batch_size, _MIN_BINS), seed, shuffle_bins=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def eval_dataset(
    examples: Sequence[dict[str, np.ndarray]],
    *,
    seq_len: int,
    batch_size: int,
    num_packing_bins: int | None = None,
) -> grain.IterDataset:
  """One pass over every trainable token, in order; the last batch is padded with empty rows."""
  pieces = shifted_pieces(examples, seq_len)
  if not pieces:
    raise ValueError("no trainable tokens in the examples")
  ds = grain.MapDataset.source(pieces).to_iter_dataset()
  ds = _packed(ds, seq_len, num_packing_bins or max(batch_size, _MIN_BINS), seed=0, shuffle_bins=False)
  pad_batch = functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size)
  return ds.batch(batch_size, batch_fn=pad_batch)
