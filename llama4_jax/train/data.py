"""Training data of an experiment: the tokenizer, tokenised train/validation examples, the batch iterators.

Sources (`DataConfig.source`): "shakespeare" (the complete works; validation = the held-out works of
`llama4_jax.data.shakespeare`), "text", "jsonl", "chat" (loss on assistant replies only). Without
`val_paths`, every 20th document of the train files is held out for validation.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from llama4_jax.data import hf_tokenizer, pipeline, shakespeare, sources
from llama4_jax.data.tokenizers import Tokenizer, load_tokenizer
from llama4_jax.train.config import DataConfig

HOLD_OUT_EVERY = 20  # without val_paths: documents i with i % 20 == 19 are the validation split


@dataclasses.dataclass
class Corpus:
  tokenizer: Tokenizer
  train: list[dict]  # examples {"tokens", "loss_mask"}
  val: list[dict]
  unigram_baseline: float | None  # validation CE (nats/token) under the train unigram distribution
  description: str


def _split(docs: list) -> tuple[list, list]:
  train = [d for i, d in enumerate(docs) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
  val = [d for i, d in enumerate(docs) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
  if not train or not val:
    raise ValueError(f"{len(docs)} documents: too few to hold out a validation split; give data.val_paths")
  return train, val


def _read(cfg: DataConfig, paths) -> list:
  if cfg.source == "text":
    return sources.read_text_documents(paths)
  if cfg.source == "jsonl":
    return [t for p in paths for t in sources.read_jsonl_texts(p, cfg.text_field)]
  if cfg.source == "chat":
    return [c for p in paths for c in sources.read_chat_jsonl(p)]
  raise ValueError(f"unknown data.source {cfg.source!r}: expected shakespeare, text, jsonl or chat")


def _documents(cfg: DataConfig) -> tuple[list, list, str]:
  """(train documents, validation documents, description); documents are strings, or message lists for chat."""
  if cfg.source == "shakespeare":
    train, val = shakespeare.split_works(shakespeare.load_works(cfg.root))
    return [w.text for w in train], [w.text for w in val], (
        f"Shakespeare: {len(train)} train works, validation {', '.join(w.key for w in val)}")
  if not cfg.train_paths:
    raise ValueError(f"data.source={cfg.source!r} needs data.train_paths")
  docs = _read(cfg, cfg.train_paths)
  train, val = (docs, _read(cfg, cfg.val_paths)) if cfg.val_paths else _split(docs)
  return train, val, f"{cfg.source}: {len(train)} train / {len(val)} validation documents"


def _tokenizer(cfg: DataConfig, train_docs: list, run_dir: str | None) -> Tokenizer:
  if cfg.tokenizer != "bpe":
    return load_tokenizer(cfg.tokenizer)
  path = os.path.join(run_dir, "tokenizer.json") if run_dir else None
  if path and os.path.exists(path):  # a resumed run keeps its tokenizer
    return load_tokenizer(path)
  texts = train_docs if cfg.source != "chat" else [m.content for c in train_docs for m in c]
  return hf_tokenizer.train_bpe(texts, cfg.bpe_vocab, path)


def unigram_baseline(train: list[dict], val: list[dict], vocab_size: int) -> float:
  """Cross-entropy of the validation targets under the add-one-smoothed train unigram distribution (the
  quantity of `llama4_jax.data.shakespeare.unigram_baseline`, from the tokenised examples)."""
  counts = np.bincount(_targets(train), minlength=vocab_size)
  probs = (counts + 1.0) / (counts.sum() + vocab_size)
  return float(-np.log(probs[_targets(val)]).mean())


def _targets(examples: list[dict]) -> np.ndarray:
  return np.concatenate([e["tokens"][e["loss_mask"] != 0] for e in examples])


def load_corpus(cfg: DataConfig, run_dir: str | None = None) -> Corpus:
  """Reads and tokenises the train and validation splits (training the BPE first if asked: its
  `tokenizer.json` goes to `run_dir`)."""
  train_docs, val_docs, description = _documents(cfg)
  tok = _tokenizer(cfg, train_docs, run_dir)
  if cfg.source == "chat":
    train, val = pipeline.tokenize_chats(train_docs, tok), pipeline.tokenize_chats(val_docs, tok)
    baseline = None
  else:
    train, val = pipeline.tokenize_texts(train_docs, tok), pipeline.tokenize_texts(val_docs, tok)
    baseline = unigram_baseline(train, val, tok.vocab_size)
  return Corpus(tok, train, val, baseline, description)


def train_iterator(corpus: Corpus, cfg: DataConfig):
  """This process's endless, checkpointable iterator of packed batches (`get_state` / `set_state`).
  Each process reads every process_count-th example and yields its batch_size / process_count rows."""
  n, i = jax.process_count(), jax.process_index()
  if cfg.batch_size % n:
    raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by {n} processes")
  ds = pipeline.train_dataset(corpus.train[i::n], seq_len=cfg.seq_len, batch_size=cfg.batch_size // n,
                              seed=cfg.seed)
  return iter(ds)


def eval_batches(corpus: Corpus, cfg: DataConfig, limit: int = 0) -> list[dict]:
  """This process's validation batches in order (the last one padded with empty rows); `limit` > 0 keeps
  the first `limit`. Every process gets the same number of batches (padded with empty ones), since each
  evaluation step is a collective over all of them."""
  n, i = jax.process_count(), jax.process_index()
  ds = pipeline.eval_dataset(corpus.val[i::n], seq_len=cfg.seq_len, batch_size=cfg.batch_size // n)
  batches = []
  for batch in ds:
    if limit and len(batches) >= limit:
      break
    batches.append(batch)
  if n > 1:
    from jax.experimental import multihost_utils

    most = int(multihost_utils.process_allgather(np.array([len(batches)], np.int32)).max())
    shape = (cfg.batch_size // n, cfg.seq_len)
    empty = {k: np.zeros(shape, np.float32 if k == "loss_mask" else np.int32)
             for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    batches += [empty] * (most - len(batches))
  return batches
