"""Logit distillation: the masked KL against a manual reference, top-k (k = V) == online on a tiny model,
alpha schedules, the teacher frozen, a vocabulary mismatch refused before anything is written, a short
distillation run that logs KL / CE / alpha.

Tiny Scout-like students and teachers of different depth and expert count on a synthetic corpus.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from llama4_jax import config as C
from llama4_jax.io.model_dir import save_params
from llama4_jax.model import llama4
from llama4_jax.train import config as tc
from llama4_jax.train import data as train_data
from llama4_jax.train import distill, loop, optim
from llama4_jax.train.losses import chunked_distill_sums, distill_sums
from llama4_jax.train.metrics import read_jsonl
from llama4_jax.train.state import ModelParts, TrainState
from sharding.mesh import MeshConfig

WORDS = ("the king queen lord lady love death night day sword crown blood heart speak hear good sweet fair "
         "what thou thee thy my mine shall will not no yes come go away here there now then").split()
VOCAB = 320


def _text(layers=4, experts=4):
  return dataclasses.replace(C.TINY_SCOUT.text, vocab_size=VOCAB, num_hidden_layers=layers, num_local_experts=experts)


def _model_cfg(layers=4, experts=4, vocab=VOCAB):
  return C.Llama4Config(text=dataclasses.replace(_text(layers, experts), vocab_size=vocab), vision=None,
                        dtype="float32")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  d = tmp_path_factory.mktemp("distill")
  rng = np.random.default_rng(0)
  for split, n in (("train", 40), ("val", 4)):
    with open(d / f"{split}.jsonl", "w") as f:
      for _ in range(n):
        f.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=int(rng.integers(60, 160)))) + "."}) + "\n")
  return d


def _exp(workdir, teacher="", **distill_kw) -> tc.Experiment:
  d = str(workdir)
  return tc.Experiment(
      name="student", model=_model_cfg(2, 2), policy=C.Policy(matmul_precision="highest"),
      mesh=MeshConfig(fsdp=-1), rules="fsdp", optim=tc.OptimConfig(lr=3e-3, warmup_steps=2),
      data=tc.DataConfig(source="jsonl", train_paths=(d + "/train.jsonl",), val_paths=(d + "/val.jsonl",),
                         bpe_vocab=300, seq_len=32, batch_size=4),
      run=tc.RunConfig(steps=4, eval_every=0, eval_batches=1, ckpt_every=0, log_every=1, out_dir=d + "/runs",
                       peak_flops=1e11, sample_prompt=""),
      distill=tc.DistillConfig(teacher=teacher, **distill_kw))


@pytest.fixture(scope="module")
def teacher_dir(workdir):
  """A model directory holding a (random) teacher deeper than the student, with more experts."""
  cfg = _model_cfg(3, 4)
  model = llama4.init(cfg, C.Policy(matmul_precision="highest"), seed=7)
  params = ModelParts.split(model)[1]
  params["text"]["lm_head"] = params["text"]["lm_head"] * 30.0  # a peaked teacher: far from the student
  return save_params(str(workdir / "teacher"), params, cfg)


# --------------------------------------------------------------------------------------------------
# The loss


def _manual_kl(s, t, mask, T):
  ls = jax.nn.log_softmax(s / T, -1)
  lt = jax.nn.log_softmax(t / T, -1)
  return float(np.sum(np.sum(np.exp(lt) * (lt - ls), -1) * mask))


def test_kl_matches_a_manual_reference_and_ignores_masked_positions():
  rng = np.random.default_rng(0)
  s, t = (jnp.asarray(rng.standard_normal((2, 6, 11)) * 3, jnp.float32) for _ in range(2))
  targets = jnp.asarray(rng.integers(0, 11, (2, 6)))
  mask = jnp.asarray(rng.random((2, 6)) > 0.4, jnp.float32)
  out = distill_sums(s, t, None, targets, mask, 2.0)
  np.testing.assert_allclose(float(out["kl"]), _manual_kl(s, t, mask, 2.0), rtol=1e-5)
  assert float(distill_sums(s, s, None, targets, mask, 2.0)["kl"]) == pytest.approx(0.0, abs=1e-5)
  # masked positions: any logits there change nothing
  m3 = jnp.asarray(mask)[..., None] > 0
  out2 = distill_sums(jnp.where(m3, s, 1e3), jnp.where(m3, t, -1e3), None, targets, mask, 2.0)
  assert float(out2["kl"]) == pytest.approx(float(out["kl"]), rel=1e-6)
  assert float(out2["ce"]) == pytest.approx(float(out["ce"]), rel=1e-6)


def test_top_k_with_k_equal_to_vocab_is_the_full_kl_and_smaller_k_differs():
  rng = np.random.default_rng(1)
  s, t = (jnp.asarray(rng.standard_normal((2, 5, 13)) * 2, jnp.float32) for _ in range(2))
  targets, mask = jnp.asarray(rng.integers(0, 13, (2, 5))), jnp.ones((2, 5), jnp.float32)
  full = distill_sums(s, t, None, targets, mask, 1.5)["kl"]
  vals, idx = jax.lax.top_k(t, 13)
  assert float(distill_sums(s, vals, idx, targets, mask, 1.5)["kl"]) == pytest.approx(float(full), rel=1e-5)
  vals4, idx4 = jax.lax.top_k(t, 4)
  assert abs(float(distill_sums(s, vals4, idx4, targets, mask, 1.5)["kl"]) - float(full)) > 1e-3


def test_chunked_sums_equal_one_piece():
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.standard_normal((2, 10, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((8, 17)), jnp.float32)
  th = jnp.asarray(rng.standard_normal((2, 10, 8)), jnp.float32)
  targets, mask = jnp.asarray(rng.integers(0, 17, (2, 10))), jnp.asarray(rng.random((2, 10)) > 0.3, jnp.float32)

  def logits(x):
    return x @ w

  def teacher(x):
    return x @ (2 * w), None

  one = chunked_distill_sums(logits, h, teacher, (th,), targets, mask, 0, 2.0)
  chunked = chunked_distill_sums(logits, h, teacher, (th,), targets, mask, 3, 2.0)
  for k in one:
    np.testing.assert_allclose(float(chunked[k]), float(one[k]), rtol=1e-5)


@pytest.mark.parametrize("schedule", distill.SCHEDULES)
def test_alpha_schedules(schedule):
  cfg = tc.DistillConfig(teacher="x", alpha=0.8, alpha_end=0.2, schedule=schedule)
  V = 100

  def a(step, ce_s=3.0, ce_t=2.0):
    return float(distill.alpha(cfg, jnp.asarray(step), jnp.asarray(11), jnp.asarray(ce_s), jnp.asarray(ce_t), V))

  if schedule == "constant":
    assert a(0) == a(10) == pytest.approx(0.8)
  elif schedule == "linear":
    assert (a(0), a(5), a(10)) == pytest.approx((0.8, 0.5, 0.2))
  elif schedule == "cosine":
    assert (a(0), a(5), a(10)) == pytest.approx((0.8, 0.5, 0.2))
    assert a(2) > 0.5 + (0.8 - 0.5) * 0.6  # slow start, unlike linear
  else:  # gap (ce_s - ce_t) / (ln V - ce_t): closed -> alpha_end, full -> alpha, independent of the step
    assert a(3, ce_s=2.0) == pytest.approx(0.2)
    assert a(3, ce_s=np.log(V)) == pytest.approx(0.8)
    half = 2.0 + 0.5 * (np.log(V) - 2.0)
    assert a(0, ce_s=half) == pytest.approx(0.5, rel=1e-5) == a(9, ce_s=half)


def test_bad_settings_name_the_value():
  with pytest.raises(ValueError, match="distill.schedule='linea'"):
    distill.validate(tc.DistillConfig(teacher="x", schedule="linea"))
  with pytest.raises(ValueError, match="distill.alpha=1.5"):
    distill.validate(tc.DistillConfig(teacher="x", alpha=1.5))


# --------------------------------------------------------------------------------------------------
# The step on tiny models


@pytest.fixture(scope="module")
def step_setup(workdir, teacher_dir):
  exp = _exp(workdir, teacher_dir, temperature=2.0, alpha=0.7)
  corpus = train_data.load_corpus(exp.data)
  mesh = sharding.make_mesh(MeshConfig(fsdp=-1), jax.devices()[:1])
  teacher = distill.load_teacher(exp.distill, exp.model, exp.policy, corpus.tokenizer, sharding.preset("fsdp"), mesh)
  model = llama4.init(exp.model, exp.policy, seed=0)
  parts, params, frozen, bias = ModelParts.split(model)
  tx = optim.make(exp.optim, parts.params)
  state = TrainState(step=jnp.zeros((), jnp.int32), total_steps=jnp.asarray(10, jnp.int32), params=params,
                     frozen=frozen, bias=bias, opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)))
  batch = {k: jnp.asarray(v) for k, v in next(train_data.train_iterator(corpus, exp.data)).items()}
  return dict(exp=exp, teacher=teacher, parts=parts, tx=tx, state=state, batch=batch)


def _terms(ss, dcfg, teacher_parts):
  """The distillation terms of the student's forward on the batch (jitted, no gradient: cheap to compile)."""
  terms = distill.make_terms_fn(ss["parts"], 1, dcfg, VOCAB, teacher_parts)
  st = ss["state"]

  def run(batch, *teacher_args):
    t = terms(st.params, st.frozen, st.bias, batch, st.step, st.total_steps, *teacher_args)
    n = t.tokens
    return {"objective": (t.ce_sum + t.extra["loss_sum"]) / n, **{k: v / n for k, v in t.extra.items()}}

  return jax.jit(run)


def test_online_teacher_and_top_k_with_k_vocab_give_the_same_loss(step_setup):
  """The teacher (3 layers, 4 experts) runs online in the student's forward (2 layers, 2 experts); its logits
  precomputed as top-k with k = V (the function `precompute_topk` runs) give the same objective and terms."""
  ss = step_setup
  dcfg = ss["exp"].distill
  on = _terms(ss, dcfg, ss["teacher"].parts)(ss["batch"], *ss["teacher"].args)
  vals, idx, nll = distill._topk_fn(ss["teacher"], VOCAB)(ss["teacher"].args, ss["batch"])
  topk = _terms(ss, dcfg, None)({**ss["batch"], "teacher_logits": vals, "teacher_idx": idx, "teacher_nll": nll})
  for key in ("objective", "kl", "ce", "teacher_ce", "alpha"):
    np.testing.assert_allclose(float(topk[key]), float(on[key]), rtol=2e-5, err_msg=key)
  assert float(on["kl"]) > 0.01 and float(on["alpha"]) == pytest.approx(0.7)
  T = dcfg.temperature
  assert float(on["objective"]) == pytest.approx(0.7 * T * T * float(on["kl"]) + 0.3 * float(on["ce"]), rel=1e-5)
  # a smaller k is a different (renormalised) target: the comparison bites
  v8, i8 = jax.lax.top_k(vals, 8)
  few = _terms(ss, dcfg, None)({**ss["batch"], "teacher_logits": v8, "teacher_idx": jnp.take_along_axis(idx, i8, -1),
                                "teacher_nll": nll})
  assert abs(float(few["kl"]) - float(on["kl"])) > 1e-3


def test_an_int8_teacher_gives_nearly_the_float_teachers_loss(step_setup):
  """`distill.teacher_quant="int8"`: the teacher's experts and MLPs held as int8 (quantised after loading);
  the objective and its terms stay within 1% of the float teacher's, and the int8 weights are really used."""
  ss = step_setup
  exp = ss["exp"]
  dcfg = dataclasses.replace(exp.distill, teacher_quant="int8")
  corpus = train_data.load_corpus(exp.data)
  mesh = sharding.make_mesh(MeshConfig(fsdp=-1), jax.devices()[:1])
  t8 = distill.load_teacher(dcfg, exp.model, exp.policy, corpus.tokenizer, sharding.preset("fsdp"), mesh)
  assert "quantised to int8" in t8.description
  assert {np.dtype(x.dtype) for x in jax.tree.leaves(t8.args)} >= {np.dtype(np.int8)}
  f32 = _terms(ss, exp.distill, ss["teacher"].parts)(ss["batch"], *ss["teacher"].args)
  q8 = _terms(ss, dcfg, t8.parts)(ss["batch"], *t8.args)
  for key in ("objective", "kl", "teacher_ce"):
    np.testing.assert_allclose(float(q8[key]), float(f32[key]), rtol=1e-2, err_msg=key)
  assert float(q8["teacher_ce"]) != float(f32["teacher_ce"])
  with pytest.raises(ValueError, match="distill.teacher_quant='int3'"):
    distill.validate(dataclasses.replace(dcfg, teacher_quant="int3"))


def test_precomputed_top_k_files_stream_and_check_alignment(workdir, teacher_dir):
  exp = _exp(workdir, teacher_dir, topk=VOCAB)
  out = distill.precompute_topk(exp, 3, str(workdir / "topk"), log=lambda *_: None, dtype="float32")
  reader = distill.TopkReader(out, exp, VOCAB)
  it = train_data.train_iterator(train_data.load_corpus(exp.data), exp.data)
  b0 = next(it)
  got = reader.batch(0, b0["inputs"])
  assert got["teacher_logits"].shape == (4, 32, VOCAB) and got["teacher_idx"].dtype == np.int32
  with pytest.raises(ValueError, match="batch 1 does not match"):
    reader.batch(1, b0["inputs"])
  with pytest.raises(ValueError, match="holds logits of 3 batches"):
    reader.batch(3, b0["inputs"])
  with pytest.raises(FileExistsError):
    distill.precompute_topk(exp, 3, out, log=lambda *_: None)


# --------------------------------------------------------------------------------------------------
# The run


def test_vocab_mismatch_is_refused_naming_both_sizes_and_nothing_is_written(workdir):
  cfg = _model_cfg(2, 2, vocab=384)
  bad = save_params(str(workdir / "teacher384"), ModelParts.split(llama4.init(cfg, C.FP32, seed=1))[1], cfg)
  exp = dataclasses.replace(_exp(workdir, bad), name="mismatch")
  run_dir = os.path.join(exp.run.out_dir, exp.name)
  with pytest.raises(ValueError, match="teacher vocabulary 384 != student vocabulary 320"):
    loop.run(exp, log=lambda *_: None)
  assert not os.path.exists(os.path.join(run_dir, "experiment.json"))
  assert not os.path.exists(os.path.join(run_dir, "checkpoints"))


@pytest.mark.slow  # about 80 s on a busy 2-core CPU (a whole run: setup, teacher load, compile, final evaluation)
def test_a_short_distillation_run_logs_kl_ce_and_alpha(workdir, teacher_dir):
  exp = dataclasses.replace(_exp(workdir, teacher_dir, schedule="linear", alpha=0.9, alpha_end=0.1), name="short")
  summary = loop.run(exp, log=lambda *_: None)
  assert np.isfinite(summary["val_loss"])
  recs = [r for r in read_jsonl(os.path.join(summary["run_dir"], "metrics.jsonl")) if r.get("split") == "train"]
  assert [r["step"] for r in recs] == [1, 2, 3, 4]
  alphas = [r["alpha"] for r in recs]
  assert alphas == pytest.approx([0.9, 0.9 - 0.8 / 3, 0.9 - 1.6 / 3, 0.1], rel=1e-5)
  assert all(r["kl"] > 0 and r["ce"] == pytest.approx(r["loss"]) for r in recs)
  assert os.path.isfile(os.path.join(summary["run_dir"], "distill.png"))
