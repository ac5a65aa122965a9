"""Evaluation: perplexity / bits per byte against an independent computation, multiple-choice scoring with
answers known by construction, checkpoint loading and the `make eval` CLI."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama4_jax import CheckpointError, load
from llama4_jax import config as C
from llama4_jax.apps import evaluate as E
from llama4_jax.model import llama4

CFG = dataclasses.replace(C.TINY_SCOUT, vision=None)
V = CFG.text.vocab_size


class ByteTokenizer:
  """One token per UTF-8 byte (id = byte + 3); bos 1, eos 2, pad 0."""

  vocab_size = 259
  bos_id = 1
  eos_ids = (2,)
  pad_id = 0

  def encode(self, text, *, bos=False, eos=False):
    return [1] * bos + [b + 3 for b in text.encode("utf-8")] + [2] * eos

  def decode(self, ids):
    return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

  def token_id(self, special):
    raise ValueError(f"no special token {special!r}")


TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
  """A random tiny model with O(1) weights (norms 1, matrices N(0, 1/fan-in)), drawn on the host: no
  compiled init."""
  graphdef, state = nnx.split(llama4.abstract(CFG, C.FP32))
  rs = np.random.RandomState(0)

  def draw(x):
    if x.ndim < 2:
      return jnp.ones(x.shape, x.dtype)
    fan_in = x.shape[-2] if x.ndim == 2 else int(np.prod(x.shape[1:-1]))
    return jnp.asarray(rs.normal(0, 1 / math.sqrt(fan_in), x.shape), x.dtype)

  return nnx.merge(graphdef, jax.tree.map(draw, state))


@pytest.fixture(scope="module")
def uniform(model):
  """The same model with a zero final-norm weight: every logit is 0, every token has log-prob -ln V."""
  g, s = nnx.split(model)
  m = nnx.merge(g, jax.tree.map(lambda x: x, s))
  m.text.norm.weight[...] = jnp.zeros_like(m.text.norm.weight[...])
  return m


@pytest.fixture(scope="module")
def plain_forward():
  """Right-padded single rows of width 32 (causal: real tokens never see the padding): one compilation."""
  f = nnx.jit(lambda m, ids: m(ids))

  def logp(model, ids):
    x = np.zeros((1, 32), np.int32)
    x[0, :len(ids)] = ids
    return np.asarray(jax.nn.log_softmax(f(model, jnp.asarray(x))[0, :len(ids)], axis=-1), np.float64)
  return logp


TEXTS = ["To be, or not to be", "Fair is foul, and foul is fair: hover through the fog and filthy air.",
         "Élan — naïve café", "x" * 40 + "\nEnd."]


def test_perplexity_equals_independent_forward(model, plain_forward):
  """exp(mean NLL) over every text token, computed window by window with a plain forward, matches; documents
  longer than the window (32 predictions) restart their context like the packed pipeline does."""
  seq = 32
  got = E.evaluate_lm(model, TOK, TEXTS, seq_len=seq, batch_size=4)
  total, count = 0.0, 0
  for t in TEXTS:
    ids = TOK.encode(t, bos=True)
    for start in range(0, len(ids) - 1, seq):
      stop = min(start + seq, len(ids) - 1)
      lp = plain_forward(model, ids[start:stop])
      total -= sum(lp[i, ids[start + i + 1]] for i in range(stop - start))
      count += stop - start
  nbytes = sum(len(t.encode()) for t in TEXTS)
  assert got.tokens == count == nbytes  # byte tokenizer: one token per byte, bos never scored
  assert got.bytes == nbytes and got.documents == len(TEXTS)
  np.testing.assert_allclose(got.nll, total, rtol=1e-5)
  np.testing.assert_allclose(got.perplexity, math.exp(total / count), rtol=1e-5)
  np.testing.assert_allclose(got.bits_per_byte, total / (math.log(2) * nbytes), rtol=1e-5)
  assert got.tokens_per_s > 0
  assert abs(got.perplexity - V) > 1  # a random model, not a uniform one


def test_bits_per_byte_of_a_uniform_model(uniform):
  """Uniform predictions over V tokens: perplexity V, log2(V) bits per token, and bits per byte scaled by
  tokens/bytes (here a 2-byte-per-token tokenizer: half)."""

  class PairTokenizer(ByteTokenizer):
    def encode(self, text, *, bos=False, eos=False):
      b = text.encode("utf-8")
      return [1] * bos + [3 + (b[i] + 7 * b[i + 1]) % 250 for i in range(0, len(b) - 1, 2)]

  texts = ["abcdefgh" * 5, "0123456789"]
  r = E.evaluate_lm(uniform, PairTokenizer(), texts, seq_len=32, batch_size=4)
  assert r.tokens == 25 and r.bytes == 50
  np.testing.assert_allclose(r.perplexity, V, rtol=1e-5)
  np.testing.assert_allclose(r.bits_per_token, math.log2(V), rtol=1e-5)
  np.testing.assert_allclose(r.bits_per_byte, math.log2(V) * 25 / 50, rtol=1e-5)


def test_multiple_choice_normalisations_known_by_construction(uniform, tmp_path):
  """Under uniform predictions a continuation of n tokens scores exactly -n ln V, so the winner of each
  metric is known: raw sum -> the fewest tokens; per character -> most characters per token; per byte ->
  most bytes per token. Three items whose answers are those three winners give 1/3 for every metric, each
  from a different item."""
  choices = ["a", "bbbbb", "ééé"]  # tokens with the " " delimiter: 2, 6, 7; chars 1, 5, 3; bytes 1, 5, 6
  lines = [{"context": "Pick one:", "choices": choices, "answer": a} for a in (0, 1, 2)]
  path = tmp_path / "mc.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  items = E.read_mc_jsonl(path)
  r = E.score_multiple_choice(uniform, TOK, items, batch_size=4)
  lnv = math.log(V)
  for sc in r.scores:
    np.testing.assert_allclose(sc, [-2 * lnv, -6 * lnv, -7 * lnv], rtol=1e-5)
  assert (r.acc, r.acc_norm, r.acc_bytes) == (1 / 3, 1 / 3, 1 / 3)
  one = [E.MCItem("Pick one:", tuple(choices), a) for a in (0, 1, 2)]
  got = []
  for it in one:
    r = E.score_multiple_choice(uniform, TOK, [it], batch_size=4)
    got.append([r.acc, r.acc_norm, r.acc_bytes])
  assert got == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_loglikelihood_forced_continuation_and_independent_sums(model, plain_forward):
  """The model's own greedy continuation of a context is the answer by construction: it is greedy, and it
  outscores continuations of the same length drawn at random. Every sum equals the plain-forward one."""
  ctx = TOK.encode("Once upon a time", bos=True)
  ids, greedy = list(ctx), []
  for _ in range(6):
    nxt = int(np.argmax(plain_forward(model, ids)[-1]))
    ids.append(nxt)
    greedy.append(nxt)
  rs = np.random.RandomState(0)
  distractors = [list(rs.randint(3, 259, 6)) for _ in range(5)]
  reqs = [(ctx, greedy)] + [(ctx, d) for d in distractors] + [(ctx[:3], greedy[:2]), (ctx, distractors[0][:1])]
  out = E.loglikelihoods(model, reqs, batch_size=4)
  assert out[0][1] and not any(g for _, g in out[1:6])
  assert out[0][0] > max(ll for ll, _ in out[1:6])
  for (c, k), (ll, _) in zip(reqs, out):
    lp = plain_forward(model, list(c) + list(k))
    want = sum(lp[len(c) - 1 + i, k[i]] for i in range(len(k)))
    np.testing.assert_allclose(ll, want, rtol=1e-5, atol=1e-5)


def test_encode_pair_moves_trailing_space():
  ctx, cont = E.encode_pair(TOK, "Answer: ", "yes")
  assert ctx == TOK.encode("Answer:", bos=True) and cont == TOK.encode(" yes")


def test_read_mc_jsonl_errors(tmp_path):
  p = tmp_path / "bad.jsonl"
  p.write_text('{"context": "a", "choices": ["x", "y"], "answer": 5}\n')
  with pytest.raises(ValueError, match="bad.jsonl:1"):
    E.read_mc_jsonl(p)
  p.write_text('{"context": "a", "choices": ["x", "y"], "answer": "y"}\n')
  assert E.read_mc_jsonl(p)[0].answer == 1


@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):
  """A training run as `make train` leaves it: checkpoints/<step>/{params, meta{"config"}} + tokenizer.json."""
  from llama4_jax.data.hf_tokenizer import train_bpe
  from llama4_jax.io.checkpointer import Checkpointer

  d = tmp_path_factory.mktemp("run")
  train_bpe(TEXTS * 3, 300, d / "tokenizer.json")
  with Checkpointer(d / "checkpoints", async_save=False) as ck:
    ck.save(7, nnx.state(model, nnx.Param), meta={"config": C.to_hf(CFG)})
  return d


def test_load_training_run_and_converted_model(model, run_dir, tmp_path, plain_forward):
  from llama4_jax.io.model_dir import save_params

  ids = list(np.random.RandomState(0).randint(0, V, 12))
  want = plain_forward(model, ids)
  for path, kind in ((run_dir, "run"), (run_dir / "checkpoints", "run"), (run_dir / "checkpoints" / "7", "step")):
    loaded = load(str(path))
    np.testing.assert_array_equal(plain_forward(loaded.model, ids), want)
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size <= 300
    assert "step 7" in loaded.description and loaded.source.kind == kind
    assert loaded.source.run_dir == str(run_dir) and loaded.source.step == 7
  save_params(tmp_path / "converted", nnx.state(model, nnx.Param), CFG)
  loaded = load(str(tmp_path / "converted"), tokenizer=str(run_dir / "tokenizer.json"))
  assert loaded.source.kind == "model"
  np.testing.assert_array_equal(plain_forward(loaded.model, ids), want)
  with pytest.raises(CheckpointError, match="not a HF directory"):
    load(tmp_path)


def test_eval_cli(run_dir, tmp_path, capsys):
  """`python -m experiments.evaluate --checkpoint RUN --data FILE --mc FILE`: table printed, JSON written,
  the numbers those of the library."""
  from experiments import evaluate as cli

  data = tmp_path / "doc.txt"
  data.write_text("\n".join(TEXTS) + "\n")
  mc = tmp_path / "mc.jsonl"
  mc.write_text(json.dumps({"context": "To be, or not to", "choices": ["be", "sea"], "answer": 0}) + "\n")
  out = tmp_path / "res.json"
  rc = cli.main(["--checkpoint", str(run_dir), "--data", str(data), "--mc", str(mc), "--seq-len", "32",
                 "--batch-size", "4", "--samples", "1", "--sample-tokens", "8", "--out", str(out)])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "perplexity" in printed and "bits per byte" in printed and "mc acc" in printed
  res = json.loads(out.read_text())
  loaded = load(str(run_dir))
  ref = E.evaluate_lm(loaded.model, loaded.tokenizer, ["\n".join(TEXTS) + "\n"], seq_len=32, batch_size=4)
  np.testing.assert_allclose(res["lm"]["perplexity"], ref.perplexity, rtol=1e-6)
  np.testing.assert_allclose(res["lm"]["bits_per_byte"], ref.bits_per_byte, rtol=1e-6)
  assert res["mc"]["items"] == 1 and len(res["samples"]) == 1 and "step 7" in res["model"]
