"""Evaluation of a language model: perplexity and bits per byte of text, multiple-choice scoring, samples.

Perplexity / bits per byte. Each document is scored as `bos + text` (bos when the tokenizer has one): every
text token is a prediction, the bos never is, no eos is added, so the scored text is exactly the document.
Documents are cut into pieces of `seq_len` predictions (`data.pipeline.shifted_pieces`: each piece restarts
its context, as non-overlapping windows do) and packed into rows (`pipeline.eval_dataset`).
  perplexity     exp(total nats / scored tokens)
  bits per byte  total nats / (ln 2 * UTF-8 bytes of the scored documents): independent of the tokenizer.

Multiple choice, as lm-evaluation-harness scores `multiple_choice` tasks: the request of choice c is
(context, delimiter + c); trailing whitespace of the context moves to the continuation; the continuation
tokens are those of encode(context + continuation) after the tokens of encode(context); its score is the sum
of their log-probabilities given everything before (bos prepended, as the harness does with
add_bos_token=True). Metrics: `acc` (argmax of the sums), `acc_norm` (sums divided by the choice's length in
characters, the harness's acc_norm) and `acc_bytes` (divided by its UTF-8 byte length).

Models come from `llama4_jax.load` (any checkpoint directory).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax.data.pipeline import eval_dataset
from llama4_jax.data.tokenizers import Tokenizer

LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------
# Perplexity and bits per byte


@dataclasses.dataclass
class LMResult:
  """Totals of a scoring pass; derived metrics as properties."""

  nll: float  # total nats of the scored tokens
  tokens: int  # scored tokens
  bytes: int  # UTF-8 bytes of the scored documents
  documents: int
  seconds: float  # wall time of the timed scoring (compilation excluded)
  timed_tokens: int  # tokens scored in `seconds` (padding rows excluded)

  @property
  def nats_per_token(self) -> float:
    return self.nll / self.tokens

  @property
  def perplexity(self) -> float:
    return math.exp(self.nats_per_token)

  @property
  def bits_per_token(self) -> float:
    return self.nats_per_token / LN2

  @property
  def bits_per_byte(self) -> float:
    return self.nll / (LN2 * self.bytes)

  @property
  def tokens_per_s(self) -> float:
    return self.timed_tokens / self.seconds if self.seconds > 0 else float("nan")

  def as_dict(self) -> dict:
    return {"perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte, "bits_per_token": self.bits_per_token,
            "nats_per_token": self.nats_per_token, "nll_nats": self.nll, "tokens": self.tokens, "bytes": self.bytes,
            "documents": self.documents, "tokens_per_s": self.tokens_per_s, "seconds": self.seconds}


def text_examples(texts: Sequence[str], tokenizer: Tokenizer) -> list[dict[str, np.ndarray]]:
  """`{"tokens", "loss_mask"}` per document: bos (if any) + the text, every text token scored."""
  out = []
  for t in texts:
    ids = tokenizer.encode(t, bos=tokenizer.bos_id is not None)
    mask = np.ones(len(ids), np.int32)
    mask[0] = 0
    out.append({"tokens": np.asarray(ids, np.int32), "loss_mask": mask})
  return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _batch_nll(graphdef, state, batch):
  """Summed nats and count of the masked targets of one packed batch."""
  model = nnx.merge(graphdef, state)
  logits = model.forward(batch["inputs"], position_ids=batch["positions"], segment_ids=batch["segment_ids"]).logits
  target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  nll = (jax.nn.logsumexp(logits, axis=-1) - target) * batch["loss_mask"]
  return nll.sum(), batch["loss_mask"].sum()


def evaluate_lm(model, tokenizer: Tokenizer, texts: Sequence[str], *, seq_len: int = 256,
                batch_size: int = 8) -> LMResult:
  """Perplexity and bits per byte of `texts` (see the module docstring)."""
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError("no text to evaluate")
  examples = text_examples(texts, tokenizer)
  batches = [{k: jnp.asarray(v) for k, v in b.items() if k in ("inputs", "targets", "positions", "segment_ids",
                                                                  "loss_mask")}
             for b in eval_dataset(examples, seq_len=seq_len, batch_size=batch_size)]
  graphdef, state = nnx.split(model)
  run = functools.partial(_batch_nll, graphdef, state)
  first = run(batches[0])  # compiles
  jax.block_until_ready(first)
  results = [first]
  t0 = time.perf_counter()
  timed = batches[1:] or batches[:1]
  timed_results = [run(b) for b in timed]
  jax.block_until_ready(timed_results)
  seconds = time.perf_counter() - t0
  results += timed_results if len(batches) > 1 else []
  nll = float(sum(float(r[0]) for r in results))
  tokens = int(round(sum(float(r[1]) for r in results)))
  timed_tokens = int(round(sum(float(r[1]) for r in timed_results)))
  want = sum(int(e["loss_mask"].sum()) for e in examples)
  if tokens != want:
    raise AssertionError(f"scored {tokens} tokens, the documents have {want}")
  nbytes = sum(len(t.encode("utf-8")) for t in texts)
  return LMResult(nll, tokens, nbytes, len(texts), seconds, timed_tokens)


# --------------------------------------------------------------------------------------------------
# Log-likelihood of continuations, multiple choice


@dataclasses.dataclass(frozen=True)
class MCItem:
  context: str
  choices: tuple[str, ...]
  answer: int  # index of the correct choice


def read_mc_jsonl(path: str | os.PathLike) -> list[MCItem]:
  """Lines `{"context": str, "choices": [str, ...], "answer": int}` (answer may also be the choice text)."""
  items = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
        choices = tuple(r["choices"])
        ans = r["answer"]
        ans = choices.index(ans) if isinstance(ans, str) else int(ans)
        if not (isinstance(r["context"], str) and choices and all(isinstance(c, str) for c in choices)):
          raise ValueError("context must be a string and choices a non-empty list of strings")
        if not 0 <= ans < len(choices):
          raise ValueError(f"answer {ans} out of range for {len(choices)} choices")
      except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}:{n}: not a multiple-choice item ({type(e).__name__}: {e})") from None
      items.append(MCItem(r["context"], choices, ans))
  return items


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """lm-eval's split: trailing spaces of the context join the continuation; the continuation tokens are
  those of the whole string after the context's tokens. The context gets bos (if the tokenizer has one)."""
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  bos = tokenizer.bos_id is not None
  whole = tokenizer.encode(context + continuation, bos=bos)
  ctx = tokenizer.encode(context, bos=bos)
  return whole[:len(ctx)], whole[len(ctx):]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_logprobs(graphdef, state, ids):
  """log p(ids[:, t+1] | ids[:, :t+1]) and whether it is the argmax, [B, W-1] each (right padding is
  never seen by real tokens under the causal mask)."""
  logits = nnx.merge(graphdef, state)(ids[:, :-1])
  logp = jax.nn.log_softmax(logits, axis=-1)
  tgt = ids[:, 1:]
  return jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0], jnp.argmax(logits, -1) == tgt


def loglikelihoods(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 16,
                   max_length: int | None = None) -> list[tuple[float, bool]]:
  """(sum of the continuation's log-probs, whether greedy decoding would produce it) per (context ids,
  continuation ids) request. Longer than `max_length` + 1 tokens: the oldest context tokens are dropped."""
  rows = []
  for ctx, cont in requests:
    if not cont:
      raise ValueError("empty continuation")
    if not ctx:
      raise ValueError("empty context: the first continuation token needs something before it (bos)")
    seq = list(ctx) + list(cont)
    if max_length is not None:
      seq = seq[-(max_length + 1):]
    rows.append((seq, len(cont)))
  graphdef, state = nnx.split(model)
  out: list[tuple[float, bool] | None] = [None] * len(rows)
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths batch together
  for s in range(0, len(order), batch_size):
    idx = order[s:s + batch_size]
    width = max(16, 1 << (max(len(rows[i][0]) for i in idx) - 1).bit_length())  # few distinct shapes
    ids = np.zeros((batch_size, width), np.int32)
    for r, i in enumerate(idx):
      ids[r, :len(rows[i][0])] = rows[i][0]
    lp, greedy = jax.device_get(_token_logprobs(graphdef, state, jnp.asarray(ids)))
    for r, i in enumerate(idx):
      seq, n = rows[i]
      span = slice(len(seq) - 1 - n, len(seq) - 1)
      out[i] = (float(lp[r, span].sum()), bool(greedy[r, span].all()))
  return out  # type: ignore[return-value]


@dataclasses.dataclass
class MCResult:
  acc: float
  acc_norm: float  # per character
  acc_bytes: float  # per UTF-8 byte
  items: int
  scores: list[list[float]]  # per item, per choice: summed log-prob
  seconds: float

  def as_dict(self, with_scores: bool = False) -> dict:
    d = {"acc": self.acc, "acc_norm": self.acc_norm, "acc_bytes": self.acc_bytes, "items": self.items,
         "seconds": self.seconds}
    if with_scores:
      d["scores"] = self.scores
    return d


def score_multiple_choice(model, tokenizer: Tokenizer, items: Sequence[MCItem], *, delimiter: str = " ",
                          batch_size: int = 16, max_length: int | None = None) -> MCResult:
  """Accuracy variants of `items` (see the module docstring); `delimiter` precedes every choice (the
  harness's target_delimiter)."""
  t0 = time.perf_counter()
  reqs, owner = [], []
  for k, it in enumerate(items):
    for c in it.choices:
      reqs.append(encode_pair(tokenizer, it.context, delimiter + c))
      owner.append(k)
  lls = loglikelihoods(model, reqs, batch_size=batch_size, max_length=max_length)
  scores: list[list[float]] = [[] for _ in items]
  for k, (ll, _) in zip(owner, lls):
    scores[k].append(ll)
  acc = norm = byt = 0
  for it, sc in zip(items, scores):
    sc = np.asarray(sc)
    acc += int(np.argmax(sc) == it.answer)
    norm += int(np.argmax(sc / np.array([len(c) for c in it.choices], float)) == it.answer)
    byt += int(np.argmax(sc / np.array([len(c.encode("utf-8")) for c in it.choices], float)) == it.answer)
  n = len(items)
  return MCResult(acc / n, norm / n, byt / n, n, scores, time.perf_counter() - t0)
