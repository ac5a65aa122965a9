"""QLoRA: LoRA on a frozen base held as int8 / int4 (`quant.Quantized`) or FP8 routed experts (`fp8.Stored`).

The loss and the adapter gradients on a quantised base equal those of LoRA on the float model built from the
dequantised base weights; a few steps on an int4 base lower the loss and leave the stored values and scales
bitwise as they were; a full (non-LoRA) training of a quantised model is refused, pointing at LoRA.
"""

from __future__ import annotations

import dataclasses
import math

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals

from llama4_jax import config as C
from llama4_jax.apps import plan as planner
from llama4_jax.io import quantize as qio
from llama4_jax.model import llama4, quant
from llama4_jax.model import moe as moe_lib
from llama4_jax.train import config as tc
from llama4_jax.train import loop, lora, optim
from llama4_jax.train import step as step_lib
from llama4_jax.train.state import TrainState
from sharding import rules as R

POLICY = C.Policy(matmul_precision="highest")
TARGETS = ("q", "v", "shared", "mlp", "experts")


def _cfg():
  text = dataclasses.replace(C.TINY_MAVERICK.text, vocab_size=320)
  return C.Llama4Config(text=text, vision=None, dtype="float32")


def _quant_policy(scheme: str) -> C.Policy:
  return qio.serving_policy(scheme, 16, targets=("experts", "mlp"), base=POLICY)


def _dequantised_twin(model) -> nnx.Module:
  """The float model whose weights are the dequantised stored ones (NumPy-side, independent of lora.py)."""
  graph, fstate = nnx.split(llama4.abstract(_cfg(), POLICY))
  stored = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  out = []
  for path, var in nnx.to_flat_state(fstate):
    w = stored[path]
    if qio.scale_path(path) in stored:
      w = qio.dequantize_leaf(path, w, stored[qio.scale_path(path)], np.float32)
    elif path[:-1] + (f"{path[-1]}_scale",) in stored:  # FP8: one multiplier per output channel
      axis = moe_lib.GATE_UP_AXIS if path[-1] == "gate_up" else moe_lib.DOWN_AXIS
      w = w.astype(np.float32) * np.expand_dims(stored[path[:-1] + (f"{path[-1]}_scale",)], axis)
    out.append((path, var.replace(jnp.asarray(w, var.dtype))))
  return nnx.merge(graph, nnx.from_flat_state(out))


def _parts(model, **kw):
  return lora.LoraParts.build(model, tc.LoraConfig(**{"targets": TARGETS, "rank": 4, "alpha": 8.0, **kw}))


def _batch(seed=0, B=2, T=16):
  ids = np.random.default_rng(seed).integers(3, 320, (B, T + 1))
  return {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
          "segment_ids": jnp.ones((B, T), jnp.int32), "positions": jnp.tile(jnp.arange(T, dtype=jnp.int32), (B, 1)),
          "loss_mask": jnp.ones((B, T), jnp.float32)}


def _loss_and_grads(parts, params, frozen, bias, batch):
  k = _cfg().text.num_experts_per_tok

  def loss(p):
    t = step_lib.forward_terms(parts, k, p, frozen, bias, batch)
    return t.ce_sum / t.tokens

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_lora_on_a_quantised_base_equals_lora_on_its_dequantised_float_model(scheme):
  policy = dataclasses.replace(POLICY, expert_fp8=True) if scheme == "fp8" else _quant_policy(scheme)
  qmodel = llama4.init(_cfg(), policy, seed=0)
  targets = ("q", "experts") if scheme == "fp8" else TARGETS
  qparts = _parts(qmodel, targets=targets)
  assert {s.stored for s in qparts.specs if s.target in ("experts", "shared", "mlp")} == {scheme}
  params, frozen, bias = qparts.split_values(qmodel, seed=0)
  params = helpers.random_lora_b(params)
  held = {np.dtype(x.dtype) for x in jax.tree.leaves(frozen)}
  assert held >= ({np.dtype(jnp.float8_e4m3fn)} if scheme == "fp8" else {np.dtype(np.int8)})  # kept as stored

  fmodel = _dequantised_twin(qmodel)
  fparts = _parts(fmodel, targets=targets)
  _, fp_frozen, fp_bias = fparts.split_values(fmodel, seed=0)
  assert jax.tree.structure(params) == jax.tree.structure(fparts.split_values(fmodel, seed=0)[0])

  batch = _batch()
  ql, qg = _loss_and_grads(qparts, params, frozen, bias, batch)
  fl, fg = _loss_and_grads(fparts, params, fp_frozen, fp_bias, batch)
  np.testing.assert_allclose(float(ql), float(fl), rtol=1e-5)
  for (path, a), b in zip(traversals.flatten_mapping(qg).items(), traversals.flatten_mapping(fg).values()):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=str(path))
  assert max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(qg)) > 0

  ids = batch["inputs"]  # the merged float parameters give the adapted forward's logits
  merged = jax.jit(qparts.merged_params)(params, frozen)
  graph, abstract = nnx.split(llama4.abstract(_cfg(), POLICY))
  ref = nnx.merge(graph, lora._fill(abstract, merged)).forward(ids).logits
  np.testing.assert_allclose(np.asarray(qparts.merge(params, frozen, bias).forward(ids).logits), np.asarray(ref),
                             rtol=1e-5, atol=1e-5)


def test_training_on_an_int4_base_lowers_the_loss_and_leaves_the_base_bitwise():
  qmodel = llama4.init(_cfg(), _quant_policy("int4"), seed=0)
  parts = _parts(qmodel)
  params, frozen, bias = parts.split_values(qmodel, seed=0)
  assert dict(parts.stored) and set(dict(parts.stored).values()) == {"int4"}
  opt_cfg = tc.OptimConfig(lr=2e-2, warmup_steps=1, weight_decay=0.0)
  tx = optim.make(opt_cfg, parts.params)
  before = jax.tree.map(np.asarray, frozen)
  state = TrainState(step=jnp.zeros((), jnp.int32), total_steps=jnp.asarray(10, jnp.int32), params=params,
                     frozen=frozen, bias=bias, opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)))
  step = jax.jit(step_lib.make_train_step(parts, tx, opt_cfg, tc.MoEConfig(), _cfg().text.num_experts_per_tok))
  batch, losses = _batch(), []
  for _ in range(4):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[1] < losses[0], losses
  after = traversals.flatten_mapping(jax.tree.map(np.asarray, state.frozen))
  packed = [p for p, v in after.items() if v.dtype == np.uint8]
  assert packed  # the int4 experts and MLPs stayed packed
  for p, v in traversals.flatten_mapping(before).items():
    assert after[p].dtype == v.dtype and after[p].tobytes() == v.tobytes(), p
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert n_opt == 2 * sum(x.size for x in jax.tree.leaves(params))  # Adam moments of the adapters only


def test_adapted_weights_are_built_per_block_inside_the_scan():
  """The forward's program holds no float copy of a whole stacked quantised weight: every dequantised
  [E, D, 2, I] array lives inside the scanned block (no array with the stacked leading blocks axis)."""
  cfg = dataclasses.replace(_cfg(), text=dataclasses.replace(_cfg().text, num_hidden_layers=8))
  qmodel = llama4.abstract(cfg, _quant_policy("int8"))
  parts = _parts(qmodel, targets=("experts",))
  params, frozen, bias = (nnx.to_pure_dict(t) for t in (parts.params, parts.frozen, parts.bias))
  n, E, D, I = 2, cfg.text.num_local_experts, cfg.text.hidden_size, cfg.text.intermediate_size
  jaxpr = str(jax.make_jaxpr(lambda p, f: parts.merge(p, f, bias).forward(jnp.zeros((1, 8), jnp.int32)).logits)(
      params, frozen))
  assert f"f32[{E},{D},2,{I}]" in jaxpr and f"f32[{n},{E},{D},2,{I}]" not in jaxpr


def test_full_training_of_a_quantised_model_is_refused_pointing_at_lora(tmp_path):
  with pytest.raises(quant.QuantError, match="LoRA"):
    qio.refuse_training(_quant_policy("int4"))
  qio.refuse_training(POLICY)  # a float model trains
  exp = tc.Experiment(name="full", model=_cfg(), policy=_quant_policy("int8"), run=tc.RunConfig(out_dir=str(tmp_path)))
  with pytest.raises(quant.QuantError, match="cannot be trained in full.*LoRA"):
    loop.run(exp, log=lambda *_: None, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="expert_fp8.*LoRA"):
    loop.run(dataclasses.replace(exp, policy=dataclasses.replace(POLICY, expert_fp8=True)), log=lambda *_: None,
             devices=jax.devices()[:1])
  assert not list(tmp_path.iterdir())  # refused before anything was written


# --------------------------------------------------------------------------------------------------
# The memory planner


@pytest.mark.parametrize("scheme", ["float", "int4"])
def test_planner_counts_the_real_adapter_and_frozen_bytes(scheme):
  policy = POLICY if scheme == "float" else _quant_policy(scheme)
  model = llama4.init(_cfg(), policy, seed=0)
  lcfg = tc.LoraConfig(targets=TARGETS, rank=4, alpha=8.0)
  params, frozen, _ = lora.LoraParts.build(model, lcfg).split_values(model, seed=0)
  work = planner.Workload(batch=1, seq=16)
  p = planner.plan(_cfg(), policy, R.DATA_PARALLEL, {"data": 1}, work, lora=lcfg)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert p.adapters == lora.adapter_bytes(params) > 0
  assert p.frozen == sum(x.nbytes for x in jax.tree.leaves(frozen))  # the base at its stored bytes
  assert (p.grads, p.optimizer, p.master) == (4 * n, 8 * n, 0)  # float32 adapters: no master copy
  full = planner.plan(_cfg(), POLICY, R.DATA_PARALLEL, {"data": 1}, work)  # full fine-tuning of the float model
  n_full = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(llama4.abstract(_cfg(), POLICY))))
  assert full.optimizer == 8 * n_full and full.adapters == 0
  assert p.total < full.total and p.optimizer < full.optimizer / 4
  if scheme == "int4":
    assert p.frozen < full.params / 2


def test_plan_cli_lora_and_qlora(capsys):
  from tools import plan as cli

  assert cli.main(["--preset", "tiny-scout", "--mesh", "fsdp=2", "--lora-rank", "4"]) == 0
  assert cli.main(["--preset", "tiny-scout", "--mesh", "fsdp=2", "--lora-rank", "4", "--quant", "int4",
                   "--group-size", "16", "--quant-targets", "experts,mlp"]) == 0
  out = capsys.readouterr().out
  assert out.count("lora r=4") == 2 and "LoRA rank 4 on q,k,v,o" in out and "quant int4" in out
  with pytest.raises(SystemExit):
    cli.main(["--preset", "tiny-scout", "--quant", "int4"])  # full training of a quantised model: no plan


def test_a_cached_forward_of_the_adapted_int4_model_matches_the_whole_sequence():
  """Generation (prefill into a KV cache, then one decode step) reads the adapted weights the same way."""
  qmodel = llama4.init(_cfg(), _quant_policy("int4"), seed=0)
  parts = _parts(qmodel)
  params, frozen, bias = parts.split_values(qmodel, seed=0)
  params = helpers.random_lora_b(params)
  ids = _batch()["inputs"]

  @jax.jit
  def run(params, frozen):
    m = parts.merge(params, frozen, bias)
    cache = m.init_cache(ids.shape[0], 32, jnp.float32)
    pre = m.forward(ids[:, :-1], cache=cache, prefill=True)
    last = m.forward(ids[:, -1:], cache=pre.cache)
    return m.forward(ids).logits, pre.logits, last.logits

  full, pre, last = run(params, frozen)
  np.testing.assert_allclose(np.asarray(pre), np.asarray(full[:, :-1]), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), rtol=1e-4, atol=1e-5)
