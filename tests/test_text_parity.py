"""Text model parity with transformers (float32, max |d logits| <= 1e-4), and that the tests discriminate.

Tiny random models (tests/hf_ref.py) with attention_chunk_size 8 and floor_scale 4, so 21-token sequences
cross two chunk boundaries and temperature tuning is active on the NoPE layer.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import hf_ref
from llama4_jax import config as C
from llama4_jax import load
from llama4_jax.model import attention as attn_lib
from llama4_jax.model import llama4, rope
from llama4_jax.model import moe as moe_lib
from llama4_jax.model.text import Attention

TOL = 1e-4
TOPK2 = dataclasses.replace(C.TINY_SCOUT, text=dataclasses.replace(C.TINY_SCOUT.text, num_experts_per_tok=2))
IDS = np.random.RandomState(0).randint(0, 300, (2, 21))


def forward(model, ids, mask=None, position_ids=None):
  """A fresh jit per call site would recompile; nnx.jit caches on the model's graph structure."""
  return np.asarray(_fwd(model, jnp.asarray(ids), None if mask is None else jnp.asarray(mask),
                         None if position_ids is None else jnp.asarray(position_ids)))


@nnx.jit
def _fwd(model, ids, mask, pos):
  return model(ids, attention_mask=mask, position_ids=pos)


class Pair:
  """A transformers reference model and ours, loaded from the same saved directory."""

  def __init__(self, cfg, directory, **build_kw):
    self.ref = hf_ref.build(cfg, str(directory), **build_kw)
    self.ours = load(directory, dtype="float32").model
    self.dir = directory

  def err(self, ids=IDS, mask=None, position_ids=None, model=None):
    want = hf_ref.logits(self.ref, ids, mask, **({} if position_ids is None else
                                                   {"position_ids": torch.as_tensor(position_ids)}))
    got = forward(model or self.ours, ids, mask, position_ids)
    keep = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    return float(np.abs(got - want)[keep].max())


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  cache = {}

  def get(name):
    if name not in cache:
      d = tmp_path_factory.mktemp(name)
      cfg, kw = {
          "scout": (C.TINY_SCOUT, {}),
          "maverick": (C.TINY_MAVERICK, {}),
          "topk2": (TOPK2, {}),
          "causal_lm": (C.TINY_MAVERICK, {"causal_lm": True}),
          "sharded": (C.TINY_SCOUT, {"max_shard_size": "20KB", "seed": 3}),
      }[name]
      cache[name] = Pair(cfg, d, **kw)
    return cache[name]

  return get


@pytest.mark.parametrize("name", ["scout", "maverick", "topk2", "causal_lm", "sharded"])
def test_logits_match_transformers(pairs, name):
  p = pairs(name)
  err = p.err()
  assert err <= TOL, err
  if name == "sharded":
    assert os.path.exists(os.path.join(p.dir, "model.safetensors.index.json"))
  if name == "causal_lm":
    with open(os.path.join(p.dir, "config.json")) as f:
      assert json.load(f)["model_type"] == "llama4_text"


@pytest.mark.parametrize("impl", ["blockwise", "xla", "dense"])
def test_every_attention_implementation_matches_transformers(pairs, impl):
  """The parity protocol per `Policy.attention_impl` (blockwise in 8-token blocks: 21 tokens are three query
  and key blocks, and left padding shifts the chunk grid off the block edges)."""
  p = pairs("scout")
  policy = dataclasses.replace(C.Policy.for_dtype("float32"), attention_impl=impl, attention_block=8)
  model = load(p.dir, policy=policy).model
  ids, mask = IDS.copy(), np.ones_like(IDS)
  mask[1, :5] = 0
  assert p.err(model=model) <= TOL
  assert p.err(ids, mask, model=model) <= TOL


def test_left_padded_batch(pairs):
  """Left padding shifts the chunk grid to the first real token (reference 1.7)."""
  p = pairs("scout")
  ids, mask = IDS.copy(), np.ones_like(IDS)
  mask[0, :3] = 0
  ids[0, :3] = 0
  assert p.err(ids, mask) <= TOL


def test_long_positions_use_llama3_scaling(pairs):
  """RoPE positions far beyond the sequence (position_ids) make the scaled low frequencies matter."""
  p = pairs("scout")
  pos = np.arange(21)[None].repeat(2, 0) + 5000
  assert p.err(position_ids=pos) <= TOL


def test_bf16_checkpoint_files(tmp_path):
  """bf16 safetensors load (upcast to float32 here) and match transformers on the same weights."""
  ref = hf_ref.build(C.TINY_MAVERICK, str(tmp_path), dtype=torch.bfloat16)
  ref = type(ref).from_pretrained(tmp_path, dtype=torch.float32).eval()
  ref.set_attn_implementation("eager")
  from safetensors import safe_open
  with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
    assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
  ours = load(tmp_path, dtype="float32").model
  err = np.abs(forward(ours, IDS) - hf_ref.logits(ref, IDS)).max()
  assert err <= TOL, err


def test_legacy_config_spelling(pairs, tmp_path):
  """A 4.51-spelling config.json (rope_theta + rope_scaling, torch_dtype, no_rope_layers: [])."""
  p = pairs("scout")
  legacy = C.to_hf(C.TINY_SCOUT, legacy=True)
  legacy["text_config"]["no_rope_layers"] = []
  legacy["text_config"].pop("moe_layers")
  shutil.copy(os.path.join(p.dir, "model.safetensors"), tmp_path / "model.safetensors")  # links out are refused
  (tmp_path / "config.json").write_text(json.dumps(legacy))
  assert p.err(model=load(tmp_path, dtype="float32").model) <= TOL


def test_moe_implementations_agree(pairs):
  """The sparse grouped path, lax.ragged_dot and the dense all-experts oracle give the same logits."""
  p = pairs("topk2")
  base = forward(p.ours, IDS)
  for impl in ("dense", "ragged"):
    _, st = nnx.split(p.ours)
    g2 = nnx.graphdef(llama4.abstract(TOPK2, dataclasses.replace(p.ours.policy, moe_impl=impl)))
    other = nnx.merge(g2, st)
    assert np.abs(forward(other, IDS) - base).max() <= 1e-5


# ------------------------------------------------------------------------------------------------
# Discrimination: each single wrong detail must move the error by >= 100x.


def _rotate_half(x, cos, sin):
  x32 = x.astype(jnp.float32)
  h = x.shape[-1] // 2
  c = jnp.concatenate([cos, cos], -1)[..., None, :]
  s = jnp.concatenate([sin, sin], -1)[..., None, :]
  rot = jnp.concatenate([-x32[..., h:], x32[..., :h]], -1)
  return (x32 * c + rot * s).astype(x.dtype)


def _score_on_output(x, idx, scores, gate_up, down, policy, expected_rows=None):
  ones = jnp.ones_like(scores)
  return moe_lib.sorted_experts(x, idx, ones, gate_up, down, policy, expected_rows) * scores[:, :1]


def _perturbed_err(p, monkeypatch, what):
  model = p.ours
  if what == "rotate_half":
    monkeypatch.setattr(rope, "apply", _rotate_half)
  elif what == "no_temperature":
    monkeypatch.setattr(attn_lib, "temperature", lambda pos, f, a: jnp.ones(pos.shape, jnp.float32))
  elif what == "score_on_output":
    monkeypatch.setitem(moe_lib.EXPERT_IMPLS, "sorted", _score_on_output)
  elif what == "chunk_wrong_layers":
    model = nnx.merge(*nnx.split(p.ours))
    for _, m in nnx.iter_modules(model):
      if isinstance(m, Attention):
        m.chunk = None if m.use_rope else C.TINY_SCOUT.text.attention_chunk_size
  elif what == "swap_gate_up":
    model = nnx.merge(*nnx.split(p.ours))
    for _, m in nnx.iter_modules(model):
      if hasattr(m, "gate_up"):
        m.gate_up[...] = m.gate_up[...][..., ::-1, :]
  want = hf_ref.logits(p.ref, IDS)
  got = np.asarray(nnx.jit(lambda m, ids: m(ids))(model, jnp.asarray(IDS)))  # fresh trace
  return float(np.abs(got - want).max())


@pytest.mark.parametrize("what", ["rotate_half", "no_temperature", "chunk_wrong_layers", "score_on_output",
                                  "swap_gate_up"])
def test_single_wrong_detail_breaks_parity(pairs, monkeypatch, what):
  p = pairs("scout")
  good = p.err()
  bad = _perturbed_err(p, monkeypatch, what)
  assert bad >= 100 * good, (what, good, bad)


# ------------------------------------------------------------------------------------------------
# Causality by gradient.


def _jacobian_mask(cfg, T):
  """|d logits[t] / d embeds[s]| > 0 as a [T, T] boolean matrix, for our randomly initialised model."""
  from llama4_jax.model.llama4 import init
  model = init(cfg, C.FP32, seed=1)
  ids = jnp.asarray(np.random.RandomState(1).randint(0, 300, (1, T)))
  emb = model.text.embed_tokens(ids)

  def f(e):
    return model.text.forward(ids, inputs_embeds=e).logits[0].sum(-1)  # [T]

  jac = jax.jit(jax.jacrev(f))(emb)  # [T, 1, T, D]
  return np.asarray(jnp.abs(jac[:, 0]).sum(-1) > 0)


def test_causal_with_global_layers():
  T = 20
  dep = _jacobian_mask(C.TINY_MAVERICK, T)
  assert not np.triu(dep, 1).any(), "a position depends on a later one"
  assert dep[np.tril_indices(T)].all(), "the global (NoPE) layer must let every earlier position through"


def test_chunked_layers_see_only_their_chunk():
  all_rope = dataclasses.replace(C.TINY_SCOUT, text=dataclasses.replace(
      C.TINY_SCOUT.text, no_rope_layers=(1, 1, 1, 1)))
  T, Cs = 20, all_rope.text.attention_chunk_size
  dep = _jacobian_mask(all_rope, T)
  chunk = np.arange(T) // Cs
  expected = (np.arange(T)[None, :] <= np.arange(T)[:, None]) & (chunk[None, :] == chunk[:, None])
  np.testing.assert_array_equal(dep, expected)


def test_bf16_argmax_agreement(tmp_path):
  """Our bf16 model agrees with transformers-fp32 on the next token at least as often as transformers-bf16,
  over 4096 positions (two configs, two seeds)."""
  hf16, ours16 = [], []
  for cfg in (C.TINY_SCOUT, C.TINY_MAVERICK):
    for seed in (5, 6):
      d = tmp_path / f"{seed}{cfg.text.interleave_moe_layer_step}"
      ref32 = hf_ref.build(cfg, str(d), seed=seed)
      ref16 = type(ref32).from_pretrained(d, dtype=torch.bfloat16).eval()
      ref16.set_attn_implementation("eager")
      ids = np.random.RandomState(seed).randint(0, 300, (8, 128))
      want = hf_ref.logits(ref32, ids).argmax(-1)
      hf16.append(hf_ref.logits(ref16, ids).argmax(-1) == want)
      ours16.append(forward(load(d, dtype="bfloat16").model, ids).argmax(-1) == want)
  assert np.mean(ours16) >= np.mean(hf16), (np.mean(ours16), np.mean(hf16))
