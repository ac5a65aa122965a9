"""Training: a real step, packing isolation by gradient, SFT masking, router balancing, exact resume after
SIGKILL, 1 vs 8 devices under expert parallelism, NaN stop, config overrides.

Everything runs the tiny Scout-like text model (chunk 8, so the 32-token rows take the chunk-local
attention path) on a synthetic corpus written to a temporary directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.train import load_config
from llama4_jax import config as C
from llama4_jax.data import hf_tokenizer, pipeline
from llama4_jax.data.sources import Message
from llama4_jax.model import llama4
from llama4_jax.train import config as tc
from llama4_jax.train import data as train_data
from llama4_jax.train import loop, optim, router
from llama4_jax.train import step as step_lib
from llama4_jax.train.losses import cross_entropy_sum
from llama4_jax.train.metrics import read_jsonl
from llama4_jax.train.state import ModelParts, TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the king queen lord lady love death night day sword crown blood heart speak hear good sweet fair "
         "what thou thee thy my mine shall will not no yes come go away here there now then").split()

TINY_CONFIG = """
import dataclasses
from llama4_jax import config as C
from llama4_jax.train.config import DataConfig, Experiment, MoEConfig, OptimConfig, RunConfig
from sharding.mesh import MeshConfig

DATA, OUT = {data}, {out}

def get_config():
  text = dataclasses.replace(C.TINY_SCOUT.text, vocab_size=320)
  return Experiment(
      name="tiny", model=C.Llama4Config(text=text, vision=None, dtype="float32"),
      policy=C.Policy(matmul_precision="highest"), mesh=MeshConfig(fsdp=-1), rules="fsdp",
      optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1),
      moe=MoEConfig(aux_loss_coef=1e-2, z_loss_coef=1e-3),
      data=DataConfig(source="jsonl", train_paths=(DATA + "/train.jsonl",), val_paths=(DATA + "/val.jsonl",),
                      bpe_vocab=300, seq_len=32, batch_size=8),
      run=RunConfig(steps=12, eval_every=0, eval_batches=2, ckpt_every=4, log_every=1, out_dir=OUT,
                    peak_flops=1e11, sample_prompt=""))
"""


def _write_corpus(directory: str) -> None:
  rng = np.random.default_rng(0)
  for split, n in (("train", 40), ("val", 4)):
    with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
      for _ in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(60, 160)))
        f.write(json.dumps({"text": " ".join(words) + "."}) + "\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  d = tmp_path_factory.mktemp("train")
  _write_corpus(str(d))
  path = d / "tiny.py"
  path.write_text(TINY_CONFIG.replace("{data}", repr(str(d))).replace("{out}", repr(str(d / "runs"))))
  return d


def tiny(workdir, *overrides: str) -> tc.Experiment:
  return tc.apply_overrides(load_config(str(workdir / "tiny.py")), list(overrides))


# --------------------------------------------------------------------------------------------------
# One compiled tiny model shared by the step-level tests


@pytest.fixture(scope="module")
def setup(workdir):
  exp = tiny(workdir)
  cfg = exp.model
  corpus = train_data.load_corpus(exp.data)
  model = llama4.init(cfg, exp.policy, seed=0)
  parts, params, frozen, bias = ModelParts.split(model)
  tx = optim.make(exp.optim, parts.params)
  state = TrainState(step=jnp.zeros((), jnp.int32), total_steps=jnp.asarray(100, jnp.int32), params=params,
                     frozen=frozen, bias=bias, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(0)))
  k = cfg.text.num_experts_per_tok
  train = jax.jit(step_lib.make_train_step(parts, tx, exp.optim, exp.moe, k))
  batch = {kk: jnp.asarray(v) for kk, v in next(train_data.train_iterator(corpus, exp.data)).items()}
  return dict(exp=exp, cfg=cfg, corpus=corpus, parts=parts, state=state, train=train, batch=batch, model=model)


def test_one_train_step_reduces_the_loss_on_a_fixed_batch(setup):
  state, batch = setup["state"], setup["batch"]
  losses = []
  for _ in range(3):
    state, m = setup["train"](state, batch)
    losses.append(float(m["loss"]))
    assert np.isfinite(float(m["grad_norm"])) and float(m["grad_norm"]) > 0
  assert losses[1] < losses[0] and losses[2] < losses[1], losses
  assert m["load"].shape == (setup["cfg"].text.num_hidden_layers, setup["cfg"].text.num_local_experts)
  np.testing.assert_allclose(np.asarray(m["load"]).sum(-1), 1.0, rtol=1e-6)


def test_gradient_accumulation_matches_the_full_batch(setup):
  """The token cross-entropy part of the objective is exactly additive over micro-batches (the router
  losses are per-micro-batch statistics, as in any accumulation scheme, so they are left out here)."""
  parts, state, batch = setup["parts"], setup["state"], setup["batch"]
  moe_cfg = tc.MoEConfig(aux_loss_coef=0.0, z_loss_coef=0.0)
  tx, opt_cfg = optax.identity(), tc.OptimConfig(lr=1.0, warmup_steps=0)  # the update is the gradient
  st = dataclasses.replace(state, opt_state=tx.init(state.params))
  grads = {}
  for a in (1, 4):
    fn = jax.jit(step_lib.make_train_step(parts, tx, opt_cfg, moe_cfg, 1, grad_accum=a))
    new, m = fn(st, batch)
    grads[a] = jax.tree.map(lambda p, q: p - q, st.params, new.params)
  a, b = jax.tree.leaves(grads[1]), jax.tree.leaves(grads[4])
  scale = max(float(np.abs(x).max()) for x in a)  # updates are read back as parameter differences
  assert max(float(np.abs(y - x).max()) for x, y in zip(a, b)) <= 1e-5 * scale


def test_packed_documents_never_see_each_other(setup):
  """d loss(document 2) / d embeddings(document 1) == 0 exactly, through every layer (chunked and global
  attention, MoE); without segment ids the same gradient is non-zero (the test bites)."""
  model, cfg = setup["model"], setup["cfg"]
  T, cut = 40, 23  # T > 2 * chunk: the chunk-local attention path
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(3, cfg.text.vocab_size, (1, T)), jnp.int32)
  seg = jnp.asarray([[1] * cut + [2] * (T - cut)], jnp.int32)
  pos = jnp.asarray([list(range(cut)) + list(range(T - cut))], jnp.int32)
  targets = jnp.roll(ids, -1, axis=1)
  doc2 = (seg == 2).astype(jnp.float32)
  emb = model.text.embed_tokens(ids)

  def loss(e, segment_ids, positions):
    out = model.text.forward(ids, position_ids=positions, segment_ids=segment_ids, inputs_embeds=e)
    return cross_entropy_sum(out.logits, targets, doc2)[0]

  grad = jax.jit(jax.grad(loss))
  g = np.asarray(grad(emb, seg, pos))
  assert np.all(g[0, :cut] == 0.0), np.abs(g[0, :cut]).max()
  assert np.abs(g[0, cut:]).max() > 0
  g_unpacked = np.asarray(grad(emb, jnp.ones_like(seg), jnp.arange(T, dtype=jnp.int32)[None]))
  assert np.abs(g_unpacked[0, :cut]).max() > 0


def test_sft_loss_covers_assistant_tokens_only(setup):
  tok = hf_tokenizer.train_bpe(["hello there, how are you? fine thanks, and you?"] * 4, 300)
  convs = [[Message("system", "be brief"), Message("user", "hello there"), Message("assistant", "fine thanks"),
            Message("user", "how are you?"), Message("assistant", "and you?")]] * 3
  examples = pipeline.tokenize_chats(convs, tok)
  batch = next(iter(pipeline.train_dataset(examples, seq_len=256, batch_size=2, seed=0)))
  mask = batch["loss_mask"] > 0
  eot = tok.token_id("<|eot|>")
  # The trained targets, row by row, are exactly the assistant replies with their <|eot|>.
  for r in range(mask.shape[0]):
    trained = batch["targets"][r][mask[r]]
    want = []
    for _ in sorted(set(batch["segment_ids"][r]) - {0}):
      want += tok.encode("fine thanks") + [eot] + tok.encode("and you?") + [eot]
    assert trained.tolist() == want
  # The loss ignores everything else: scrambling the other targets (and their logits) changes nothing.
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((*mask.shape, tok.vocab_size)), jnp.float32)
  s1, n1 = cross_entropy_sum(logits, jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_mask"]))
  scrambled = np.where(mask, batch["targets"], rng.integers(0, tok.vocab_size, mask.shape))
  noisy = jnp.where(jnp.asarray(mask)[..., None], logits, 1e3 * logits)
  s2, n2 = cross_entropy_sum(noisy, jnp.asarray(scrambled), jnp.asarray(batch["loss_mask"]))
  assert float(n1) == float(mask.sum()) and float(s1) == float(s2)
  manual = -jax.nn.log_softmax(logits)[np.nonzero(mask) + (batch["targets"][mask],)].sum()
  np.testing.assert_allclose(float(s1), float(manual), rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Router balancing


def _skewed_router(seed=0, N=2048, D=16, E=8):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((N, D))
  x[:, 0] = 1.0  # a constant feature...
  w = rng.standard_normal((D, E)) * 0.3
  w[0, 0] += 1.5  # ...that favours expert 0: almost half the tokens pick it (balanced: 1/8)
  return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)


def test_balance_loss_value_is_one_under_uniform_routing_and_e_when_collapsed():
  E, N = 4, 400
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((1, N, E)), jnp.float32)
  w = jnp.ones((N,))
  uniform = jnp.full((1, E), N / E)
  np.testing.assert_allclose(float(router.load_balance_loss(logits, uniform, w)), 1.0, rtol=1e-6)
  collapsed_logits = jnp.zeros((1, N, E)).at[..., 0].set(30.0).at[..., 1:].set(-30.0)
  counts = router.selection_counts(collapsed_logits, 1, w)
  np.testing.assert_allclose(float(router.load_balance_loss(collapsed_logits, counts, w)), E, rtol=1e-6)


def test_load_balancing_loss_pushes_a_skewed_router_toward_balance():
  x, w = _skewed_router()
  ones = jnp.ones((x.shape[0],))

  def max_load(w):
    return float(router.load_fraction(router.selection_counts((x @ w)[None], 1, ones)).max())

  def loss(w):
    logits = (x @ w)[None]
    return router.load_balance_loss(logits, router.selection_counts(logits, 1, ones), ones)

  opt = optax.adam(3e-2)
  s, before = opt.init(w), max_load(w)
  grad = jax.jit(jax.grad(loss))
  for _ in range(30):
    u, s = opt.update(grad(w), s)
    w = optax.apply_updates(w, u)
  after = max_load(w)
  assert before > 0.4 and after < 0.33, (before, after)


def test_selection_bias_balances_without_gradients():
  x, w = _skewed_router()
  logits = (x @ w)[None]
  ones = jnp.ones((x.shape[0],))
  bias = jnp.zeros((1, w.shape[1]))
  before = float(router.load_fraction(router.selection_counts(logits, 1, ones)).max())
  for _ in range(200):
    bias = router.update_selection_bias(bias, router.selection_counts(logits, 1, ones, bias), 0.02)
  after = float(router.load_fraction(router.selection_counts(logits, 1, ones, bias)).max())
  assert after < 0.2 < before, (before, after)
  np.testing.assert_allclose(float(bias.mean()), 0.0, atol=1e-6)


def test_selection_bias_changes_selection_not_scores():
  from llama4_jax.model import moe

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
  bias = jnp.asarray([100.0, 0.0, 0.0, 0.0])
  idx, scores, logits = moe.route(x, r, 1, C.FP32, bias)
  assert np.all(np.asarray(idx) == 0)
  np.testing.assert_allclose(scores[:, 0], jax.nn.sigmoid(logits[:, 0]), rtol=1e-6)
  idx0, _, logits0 = moe.route(x, r, 1, C.FP32)
  np.testing.assert_array_equal(logits, logits0)


# --------------------------------------------------------------------------------------------------
# Whole runs


def _subprocess_env(cache_dir):
  """One CPU device; a persistent compilation cache shared by the runs (the later ones skip compiling)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
  env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _train_cmd(workdir, *extra):
  return [sys.executable, "-m", "experiments.train", "--config", str(workdir / "tiny.py"), *extra]


def _losses(run_dir):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["split"] == "train"}


def test_resume_after_sigkill_gives_bitwise_identical_losses(workdir):
  steps = 24
  common = ["--set", f"run.steps={steps}", "run.ckpt_every=4"]
  env = _subprocess_env(workdir / "xla_cache")
  ref = subprocess.run(_train_cmd(workdir, *common, "name=uninterrupted"), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert ref.returncode == 0, ref.stderr[-3000:]

  run_dir = workdir / "runs" / "killed"
  proc = subprocess.Popen(_train_cmd(workdir, *common, "name=killed"), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = run_dir / "checkpoints" / "4"
  deadline = time.time() + 240
  while not first.is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
  killed_at = max(_losses(run_dir))
  assert killed_at < steps

  resumed = subprocess.run(_train_cmd(workdir, *common, "name=killed", "--resume"), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step" in resumed.stdout
  want, got = _losses(workdir / "runs" / "uninterrupted"), _losses(run_dir)
  assert sorted(got) == list(range(1, steps + 1))
  assert got == want  # bitwise: the JSON floats are exact
  s_ref = json.loads((workdir / "runs" / "uninterrupted" / "summary.json").read_text())
  s_res = json.loads((run_dir / "summary.json").read_text())
  assert s_res["val_loss"] == s_ref["val_loss"]
  for f in ("loss.png", "tensorboard", "tokenizer.json", "experiment.json"):
    assert (run_dir / f).exists()


def test_same_losses_on_1_and_8_devices_with_expert_parallelism(workdir):
  common = ("run.steps=4", "run.ckpt_every=0", "rules=expert_parallel")
  one = loop.run(tiny(workdir, "name=dev1", "mesh.fsdp=1", *common), log=lambda *_: None,
                 devices=jax.devices()[:1])
  eight = loop.run(tiny(workdir, "name=dev8", "mesh.fsdp=2", "mesh.expert=4", *common), log=lambda *_: None)
  a, b = _losses(one["run_dir"]), _losses(eight["run_dir"])
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-5)
  np.testing.assert_allclose(eight["val_loss"], one["val_loss"], rtol=2e-5)


class _PoisonedIterator:
  """Wraps the train iterator; the batch of step `at` carries a NaN loss mask."""

  def __init__(self, it, at):
    self.it, self.at, self.n = it, at, 0

  def __next__(self):
    b = dict(next(self.it))
    self.n += 1
    if self.n == self.at:
      b["loss_mask"] = np.full_like(b["loss_mask"], np.nan)
    return b

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(workdir, monkeypatch):
  real = train_data.train_iterator
  monkeypatch.setattr(train_data, "train_iterator", lambda *a, **k: _PoisonedIterator(real(*a, **k), 7))
  exp = tiny(workdir, "name=nan", "run.steps=10", "run.ckpt_every=2", "mesh.fsdp=1")
  with pytest.raises(loop.TrainingDiverged, match=r"step 7: loss nan.*Last good checkpoint: step 6"):
    loop.run(exp, log=lambda *_: None, devices=jax.devices()[:1])
  from llama4_jax.io.checkpointer import Checkpointer
  from llama4_jax.io.model_dir import restore_params

  run_dir = workdir / "runs" / "nan"
  ck = Checkpointer(run_dir / "checkpoints")
  assert ck.latest_step() == 6
  ck.close()
  params = restore_params(run_dir / "checkpoints" / "6" / "params")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  assert max(_losses(run_dir)) == 6


def test_quantised_weights_are_not_trained(workdir):
  """Integer weights train only frozen under LoRA: a full run refuses before it writes anything."""
  exp = tiny(workdir, "name=quant", "policy.quant=int8")
  with pytest.raises(ValueError, match="policy.quant='int8': integer weights cannot be trained in full; train LoRA"):
    loop.run(exp, log=lambda *_: None, devices=jax.devices()[:1])
  assert not (workdir / "runs" / "quant").exists()


# --------------------------------------------------------------------------------------------------
# Config and optimiser details


def test_overrides_parse_by_field_type_and_rederive_the_layer_pattern(workdir):
  exp = tiny(workdir, "optim.lr=1e-3", "model.text.num_hidden_layers=8", "data.train_paths=a.txt,b.txt",
             "moe.bias_balancing=true", "run.init_from=/x")
  assert exp.optim.lr == 1e-3 and exp.moe.bias_balancing is True and exp.run.init_from == "/x"
  assert exp.model.text.num_hidden_layers == 8 and exp.model.text.rope_flags == (1, 1, 1, 0) * 2
  assert exp.model.text.moe_layer_ids == tuple(range(8)) and exp.model.text.layer_period == 4
  assert exp.data.train_paths == ("a.txt", "b.txt")
  with pytest.raises(tc.OverrideError, match="no field 'lrr'.*valid fields: lr, "):
    tc.override(exp, "optim.lrr=1")
  with pytest.raises(tc.OverrideError, match="'run.steps' expects int, got 'many'"):
    tc.override(exp, "run.steps=many")


def test_weight_decay_skips_norms_biases_and_vectors():
  cfg = dataclasses.replace(C.TINY_SCOUT)
  from flax import nnx

  mask = optim.decay_mask(nnx.state(llama4.abstract(cfg, C.FP32), nnx.Param))
  from flax.nnx import traversals

  flat = {".".join(map(str, k)): v for k, v in traversals.flatten_mapping(mask).items()}
  assert flat["text.embed"] and flat["text.lm_head"] and flat["text.blocks.layers.0.ffn.gate_up"]
  assert not flat["text.norm.weight"] and not flat["text.blocks.layers.0.attn_norm.weight"]
  biases = [k for k in flat if k.endswith("bias")]
  assert biases and not any(flat[k] for k in biases)


def test_schedule_warms_up_then_decays_to_the_floor():
  cfg = tc.OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
  s = lambda step: optim.learning_rate(cfg, step, 100)  # noqa: E731
  assert float(s(0)) == pytest.approx(0.1) and float(s(9)) == pytest.approx(1.0)
  assert float(s(4)) == pytest.approx(0.5) and 0.1 < float(s(50)) < 1.0 and float(s(99)) == pytest.approx(0.1)


def test_budgeted_run_ends_its_schedule_at_its_last_step(workdir):
  """A budget already spent when the probe steps are timed cuts the run to one more step; the cosine is
  refitted to that length (no recompilation), so the last step trains at the floor learning rate."""
  exp = tiny(workdir, "name=budget", "run.steps=40", "run.time_budget_s=0.5", "run.final_reserve_s=0",
             "run.ckpt_every=0")
  from llama4_jax.train.budget import BUDGET_PROBE_STEPS

  s = loop.run(exp, log=lambda *_: None)
  probe = 1 + BUDGET_PROBE_STEPS
  assert s["steps"] == probe + 1
  rows = read_jsonl(os.path.join(s["run_dir"], "metrics.jsonl"))
  lrs = {r["step"]: r["lr"] for r in rows if r.get("split") == "train"}
  assert sorted(lrs) == list(range(1, probe + 2))
  assert lrs[probe + 1] == pytest.approx(exp.optim.lr * exp.optim.min_lr_ratio)
  assert lrs[1] == pytest.approx(exp.optim.lr / exp.optim.warmup_steps)
