"""HF <-> Orbax conversion: bit-identical round trips, transformers reloads the export, FP8 releases,
clear errors with nothing left behind, atomic output under SIGKILL, and bounded memory."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import hf_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.convert_memory import build_hf, synthetic_config  # noqa: E402
from llama4_jax import CheckpointError, load  # noqa: E402
from llama4_jax import config as C  # noqa: E402
from llama4_jax.io import checkpointer, convert, hf_keys, hf_sources, model_dir, orbax_store  # noqa: E402
from llama4_jax.io import safetensors as st  # noqa: E402
from llama4_jax.io.atomic import WriteError  # noqa: E402
from llama4_jax.io.safetensors import list_tensors  # noqa: E402
from tools.convert import main as cli  # noqa: E402

np.float8_e4m3fn = getattr(np, "float8_e4m3fn", ml_dtypes.float8_e4m3fn)  # safetensors looks fp8 up in numpy
TEXT = C.Llama4Config(text=C.TINY_SCOUT.text, vision=None, dtype="float32")
IDS = np.random.RandomState(0).randint(0, 300, (2, 21))
ASSETS = {"tokenizer_config.json": '{"model_max_length": 64}\n', "chat_template.jinja": "{{ messages }}\n"}

MODELS = {  # name: (config, hf_ref.build kwargs, max shard size used for the export)
    "mm-fp32": (C.TINY_SCOUT, {}, "5GB"),
    "mm-bf16": (C.TINY_MAVERICK, dict(dtype=torch.bfloat16, max_shard_size="100KB"), "100KB"),
    "text-fp32": (TEXT, dict(causal_lm=True, max_shard_size="60KB"), "60KB"),
    "text-bf16": (TEXT, dict(causal_lm=True, dtype=torch.bfloat16), "5GB"),
}


def tensors_of(directory):
  """{key: (safetensors dtype, array)} of every tensor of a HF directory."""
  return {k: (info.dtype, load_file(info.file)[k]) for k, info in list_tensors(str(directory)).items()}


def assert_identical(a, b):
  assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
  for k in a:
    assert a[k][0] == b[k][0] and a[k][1].shape == b[k][1].shape, k
    assert a[k][1].tobytes() == b[k][1].tobytes(), k


def leftovers(parent):
  return [e for e in os.listdir(parent) if ".tmp-" in e or ".old-" in e]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """name -> (HF dir, transformers model); the dirs carry two asset files besides generation_config.json."""
  out = {}
  for name, (cfg, kw, _) in MODELS.items():
    d = tmp_path_factory.mktemp(name)
    model = hf_ref.build(cfg, str(d), **kw)
    for f, text in ASSETS.items():
      (d / f).write_text(text)
    out[name] = (d, model)
  return out


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
  """name -> (Orbax dir, exported HF dir)."""
  base = tmp_path_factory.mktemp("converted")
  out = {}
  for name, (d, _) in hf.items():
    ob, back = base / f"{name}-orbax", base / f"{name}-back"
    convert.hf_to_orbax(d, ob)
    convert.orbax_to_hf(ob, back, max_shard_size=MODELS[name][2])
    out[name] = (ob, back)
  return out


# --------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bit_identical(hf, converted, name):
  src, _ = hf[name]
  ob, back = converted[name]
  a, b = tensors_of(src), tensors_of(back)
  cfg = C.from_hf(src)
  prefix = hf_keys.MULTIMODAL_TEXT_PREFIX if cfg.vision is not None else ""
  assert set(a) == {p.key for p in hf_keys.placements(cfg, prefix)}  # the key table covers the checkpoint
  assert_identical(a, b)
  assert C.from_hf(back) == cfg
  sharded = os.path.exists(src / st.INDEX_FILE)
  assert os.path.exists(back / st.INDEX_FILE) == sharded
  if sharded:
    index = json.loads((back / st.INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(v[1].nbytes for v in b.values())
    assert index["metadata"]["total_parameters"] == sum(v[1].size for v in b.values())
  for f in [*ASSETS, "generation_config.json"]:
    assert (ob / "assets" / f).read_bytes() == (src / f).read_bytes() == (back / f).read_bytes()
  assert leftovers(ob.parent) == []


@pytest.mark.parametrize("name", ["mm-fp32", "text-bf16"])
def test_transformers_loads_the_export(hf, converted, name):
  src, ref = hf[name]
  _, back = converted[name]
  cls = type(ref)
  kw = {"dtype": torch.bfloat16} if "bf16" in name else {}
  model = cls.from_pretrained(back, **kw).eval()
  model.set_attn_implementation("eager")
  np.testing.assert_array_equal(hf_ref.logits(model, IDS), hf_ref.logits(ref, IDS))


def test_orbax_params_equal_the_hf_loader(hf, converted):
  """Our parameters from the Orbax copy equal `load`'s from the HF directory (same mapping)."""
  src, _ = hf["mm-fp32"]
  ob, _ = converted["mm-fp32"]
  want = nnx.to_flat_state(nnx.state(load(src, dtype="float32").model))
  got = nnx.to_flat_state(nnx.state(load(ob).model))
  assert [p for p, _ in want] == [p for p, _ in got]
  for (p, a), (_, b) in zip(want, got):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))


def test_dtype_cast_on_both_sides(hf, tmp_path):
  src, _ = hf["text-fp32"]
  convert.hf_to_orbax(src, tmp_path / "ob", dtype="bfloat16")
  convert.orbax_to_hf(tmp_path / "ob", tmp_path / "back", dtype="float32")
  a, b = tensors_of(src), tensors_of(tmp_path / "back")
  for k, (_, x) in a.items():
    np.testing.assert_array_equal(b[k][1], x.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=k)
  assert json.loads((tmp_path / "ob" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_of_a_training_checkpoint(hf, tmp_path):
  """orbax-to-hf takes a Checkpointer directory (latest step; config from meta["config"])."""
  src, _ = hf["text-fp32"]
  state = nnx.state(load(src, dtype="float32").model)
  with checkpointer.Checkpointer(tmp_path / "run", async_save=False) as c:
    c.save(1, state, meta={"config": C.to_hf(C.from_hf(src))})
  assert cli(["orbax-to-hf", "-q", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
  assert_identical(tensors_of(src), tensors_of(tmp_path / "back"))


# --------------------------------------------------------------------------------------------------
# Destinations


def test_existing_destination_needs_overwrite(hf, converted, tmp_path, capsys):
  src, _ = hf["text-fp32"]
  dst = tmp_path / "ob"
  dst.mkdir()
  (dst / "keep.txt").write_text("old")
  assert cli(["hf-to-orbax", "-q", str(src), str(dst)]) == 1
  assert "exists" in capsys.readouterr().err and (dst / "keep.txt").exists()
  assert cli(["hf-to-orbax", "-q", str(src), str(dst), "--overwrite"]) == 0
  assert not (dst / "keep.txt").exists() and (dst / "params").is_dir()
  assert leftovers(tmp_path) == []


@pytest.mark.parametrize("direction", ["hf-to-orbax", "orbax-to-hf"])
def test_disk_full_leaves_nothing(hf, converted, tmp_path, monkeypatch, direction):
  target = (orbax_store.ParamWriter, "write") if direction == "hf-to-orbax" else (st.SafetensorsWriter, "write")
  real, calls = getattr(*target), []

  def full(self, *a, **kw):
    calls.append(1)
    if len(calls) == 7:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, *a, **kw)

  monkeypatch.setattr(*target, full)
  dst = tmp_path / "out"
  with pytest.raises(WriteError, match=f"{dst}.*no space left on device"):
    if direction == "hf-to-orbax":
      convert.hf_to_orbax(hf["mm-fp32"][0], dst)
    else:
      convert.orbax_to_hf(converted["mm-fp32"][0], dst)
  assert not dst.exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Bad inputs: errors name the file and key; nothing is left at the destination


@pytest.fixture
def bad(hf, tmp_path):
  """A fresh copy of the sharded text checkpoint and where its KEY lives."""
  import shutil
  d = tmp_path / "hf"
  shutil.copytree(hf["text-fp32"][0], d)
  index = json.loads((d / st.INDEX_FILE).read_text())
  return d, d / index["weight_map"][KEY], index


KEY = "model.layers.1.feed_forward.experts.gate_up_proj"


def _rewrite(shard, fn):
  t = load_file(shard)
  fn(t)
  save_file(t, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("case", ["truncated", "corrupt", "missing-shard", "shape", "dtype", "config"])
def test_bad_hf_checkpoint(bad, tmp_path, case):
  d, shard, index = bad
  if case == "truncated":
    shard.write_bytes(shard.read_bytes()[:-100])
    match = f"{shard}.*(truncated|not fully covered)"
  elif case == "corrupt":
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-header}")
    match = f"{shard}.*unreadable"
  elif case == "missing-shard":
    shard.unlink()
    match = f"{shard}.*missing"
  elif case == "shape":
    _rewrite(shard, lambda t: t.update({KEY: t[KEY][:, :, :-2]}))
    match = rf"{shard}.*{KEY}.*shape \[4, 64, 62\].*\[4, 64, 64\]"
  elif case == "dtype":
    _rewrite(shard, lambda t: t.update({KEY: t[KEY].astype(np.int32)}))
    match = f"{shard}.*{KEY}.*dtype I32"
  else:
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    match = r"experts\.gate_up_proj.*shape \[4, 64, 64\].*\[4, 64, 96\]"
  dst = tmp_path / "out"
  with pytest.raises(CheckpointError, match=match):
    convert.hf_to_orbax(d, dst)
  assert not dst.exists() and leftovers(tmp_path) == []


def test_bad_orbax_checkpoint(converted, tmp_path):
  import shutil
  ob = tmp_path / "ob"
  shutil.copytree(converted["text-fp32"][0], ob)
  cfg = json.loads((ob / "config.json").read_text())
  cfg["intermediate_size"] = 48
  (ob / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=rf"{ob}/params: parameter 'text\.blocks\.layers\.0\.ffn\.\w+' has shape"):
    convert.orbax_to_hf(ob, tmp_path / "out")
  assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
  with pytest.raises(CheckpointError, match="not a HF directory.*model directory"):
    convert.orbax_to_hf(tmp_path, tmp_path / "out2")


# --------------------------------------------------------------------------------------------------
# FP8 releases, built by hand from a tiny random model


def quantize_rows(w):
  """Per output row of a HF Linear [out, in]: (fp8 values, float32 scale [out, 1])."""
  w = w.astype(np.float32)
  s = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-12) / 448.0
  return np.clip(w / s, -448, 448).astype(ml_dtypes.float8_e4m3fn), s.astype(np.float32)


def deq(q, s):
  return q.astype(np.float32) * s


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
  """Both FP8 layouts of one tiny text model, and the reference dequantised HF state dict of each.
  compressed-tensors: routed experts per expert in fp8 except the last layer's (left unquantised, as
  Meta's fp8_mixed does), everything else bf16. fbgemm_fp8: fused experts fp8 + the shared experts'
  Linears fp8, everything else fp32."""
  base = tmp_path_factory.mktemp("fp8")
  ref = hf_ref.build(TEXT, str(base / "src"), causal_lm=True)
  sd = load_file(base / "src" / "model.safetensors")
  config = json.loads((base / "src" / "config.json").read_text())
  t = TEXT.text
  E, I, L = t.num_local_experts, t.intermediate_size, t.num_hidden_layers
  out = {}

  ct, ct_ref = {}, {}
  for k, v in sd.items():
    if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
      continue
    ct[k] = v.astype(ml_dtypes.bfloat16)
    ct_ref[k] = ct[k].astype(np.float32)
  for i in range(L):
    pre = f"model.layers.{i}.feed_forward.experts."
    gu, dn = sd[pre + "gate_up_proj"], sd[pre + "down_proj"]
    gates, downs = [], []
    for e in range(E):
      # C-contiguous copies: safetensors' save_file writes a transposed view's memory as it lies.
      ws = {n: np.ascontiguousarray(w) for n, w in
            (("gate_proj", gu[e, :, :I].T), ("up_proj", gu[e, :, I:].T), ("down_proj", dn[e].T))}
      dq = {}
      for n, w in ws.items():
        key = f"{pre}{e}.{n}.weight"
        if i == L - 1:
          ct[key] = w.astype(ml_dtypes.bfloat16)
          dq[n] = ct[key].astype(np.float32)
        else:
          ct[key], ct[key + "_scale"] = quantize_rows(w)
          dq[n] = deq(ct[key], ct[key + "_scale"])
      gates.append(np.concatenate([dq["gate_proj"].T, dq["up_proj"].T], -1))
      downs.append(dq["down_proj"].T)
    ct_ref[pre + "gate_up_proj"], ct_ref[pre + "down_proj"] = np.stack(gates), np.stack(downs)
  d = base / "compressed-tensors"
  d.mkdir()
  save_file(ct, d / "model.safetensors", metadata={"format": "pt"})
  (d / "config.json").write_text(json.dumps({**config, "quantization_config": {
      "quant_method": "compressed-tensors", "format": "float-quantized"}}))
  out["compressed-tensors"] = (d, ct_ref)

  fb, fb_ref = {}, {}
  for k, v in sd.items():
    if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
      wt = np.swapaxes(v, 1, 2)  # [E, out, in]
      q, s = quantize_rows(wt.reshape(-1, wt.shape[-1]))
      q, s = q.reshape(wt.shape), s.reshape(wt.shape[:2])
      fb[k] = np.ascontiguousarray(np.swapaxes(q, 1, 2))
      fb[k + "_scale"] = s[:, None, :] if k.endswith("gate_up_proj") else s[:, :, None]
      fb_ref[k] = np.swapaxes(deq(q, s[..., None]), 1, 2)
    elif "shared_expert" in k:
      fb[k], fb[k.replace("weight", "weight_scale")] = quantize_rows(v)
      fb_ref[k] = deq(fb[k], fb[k.replace("weight", "weight_scale")])
    else:
      fb[k] = fb_ref[k] = v
  d = base / "fbgemm"
  d.mkdir()
  save_file(fb, d / "model.safetensors", metadata={"format": "pt"})
  (d / "config.json").write_text(json.dumps({**config, "quantization_config": {
      "quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}}))
  out["fbgemm_fp8"] = (d, fb_ref)
  out["ref_model"] = ref
  return out


@pytest.mark.parametrize("layout", ["compressed-tensors", "fbgemm_fp8"])
def test_fp8_dequantised_weights(fp8, tmp_path, layout):
  d, want = fp8[layout]
  convert.hf_to_orbax(d, tmp_path / "ob", dtype="float32")
  convert.orbax_to_hf(tmp_path / "ob", tmp_path / "back")
  got = tensors_of(tmp_path / "back")
  assert set(got) == set(want)
  for k, w in want.items():
    np.testing.assert_array_equal(got[k][1], w, err_msg=k)
  assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())
  # Default dtype for an FP8 source: bfloat16, one rounding of the float32 dequantisation.
  convert.hf_to_orbax(d, tmp_path / "ob16")
  gu = orbax_store.ParamReader(tmp_path / "ob16" / "params").read(("text", "blocks", "layers", 0, "ffn", "gate_up"), 0)
  np.testing.assert_array_equal(gu, want["model.layers.0.feed_forward.experts.gate_up_proj"].reshape(gu.shape)
                                .astype(ml_dtypes.bfloat16))


def test_fp8_logits_match_transformers_on_the_dequantised_weights(fp8, tmp_path):
  import jax.numpy as jnp
  d, want = fp8["compressed-tensors"]
  convert.hf_to_orbax(d, tmp_path / "ob", dtype="float32")
  ours = load(tmp_path / "ob").model
  ref = fp8["ref_model"]
  ref.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in want.items()}, strict=True)
  got = np.asarray(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(IDS)))
  np.testing.assert_allclose(got, hf_ref.logits(ref, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["compressed-tensors", "fbgemm_fp8"])
def test_keep_fp8(fp8, tmp_path, layout):
  d, want = fp8[layout]
  assert cli(["hf-to-orbax", "-q", str(d), str(tmp_path / "ob"), "--keep-fp8", "--dtype", "float32"]) == 0
  info = json.loads((tmp_path / "ob" / model_dir.INFO).read_text())["fp8"]
  assert info["leaves"] == {"ffn.gate_up": "ffn.gate_up_scale", "ffn.down": "ffn.down_scale"}
  params = model_dir.restore_params(tmp_path / "ob")
  t = TEXT.text
  E, D, I = t.num_local_experts, t.hidden_size, t.intermediate_size
  src = load_file(d / "model.safetensors")
  for j in range(t.layer_period):
    ffn = params["text"]["blocks"]["layers"][str(j)]["ffn"]
    assert ffn["gate_up"].dtype == ml_dtypes.float8_e4m3fn and ffn["gate_up"].shape[1:] == (E, D, 2, I)
    assert ffn["gate_up_scale"].shape[1:] == (E, 2, I) and ffn["down_scale"].shape[1:] == (E, D)
    assert ffn["shared"]["gate"].dtype == np.float32  # everything else dequantised
    for b in range(ffn["gate_up"].shape[0]):
      layer = b * t.layer_period + j
      pre = f"model.layers.{layer}.feed_forward.experts."
      if layout == "fbgemm_fp8":  # the stored fp8 bytes, reshaped, never re-rounded
        assert np.asarray(ffn["gate_up"][b]).tobytes() == src[pre + "gate_up_proj"].tobytes()
        np.testing.assert_array_equal(ffn["down_scale"][b], src[pre + "down_proj_scale"][:, :, 0])
      elif layer < t.num_hidden_layers - 1:
        np.testing.assert_array_equal(np.asarray(ffn["gate_up"][b, 1, :, 0, :]).view(np.uint8),
                                      src[pre + "1.gate_proj.weight"].T.view(np.uint8))
        np.testing.assert_array_equal(ffn["gate_up_scale"][b, 1, 1], src[pre + "1.up_proj.weight_scale"][:, 0])
      else:  # left unquantised by the source: quantised per output column here, close to the original
        w = hf_sources.dequantize_ours(("ffn", "gate_up"), np.asarray(ffn["gate_up"][b]),
                                    np.asarray(ffn["gate_up_scale"][b]), np.float32)
        ref = want[pre + "gate_up_proj"].reshape(w.shape)
        assert np.abs(w - ref).max() <= np.abs(ref).max() / 8
  # Export dequantises; where the source was quantised, exactly the reference.
  convert.orbax_to_hf(tmp_path / "ob", tmp_path / "back", dtype="float32")
  got = tensors_of(tmp_path / "back")
  last_experts = f"layers.{t.num_hidden_layers - 1}.feed_forward.experts"
  exact = [k for k in want if layout == "fbgemm_fp8" or last_experts not in k]
  for k in exact:
    np.testing.assert_array_equal(got[k][1], want[k], err_msg=k)


def test_keep_fp8_loads_with_fp8_experts_for_inference(fp8, tmp_path):
  """`load` of a --keep-fp8 directory holds the stored FP8 bytes and scales as they are and runs them
  (activations quantised per token): close to the dequantised model, not equal to it."""
  import jax.numpy as jnp
  d, _ = fp8["fbgemm_fp8"]
  convert.hf_to_orbax(d, tmp_path / "keep", dtype="float32", keep_fp8=True)
  convert.hf_to_orbax(d, tmp_path / "deq", dtype="float32")
  model = load(tmp_path / "keep").model
  assert model.text.policy.expert_fp8
  stored = model_dir.restore_params(tmp_path / "keep")["text"]["blocks"]["layers"]
  for j, layer in enumerate(model.text.blocks.layers):
    for name in ("gate_up", "down"):
      assert getattr(layer.ffn, name).dtype == jnp.float8_e4m3fn
      assert np.asarray(getattr(layer.ffn, name)[...]).tobytes() == np.asarray(stored[str(j)]["ffn"][name]).tobytes()
      np.testing.assert_array_equal(getattr(layer.ffn, f"{name}_scale")[...], stored[str(j)]["ffn"][f"{name}_scale"])
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(IDS)))
  ref = np.asarray(nnx.jit(lambda m, x: m(x))(load(tmp_path / "deq").model, jnp.asarray(IDS)))
  err = np.abs(got - ref).max() / np.abs(ref).max()
  assert 1e-5 < err < 0.1, err  # the exact arithmetic is tested at the seam (tests/test_fp8.py)


def test_keep_fp8_needs_an_fp8_source(hf, tmp_path):
  with pytest.raises(C.ConfigError, match="--keep-fp8"):
    convert.hf_to_orbax(hf["text-fp32"][0], tmp_path / "ob", keep_fp8=True)


def test_fp8_missing_scale_is_named(fp8, tmp_path):
  d, _ = fp8["compressed-tensors"]
  t = load_file(d / "model.safetensors")
  key = "model.layers.0.feed_forward.experts.2.down_proj.weight_scale"
  del t[key]
  (tmp_path / "hf").mkdir()
  save_file(t, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
  (tmp_path / "hf" / "config.json").write_bytes((d / "config.json").read_bytes())
  with pytest.raises(CheckpointError, match=f"{key}.*missing"):
    convert.hf_to_orbax(tmp_path / "hf", tmp_path / "ob")


# --------------------------------------------------------------------------------------------------
# Processes: SIGKILL mid-conversion, peak memory


_KILLED = textwrap.dedent("""
    import sys, time
    from llama4_jax.io import convert, orbax_store
    real, n = orbax_store.ParamWriter.write, [0]
    def write(self, *a, **kw):
      n[0] += 1
      if n[0] == 20:
        print("HALFWAY", flush=True)
        time.sleep(600)
      return real(self, *a, **kw)
    orbax_store.ParamWriter.write = write
    convert.hf_to_orbax(sys.argv[1], sys.argv[2])
""")


def test_sigkill_mid_conversion_leaves_no_destination(hf, tmp_path):
  src, _ = hf["mm-fp32"]
  dst = tmp_path / "ob"
  p = subprocess.Popen([sys.executable, "-c", _KILLED, str(src), str(dst)], stdout=subprocess.PIPE, cwd=ROOT)
  try:
    assert p.stdout.readline().strip() == b"HALFWAY"
    assert len(leftovers(tmp_path)) == 1  # the half-written temporary directory
  finally:
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
  assert not dst.exists()
  convert.hf_to_orbax(src, dst)  # the next conversion removes what the killed one left
  assert leftovers(tmp_path) == [] and (dst / "params").is_dir()


# VmHWM: this process's peak RSS (ru_maxrss would carry over the forking parent's across exec). The tiny
# conversion runs first in the same process: its peak is the fixed cost (Python, JAX, tensorstore).
_MEASURED = textwrap.dedent("""
    import sys
    from tools.convert import main
    def hwm():
      return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
    n = len(sys.argv) // 2
    assert main(sys.argv[1:n + 1]) == 0
    fixed = hwm()
    assert main(sys.argv[n + 1:]) == 0
    print(fixed, hwm())
""")


def _peak_rss(tiny_args, big_args):
  r = subprocess.run([sys.executable, "-c", _MEASURED, *tiny_args, *big_args], capture_output=True, text=True,
                     cwd=ROOT)
  assert r.returncode == 0, r.stderr[-2000:]
  fixed, peak = map(int, r.stdout.split()[-2:])
  return fixed, peak


def test_conversion_memory_is_bounded(tmp_path):
  """~310 MB checkpoint of 20 layers whose largest tensor is 8 MB: both directions stay within 40% of the
  checkpoint above the fixed cost measured on a tiny checkpoint (loading every tensor at once would need
  all of it, and more)."""
  big = synthetic_config(hidden=512, layers=20, experts=8, intermediate=512, vocab=8192, heads=8, kv_heads=2)
  tiny = synthetic_config(hidden=64, layers=4, experts=4, intermediate=32, vocab=512, heads=4, kv_heads=2)
  size = build_hf(big, str(tmp_path / "big"), max_shard_size="100MB")
  build_hf(tiny, str(tmp_path / "tiny"))
  assert size > 300e6
  t, b = str(tmp_path / "tiny"), str(tmp_path / "big")
  for direction, args in (("hf-to-orbax", lambda d: ["hf-to-orbax", "-q", d, d + "-ob"]),
                          ("orbax-to-hf", lambda d: ["orbax-to-hf", "-q", d + "-ob", d + "-back",
                                                     "--max-shard-size", "100MB"])):
    fixed, peak = _peak_rss(args(t), args(b))
    assert peak - fixed < 0.4 * size, (direction, fixed, peak, size)
  for key in ("model.layers.19.feed_forward.experts.gate_up_proj", "lm_head.weight"):
    a, z = (load_file(list_tensors(d)[key].file)[key] for d in (b, b + "-back"))
    assert a.tobytes() == z.tobytes()
