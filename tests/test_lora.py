"""LoRA: adapter shapes and logical names (routed experts per expert), placement under the sharding presets,
merged logits == adapter logits (through a saved model directory and `llama4_jax.load`), adapters saved alone,
a train step that updates the adapters only, bad targets / ranks / resuming as a full run refused, and a
short SFT run on chat data.

Tiny Maverick-like text model (dense and MoE layers alternate, so every target exists).
"""

from __future__ import annotations

import dataclasses
import json
import os

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals

import sharding
from llama4_jax import config as C
from llama4_jax import load
from llama4_jax.io.checkpointer import Checkpointer
from llama4_jax.model import llama4
from llama4_jax.train import config as tc
from llama4_jax.train import loop, lora, optim
from llama4_jax.train import step as step_lib
from llama4_jax.train.state import TrainState
from sharding.mesh import MeshConfig

POLICY = C.Policy(matmul_precision="highest")
ALL = ("q", "k", "v", "o", "shared", "mlp", "experts")


def _cfg():
  text = dataclasses.replace(C.TINY_MAVERICK.text, vocab_size=320)
  return C.Llama4Config(text=text, vision=None, dtype="float32")


@pytest.fixture(scope="module")
def model():
  return llama4.init(_cfg(), POLICY, seed=0)


def _parts(model, **kw):
  return lora.LoraParts.build(model, tc.LoraConfig(**{"targets": ALL, "rank": 4, "alpha": 8.0, **kw}))


def _flat_meta(template):
  return {p: (v.shape, tuple(v.get_metadata()["out_sharding"])) for p, v in nnx.to_flat_state(template)}


def test_adapters_carry_their_weights_logical_names(model):
  parts = _parts(model)
  meta = _flat_meta(parts.params)
  assert {s.target for s in parts.specs} == set(ALL)
  L = ("text", "blocks", "layers")
  n = _cfg().text.num_hidden_layers // _cfg().text.layer_period  # scanned blocks
  q = meta[("lora", *L, 0, "attn", "q", "a")], meta[("lora", *L, 0, "attn", "q", "b")]
  assert q == (((n, 64, 4), ("layers", "embed", None)), ((n, 4, 4, 16), ("layers", None, "q_heads", "head_dim")))
  o = meta[("lora", *L, 0, "attn", "o", "a")], meta[("lora", *L, 0, "attn", "o", "b")]
  assert o == (((n, 4, 16, 4), ("layers", "q_heads", "head_dim", None)), ((n, 4, 64), ("layers", None, "embed")))
  moe = next(s for s in parts.specs if s.target == "experts" and s.path[-1] == "gate_up").path
  E, I = _cfg().text.num_local_experts, _cfg().text.intermediate_size
  assert meta[("lora", *moe, "a")] == ((n, E, 64, 4), ("layers", "experts", "embed", None))
  assert meta[("lora", *moe, "b")] == ((n, E, 4, 2, I), ("layers", "experts", None, "gate_up", "expert_mlp"))
  down = moe[:-1] + ("down",)
  assert meta[("lora", *down, "a")] == ((n, E, I, 4), ("layers", "experts", "expert_mlp", None))
  # the base is frozen entirely (routers too, by default); only the adapters train
  assert all(p[0] == "lora" for p in meta)
  assert ("text", "lm_head") in dict(nnx.to_flat_state(parts.frozen))


def test_adapters_are_placed_like_their_base_weights_under_the_presets(model):
  parts = _parts(model)
  mesh = sharding.make_mesh(MeshConfig(fsdp=2, expert=4), jax.devices()[:8])
  for name in ("fsdp", "expert_parallel"):
    specs, _ = sharding.param_specs(parts.params, sharding.preset(name), mesh)
    base, _ = sharding.param_specs(parts.frozen, sharding.preset(name), mesh)
    flat, base_flat = dict(nnx.to_flat_state(specs)), dict(nnx.to_flat_state(base))
    for s in parts.specs:
      w = tuple(base_flat[s.path].get_value())
      a = tuple(flat[("lora", *s.path, "a")].get_value())
      b = tuple(flat[("lora", *s.path, "b")].get_value())
      nb, ni = len(s.batch), len(s.fan_in)
      w = w + (None,) * (len(s.names) - len(w))
      a = a + (None,) * (nb + ni + 1 - len(a))
      assert a[: nb + ni] == w[: nb + ni], (name, s.path, a, w)
      assert a[nb + ni] is None and b[nb] is None
    if name == "expert_parallel":  # the per-expert adapters are split over the expert axis, as their experts
      routed = [s for s in parts.specs if s.target == "experts"]
      assert routed and all(tuple(flat[("lora", *s.path, k)].get_value())[:2] == (None, "expert")
                            for s in routed for k in "ab")


def _logits(m, ids):
  return np.asarray(m.forward(ids).logits)


def test_merged_checkpoint_gives_the_adapter_logits(model, tmp_path):
  parts = _parts(model)
  params, frozen, bias = parts.split_values(model, seed=0)
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 320, (2, 24)), jnp.int32)
  base = _logits(model, ids)
  np.testing.assert_allclose(_logits(parts.merge(params, frozen, bias), ids), base, atol=1e-6)  # B = 0
  params = helpers.random_lora_b(params)
  adapted = _logits(parts.merge(params, frozen, bias), ids)
  assert np.abs(adapted - base).max() > 1e-2  # the adapters matter
  merged_dir = lora.save_merged(str(tmp_path / "merged"), parts, params, frozen, _cfg())
  loaded = load(merged_dir, policy=POLICY).model
  np.testing.assert_allclose(_logits(loaded, ids), adapted, atol=1e-5, rtol=1e-5)

  ad_dir = lora.save_adapters(str(tmp_path / "adapter"), params, parts.lora, base="tiny")
  cfg, restored = lora.load_adapters(ad_dir)
  assert cfg == parts.lora
  for a, b in zip(jax.tree.leaves(lora.adapters_of(params)), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with open(os.path.join(ad_dir, lora.ADAPTER_CONFIG)) as f:
    record = json.load(f)
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
  assert record["bytes"] == lora.adapter_bytes(params) < base_bytes / 3
  with pytest.raises(Exception, match="exists"):  # nothing overwritten without overwrite=True
    lora.save_adapters(ad_dir, params, parts.lora)


def test_a_train_step_moves_the_adapters_only(model):
  cfg = _cfg()
  parts = _parts(model, targets=("q", "v", "experts"), train_router=True)
  params, frozen, bias = parts.split_values(model, seed=0)
  assert any(p[-1] == "router" for p in traversals.flatten_mapping(params))
  opt_cfg = tc.OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.0)
  tx = optim.make(opt_cfg, parts.params)
  opt_state = tx.init(params)
  n_opt = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim)
  n_train = sum(x.size for x in jax.tree.leaves(params))
  assert n_opt == 2 * n_train < sum(x.size for x in jax.tree.leaves(frozen)) / 4  # Adam moments: trainables only
  state = TrainState(step=jnp.zeros((), jnp.int32), total_steps=jnp.asarray(10, jnp.int32), params=params,
                     frozen=frozen, bias=bias, opt_state=opt_state, rng=jax.random.key_data(jax.random.key(0)))
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 320, (2, 17))
  batch = {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
           "segment_ids": jnp.ones((2, 16), jnp.int32), "positions": jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1)),
           "loss_mask": jnp.ones((2, 16), jnp.float32)}
  step = jax.jit(step_lib.make_train_step(parts, tx, opt_cfg, tc.MoEConfig(), cfg.text.num_experts_per_tok))
  losses = []
  for _ in range(3):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[2] < losses[1] < losses[0], losses
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = {p for p, v in traversals.flatten_mapping(state.params).items()
           if np.abs(np.asarray(v) - np.asarray(traversals.flatten_mapping(params)[p])).max() > 0}
  assert any(p[-1] == "router" for p in moved) and any(p[-1] == "b" for p in moved)


def test_bad_targets_and_ranks_are_refused_naming_the_value(model):
  with pytest.raises(lora.LoraError, match="unknown target.*'attn'"):
    _parts(model, targets=("attn",))
  scout = llama4.init(dataclasses.replace(C.TINY_SCOUT, vision=None), POLICY, seed=0)  # MoE in every layer
  with pytest.raises(lora.LoraError, match="'mlp' match\\(es\\) no weight"):
    lora.LoraParts.build(scout, tc.LoraConfig(targets=("q", "mlp")))
  with pytest.raises(lora.LoraError, match="lora.rank=40 exceeds the dimension 32 of text/blocks/layers/0/attn/k"):
    _parts(model, targets=("k",), rank=40)


# --------------------------------------------------------------------------------------------------
# A run


def _write_chats(d):
  rng = np.random.default_rng(0)
  words = "good my lord what news thou art welcome sir speak I pray you madam".split()
  for split, n in (("train", 30), ("val", 4)):
    with open(os.path.join(d, f"{split}.jsonl"), "w") as f:
      for _ in range(n):
        line = " ".join(rng.choice(words, 8))
        msgs = [{"role": "user", "content": line}, {"role": "assistant", "content": line.upper()}]
        f.write(json.dumps({"messages": msgs}) + "\n")


def _chat_exp(tmp_path) -> tc.Experiment:
  _write_chats(str(tmp_path))
  return tc.Experiment(
      name="lora", model=_cfg(), policy=POLICY, mesh=MeshConfig(fsdp=-1), rules="fsdp",
      optim=tc.OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.0),
      data=tc.DataConfig(source="chat", train_paths=(str(tmp_path / "train.jsonl"),),
                         val_paths=(str(tmp_path / "val.jsonl"),), bpe_vocab=300, seq_len=64, batch_size=4),
      run=tc.RunConfig(steps=3, eval_every=0, ckpt_every=0, log_every=1, out_dir=str(tmp_path / "runs"),
                       peak_flops=1e11, sample_prompt=""),
      lora=tc.LoraConfig(targets=("q", "v", "experts"), rank=2, alpha=4.0))


def test_continuing_a_lora_run_as_a_full_run_is_refused_before_anything_is_written(tmp_path):
  """A step whose meta says LoRA (as a LoRA run writes it); a full run on that directory stops in setup."""
  exp = _chat_exp(tmp_path)
  run_dir = tmp_path / "runs" / exp.name
  with Checkpointer(str(run_dir / "checkpoints")) as ck:
    ck.save(3, {"x": np.zeros(2, np.float32)}, meta={"experiment": tc.to_dict(exp)}, force=True)
  (run_dir / "experiment.json").write_text("the LoRA run's")
  for kw in ({"lora": None}, {"lora": dataclasses.replace(exp.lora, rank=4)}):
    with pytest.raises(ValueError, match=r"step 3 was written by a LoRA run \(lora=\{'targets': \['q', 'v', 'exp"):
      loop.run(dataclasses.replace(exp, **kw), resume=True, log=lambda *_: None, devices=jax.devices()[:1])
  assert (run_dir / "experiment.json").read_text() == "the LoRA run's"


@pytest.mark.slow  # about 70 s on a busy 2-core CPU: a whole run (chat tokenizer, compile, saves, evaluation)
def test_lora_sft_run_writes_adapter_and_merged_model_and_refuses_a_full_resume(tmp_path):
  exp = _chat_exp(tmp_path)
  summary = loop.run(exp, log=lambda *_: None, devices=jax.devices()[:1])
  run_dir = summary["run_dir"]
  assert 0 < summary["adapter_bytes"] and os.path.isfile(os.path.join(run_dir, "adapter", lora.ADAPTER_CONFIG))
  merged = load(os.path.join(run_dir, "merged"), policy=POLICY)
  assert merged.source.kind == "model"
  before = open(os.path.join(run_dir, "experiment.json")).read()
  with pytest.raises(ValueError, match=r"written by a LoRA run \(lora=\{'targets': \['q', 'v', 'experts'\].*"
                                       r"continuing it as a full run \(lora=None\)"):
    loop.run(dataclasses.replace(exp, lora=None), resume=True, log=lambda *_: None, devices=jax.devices()[:1])
  assert open(os.path.join(run_dir, "experiment.json")).read() == before
