"""`load` of bad HF checkpoints: every failure names the file and key, and nothing is returned half-loaded."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_ref
from llama4_jax import CheckpointError, load
from llama4_jax import config as C
from llama4_jax.io.safetensors import list_tensors

TEXT_ONLY = C.Llama4Config(text=C.TINY_MAVERICK.text, vision=None, dtype="float32")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  d = tmp_path_factory.mktemp("good")
  hf_ref.build(TEXT_ONLY, str(d), causal_lm=True, max_shard_size="30KB")
  return d


def _copy(good, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(good, dst)
  return dst


def _edit_shard(d, key, fn):
  """Rewrites the shard holding `key` with fn(tensors) applied."""
  with open(d / "model.safetensors.index.json") as f:
    index = json.load(f)
  shard = d / index["weight_map"][key]
  tensors = load_file(shard)
  fn(tensors)
  save_file(tensors, shard, metadata={"format": "pt"})
  return shard, index


KEY = "model.layers.1.feed_forward.experts.gate_up_proj"


def test_good_sharded_checkpoint_loads(good):
  assert len([f for f in os.listdir(good) if f.endswith(".safetensors")]) > 2
  model = load(good, dtype="float32").model
  assert model.text.blocks.layers[1].ffn.gate_up.shape[1:] == (8, 64, 2, 32)


def test_missing_key(good, tmp_path):
  d = _copy(good, tmp_path)
  shard, index = _edit_shard(d, KEY, lambda t: t.pop(KEY))
  del index["weight_map"][KEY]
  (d / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match=f"{KEY}.*missing"):
    load(d, dtype="float32")


def test_key_listed_in_index_but_absent_from_shard(good, tmp_path):
  d = _copy(good, tmp_path)
  shard, _ = _edit_shard(d, KEY, lambda t: t.pop(KEY))
  with pytest.raises(CheckpointError, match=f"{shard.name}.*{KEY}"):
    load(d, dtype="float32")


def test_unexpected_key(good, tmp_path):
  d = _copy(good, tmp_path)
  extra = "model.layers.0.self_attn.q_norm.weight"
  shard, index = _edit_shard(d, KEY, lambda t: t.update({extra: np.ones(4, np.float32)}))
  index["weight_map"][extra] = shard.name
  (d / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match=f"{shard.name}.*unexpected key '{extra}'"):
    load(d, dtype="float32")


def test_wrong_shape(good, tmp_path):
  d = _copy(good, tmp_path)
  shard, _ = _edit_shard(d, KEY, lambda t: t.update({KEY: t[KEY][:, :, :-2]}))
  with pytest.raises(CheckpointError, match=rf"{shard.name}.*{KEY}.*shape \[8, 64, 62\].*\[8, 64, 64\]"):
    load(d, dtype="float32")


def test_wrong_dtype(good, tmp_path):
  d = _copy(good, tmp_path)
  shard, _ = _edit_shard(d, KEY, lambda t: t.update({KEY: t[KEY].astype(np.int64)}))
  with pytest.raises(CheckpointError, match=f"{shard.name}.*{KEY}.*dtype I64"):
    load(d, dtype="float32")


def test_truncated_file(good, tmp_path):
  d = _copy(good, tmp_path)
  with open(d / "model.safetensors.index.json") as f:
    shard = d / json.load(f)["weight_map"][KEY]
  data = shard.read_bytes()
  shard.write_bytes(data[: len(data) - 100])
  with pytest.raises(CheckpointError, match=f"{shard.name}.*(truncated|unreadable)"):
    load(d, dtype="float32")


def test_corrupt_header(good, tmp_path):
  d = _copy(good, tmp_path)
  with open(d / "model.safetensors.index.json") as f:
    shard = d / json.load(f)["weight_map"][KEY]
  shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-header}")
  with pytest.raises(CheckpointError, match=f"{shard.name}.*unreadable"):
    load(d, dtype="float32")


def test_missing_shard(good, tmp_path):
  d = _copy(good, tmp_path)
  with open(d / "model.safetensors.index.json") as f:
    shard = d / json.load(f)["weight_map"][KEY]
  shard.unlink()
  with pytest.raises(CheckpointError, match=f"{shard.name}.*missing"):
    load(d, dtype="float32")


def test_config_disagrees_with_tensors(good, tmp_path):
  d = _copy(good, tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["intermediate_size"] = 48
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="shape"):
    load(d, dtype="float32")


def test_empty_directory(tmp_path):
  C.save_hf(TEXT_ONLY, tmp_path)
  with pytest.raises(CheckpointError, match="neither model.safetensors"):
    list_tensors(str(tmp_path))
