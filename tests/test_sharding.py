"""Sharding on 8 simulated CPU devices: mesh, rules, parameter placement, expert-parallel MoE, planner.

The parity tests run the tiny Scout-like and Maverick-like text models (float32, HIGHEST matmuls,
weights drawn at O(1) scale so nothing is ~0) under every rules preset and compare logits and the
gradient of a cross-entropy loss w.r.t. every parameter with the single-device run: max |a - b| /
max |b| per array <= 1e-5. To keep compile time down, the TINY presets are cut to one period of two
layers (a RoPE/chunked/qk-norm layer and a NoPE/global/temperature-tuned one; Scout: both MoE with 4
experts, Maverick: dense then MoE with 8 experts), and their weights are drawn on the host from the
abstract model (no init program to compile). Each sharded program is compiled once (module-level
cache) and reused by the adversarial-routing tests.
"""

from __future__ import annotations

import dataclasses
import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
from llama4_jax import config as C
from llama4_jax.apps import plan as plan_lib
from llama4_jax.model import llama4, moe
from sharding import dispatch as ep_lib
from sharding import params as sp
from sharding import rules as R

POLICY = C.Policy(matmul_precision="highest")


MODELS = helpers.TWO_LAYER_MODELS
B, T = 8, 20  # T > 2 * attention_chunk_size (8): the chunk-local attention path runs
TOL = 1e-5
LAYOUTS = {  # rules preset -> mesh on the 8 devices
    "data_parallel": sharding.MeshConfig(data=8, fsdp=1),
    "fsdp": sharding.MeshConfig(fsdp=8),
    "fsdp_tp": sharding.MeshConfig(fsdp=4, tensor=2),
    "expert_parallel": sharding.MeshConfig(fsdp=2, expert=4),
    "inference": sharding.MeshConfig(fsdp=1, expert=4, tensor=2),
}
ERRORS: dict[str, float] = {}  # measured max relative errors, printed at the end of the module


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _record(key: str, err: float) -> None:
  ERRORS[key] = max(ERRORS.get(key, 0.0), err)


@pytest.fixture(scope="module", autouse=True)
def _report():
  yield
  print("\nmax relative errors:", {k: f"{v:.2e}" for k, v in sorted(ERRORS.items())})


# --------------------------------------------------------------------------------------------------
# Models and the single-device reference


def randomise(state: nnx.State, seed: int, router_scale: float = 3.0) -> nnx.State:
  """Every weight redrawn at O(1) activation scale (the 0.02 init makes everything ~0)."""
  rng = np.random.default_rng(seed)

  def one(var):
    names = [n for n in sp.logical_names(var) if n not in ("layers", "experts")]
    dims = [d for d, n in zip(var.shape, sp.logical_names(var)) if n not in ("layers", "experts")]
    z = rng.standard_normal(var.shape)
    if "norm" in names:
      w = 1.0 + 0.2 * z
    elif names[0] == "vocab":
      w = z
    else:
      fan_in = dims[0] * dims[1] if names[0] == "q_heads" else dims[0]
      w = z / np.sqrt(fan_in) * (router_scale if "router" in names else 1.0)
    return var.replace(jnp.asarray(w, var.dtype))

  return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def zero_router(state: nnx.State) -> nnx.State:
  """Every router weight 0: all logits tie, top-k picks expert 0 for every token (worst imbalance)."""

  def one(path, var):
    return var.replace(jnp.zeros_like(var.get_value())) if sp.path_str(path).endswith("router") else var

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def make_loss(graphdef):
  def loss(state, ids, targets):
    logits = nnx.merge(graphdef, state)(ids)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits

  return jax.value_and_grad(loss, has_aux=True)


@functools.cache
def model(name: str):
  """(graphdef, state, ids, targets) on device 0; the state drawn from the abstract model."""
  cfg = MODELS[name]
  graphdef, abstract_state = nnx.split(llama4.abstract(cfg, POLICY))
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(0, cfg.text.vocab_size, (B, T)), jnp.int32)
  targets = jnp.asarray(rng.integers(0, cfg.text.vocab_size, (B, T)), jnp.int32)
  return graphdef, randomise(abstract_state, 2), ids, targets


@functools.cache
def reference_step(name: str):
  return jax.jit(make_loss(model(name)[0]))


@functools.cache
def reference(name: str, adversarial: bool = False):
  _, state, ids, targets = model(name)
  state = zero_router(state) if adversarial else state
  (_, logits), grads = reference_step(name)(state, ids, targets)
  return np.asarray(logits), jax.tree.map(np.asarray, grads)


@functools.cache
def layout(preset: str):
  rules, mesh = R.preset(preset), sharding.make_mesh(LAYOUTS[preset])
  return rules, mesh


@functools.cache
def sharded_step(preset: str, name: str):
  rules, mesh = layout(preset)
  with sharding.use(rules, mesh):
    return jax.jit(make_loss(model(name)[0]))


def run_sharded(preset: str, name: str, adversarial: bool = False):
  _, state, ids, targets = model(name)
  state = zero_router(state) if adversarial else state
  rules, mesh = layout(preset)
  state = jax.device_put(state, sharding.param_shardings(state, rules, mesh))
  batch = sharding.batch_sharding(rules, mesh, ids.shape)
  with sharding.use(rules, mesh):
    (_, logits), grads = sharded_step(preset, name)(state, jax.device_put(ids, batch),
                                                    jax.device_put(targets, batch))
  return logits, grads


def compare(preset: str, name: str, adversarial: bool = False) -> None:
  ref_logits, ref_grads = reference(name, adversarial)
  logits, grads = run_sharded(preset, name, adversarial)
  tag = f"{preset}/{name}" + ("/adversarial" if adversarial else "")
  e = rel_err(logits, ref_logits)
  _record(f"logits {tag}", e)
  assert e <= TOL, f"{tag}: logits relative error {e:.2e}"
  worst = 0.0
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    e = rel_err(g, r)
    worst = max(worst, e)
    assert e <= TOL, f"{tag}: gradient of {sp.path_str(path)} relative error {e:.2e}"
  _record(f"grads {tag}", worst)


# --------------------------------------------------------------------------------------------------
# Parity: every preset, both models


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("preset", sorted(LAYOUTS))
def test_logits_and_grads_match_single_device(preset, name):
  compare(preset, name)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("preset", ["expert_parallel", "inference"])
def test_dropless_under_adversarial_routing(preset, name):
  """All router weights 0: every token of every device goes to expert 0 (device 0 of the expert axis)."""
  E = MODELS[name].text.num_local_experts
  idx, _, _ = moe.route(jax.random.normal(jax.random.key(0), (B * T, 64)), jnp.zeros((64, E)), 1, POLICY)
  assert int(jnp.max(idx)) == 0, "a zero router must send every token to expert 0 (top_k breaks ties low)"
  compare(preset, name, adversarial=True)


# --------------------------------------------------------------------------------------------------
# Placement


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


@pytest.mark.parametrize("preset", sorted(LAYOUTS))
def test_parameters_live_where_their_rule_says(preset):
  rules, mesh = layout(preset)
  _, state, _, _ = model("maverick")
  placed = jax.device_put(state, sharding.param_shardings(state, rules, mesh))
  sizes = dict(mesh.shape)
  for (path, var), arr in zip(jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda v: isinstance(v, nnx.Variable)),
                              jax.tree.leaves(placed)):
    names = sp.logical_names(var)
    where = sp.path_str(path)
    expected = P(*[None if n is None or not rules.axes(n) or var.shape[i] % np.prod([sizes[a] for a in rules.axes(n)])
                   else (rules.axes(n)[0] if len(rules.axes(n)) == 1 else rules.axes(n))
                   for i, n in enumerate(names)])
    assert arr.sharding.is_equivalent_to(NamedSharding(mesh, expected), arr.ndim), (where, arr.sharding.spec)
    split = int(np.prod([sizes[a] for e in expected for a in _axes(e)]))
    shard_sizes = {s.data.nbytes for s in arr.addressable_shards}
    assert shard_sizes == {arr.nbytes // split}, (where, shard_sizes, arr.nbytes, split)
    if preset in ("expert_parallel", "inference") and "experts" in names:
      assert expected[names.index("experts")] == "expert", where  # experts split on the expert axis
    if preset.startswith("fsdp") and "embed" in names:
      assert expected[names.index("embed")] == "fsdp", where


def test_sharded_init_equals_init_and_is_placed():
  rules, mesh = layout("expert_parallel")
  cfg = MODELS["maverick"]
  m = llama4.init(cfg, POLICY, seed=0, shardings=sharding.param_shardings(llama4.abstract(cfg, POLICY), rules, mesh))
  want = nnx.state(llama4.init(cfg, POLICY, seed=0))  # on one device
  got = nnx.state(m)
  specs, _ = sharding.param_specs(got, rules, mesh)
  for a, b, s in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(specs)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding.is_equivalent_to(NamedSharding(mesh, s), a.ndim)
  gate_up = m.text.blocks.layers[1].ffn.gate_up[...]  # [layers, E, D, 2, I], E split over expert=4
  assert {s.data.shape[1] for s in gate_up.addressable_shards} == {cfg.text.num_local_experts // 4}


def test_shard_model_places_in_place():
  rules, mesh = layout("fsdp")
  graphdef, state, *_ = model("scout")
  m = sharding.shard_model(nnx.merge(graphdef, state), rules, mesh)
  embed = m.text.embed[...]
  assert embed.sharding.spec == P(None, "fsdp")
  assert embed.addressable_shards[0].data.shape == (embed.shape[0], embed.shape[1] // 8)


def test_indivisible_dimension_falls_back_to_replicated_with_a_note():
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1, expert=8))
  abstract = llama4.abstract(C.TINY_SCOUT, POLICY)  # 4 experts cannot split over 8 devices
  with pytest.warns(UserWarning, match="not divisible by expert=8"):
    sh = sharding.param_shardings(abstract, R.EXPERT_PARALLEL, mesh)
  gate_up = sh["text"]["blocks"]["layers"][0]["ffn"]["gate_up"].get_value()
  assert gate_up.spec == P(None, None, "fsdp", None, None)


# --------------------------------------------------------------------------------------------------
# Rules


def test_unknown_logical_name_raises():
  with pytest.raises(R.UnknownAxisName, match="unknown logical axis name 'heads'"):
    R.FSDP.spec(("heads", "embed"))
  with pytest.raises(R.UnknownAxisName, match=r"\['emb'\]"):
    R.from_mapping({"emb": "fsdp"})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    R.Rules(embed="model")


def test_collision_raises_naming_the_array():
  bad = dataclasses.replace(R.FSDP, name="bad", experts="fsdp")
  with pytest.raises(R.AxisCollision, match="'embed' both map to mesh axis 'fsdp'"):
    bad.spec(("experts", "embed"), what="w")
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=8))
  with pytest.raises(R.AxisCollision, match=r"parameter text/blocks/layers/0/ffn/(gate_up|down)"):
    sharding.param_shardings(llama4.abstract(MODELS["scout"], POLICY), bad, mesh)
  with pytest.raises(R.AxisCollision, match="lists a mesh axis twice"):
    R.Rules(act_batch=("data", "data"))


def test_rules_specs_and_tuples():
  assert R.FSDP.spec(("act_batch", "act_seq", None)) == P(("data", "fsdp", "expert"), None, None)
  assert R.FSDP_TP.spec(("layers", "embed", "q_heads", "head_dim")) == P(None, "fsdp", "tensor", None)
  spec, notes = R.FSDP.resolve(("act_batch", None), (4, 3), {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1})
  assert spec == P(None, None) and "not divisible" in notes[0]
  assert set(R.PRESETS) == {"data_parallel", "fsdp", "fsdp_tp", "expert_parallel", "inference", "context_parallel"}
  assert R.with_context(R.FSDP_TP).axes("act_seq") == ("context",)
  assert R.CONTEXT_PARALLEL.axes("act_seq") == ("context",)
  with pytest.raises(dataclasses.FrozenInstanceError):
    R.FSDP.embed = None


# --------------------------------------------------------------------------------------------------
# Mesh


def test_mesh_config():
  assert sharding.MeshConfig().shape(8) == {"data": 1, "fsdp": 8, "expert": 1, "context": 1, "tensor": 1}
  assert sharding.MeshConfig(data=2, fsdp=-1, tensor=2).shape(8)["fsdp"] == 2
  assert sharding.MeshConfig.parse("data=2,expert=4") == sharding.MeshConfig(data=2, fsdp=1, expert=4)
  with pytest.raises(ValueError, match="at most one"):
    sharding.MeshConfig(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="do not divide"):
    sharding.MeshConfig(tensor=3).shape(8)
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.MeshConfig(fsdp=4).shape(8)
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, expert=2, tensor=2))
  assert mesh.axis_names == ("data", "fsdp", "expert", "context", "tensor") and mesh.devices.size == 8
  assert all(t == AxisType.Auto for t in mesh.axis_types)  # the model is written for propagated shardings
  lines = []
  sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4), log=lines.append)
  assert "[process 0/1] mesh (data=2, fsdp=4, expert=1, context=1, tensor=1)" in lines[0]
  assert lines[0].count("device ") == 8


# --------------------------------------------------------------------------------------------------
# The expert-parallel MoE layer alone (top-2, a token count the mesh does not divide)

N_TOK, D, E, I, K = 43, 16, 8, 12, 2


def _layer_inputs(route: str):
  ks = jax.random.split(jax.random.key(7), 5)
  x = jax.random.normal(ks[0], (N_TOK, D))
  scores = jax.random.uniform(ks[1], (N_TOK, K), minval=0.1)
  gate_up = jax.random.normal(ks[2], (E, D, 2, I)) / np.sqrt(D)
  down = jax.random.normal(ks[3], (E, I, D)) / np.sqrt(I)
  if route == "random":
    idx = jax.random.permutation(ks[4], jnp.tile(jnp.arange(E), (N_TOK, 1)), axis=1, independent=True)[:, :K]
  else:  # every token to the last two experts: all of them on the last device of the expert axis
    idx = jnp.tile(jnp.array([E - 1, E - 2]), (N_TOK, 1))
  return x, idx.astype(jnp.int32), scores, gate_up, down


def _layer_loss(x, idx, scores, gate_up, down):
  y = moe.routed(x, idx, scores, gate_up, down, POLICY)
  return jnp.sum(jnp.sin(y)), y


_layer_step = jax.value_and_grad(_layer_loss, argnums=(0, 2, 3, 4), has_aux=True)
_layer_reference = jax.jit(_layer_step)  # one compiled program per input shape, shared by the tests


@functools.cache
def _layer_sharded(rules):
  """One jitted layer step per rules object (the routing is an input: no recompilation across routes)."""
  return jax.jit(_layer_step)


def _layer_run(rules, mesh, inputs, on_drop=None):
  with sharding.use(rules, mesh, on_drop=on_drop):
    return _layer_sharded(rules)(*inputs)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
  """`jax.lax.ragged_all_to_all` semantics from all_gather (XLA:CPU cannot compile the real one)."""
  me = jax.lax.axis_index(axis_name)
  ops = jax.lax.all_gather(operand, axis_name)  # [n, rows, ...]
  src_off = jax.lax.all_gather(input_offsets, axis_name)[:, me]  # where source s's slice for me starts
  dst_off = jax.lax.all_gather(output_offsets, axis_name)[:, me]  # where it lands in my output
  rows = jnp.arange(output.shape[0])[:, None]
  hit = (rows >= dst_off[None]) & (rows < (dst_off + recv_sizes)[None])  # [rows, n]
  src = jnp.argmax(hit, axis=1)
  row = jnp.clip(src_off[src] + rows[:, 0] - dst_off[src], 0, operand.shape[0] - 1)
  mask = jnp.any(hit, axis=1).reshape((-1,) + (1,) * (output.ndim - 1))
  return jnp.where(mask, ops[src, row], output)


@pytest.mark.parametrize("route", ["random", "all_to_last_device"])
@pytest.mark.parametrize("mode", ["dropless", "ragged_emulated"])
def test_expert_parallel_layer_matches_and_differentiates(mode, route, monkeypatch):
  if mode == "ragged_emulated":
    monkeypatch.setattr(ep_lib, "ragged_all_to_all", emulated_ragged_all_to_all)
  ep = R.ExpertDispatch(mode="ragged" if mode == "ragged_emulated" else "dropless")
  rules = dataclasses.replace(R.EXPERT_PARALLEL, dispatch=ep)
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, expert=4))
  inputs = _layer_inputs(route)
  (_, y), grads = _layer_run(rules, mesh, inputs)
  (_, y_ref), grads_ref = _layer_reference(*inputs)
  errs = [rel_err(y, y_ref)] + [rel_err(g, r) for g, r in zip(grads, grads_ref)]
  _record(f"moe layer {mode}/{route}", max(errs))
  assert max(errs) <= TOL, errs
  assert float(jnp.max(jnp.abs(grads[3]))) > 0  # gradients reach the expert weights


def test_capacity_mode_reports_dropped_fraction():
  seen = []
  rules = dataclasses.replace(R.EXPERT_PARALLEL, dispatch=R.ExpertDispatch(mode="capacity", capacity_factor=1.0))
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, expert=4))
  x, idx, scores, gate_up, down = _layer_inputs("all_to_last_device")
  x, idx, scores = x[:40], idx[:40], scores[:40]  # 5 tokens, 10 assignments per device
  (_, y), _ = _layer_run(rules, mesh, (x, idx, scores, gate_up, down), on_drop=seen.append)
  jax.effects_barrier()
  # Each device sends its 10 assignments to one device with ceil(1.0 * 10 / 4) = 3 slots: 7 of 10 dropped.
  assert len(seen) == 1 and abs(float(seen[0]) - 0.7) < 1e-6, seen
  (_, y_ref), _ = _layer_reference(x, idx, scores, gate_up, down)
  kept = np.abs(np.asarray(y) - np.asarray(y_ref)).max(axis=1) < 1e-5
  assert 0 < kept.sum() < len(kept)  # some tokens complete, the dropped ones differ


def test_sorted_experts_ignores_out_of_range_ids():
  """The contract the dispatch relies on: an id >= E (an empty receive slot) costs nothing, adds nothing."""
  x, idx, scores, gate_up, down = _layer_inputs("random")
  empty = (jnp.arange(N_TOK) % 3 == 0)[:, None]
  experts = jax.jit(moe.sorted_experts, static_argnames="policy")
  y = experts(x, jnp.where(empty, E, idx), scores, gate_up, down, policy=POLICY)
  keep = ~np.asarray(empty[:, 0])
  y_ref = experts(x[keep], idx[keep], scores[keep], gate_up, down, policy=POLICY)
  np.testing.assert_allclose(np.asarray(y)[keep], np.asarray(y_ref), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Planner


def test_plan_counts_every_parameter_once():
  policy = C.BF16
  abstract = llama4.abstract(C.SCOUT, policy)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract)))
  work = plan_lib.Workload(batch=8, seq=1024)
  dp = plan_lib.plan(C.SCOUT, policy, R.DATA_PARALLEL, {"data": 8}, work, abstract=abstract)
  assert (dp.params, dp.grads, dp.optimizer, dp.master) == (2 * n, 2 * n, 8 * n, 4 * n)
  fsdp = plan_lib.plan(C.SCOUT, policy, R.FSDP, {"fsdp": 8}, work, abstract=abstract)
  assert 2 * n / 8 <= fsdp.params < 2 * n / 8 * 1.001 and not fsdp.notes
  ep = plan_lib.plan(C.SCOUT, policy, R.EXPERT_PARALLEL, {"fsdp": 4, "expert": 2}, work, abstract=abstract)
  assert ep.params > fsdp.params  # non-expert weights are not split over `expert`
  assert fsdp.tokens_per_device == 1024 and fsdp.activations > 0


def test_plan_counts_fp8_experts_at_their_own_bytes():
  """Serving Maverick with FP8-stored experts: each routed expert weight 1 byte instead of 2, plus float32
  scales ([E, 2I] and [E, D] per MoE layer); with it the model fits 8 H100s."""
  t, work = C.MAVERICK.text, plan_lib.Workload(batch=8, seq=8192, train=False)
  bf16, f8 = C.BF16, dataclasses.replace(C.BF16, expert_fp8=True)
  a = plan_lib.plan(C.MAVERICK, bf16, R.INFERENCE, {"tensor": 8}, work)
  b = plan_lib.plan(C.MAVERICK, f8, R.INFERENCE, {"tensor": 8}, work)
  E, D, I = t.num_local_experts, t.hidden_size, t.intermediate_size
  n_moe = sum(t.is_moe(i) for i in range(t.num_hidden_layers))
  weights = n_moe * 3 * E * D * I // 8  # split over tensor on the expert width
  scales = n_moe * (E * 2 * I // 8 + E * D)  # gate_up's per column (split), down's per output row (whole)
  assert b.params == a.params - weights + 4 * scales
  hw = plan_lib.HARDWARE["8xh100"]
  with pytest.raises(ValueError, match="no layout fits"):
    plan_lib.choose_mesh(C.MAVERICK, bf16, hw, work)
  _, _, p = plan_lib.choose_mesh(C.MAVERICK, f8, hw, work)
  assert p.fits(hw.hbm_gib)


def test_choose_mesh_and_cli(capsys):
  from tools import plan as cli

  hw = plan_lib.HARDWARE["v5p-128"]
  mesh, rules, p = plan_lib.choose_mesh(C.SCOUT, C.BF16, hw, plan_lib.Workload(batch=64, seq=4096))
  assert p.fits(hw.hbm_gib) and np.prod(list(mesh.sizes_dict().values())) == hw.devices
  with pytest.raises(ValueError, match="no layout fits"):
    plan_lib.choose_mesh(C.MAVERICK, C.BF16, plan_lib.HARDWARE["8xh100"], plan_lib.Workload(batch=8))
  assert cli.main(["--preset", "scout", "--mesh", "fsdp=8", "--rules", "fsdp"]) == 0
  out = capsys.readouterr().out
  assert "scout" in out and "fsdp=8" in out and "adam m+v" in out
