"""`llama4_jax.load` of LoRA outputs: a LoRA run directory, one of its steps (float or int4 base) and an
adapter directory give the logits of the run's merged/ model; an adapter directory whose base is missing is
refused naming it. A QLoRA run resumed from a checkpoint continues bitwise."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals

from llama4_jax import config as C
from llama4_jax import load
from llama4_jax.io import model_dir
from llama4_jax.io import quantize as qio
from llama4_jax.io.checkpointer import Checkpointer
from llama4_jax.io.validate import CheckpointError
from llama4_jax.model import llama4
from llama4_jax.train import checkpoints, lora
from llama4_jax.train import config as tc

POLICY = C.Policy(matmul_precision="highest")
LORA = tc.LoraConfig(targets=("q", "v", "shared", "experts"), rank=4, alpha=8.0)


def _cfg():
  text = dataclasses.replace(C.TINY_MAVERICK.text, vocab_size=320)
  return C.Llama4Config(text=text, vision=None, dtype="float32")


def _trained(policy):
  """(base model, parts, adapters with a non-zero B, frozen) as after some training."""
  model = llama4.init(_cfg(), policy, seed=0)
  parts = lora.LoraParts.build(model, LORA)
  params, frozen, _ = parts.split_values(model, seed=0)
  flat = traversals.flatten_mapping(params)
  rng = np.random.default_rng(1)
  for p, v in flat.items():
    if p[-1] == "b":
      flat[p] = jnp.asarray(rng.standard_normal(v.shape) * 0.05, v.dtype)
  return model, parts, traversals.unflatten_mapping(flat), frozen


def _run_dir(tmp_path, policy, params, frozen, step=5):
  """A LoRA run directory with one checkpoint step, as `loop.run` writes it (adapters + frozen base)."""
  exp = tc.Experiment(name="lora", model=_cfg(), policy=policy, lora=LORA)
  run_dir = tmp_path / "runs" / "lora"
  with Checkpointer(str(run_dir / "checkpoints")) as ck:
    ck.save(step, checkpoints.merge_params(params, frozen),
            meta={"config": C.to_hf(_cfg()), "experiment": tc.to_dict(exp)}, force=True)
  return run_dir


def _logits(path, **kw):
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 320, (2, 20)), jnp.int32)
  return np.asarray(load(str(path), policy=POLICY, **kw).model.forward(ids).logits)


@pytest.mark.parametrize("scheme", ["float", "int4"])
def test_a_lora_run_and_its_steps_load_as_the_merged_model(tmp_path, scheme):
  policy = POLICY if scheme == "float" else qio.serving_policy("int4", 16, targets=("experts", "mlp"), base=POLICY)
  _, parts, params, frozen = _trained(policy)
  run_dir = _run_dir(tmp_path, policy, params, frozen)
  merged = lora.save_merged(str(run_dir / "merged"), parts, params, frozen, _cfg())
  ref = _logits(merged)
  for path in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "5"):
    np.testing.assert_allclose(_logits(path), ref, rtol=1e-6, atol=1e-6)
  loaded = load(str(run_dir), policy=POLICY)
  assert loaded.source.kind == "run" and loaded.source.lora["rank"] == 4
  assert loaded.model.policy.quant == "none" and not any(  # the merged model is a float model
      p[-1].endswith(qio.SUFFIX) for p, _ in nnx.to_flat_state(nnx.state(loaded.model)))


def test_an_adapter_directory_loads_on_its_base_and_a_missing_base_is_named(tmp_path):
  model, parts, params, frozen = _trained(POLICY)
  base_dir = model_dir.save_params(str(tmp_path / "base"), nnx.state(model, nnx.Param), _cfg())
  ad = lora.save_adapters(str(tmp_path / "adapter"), params, LORA, base=base_dir)
  ref = _logits(lora.save_merged(str(tmp_path / "merged"), parts, params, frozen, _cfg()))
  np.testing.assert_allclose(_logits(ad), ref, rtol=1e-6, atol=1e-6)
  assert load(ad, policy=POLICY).source.kind == "adapter"

  gone = lora.save_adapters(str(tmp_path / "gone"), params, LORA, base=str(tmp_path / "no-such-base"))
  with pytest.raises(CheckpointError, match=r"gone: the base these LoRA adapters apply to, '.*no-such-base'.*is "
                                            r"missing"):
    load(gone, policy=POLICY)
  random = lora.save_adapters(str(tmp_path / "random"), params, LORA, base="")
  with pytest.raises(CheckpointError, match="records no base"):
    load(random, policy=POLICY)


def test_exporting_a_lora_step_to_hf_is_refused_naming_what_to_export(tmp_path):
  from llama4_jax.io import convert

  _, parts, params, frozen = _trained(POLICY)
  run_dir = _run_dir(tmp_path, POLICY, params, frozen)
  with pytest.raises(CheckpointError, match=r"a LoRA run's step .* does not merge .*save_params"):
    convert.orbax_to_hf(run_dir / "checkpoints" / "5", tmp_path / "hf")
  merged = lora.save_merged(str(run_dir / "merged"), parts, params, frozen, _cfg())
  with pytest.raises(CheckpointError, match=f"export the run's merged model instead: orbax-to-hf {merged} OUT"):
    convert.orbax_to_hf(run_dir, tmp_path / "hf")
  assert not (tmp_path / "hf").exists()
  convert.orbax_to_hf(merged, tmp_path / "hf")  # the merged model exports
  assert (tmp_path / "hf" / "config.json").exists()


def _qlora_experiment(tmp_path, **run):
  """An int4 model directory and a QLoRA chat experiment starting from it (float policy: the run switches the
  base's storage on)."""
  import json

  from sharding.mesh import MeshConfig

  qpolicy = qio.serving_policy("int4", 16, targets=("experts", "mlp"), base=POLICY)
  qdir = model_dir.save_params(str(tmp_path / "int4"), nnx.state(llama4.init(_cfg(), qpolicy, seed=0), nnx.Param),
                               _cfg())
  rng = np.random.default_rng(0)
  words = "good my lord what news thou art welcome sir speak I pray you madam".split()
  for split, n in (("train", 30), ("val", 4)):
    with open(tmp_path / f"{split}.jsonl", "w") as f:
      for _ in range(n):
        line = " ".join(rng.choice(words, 8))
        f.write(json.dumps({"messages": [{"role": "user", "content": line},
                                         {"role": "assistant", "content": line.upper()}]}) + "\n")
  exp = tc.Experiment(
      name="qlora", model=_cfg(), policy=POLICY, mesh=MeshConfig(fsdp=-1), rules="fsdp",
      optim=tc.OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.0),
      data=tc.DataConfig(source="chat", train_paths=(str(tmp_path / "train.jsonl"),),
                         val_paths=(str(tmp_path / "val.jsonl"),), bpe_vocab=300, seq_len=64, batch_size=4),
      run=tc.RunConfig(**{"steps": 3, "eval_every": 0, "ckpt_every": 0, "log_every": 1,
                          "out_dir": str(tmp_path / "runs"), "peak_flops": 1e11, "sample_prompt": "",
                          "init_from": qdir, **run}),
      lora=tc.LoraConfig(targets=("q", "v", "experts"), rank=2, alpha=4.0))
  return qdir, exp


@pytest.mark.slow  # a whole QLoRA run (tokenizer, compile, checkpoints, merged/, evaluation): ~1-2 min on 2 CPUs
def test_a_qlora_run_from_an_int4_model_directory_loads_as_its_merged_model(tmp_path):
  """`run.init_from` an int4 model directory with a float policy: the run switches the base's storage on
  (recorded in its experiment), keeps the base packed in its checkpoints, and `load(run_dir)` == merged/."""
  import json
  import os

  import jax

  from llama4_jax.train import loop

  qdir, exp = _qlora_experiment(tmp_path)
  summary = loop.run(exp, log=lambda *_: None, devices=jax.devices()[:1])
  run_dir = summary["run_dir"]
  with open(os.path.join(run_dir, "experiment.json")) as f:
    assert json.load(f)["policy"]["quant"] == "int4"
  step = load(run_dir, policy=POLICY).source.directory
  stored = model_dir.restore_params(step)
  base = model_dir.restore_params(qdir)
  for p, v in traversals.flatten_mapping(base).items():  # the frozen base went through the run bitwise
    s = traversals.flatten_mapping(stored)[p]
    assert np.asarray(s).dtype == np.asarray(v).dtype and np.asarray(s).tobytes() == np.asarray(v).tobytes(), p
  np.testing.assert_allclose(_logits(run_dir), _logits(os.path.join(run_dir, "merged")), rtol=1e-6, atol=1e-6)


def test_a_resumed_qlora_run_continues_bitwise(tmp_path):
  """A QLoRA run resumed from its step-2 checkpoint (the later one removed, as if it had been killed before
  writing it) gives the uninterrupted run's losses of steps 3-4 and its final adapters bitwise, on the int4
  base restored packed from the checkpoint."""
  import os
  import shutil

  import jax

  from llama4_jax.train import loop
  from llama4_jax.train.metrics import read_jsonl

  _, exp = _qlora_experiment(tmp_path, steps=4, ckpt_every=2)
  run_dir = loop.run(exp, log=lambda *_: None, devices=jax.devices()[:1])["run_dir"]

  def losses():
    return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["split"] == "train"}

  want, final = losses(), model_dir.restore_params(os.path.join(run_dir, "checkpoints", "4"))
  assert sorted(want) == [1, 2, 3, 4]
  shutil.rmtree(os.path.join(run_dir, "checkpoints", "4"))
  lines = []
  loop.run(exp, resume=True, log=lines.append, devices=jax.devices()[:1])
  assert any("resumed from step 2" in str(m) for m in lines), lines
  assert losses() == want  # bitwise: the JSON floats are exact
  got = traversals.flatten_mapping(model_dir.restore_params(os.path.join(run_dir, "checkpoints", "4")))
  for p, v in traversals.flatten_mapping(final).items():  # adapters and the packed base
    assert np.asarray(got[p]).tobytes() == np.asarray(v).tobytes(), p
