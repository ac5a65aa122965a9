"""Weight-only int8 / int4 serving: formats against a NumPy reference written here, the quantised model against
a float model built from the dequantised weights (every MoE path, expert parallelism on 8 simulated devices),
storage (save/load bitwise, quantise from an Orbax model or while converting from HF, export dequantised), the
clipping quantizer, and bad input."""

from __future__ import annotations

import dataclasses
import json
import os

import helpers
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import sharding
from llama4_jax import config as C
from llama4_jax.apps import quantize as qapp
from llama4_jax.io import convert, model_dir
from llama4_jax.io import quantize as qio
from llama4_jax.io.load import load
from llama4_jax.model import llama4, quant
from llama4_jax.model.layers import einsum
from sharding import rules as R

B, T = 4, 20  # T > 2 * attention_chunk_size (8): the chunk-local attention path runs
F32 = C.Policy(matmul_precision="highest")


MODELS = helpers.TWO_LAYER_MODELS


# --------------------------------------------------------------------------------------------------
# NumPy reference (independent of model/quant.py)


def ref_quantize(w: np.ndarray, axis: int, bits: int, group: int | None, scale_dtype=np.float32):
  """(values int8 in W's shape, scales with the axis as groups) by per-group absmax, round half to even."""
  w = np.moveaxis(w.astype(np.float32), axis, -1)
  n = w.shape[-1]
  g = n if group is None else group
  qmax = 127 if bits == 8 else 7
  wg = w.reshape(w.shape[:-1] + (n // g, g))
  amax = np.abs(wg).max(-1)
  s = np.where(amax > 0, amax * np.float32(1.0 / qmax), 1.0).astype(scale_dtype)
  inv = (np.float32(1.0) / s.astype(np.float32))[..., None]
  v = np.clip(np.round(wg * inv), -qmax, qmax).astype(np.int8).reshape(w.shape)
  return np.moveaxis(v, -1, axis), np.moveaxis(s, -1, axis)


def ref_pack(v: np.ndarray, axis: int) -> np.ndarray:
  """Two's-complement nibbles, v[2k] low, v[2k+1] high, along `axis`."""
  v = np.moveaxis(v, axis, -1).astype(np.int16)
  lo, hi = v[..., 0::2] & 0xF, v[..., 1::2] & 0xF
  return np.moveaxis((lo | (hi << 4)).astype(np.uint8), -1, axis)


def ref_dequantize(v: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray:
  g = v.shape[axis] // s.shape[axis]
  return v.astype(np.float32) * np.repeat(s.astype(np.float32), g, axis=axis)


@pytest.mark.parametrize("axis", [-3, -2, 3])
@pytest.mark.parametrize("scheme,group,scale_dtype", [("int8", None, "float32"), ("int4", 16, "float32"),
                                                      ("int4", 8, "bfloat16")])
def test_quantize_matches_numpy_reference_bytes_and_scales(axis, scheme, group, scale_dtype):
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((3, 32, 16, 48)) * rng.uniform(0.1, 3, (3, 1, 16, 48))).astype(np.float32)
  w[0, :16, 0, 0] = 0.0  # an all-zero group: scale 1, values 0
  q = quant.quantize(jnp.asarray(w), axis, scheme, group, scale_dtype)
  np_sd = ml_dtypes.bfloat16 if scale_dtype == "bfloat16" else np.float32
  v, s = ref_quantize(w, axis, 8 if scheme == "int8" else 4, group, np_sd)
  assert np.asarray(q.scale).dtype == np_sd and np.array_equal(np.asarray(q.scale), s)
  stored = v if scheme == "int8" else ref_pack(v, axis)
  assert np.asarray(q.q).dtype == stored.dtype and np.asarray(q.q).tobytes() == stored.tobytes()
  np.testing.assert_array_equal(np.asarray(q.dequantize()), ref_dequantize(v, s, axis))
  assert q.shape == w.shape and q.group_size == (group or w.shape[axis])
  # and the round trip is close: within half a step per group
  err = np.abs(np.asarray(q.dequantize()) - w)
  assert np.all(err <= np.repeat(s.astype(np.float32), q.group_size, axis=axis) / 2 + 1e-6)


def test_pack_unpack_every_nibble():
  v = np.arange(-8, 8, dtype=np.int8)
  grid = np.stack(np.meshgrid(v, v, indexing="ij"), -1).reshape(-1, 2)  # every (lo, hi) pair
  x = grid.reshape(-1)[None, :]  # [1, 512] pairs along axis -1
  p = quant.pack_int4(jnp.asarray(x), -1)
  assert np.asarray(p).tobytes() == ref_pack(x, -1).tobytes()
  assert sorted(set(np.asarray(p).reshape(-1).tolist())) == list(range(256))
  np.testing.assert_array_equal(np.asarray(quant.unpack_int4(p, -1)), x)


def test_matmul_seam_dequantises_inside_and_checks_the_axis():
  rng = np.random.default_rng(1)
  x, w = rng.standard_normal((5, 32)).astype(np.float32), rng.standard_normal((32, 24)).astype(np.float32)
  q = quant.quantize(jnp.asarray(w), -2, "int4", 16)
  y = np.asarray(einsum("nd,df->nf", jnp.asarray(x), q, F32))
  v, s = ref_quantize(w, -2, 4, 16)
  np.testing.assert_allclose(y, x @ ref_dequantize(v, s, -2), rtol=1e-6, atol=1e-6)
  with pytest.raises(quant.QuantError, match="contracts axis -2"):
    einsum("nf,df->nd", jnp.ones((5, 24)), q, F32)


def test_clip_search_never_worse_than_rtn_and_weights_by_activations():
  rng = np.random.default_rng(2)
  w = rng.standard_t(3, (4, 256, 32)).astype(np.float32)  # heavy tails: clipping pays
  h = rng.uniform(0.01, 4, (4, 256, 1)).astype(np.float32)
  rtn = quant.quantize(jnp.asarray(w), -2, "int4", 64)
  for hh in (None, h):
    r = quant.clip_ratios(jnp.asarray(w), -2, "int4", 64, hh)
    assert r.shape == rtn.scale.shape and float(r.min()) >= 0.5 and float(r.max()) <= 1.0
    c = quant.quantize(jnp.asarray(w), -2, "int4", 64, ratios=r)
    weight = np.ones_like(w) if hh is None else np.broadcast_to(hh, w.shape)
    err_c, err_rtn = (float(np.sum(weight * (np.asarray(q.dequantize()) - w) ** 2)) for q in (c, rtn))
    assert err_c < 0.9 * err_rtn


def _correlated_inputs(rng, lead: int, tokens: int, n: int) -> np.ndarray:
  """[lead, tokens, n] inputs with strongly correlated features and a few outlier channels."""
  mix = rng.standard_normal((lead, n, n)) / np.sqrt(n)
  x = np.einsum("ltn,lnm->ltm", rng.standard_normal((lead, tokens, n)), mix) + 0.1 * rng.standard_normal(
      (lead, tokens, n))
  x[..., :4] *= 6.0
  return x


def _output_error(x: np.ndarray, w: np.ndarray, wq: np.ndarray) -> float:
  """sum over the leading index of ||X (W - Wq)||^2, w [lead, n, R] contracted on its middle axis."""
  return float(sum(np.sum((x[i] @ (w[i] - wq[i]).astype(np.float64)) ** 2) for i in range(len(w))))


def ref_gptq(w: np.ndarray, h: np.ndarray, bits: int, group: int | None, damp: float = 0.01) -> np.ndarray:
  """Plain GPTQ in float64 (one matrix w [n, R] contracted on axis 0, H [n, n]): column by column, the whole
  inverse Hessian downdated after each one (no Cholesky trick, no lazy blocks); int4 group scales from the
  updated weights at each group's first index. Returns the dequantised weight."""
  n = w.shape[0]
  qmax = 127 if bits == 8 else 7
  g = n if group is None else group
  m = h + damp * np.mean(np.diag(h)) * np.eye(n)
  hinv = np.linalg.inv(m)
  w = w.astype(np.float64).copy()
  out = np.zeros_like(w)
  s = None
  for i in range(n):
    if i % g == 0:
      amax = np.abs(w[i:i + g] if group is not None else w).max(0)
      s = np.where(amax > 0, amax / qmax, 1.0)
    out[i] = np.clip(np.round(w[i] / s), -qmax, qmax) * s
    err = (w[i] - out[i]) / hinv[i, i]
    w[i + 1:] -= np.outer(hinv[i + 1:, i], err)  # the optimal update of the remaining columns (OBS)
    hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]  # eliminate column i
  return out


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int8", None)])
def test_gptq_output_error_below_rtn_on_correlated_inputs(scheme, group):
  rng = np.random.default_rng(7)
  lead, n, R = 3, 128, 48
  x = _correlated_inputs(rng, lead, 600, n)
  w = rng.standard_normal((lead, n, R)).astype(np.float32)
  h = np.einsum("ltn,ltm->lnm", x, x)
  q = quant.gptq(jnp.asarray(w), -2, scheme, group, h)
  rtn = quant.quantize(jnp.asarray(w), -2, scheme, group)
  err_q, err_rtn = (_output_error(x, w, np.asarray(a.dequantize())) for a in (q, rtn))
  assert err_q < 0.6 * err_rtn, (err_q, err_rtn)
  # against the independent float64 reference: nearly every integer the same, the same output error
  ref = np.stack([ref_gptq(w[i], h[i], 8 if scheme == "int8" else 4, group) for i in range(lead)])
  err_ref = _output_error(x, w, ref)
  assert abs(err_q - err_ref) <= 0.05 * err_ref, (err_q, err_ref)
  v = np.asarray(q.q) if scheme == "int8" else np.asarray(quant.unpack_int4(q.q, -2))
  vr = np.round(ref / np.repeat(np.asarray(q.scale, np.float64), q.group_size, axis=-2))
  assert np.mean(v == vr) > 0.97


@pytest.mark.parametrize("axis,shape", [(-2, (2, 64, 24)), (-3, (2, 64, 2, 12)), (-2, (64, 16))])
def test_gptq_stores_valid_int4_and_round_trips(axis, shape):
  rng = np.random.default_rng(8)
  w = rng.standard_t(4, shape).astype(np.float32)
  a = axis % len(shape)
  n = shape[a]
  x = _correlated_inputs(rng, int(np.prod(shape[:a])), 200, n)
  h = np.einsum("ltn,ltm->lnm", x, x).reshape(shape[:a] + (n, n))
  q = quant.gptq(jnp.asarray(w), axis, "int4", 16, h, scale_dtype="bfloat16")
  assert q.q.dtype == jnp.uint8 and q.axis == axis
  assert q.shape == w.shape and q.group_size == 16 and q.scale.dtype == jnp.bfloat16
  v = np.asarray(quant.unpack_int4(q.q, axis))
  assert v.min() >= -7 and v.max() <= 7
  assert np.asarray(q.q).tobytes() == ref_pack(v, axis).tobytes()
  np.testing.assert_array_equal(np.asarray(q.dequantize()), ref_dequantize(v, np.asarray(q.scale), axis))
  # every group's scale is its own absmax / 7 of some weights: the values reach +-7 in most groups
  reach = np.abs(_grouped_np(v, axis, 16)).max(axis=(a + 1))
  assert np.mean(reach == 7) > 0.5


def _grouped_np(v: np.ndarray, axis: int, g: int) -> np.ndarray:
  a = axis % v.ndim
  return v.reshape(v.shape[:a] + (v.shape[a] // g, g) + v.shape[a + 1:])


@pytest.mark.parametrize("scheme,group,axis,shape", [("int4", 16, -2, (3, 64, 24)), ("int4", 8, -3, (2, 32, 2, 8)),
                                                     ("int8", None, -2, (2, 48, 16))])
def test_gptq_with_identity_statistics_is_rtn(scheme, group, axis, shape):
  """H = identity: no column is correlated with another, nothing to compensate: the bytes of RTN."""
  w = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
  a = axis % len(shape)
  eye = np.broadcast_to(np.eye(shape[a], dtype=np.float32) * 3.0, shape[:a] + (shape[a], shape[a]))
  rtn = quant.quantize(jnp.asarray(w), axis, scheme, group)
  for h in (None, eye):
    q = quant.gptq(jnp.asarray(w), axis, scheme, group, h)
    assert np.asarray(q.q).tobytes() == np.asarray(rtn.q).tobytes()
    assert np.asarray(q.scale).tobytes() == np.asarray(rtn.scale).tobytes()
  with pytest.raises(quant.QuantError, match="GPTQ statistics of shape"):
    quant.gptq(jnp.asarray(w), axis, scheme, group, np.eye(4))


def test_gptq_calibration_statistics_and_plan(tmp_path):
  """`calibration_hessians` on the tiny model: H of every quantised MoE matmul, consistent with the per-index
  statistics of the clip search, memory-mapped files when given a directory; the gptq Plan with them has a
  lower output error than RTN on the calibration inputs of the routed experts."""
  cfg, src = _float_dir(tmp_path)
  m = load(src, policy=C.Policy(scan_layers=False)).model
  ids = np.random.default_rng(0).integers(0, cfg.text.vocab_size, 600)
  seen = []
  with quant.calibrating(lambda x, idx, sc, gu, dn: seen.append((np.asarray(x), np.asarray(idx), np.asarray(sc)))):
    m.text.forward(jnp.asarray(ids[None, :300]), logits=False)
    m.text.forward(jnp.asarray(ids[None, 300:]), logits=False)
  spill = tmp_path / "spill"
  spill.mkdir()
  hs = qapp.calibration_hessians(m, ids, window=300, directory=str(spill))
  E, D, I = cfg.text.num_local_experts, cfg.text.hidden_size, cfg.text.intermediate_size
  key = ("text", "blocks", "layers", 0, "ffn")
  assert hs[(*key, "gate_up", 0)].shape == (E, D, D) and hs[(*key, "down", 0)].shape == (E, I, I)
  assert hs[(*key, "shared", "gate", 0)].shape == (D, D) and hs[(*key, "shared", "down", 0)].shape == (I, I)
  assert len(hs) == 2 * 5 and len(list(spill.iterdir())) == 10 and isinstance(hs[(*key, "down", 0)], np.memmap)
  # layer 0's inputs are the first of every two observer calls: H recomputed here, expert by expert
  calls = seen[0::2]
  xs, idx, sc = (np.concatenate([c[i] for c in calls]) for i in range(3))
  gu = np.asarray(m.text.blocks.layers[0].ffn.gate_up[...][0], np.float64)
  for e in range(E):
    tok, slot = np.nonzero(idx == e)
    u = xs[tok].astype(np.float64) * sc[tok, slot][:, None]
    g, up = u @ gu[e, :, 0], u @ gu[e, :, 1]
    act = g / (1 + np.exp(-g)) * up
    np.testing.assert_allclose(hs[(*key, "gate_up", 0)][e], u.T @ u, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(hs[(*key, "down", 0)][e], act.T @ act, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(hs[(*key, "shared", "up", 0)], xs.T @ xs, rtol=1e-4, atol=1e-3)
  # the gptq plan: valid int4 leaves, and a lower output error than RTN where the calibration data is
  pol = qio.serving_policy("int4", 16, targets=("experts", "mlp"))
  plans = {mth: qio.Plan.of(cfg, pol, mth) for mth in ("rtn", "gptq")}
  path = (*key, "shared", "gate")
  w = np.asarray(m.text.blocks.layers[0].ffn.shared.gate[...][0])
  out = {mth: dict(p.items(path, w, hs[(*path, 0)])) for mth, p in plans.items()}
  deq = {mth: qio.dequantize_leaf(path, o[path], o[qio.scale_path(path)], np.float32) for mth, o in out.items()}
  assert out["gptq"][path].dtype == np.uint8 and out["gptq"][path].shape == out["rtn"][path].shape
  err = {mth: float(np.sum((xs @ (w - d)) ** 2)) for mth, d in deq.items()}
  assert err["gptq"] < 0.8 * err["rtn"], err
  with pytest.raises(quant.QuantError, match="'gptq' needs calibration data"):
    qapp.quantize_model(src, str(tmp_path / "g"), "int4", 16, method="gptq")
  with pytest.raises(quant.QuantError, match="used by methods 'clip' and 'gptq'"):
    qapp.quantize_model(src, str(tmp_path / "g"), "int4", 16, calib=str(tmp_path / "x.txt"))
  hf = str(tmp_path / "hf")
  convert.orbax_to_hf(src, hf)
  with pytest.raises(C.ConfigError, match="--method gptq needs calibration data"):
    convert.hf_to_orbax(hf, str(tmp_path / "h"), quantize="int4", group_size=16, method="gptq")
  assert not os.path.exists(tmp_path / "g") and not os.path.exists(tmp_path / "h")


def test_calibrated_clip_search_lowers_the_output_error_and_reduces_to_the_diagonal_search():
  rng = np.random.default_rng(10)
  lead, n, R = 2, 128, 32
  x = _correlated_inputs(rng, lead, 600, n)
  w = rng.standard_t(3, (lead, n, R)).astype(np.float32)
  h = np.einsum("ltn,ltm->lnm", x, x)
  rtn = quant.quantize(jnp.asarray(w), -2, "int4", 32)
  r = quant.clip_ratios_calibrated(jnp.asarray(w), -2, "int4", 32, h)
  assert r.shape == rtn.scale.shape and float(r.min()) >= 0.5 and float(r.max()) <= 1.0
  c = quant.quantize(jnp.asarray(w), -2, "int4", 32, ratios=r)
  err_c, err_rtn = (_output_error(x, w, np.asarray(q.dequantize())) for q in (c, rtn))
  assert err_c < 0.8 * err_rtn, (err_c, err_rtn)
  # a diagonal H has no cross terms: the objective of the per-index weighted search, the same ratios
  d = rng.uniform(0.1, 4, (lead, n)).astype(np.float32)
  rd = quant.clip_ratios_calibrated(jnp.asarray(w), -2, "int4", 32, np.einsum("ln,nm->lnm", d, np.eye(n)))
  rw = quant.clip_ratios(jnp.asarray(w), -2, "int4", 32, d[..., None])
  assert np.mean(np.asarray(rd) == np.asarray(rw)) > 0.95
  with pytest.raises(quant.QuantError, match="clip statistics of shape"):
    quant.clip_ratios_calibrated(jnp.asarray(w), -2, "int4", 32, d)


# --------------------------------------------------------------------------------------------------
# The quantised model equals a float model of the dequantised weights


def _states(name: str, scheme: str, group: int = 16, targets=("experts",), impl: str = "sorted"):
  """(quantised graphdef, state; float graphdef, dequantised state) of a randomised tiny model."""
  cfg, base = MODELS[name], dataclasses.replace(F32, moe_impl=impl)
  qpolicy = qio.serving_policy(scheme, group, targets=targets, base=base)
  fgraph, fstate = nnx.split(llama4.abstract(cfg, base))
  fstate = helpers.randomise(fstate, 3)
  plan = qio.Plan.of(cfg, qpolicy)
  qgraph, qabs = nnx.split(llama4.abstract(cfg, qpolicy))
  qflat = dict(nnx.to_flat_state(qabs))
  deq = []
  for path, var in nnx.to_flat_state(fstate):
    items = dict(plan.items(path, np.asarray(var.get_value())))
    for p, v in items.items():
      qflat[p] = qflat[p].replace(jnp.asarray(v))
    if path in plan.leaves:
      s = items[plan.leaves[path][0]]
      var = var.replace(jnp.asarray(qio.dequantize_leaf(path, items[path], s, np.float32)))
    deq.append((path, var))
  return cfg, qgraph, nnx.from_flat_state(list(qflat.items())), fgraph, nnx.from_flat_state(deq)


def _logits(graph, state, ids):
  return np.asarray(jax.jit(lambda s, i: nnx.merge(graph, s)(i))(state, ids))


def _ids(cfg):
  return jnp.asarray(np.random.default_rng(4).integers(0, cfg.text.vocab_size, (B, T)), jnp.int32)


@pytest.mark.parametrize("impl", ["sorted", "ragged", "dense"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_quantized_logits_equal_dequantized_float_model(name, scheme, impl):
  cfg, qg, qs, fg, fs = _states(name, scheme, targets=("experts", "mlp") if impl == "sorted" else ("experts",),
                                impl=impl)
  ids = _ids(cfg)
  a, b = _logits(qg, qs, ids), _logits(fg, fs, ids)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("preset", ["expert_parallel", "inference"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_logits_under_expert_parallelism_on_8_devices(preset, scheme):
  assert jax.device_count() == 8
  cfg, qg, qs, fg, fs = _states("maverick", scheme)
  ids = _ids(cfg)
  ref = _logits(fg, fs, ids)
  mesh = sharding.make_mesh({"expert_parallel": sharding.MeshConfig(fsdp=2, expert=4),
                             "inference": sharding.MeshConfig(fsdp=1, expert=4, tensor=2)}[preset])
  rules = R.preset(preset)
  shardings = sharding.param_shardings(qs, rules, mesh, warn=False)
  placed = jax.device_put(qs, shardings)
  gu = next(v.get_value() for p, v in nnx.to_flat_state(placed) if p[-1] == "gate_up")
  assert gu.dtype == (jnp.int8 if scheme == "int8" else jnp.uint8) and len(gu.sharding.device_set) == 8
  with sharding.use(rules, mesh):
    out = jax.jit(lambda s, i: nnx.merge(qg, s)(i))(placed, jax.device_put(ids, sharding.batch_sharding(
        rules, mesh, ids.shape)))
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# --------------------------------------------------------------------------------------------------
# Storage


def _float_dir(tmp_path, name="scout"):
  cfg = MODELS[name]
  graph, state = nnx.split(llama4.abstract(cfg, F32))
  state = helpers.randomise(state, 5)
  return cfg, model_dir.save_params(str(tmp_path / "float"), nnx.state(nnx.merge(graph, state), nnx.Param), cfg)


def _leaves(state) -> dict:
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(state, nnx.Param))}


def test_save_load_bitwise_and_scheme_recorded(tmp_path):
  cfg, qg, qs, _, _ = _states("scout", "int4")
  d = model_dir.save_params(str(tmp_path / "q"), nnx.state(nnx.merge(qg, qs), nnx.Param), cfg)
  info = json.load(open(os.path.join(d, model_dir.INFO)))
  assert info["quant"]["scheme"] == "int4" and info["quant"]["group_size"] == 16 and info["fp8"] is None
  m = load(d).model
  assert m.text.policy.quant == "int4" and m.text.policy.quant_group == 16
  want, got = _leaves(nnx.merge(qg, qs)), _leaves(m)
  assert set(want) == set(got)
  for p in want:
    assert want[p].dtype == got[p].dtype and want[p].tobytes() == got[p].tobytes(), p


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_model_dir_then_hf_round_trip(tmp_path, scheme):
  cfg, src = _float_dir(tmp_path)
  dst = str(tmp_path / scheme)
  rec = qapp.quantize_model(src, dst, scheme, group_size=16)
  assert rec["scheme"] == scheme and rec["method"] == "rtn"
  floats, q = _leaves(load(src).model), load(dst).model
  assert q.text.policy.quant == scheme
  for p, v in _leaves(q).items():  # every quantised leaf equals the in-memory quantisation of the float one
    if str(p[-1]).endswith(qio.SUFFIX):
      w = p[:-1] + (p[-1][: -len(qio.SUFFIX)],)
      ref = quant.quantize(jnp.asarray(floats[w]), -3 if w[-1] == "gate_up" else -2, scheme, 16)
      assert np.asarray(ref.scale).tobytes() == v.tobytes()
      assert np.asarray(ref.q).tobytes() == _leaves(q)[w].tobytes()
  # converting the float model's HF export with --quantize gives the same bytes
  hf = str(tmp_path / "hf")
  convert.orbax_to_hf(src, hf)
  again = str(tmp_path / "again")
  convert.hf_to_orbax(hf, again, quantize=scheme, group_size=16)
  a, b = _leaves(q), _leaves(load(again).model)
  assert json.load(open(os.path.join(again, model_dir.INFO)))["quant"]["scheme"] == scheme
  for p in a:
    if a[p].dtype in (np.int8, np.uint8) or str(p[-1]).endswith(qio.SUFFIX):
      assert a[p].tobytes() == b[p].tobytes(), p
  # and exporting the quantised model writes the dequantised weights
  hf_q = str(tmp_path / "hf_q")
  convert.orbax_to_hf(dst, hf_q)
  exported = _leaves(load(hf_q).model)
  for p, v in a.items():
    if str(p[-1]).endswith(qio.SUFFIX):
      w = p[:-1] + (p[-1][: -len(qio.SUFFIX)],)
      np.testing.assert_array_equal(exported[w], np.asarray(qio.dequantize_leaf(w, a[w], v, np.float32)))


def test_calibrated_quantizers_need_an_eager_model_and_a_tokenizer(tmp_path):
  cfg, src = _float_dir(tmp_path)
  text = tmp_path / "calib.txt"
  text.write_text("a calibration text " * 10)
  ids = np.random.default_rng(0).integers(0, cfg.text.vocab_size, 300)
  with pytest.raises(ValueError, match="scan_layers=False"):
    qapp.calibration_hessians(load(src).model, ids)
  for method in ("clip", "gptq"):  # the saved model has no tokenizer
    with pytest.raises(Exception, match="tokenizer"):
      qapp.quantize_model(src, str(tmp_path / "c"), "int4", 16, method=method, calib=str(text))


# --------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_named(tmp_path):
  with pytest.raises(quant.QuantError, match="group size 24 does not divide the contracted axis"):
    quant.quantize(jnp.ones((64, 8)), -2, "int4", 24)
  with pytest.raises(quant.QuantError, match="group size 48 does not divide hidden_size=64"):
    qio.Plan.of(MODELS["scout"], qio.serving_policy("int4", 48))
  with pytest.raises(quant.QuantError, match="unknown quantisation scheme 'int3'"):
    quant.quantize(jnp.ones((64, 8)), -2, "int3")
  with pytest.raises(C.ConfigError, match="policy.quant.*'int3'"):
    C.Policy(quant="int3")
  with pytest.raises(C.ConfigError, match="policy.quant_group.*7"):
    C.Policy(quant="int4", quant_group=7)
  with pytest.raises(C.ConfigError, match="expert_fp8"):
    C.Policy(quant="int8", expert_fp8=True)
  with pytest.raises(quant.QuantError, match="unknown quantisation method 'awq'"):
    qio.check_method("awq")
  cfg, src = _float_dir(tmp_path)
  dst = qapp.quantize_model(src, str(tmp_path / "q4"), "int4", 16) and str(tmp_path / "q4")
  with pytest.raises(quant.QuantError, match="stored with quant='int4', the policy asks for quant='int8'"):
    load(dst, policy=qio.serving_policy("int8"))
  with pytest.raises(quant.QuantError, match="stored with quant_group=16, the policy asks for quant_group=128"):
    load(dst, policy=qio.serving_policy("int4", 128))
  with pytest.raises(quant.QuantError, match="policy.quant='int8' but the checkpoint is not quantised"):
    load(src, policy=qio.serving_policy("int8"))
  with pytest.raises(quant.QuantError, match="already stored quantised"):
    qapp.quantize_model(dst, str(tmp_path / "qq"), "int8")
  with pytest.raises(quant.QuantError, match="cannot be trained"):
    qio.refuse_training(load(dst).model.text.policy)
  assert not os.path.exists(tmp_path / "qq")


def test_cli(tmp_path, capsys):
  from tools import convert as cli

  _, src = _float_dir(tmp_path)
  assert cli.main(["quantize", src, str(tmp_path / "q"), "--quantize", "int4", "--group-size", "16", "-q"]) == 0
  assert load(str(tmp_path / "q")).model.text.policy.quant == "int4"
  assert cli.main(["quantize", src, str(tmp_path / "bad"), "--quantize", "int4", "--group-size", "24", "-q"]) == 1
  assert "group size 24 does not divide" in capsys.readouterr().err and not os.path.exists(tmp_path / "bad")
