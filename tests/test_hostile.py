"""Hostile and broken inputs: each case of docs/RELIABILITY.md is a test, here or named there; every error
names the file, key or value at fault, and nothing is left half-written.

Each test here carries the ids of its cases (`@case("C02")`); `test_reliability_table_matches_the_tests`
checks that every row of the table names tests that exist and carry its id, and that every id used here has
a row, so the table cannot drift from the tests. The checkpoints are tiny synthetic ones written without
torch (`benchmarks.convert_memory.build_hf`), so the whole file runs in well under a minute.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.convert_memory import build_hf, synthetic_config  # noqa: E402
from llama4_jax import CheckpointError, load  # noqa: E402
from llama4_jax import config as C  # noqa: E402
from llama4_jax.apps.generate import generate, generate_text  # noqa: E402
from llama4_jax.data import sources  # noqa: E402
from llama4_jax.data.images import preprocess_images  # noqa: E402
from llama4_jax.data.tokenizers import load_tokenizer  # noqa: E402
from llama4_jax.io import convert, model_dir  # noqa: E402
from llama4_jax.io import safetensors as st  # noqa: E402
from llama4_jax.io.atomic import WriteError  # noqa: E402
from llama4_jax.model import llama4  # noqa: E402
from llama4_jax.train import checkpoints, loop  # noqa: E402
from llama4_jax.train import config as tc  # noqa: E402
from sharding.mesh import MeshConfig  # noqa: E402
from tools.convert import main as convert_cli  # noqa: E402

CFG = dataclasses.replace(synthetic_config(hidden=16, layers=2, experts=2, intermediate=16, vocab=64, heads=2,
                                           kv_heads=1), dtype="float32")
KEY = "model.layers.1.feed_forward.experts.gate_up_proj"
TABLE = os.path.join(ROOT, "docs", "RELIABILITY.md")


def case(*ids: str):
  """Tags a test with the ids of the docs/RELIABILITY.md cases it proves."""
  def tag(fn):
    fn.cases = ids
    return fn
  return tag


# --------------------------------------------------------------------------------------------------
# Fixtures: one tiny HF checkpoint, single-file and sharded, copied fresh for each test that breaks it


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  base = tmp_path_factory.mktemp("hostile")
  build_hf(CFG, str(base / "single"))
  build_hf(CFG, str(base / "sharded"), max_shard_size="8KB")
  return base


@pytest.fixture
def single(built, tmp_path):
  """A fresh copy of the single-file checkpoint (model.safetensors)."""
  return shutil.copytree(built / "single", tmp_path / "hf")


@pytest.fixture
def sharded(built, tmp_path):
  """A fresh copy of the sharded checkpoint (model-0000i-of-0000n.safetensors + index)."""
  return shutil.copytree(built / "sharded", tmp_path / "hf")


def leftovers(parent) -> list[str]:
  return [e for e in os.listdir(parent) if ".tmp-" in e or ".old-" in e]


def refused(src, match: str, tmp_path, capsys, exc=CheckpointError) -> None:
  """`load(src)` raises `exc` matching `match`; `tools.convert hf-to-orbax src` exits 1 with the same message
  on stderr and leaves no output (nor a temporary directory) behind."""
  with pytest.raises(exc, match=match):
    load(src)
  dst = tmp_path / "out"
  assert convert_cli(["hf-to-orbax", "-q", str(src), str(dst)]) == 1
  err = capsys.readouterr().err
  assert re.search(match, err), err
  assert not dst.exists() and leftovers(tmp_path) == []


def split_file(path) -> tuple[dict, bytes]:
  """(header dict, data bytes) of a safetensors file."""
  raw = path.read_bytes()
  n = int.from_bytes(raw[:8], "little")
  return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_file(path, header: dict | bytes, data: bytes, length: int | None = None) -> None:
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)


# --------------------------------------------------------------------------------------------------
# The safetensors file itself


@case("C01")
@pytest.mark.parametrize("cut", ["inside-length", "inside-header", "inside-data"])
def test_truncated_file(single, tmp_path, capsys, cut):
  f = single / st.SINGLE_FILE
  raw = f.read_bytes()
  n = int.from_bytes(raw[:8], "little")
  keep = {"inside-length": 5, "inside-header": 8 + n // 2, "inside-data": len(raw) - 3}[cut]
  f.write_bytes(raw[:keep])
  match = {"inside-length": "shorter than the 8-byte header length", "inside-header": "header length field says",
           "inside-data": "truncated.*key '.*' ends at byte"}[cut]
  refused(single, f"{re.escape(str(f))}: .*{match}", tmp_path, capsys)


@case("C02", "C03")
@pytest.mark.parametrize("length", [2 ** 60, "file+1"])
def test_header_length_field_huge_or_past_the_file(single, tmp_path, capsys, length):
  f = single / st.SINGLE_FILE
  raw = f.read_bytes()
  n = 2 ** 60 if length == 2 ** 60 else len(raw) - 8 + 1
  f.write_bytes(n.to_bytes(8, "little") + raw[8:])
  refused(single, rf"{re.escape(str(f))}: unreadable safetensors file \(header length field says {n} bytes",
          tmp_path, capsys)


@case("C04")
@pytest.mark.parametrize("header, match", [
    (b"{garbage-header}", "header is not JSON"),
    (b"\xff\xfe\x00\x01\x80\x81\x82\x83", "header is not JSON"),
    (b"[1, 2, 3]", "header is not a JSON object"),
    (b'{"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}', "key 'w': dtype 'Q4' not supported"),
    (b'{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', "key 'w': malformed entry"),
    (b'{"w": "x"}', "key 'w': malformed entry"),
])
def test_header_not_json_or_malformed(single, tmp_path, capsys, header, match):
  f = single / st.SINGLE_FILE
  write_file(f, header, b"\0" * 64)
  refused(single, f"{re.escape(str(f))}: unreadable safetensors file .*{match}", tmp_path, capsys)


@case("C05", "C06", "C07")
@pytest.mark.parametrize("how", ["negative", "overlapping", "out-of-file"])
def test_bad_data_offsets(single, tmp_path, capsys, how):
  f = single / st.SINGLE_FILE
  header, data = split_file(f)
  first, second = [k for k in header if k != "__metadata__"][:2]
  a, b = header[first]["data_offsets"]
  if how == "negative":
    header[first]["data_offsets"] = [a - 4, b - 4]
    match = rf"key '{first}': data_offsets \[-4, \d+\] do not hold"
  elif how == "overlapping":
    header[second] = dict(header[first])
    match = f"keys '{first}' and '{second}' overlap|keys '{second}' and '{first}' overlap"
  else:
    header[first]["data_offsets"] = [a + 10 ** 9, b + 10 ** 9]
    match = f"data_offsets past the end.*key '{first}' ends at byte"
  write_file(f, header, data)
  refused(single, f"{re.escape(str(f))}: .*({match})", tmp_path, capsys)


# --------------------------------------------------------------------------------------------------
# The index: only files of the checkpoint directory itself are read


@case("C13", "C14")
@pytest.mark.parametrize("name", ["../x.safetensors", "sub/../../x.safetensors", "/etc/passwd"])
def test_index_entry_outside_the_directory(sharded, tmp_path, capsys, name):
  index = json.loads((sharded / st.INDEX_FILE).read_text())
  index["weight_map"][KEY] = name
  (sharded / st.INDEX_FILE).write_text(json.dumps(index))
  where = re.escape(str(sharded / st.INDEX_FILE))
  refused(sharded, f"{where}: file {re.escape(repr(name))} lies outside the checkpoint directory", tmp_path, capsys)


@case("C15")
@pytest.mark.parametrize("which", ["shard", "index", "config"])
def test_symlink_leaving_the_directory_is_refused(sharded, tmp_path, capsys, which):
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  index = json.loads((sharded / st.INDEX_FILE).read_text())
  name = {"shard": index["weight_map"][KEY], "index": st.INDEX_FILE, "config": "config.json"}[which]
  shutil.move(sharded / name, outside / name)
  os.symlink(outside / name, sharded / name)
  refused(sharded, f"{re.escape(str(sharded / name))}: a symlink to {re.escape(str(outside / name))}, outside the "
          "checkpoint directory", tmp_path, capsys)


def _hub_cache(src, cache, repo="models--org--tiny"):
  """`src` laid out as the HF hub cache does: snapshots/<rev>/FILE -> ../../blobs/<hash>."""
  blobs, snap = cache / repo / "blobs", cache / repo / "snapshots" / "0123abcd"
  blobs.mkdir(parents=True)
  snap.mkdir(parents=True)
  for i, name in enumerate(sorted(os.listdir(src))):
    shutil.copy(src / name, blobs / f"blob{i:04d}")
    os.symlink(f"../../blobs/blob{i:04d}", snap / name)
  return snap


@case("C16")
def test_hub_cache_symlinks_into_the_repo_blobs_are_followed(built, tmp_path):
  snap = _hub_cache(built / "sharded", tmp_path / "hub")
  assert all(os.path.islink(snap / n) for n in os.listdir(snap))
  model = load(snap, dtype="float32").model
  ref = load(built / "sharded", dtype="float32").model
  np.testing.assert_array_equal(np.asarray(model.text.embed[...]), np.asarray(ref.text.embed[...]))
  convert.hf_to_orbax(snap, tmp_path / "ob")
  assert (tmp_path / "ob" / "params").is_dir()


@case("C15", "C16")
def test_hub_cache_link_into_another_repo_is_refused(built, tmp_path, capsys):
  snap = _hub_cache(built / "sharded", tmp_path / "hub")
  other = _hub_cache(built / "sharded", tmp_path / "hub", repo="models--evil--other")
  index = json.loads((snap / st.INDEX_FILE).read_text())
  shard = index["weight_map"][KEY]
  os.remove(snap / shard)
  os.symlink(os.path.relpath(os.path.realpath(other / shard), snap), snap / shard)
  refused(snap, f"{re.escape(str(snap / shard))}: a symlink to .*models--evil--other/blobs/.*outside the checkpoint",
          tmp_path, capsys)


# --------------------------------------------------------------------------------------------------
# config.json


@case("C17")
def test_config_json_missing(single, tmp_path, capsys):
  os.remove(single / "config.json")
  refused(single, f"{re.escape(str(single / 'config.json'))}: missing", tmp_path, capsys)


@case("C18")
@pytest.mark.parametrize("text, match", [
    ("{oops", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"model_type": "llama4", "text_config": 3}', "'text_config': missing from a 'llama4' config"),
    ('{"model_type": "gpt2"}', "'model_type': expected 'llama4' or 'llama4_text', got 'gpt2'"),
])
def test_config_json_malformed(single, tmp_path, capsys, text, match):
  path = single / "config.json"
  path.write_bytes(text if isinstance(text, bytes) else text.encode())
  refused(single, f"{re.escape(str(path))}: .*{match}", tmp_path, capsys, exc=C.ConfigError)


@case("C19")
@pytest.mark.parametrize("field, value", [
    ("hidden_size", 0), ("num_local_experts", -2), ("vocab_size", 2 ** 40), ("num_attention_heads", 2 ** 31),
    ("hidden_size", 16.5), ("num_hidden_layers", "2"), ("num_experts_per_tok", 3),
])
def test_config_json_absurd_values(single, tmp_path, capsys, field, value):
  path = single / "config.json"
  d = json.loads(path.read_text())
  d[field] = value
  path.write_text(json.dumps(d))
  refused(single, f"{re.escape(str(path))}: config field 'text_config.{field}': .*{re.escape(repr(value))}"
          if field != "num_experts_per_tok" else f"'text_config.{field}': 3 exceeds num_local_experts=2",
          tmp_path, capsys, exc=C.ConfigError)


@case("C19")
@pytest.mark.parametrize("field, value", [("hidden_size", 0), ("num_attention_heads", 0), ("patch_size", -14)])
def test_vision_config_absurd_values(field, value):
  d = C.to_hf(C.TINY_SCOUT)
  d["vision_config"][field] = value
  with pytest.raises(C.ConfigError, match=f"'vision_config.{field}': must be a positive integer.*{value}"):
    C.from_hf(d)


# --------------------------------------------------------------------------------------------------
# Output directories


@pytest.fixture(scope="module")
def orbax(built, tmp_path_factory):
  """The single-file checkpoint converted to a model directory."""
  dst = tmp_path_factory.mktemp("orbax") / "ob"
  convert.hf_to_orbax(built / "single", dst)
  return dst


@case("C21", "C22")
@pytest.mark.parametrize("where", ["equal", "inside", "contains"])
@pytest.mark.parametrize("direction", ["hf-to-orbax", "orbax-to-hf"])
def test_output_equal_to_inside_or_containing_the_input(single, orbax, tmp_path, capsys, where, direction):
  src = single if direction == "hf-to-orbax" else shutil.copytree(orbax, tmp_path / "ob")
  dst = {"equal": src, "inside": src / "out", "contains": tmp_path}[where]
  before = sorted(os.listdir(src))
  for overwrite in ([], ["--overwrite"]):
    assert convert_cli([direction, "-q", str(src), str(dst), *overwrite]) == 1
    err = capsys.readouterr().err
    assert f"error: {dst}: the output directory" in err and {"equal": "is the input", "inside": "lies inside",
                                                                "contains": "contains the input"}[where] in err
  assert sorted(os.listdir(src)) == before and leftovers(tmp_path) == [] and leftovers(src) == []


_KILLED = """
import os, sys, time
os.environ["JAX_PLATFORMS"] = "cpu"
from llama4_jax.io import convert, safetensors
real, n = safetensors.SafetensorsWriter.write, [0]
def write(self, *a, **kw):
  n[0] += 1
  if n[0] == 10:
    print("HALFWAY", flush=True)
    time.sleep(600)
  return real(self, *a, **kw)
safetensors.SafetensorsWriter.write = write
convert.orbax_to_hf(sys.argv[1], sys.argv[2], max_shard_size="8KB")
"""


@case("C23")
def test_sigkill_mid_export_leaves_no_destination_and_the_next_run_cleans_up(orbax, tmp_path):
  dst = tmp_path / "back"
  p = subprocess.Popen([sys.executable, "-c", _KILLED, str(orbax), str(dst)], stdout=subprocess.PIPE, cwd=ROOT)
  try:
    assert p.stdout.readline().strip() == b"HALFWAY"
    (tmp,) = leftovers(tmp_path)
    assert re.fullmatch(rf"\.back\.tmp-{p.pid}-[0-9a-f]{{8}}", tmp)  # clearly named: destination and writer's PID
    assert any(n.endswith(".safetensors") for n in os.listdir(tmp_path / tmp))  # half written
  finally:
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
  assert not dst.exists() and leftovers(tmp_path) == [tmp]
  convert.orbax_to_hf(orbax, dst)  # the next run removes what the killed one left
  assert leftovers(tmp_path) == [] and (dst / st.SINGLE_FILE).is_file()


# --------------------------------------------------------------------------------------------------
# Write failures and weights that are not numbers


@case("C24")
def test_disk_full_while_writing_the_metadata_leaves_nothing(single, tmp_path, monkeypatch):
  def full(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(model_dir, "write_model_files", full)
  dst = tmp_path / "out"
  with pytest.raises(WriteError, match=f"{dst}: writing metadata, config and assets failed: no space left on device"):
    convert.hf_to_orbax(single, dst)
  assert not dst.exists() and leftovers(tmp_path) == []


def _poison(directory, key):
  """Writes a NaN and an inf into the first two values of `key`; returns its file."""
  info = st.list_tensors(str(directory))[key]
  with open(info.file, "r+b") as f:
    f.seek(info.offset)
    f.write(np.array([np.nan, np.inf], np.float32).tobytes())
  return info.file


@case("C25")
def test_nan_and_inf_weights_warn_by_name_and_strict_refuses(single, tmp_path, capsys, caplog):
  f = _poison(single, KEY)
  msg = f"{re.escape(f)}: key '{KEY}': 1 NaN and 1 inf values"
  with caplog.at_level(logging.WARNING):
    assert convert_cli(["hf-to-orbax", "-q", str(single), str(tmp_path / "ob")]) == 0
  assert re.search(f"{msg} .*converted as they are \\(--strict refuses\\)", caplog.text)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    load(single, dtype="float32")  # the loader warns too
  assert re.search(f"{msg} .*loaded as they are", caplog.text)
  assert convert_cli(["hf-to-orbax", "-q", "--strict", str(single), str(tmp_path / "strict")]) == 1
  assert re.search(f"error: {msg}.*refused \\(--strict\\)", capsys.readouterr().err)
  assert not (tmp_path / "strict").exists() and leftovers(tmp_path) == []

  caplog.clear()  # the other direction: the converted model holds the NaN and the inf too
  with caplog.at_level(logging.WARNING):
    assert convert_cli(["orbax-to-hf", "-q", str(tmp_path / "ob"), str(tmp_path / "back")]) == 0
  leaf = re.escape(f"{tmp_path / 'ob' / 'params'}: parameter text.blocks.layers.0.ffn.gate_up block 1 (HF key "
                   f"'{KEY}'): 1 NaN and 1 inf values")
  assert re.search(leaf, caplog.text)
  assert convert_cli(["orbax-to-hf", "-q", "--strict", str(tmp_path / "ob"), str(tmp_path / "strict")]) == 1
  assert re.search(f"error: {leaf}.*refused", capsys.readouterr().err)
  assert not (tmp_path / "strict").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Pickle: never loaded


@case("C26")
@pytest.mark.parametrize("name", ["pytorch_model.bin", "consolidated.00.pth", "pytorch_model.bin.index.json"])
def test_pickle_weights_are_refused_unread(single, tmp_path, capsys, name):
  os.remove(single / st.SINGLE_FILE)
  (single / name).write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")  # would run a command if unpickled
  refused(single, f"{re.escape(str(single / name))}: not supported: pickle", tmp_path, capsys)
  with pytest.raises(CheckpointError, match=f"{re.escape(str(single / name))}: not supported: pickle"):
    load(single / name)  # the file itself


_PICKLE_LOADERS = re.compile(r"\btorch\.load\(|\btorch\.jit\.load\(|\bpickle\.loads?\(|\bimport (c|cloud)?pickle\b|"
                             r"\bfrom (c|cloud)?pickle import\b|\bdill\b|\bjoblib\.load\(|read_pickle\(|"
                             r"allow_pickle\s*=\s*True|weights_only\s*=\s*False|\bUnpickler\b")


@case("C27")
def test_no_pickle_loader_anywhere_in_the_code():
  hits, n = [], 0
  for top in ("llama4_jax", "sharding", "tools", "experiments", "benchmarks"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
      for name in files:
        if name.endswith(".py"):
          n += 1
          with open(os.path.join(dirpath, name), encoding="utf-8") as f:
            hits += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(f, 1) if _PICKLE_LOADERS.search(line)]
  assert n > 50 and hits == []


# --------------------------------------------------------------------------------------------------
# Orbax model directories


@case("C28")
@pytest.mark.parametrize("damage", ["metadata", "data", "config"])
def test_damaged_model_directory(orbax, tmp_path, damage):
  ob = shutil.copytree(orbax, tmp_path / "ob")
  if damage == "data":  # every file of the OCDBT store cut in half
    for f in (ob / "params" / "d").iterdir():
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    match, exc = rf"{re.escape(str(ob / 'params'))}: parameter '[\w.]+' is unreadable", CheckpointError
  elif damage == "metadata":
    bad = ob / "params" / "_METADATA"
    bad.write_text("{not json")
    match, exc = f"{re.escape(str(bad))}: unreadable", CheckpointError
  else:
    bad = ob / "config.json"
    bad.write_text(json.dumps({**json.loads(bad.read_text()), "num_local_experts": 0}))
    match, exc = f"{re.escape(str(bad))}: config field 'text_config.num_local_experts'", C.ConfigError
  with pytest.raises(exc, match=match):
    load(ob)
  with pytest.raises(exc, match=match):
    convert.orbax_to_hf(ob, tmp_path / "back")
  assert not (tmp_path / "back").exists()


# --------------------------------------------------------------------------------------------------
# Training


def _experiment(tmp_path, **data) -> tc.Experiment:
  rng = np.random.default_rng(0)
  words = "the king queen lord lady love night day sword crown".split()
  with open(tmp_path / "train.jsonl", "w") as f:
    for _ in range(30):
      f.write(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n")
  text = dataclasses.replace(C.TINY_SCOUT.text, vocab_size=320)
  return tc.Experiment(
      name="r", model=C.Llama4Config(text=text, vision=None, dtype="float32"), mesh=MeshConfig(fsdp=1),
      data=tc.DataConfig(source="jsonl", train_paths=(str(tmp_path / "train.jsonl"),), bpe_vocab=300, seq_len=16,
                         batch_size=2, **data),
      run=tc.RunConfig(steps=2, out_dir=str(tmp_path / "runs"), sample_prompt=""))


@case("T02")
def test_resume_with_a_changed_model_config_is_refused(tmp_path):
  exp = _experiment(tmp_path)
  quiet, one = (lambda *_: None), jax.devices()[:1]
  s = loop.setup(exp, one, quiet, time.perf_counter())
  state, _ = loop.restore_or_init(s, False, quiet)
  checkpoints.save(s.ck, state, s.it.get_state(), {"config": C.to_hf(s.cfg)}, force=True)
  s.ck.close()
  step_dir = re.escape(os.path.join(s.run_dir, "checkpoints", "0"))

  s = loop.setup(exp, one, quiet, time.perf_counter())  # the same model resumes
  assert loop.restore_or_init(s, True, quiet)[1] == 0
  s.ck.close()
  for assignment, match in [
      ("model.text.intermediate_size=48", "intermediate_size is 32 in the checkpoint, 48 now"),
      ("model.text.rope_theta=1000", r"rope_parameters.rope_theta is 500000.0 in the checkpoint, 1000.0 now"),
      ("model.text.num_hidden_layers=8", r"layer_types is .* in the checkpoint, .* now \(and 3 more: .*num_hidden_l")]:
    s = loop.setup(tc.override(exp, assignment), one, quiet, time.perf_counter())
    with pytest.raises(CheckpointError, match=f"{step_dir}: resuming with a changed model config: {match}"):
      loop.restore_or_init(s, True, quiet)
    s.ck.close()


@case("T03")
@pytest.mark.parametrize("assignment, message", [
    ("optim.lrr=1", "OptimConfig has no field 'lrr'"),
    ("run.steps=many", "field 'run.steps' expects int, got 'many'"),
    ("model.text.hidden_size=0", "config field 'text_config.hidden_size': must be a positive integer"),
    ("run.steps", "expected field=value"),
])
def test_bad_set_on_the_train_command_line(assignment, message, capsys):
  from experiments.train import main

  assert main(["--config", "cpu_default", "--set", assignment, "--print-config"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --set ") and assignment in err and message in err, err


@case("T04", "T05", "T06", "T07")
@pytest.mark.parametrize("reader", ["text", "jsonl", "chat"])
@pytest.mark.parametrize("content, match", [
    (None, ": no such data file"),
    (b"", ": empty data file"),
    (b"   \n\n", ": empty data file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r": binary data \(a NUL byte at offset 8\)"),
    (b"\n\n\n" + b'{"text": "caf\xe9"}\n', r":4: not UTF-8 text \(byte 0xe9 at column 14\)"),
])
def test_bad_data_files(tmp_path, reader, content, match):
  path = tmp_path / "data.jsonl"
  if content is not None:
    path.write_bytes(content)
  read = {"text": lambda p: sources.read_text_documents([p]), "jsonl": sources.read_jsonl_texts,
          "chat": sources.read_chat_jsonl}[reader]
  with pytest.raises(sources.DataFormatError, match=re.escape(str(path)) + match):
    read(path)


# --------------------------------------------------------------------------------------------------
# Evaluation and generation


@case("G01")
@pytest.mark.parametrize("what", ["missing", "empty-dir", "run-without-steps"])
def test_missing_checkpoint(tmp_path, capsys, what):
  path = tmp_path / "ckpt"
  if what == "empty-dir":
    path.mkdir()
  elif what == "run-without-steps":
    (path / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)  # a save that never completed
  match = "no such directory" if what == "missing" else "not a HF directory .* nor a run directory with a complete"
  with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: {match}"):
    load(path)
  from experiments.generate import main

  assert main(["--checkpoint", str(path), "--prompt", "hi"]) == 2
  assert f"error: {path}: {match.split(' .*')[0]}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model():
  text = dataclasses.replace(C.TINY_SCOUT.text, max_position_embeddings=16)
  return llama4.init(C.Llama4Config(text=text, vision=None, dtype="float32"), C.Policy(), seed=0)


@case("G02")
def test_prompt_longer_than_the_context(tiny_model):
  with pytest.raises(ValueError, match=r"a prompt of 20 tokens \+ max_new_tokens=1 exceeds max_position_embeddings=16"):
    generate(tiny_model, np.ones((1, 20), np.int32), max_new_tokens=1)


@case("G02")
def test_prompt_within_the_context_generates(tiny_model):
  """8 + 2 tokens of 16: the cache rounding (cache_multiple=64) stops at max_position_embeddings."""
  assert generate(tiny_model, np.ones((1, 8), np.int32), max_new_tokens=2).tokens.shape == (1, 2)
  assert generate(tiny_model, np.ones((1, 14), np.int32), max_new_tokens=2).tokens.shape == (1, 2)


@case("G03")
@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_image(tmp_path, damage):
  path = tmp_path / "photo.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
  raw = path.read_bytes()
  path.write_bytes({"garbage": b"not an image at all", "truncated": raw[:len(raw) // 2], "empty": b""}[damage])
  with pytest.raises(ValueError, match=rf"image 0 \({re.escape(str(path))}\): not a readable image"):
    preprocess_images([path])
  if damage == "truncated":  # opened lazily by the caller: the decode error still names it
    with pytest.raises(ValueError, match=rf"image 1 \({re.escape(str(path))}\): cannot decode the image"):
      preprocess_images([np.zeros((8, 8, 3), np.uint8), Image.open(path)])


@pytest.fixture(scope="module")
def chat_parts():
  model = llama4.abstract(C.Llama4Config(text=C.TINY_SCOUT.text, vision=None, dtype="float32"), C.Policy())
  return model, load_tokenizer("llama4")


@case("G04")
@pytest.mark.parametrize("messages, match", [
    ([{"role": "robot", "content": "hi"}], "role must be one of"),
    ([{"role": "user"}], "needs content"),
    ([{"content": "hi"}], "expected a Message or a mapping"),
    ([{"role": "user", "content": 3}], "content must be a string or a list"),
    ([], "at least one message"),
])
def test_malformed_chat_messages_fail_before_the_model_runs(chat_parts, messages, match):
  with pytest.raises(ValueError, match=f"prompt 1: .*{match}"):  # the batch row at fault, then the message
    generate_text(*chat_parts, ["a good prompt", messages])  # an abstract model: nothing could run


# --------------------------------------------------------------------------------------------------
# The table


def _table() -> dict[str, list[str]]:
  """{case id: [test references]} of docs/RELIABILITY.md's rows."""
  rows = {}
  with open(TABLE, encoding="utf-8") as f:
    for line in f:
      if not re.match(r"\|\s*[A-Z]\d\d\s*\|", line):
        continue
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      assert len(cells) == 5, f"{TABLE}: row {cells[0]} has {len(cells)} cells, not 5 (a '|' inside a cell?)"
      assert cells[0] not in rows, f"{TABLE}: case {cells[0]} listed twice"
      assert all(cells[1:4]), f"{TABLE}: case {cells[0]} has an empty case / expected / observed cell"
      rows[cells[0]] = re.findall(r"`([\w/.]+\.py::\w+)`", cells[4])
  return rows


def test_reliability_table_matches_the_tests():
  rows = _table()
  tagged = {name: fn.cases for name, fn in globals().items() if name.startswith("test_") and hasattr(fn, "cases")}
  assert len(rows) >= 30 and len(tagged) >= 20
  for cid, refs in rows.items():
    assert refs, f"{TABLE}: case {cid} names no test"
    for ref in refs:
      path, name = ref.split("::")
      if os.path.basename(path) == os.path.basename(__file__):
        assert cid in tagged.get(name, ()), f"{TABLE}: {cid} names {name}, which is not tagged @case({cid!r})"
      else:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
          assert f"def {name}(" in f.read(), f"{TABLE}: {cid} names {ref}, which does not exist"
  for name, ids in tagged.items():
    for cid in ids:
      assert cid in rows and f"tests/test_hostile.py::{name}" in rows[cid], (
          f"{name} is tagged {cid}, but the {cid} row of {TABLE} does not name it")
