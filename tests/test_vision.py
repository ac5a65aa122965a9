"""Vision tower, pixel shuffle, adapter, projector and early fusion at parity with transformers (float32).

One tiny random HF `Llama4ForConditionalGeneration` (TINY_SCOUT) is built per module; our model is loaded
from its checkpoint with `llama4_jax.load`. Every forward is jitted once per input shape.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.llama4 import modeling_llama4 as hf_llama4

import hf_ref
from llama4_jax import CheckpointError, load
from llama4_jax import config as C
from llama4_jax.io import hf_keys, hf_sources
from llama4_jax.io import safetensors as st
from llama4_jax.model import rope
from llama4_jax.model import vision as vm

CFG = C.TINY_SCOUT
V = CFG.vision
TPT = V.tokens_per_tile  # 16 <|patch|> tokens per tile
BOI, EOI, TILE_X, TILE_Y, IMAGE, PATCH = 300, 301, 304, 305, 310, CFG.image_token_index
TOL = 1e-4


def image_tokens(rows: int, cols: int) -> list[int]:
  """Prompt tokens of one image split into rows x cols tiles (+ a global tile if more than one), ref. 2.8."""
  if rows * cols == 1:
    return [BOI, IMAGE] + [PATCH] * TPT + [EOI]
  out = [BOI]
  for _ in range(rows):
    for x in range(cols):
      out += [PATCH] * TPT + ([TILE_X] if x < cols - 1 else [])
    out.append(TILE_Y)
  return out + [IMAGE] + [PATCH] * TPT + [EOI]


def pixels(n_tiles: int, seed: int) -> np.ndarray:
  return np.random.RandomState(seed).uniform(-1, 1, (n_tiles, 3, V.image_size, V.image_size)).astype(np.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny_vlm")
  ref = hf_ref.build(CFG, str(d))
  return ref, str(d)


@pytest.fixture(scope="module")
def ours(ckpt):
  return load(ckpt[1], dtype="float32").model


@pytest.fixture(scope="module")
def forward():
  return nnx.jit(lambda m, ids, mask, pv: m.forward(ids, attention_mask=mask, pixel_values=pv))


def hf_run(ref, ids, pv, mask=None):
  with torch.no_grad():
    out = ref(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pv),
              attention_mask=None if mask is None else torch.as_tensor(mask))
  return out.logits.numpy(), out.image_hidden_states.numpy()


def max_err(a, b, mask=None):
  d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
  return float(d[mask.astype(bool)].max() if mask is not None else d.max())


# --------------------------------------------------------------------------------------------------
# Pure pieces against the transformers functions


def test_rope_table_matches_hf():
  freqs = hf_llama4.Llama4VisionRotaryEmbedding._compute_freqs_ci(hf_ref.hf_config(CFG).vision_config)[:, 0]
  cos, sin = vm.rope_table(V)
  assert cos.shape == (V.grid ** 2 + 1, V.head_dim // 2)
  np.testing.assert_allclose(np.asarray(cos), freqs.real.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(sin), freqs.imag.numpy(), atol=1e-6)
  assert np.all(np.asarray(cos)[-1] == 1) and np.all(np.asarray(sin)[-1] == 0)  # CLS (last) row: angle 0


def test_pixel_shuffle_matches_hf_and_index_map():
  x = np.random.RandomState(0).randn(2, 64, 5).astype(np.float32)
  got = np.asarray(vm.pixel_shuffle(jnp.asarray(x), 0.5))
  np.testing.assert_array_equal(got, hf_llama4.pixel_shuffle(torch.as_tensor(x), 0.5).numpy())
  for i, j, dy, dx, c in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 3), (3, 1, 0, 1, 4), (2, 3, 1, 1, 2)]:
    assert got[1, i * 4 + j, (dy * 2 + dx) * 5 + c] == x[1, (2 * i + dy) * 8 + (2 * j + dx), c]


def test_patchify_matches_unfold():
  x = pixels(2, 1)
  want = torch.nn.Unfold(V.patch_size, stride=V.patch_size)(torch.as_tensor(x)).permute(0, 2, 1).numpy()
  np.testing.assert_array_equal(np.asarray(vm.patchify(jnp.asarray(x), V.patch_size)), want)


def test_merge_scatter_order():
  ids = np.array([[5, PATCH, 5, PATCH], [PATCH, 5, PATCH, 5]])
  emb = jnp.zeros((2, 4, 3))
  feats = jnp.arange(1, 5, dtype=jnp.float32)[:, None] * jnp.ones((1, 3))
  out = np.asarray(jax.jit(vm.merge_image_features, static_argnums=3)(emb, ids, feats, PATCH))
  np.testing.assert_array_equal(out[..., 0], [[0, 1, 0, 2], [3, 0, 4, 0]])


# --------------------------------------------------------------------------------------------------
# Whole model against transformers


TILINGS = [(1, 1), (1, 2), (2, 3)]  # one tile; 1x2 + global; 2x3 + global


def test_image_text_parity(ckpt, ours, forward):
  """One prompt per tiling, each compared with its own unbatched HF run. To compile once, ours runs them as one
  right-padded batch (causal: padding after a prompt does not change it) with the tiles concatenated."""
  ref, _ = ckpt
  prompts = [[1, 7, 8, 9] + image_tokens(r, c) + [20, 21, 22, 23, 24] for r, c in TILINGS]
  # bf16 pixels, as the processor emits them: ours casts them to float32, HF gets the same values in float32
  tiles = [pixels(r * c + (r * c > 1), seed=10 * r + c).astype(jnp.bfloat16) for r, c in TILINGS]
  T = max(map(len, prompts))
  ids = np.array([p + [0] * (T - len(p)) for p in prompts])
  out = forward(ours, jnp.asarray(ids), None, jnp.asarray(np.concatenate(tiles)))
  assert out.image_features.shape == (sum(map(len, tiles)), TPT, V.projector_output_dim)
  first = 0
  for (r, c), p, pv, row in zip(TILINGS, prompts, tiles, out.logits):
    want_logits, want_feats = hf_run(ref, np.array([p]), np.asarray(pv, np.float32))
    feat_err = max_err(out.image_features[first:first + len(pv)], want_feats)
    logit_err = max_err(row[None, :len(p)], want_logits)
    first += len(pv)
    print(f"{r}x{c}: features {feat_err:.2e}, logits {logit_err:.2e}")
    assert feat_err < TOL and logit_err < TOL, (r, c)


def test_batch_with_different_image_counts(ckpt, ours, forward):
  ref, _ = ckpt
  a = [1, 7] + image_tokens(1, 2) + [30, 31, 32]  # one image, 3 tiles
  b = [1, 8] + image_tokens(1, 1) + [40] + image_tokens(1, 1) + [41, 42]  # two images, 1 tile each
  T = max(len(a), len(b))
  ids = np.array([[0] * (T - len(a)) + a, [0] * (T - len(b)) + b])
  mask = np.array([[0] * (T - len(a)) + [1] * len(a), [0] * (T - len(b)) + [1] * len(b)])
  assert mask.min() == 0  # one row is left-padded
  pv = pixels(5, seed=7)  # tiles in prompt order: a's three, then b's two
  want_logits, want_feats = hf_run(ref, ids, pv, mask)
  out = forward(ours, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pv))
  feat_err, logit_err = max_err(out.image_features, want_feats), max_err(out.logits, want_logits, mask)
  print(f"batch: features {feat_err:.2e}, logits {logit_err:.2e}")
  assert feat_err < TOL and logit_err < TOL


# --------------------------------------------------------------------------------------------------
# Discrimination: each single wrong detail breaks parity by >= 100x


def _zero_based_angles(orig):
  def angles(cfg):
    cos, sin = orig(cfg)
    F = cfg.head_dim // 2
    w = rope.base_inv_freq(F, cfg.rope_theta)  # theta^(-2j/F), j < F/2
    w = np.concatenate([w, w])[None]
    c0, s0 = cos * np.cos(w) + sin * np.sin(w), sin * np.cos(w) - cos * np.sin(w)  # angle - w
    c0[-1], s0[-1] = 1.0, 0.0  # CLS keeps angle 0
    return c0, s0
  return angles


def _transposed_grid(orig):
  def shuffle(x, ratio):
    n, p, c = x.shape
    g = int(round(p ** 0.5))
    return orig(x.reshape(n, g, g, c).transpose(0, 2, 1, 3).reshape(n, p, c), ratio)
  return shuffle


PERTURBATIONS = {
    "cls_first": [("append_class_token", lambda orig: lambda x, cls: jnp.concatenate(
        [jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[-1])), x], axis=1)),
                  ("drop_class_token", lambda orig: lambda x: x[:, 1:])],
    "rope_zero_based": [("rope.vision_angles", _zero_based_angles)],
    "shuffle_transposed": [("pixel_shuffle", _transposed_grid)],
}


@pytest.fixture(scope="module")
def features_case(ckpt, ours):
  pv = pixels(3, seed=3)
  with torch.no_grad():
    want = ckpt[0].get_image_features(pixel_values=torch.as_tensor(pv)).last_hidden_state.numpy()

  def err():
    feats, _ = nnx.jit(lambda m, p: m.image_features(p))(ours, jnp.asarray(pv))  # fresh trace every call
    return max_err(feats, want)

  return err, err()


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_perturbation_breaks_parity(features_case, monkeypatch, name):
  err, base = features_case
  assert base < TOL
  for attr, make in PERTURBATIONS[name]:
    owner, attr = (rope, "vision_angles") if attr.startswith("rope.") else (vm, attr)
    monkeypatch.setattr(owner, attr, make(getattr(owner, attr)))
  bad = err()
  print(f"{name}: {bad:.2e} vs {base:.2e}")
  assert bad >= 100 * base and bad > 1e-3


# --------------------------------------------------------------------------------------------------
# Errors and loading


def test_token_count_mismatch(ours):
  ids = np.array([[1] + image_tokens(1, 1)[:-2] + [EOI]])  # one <|patch|> short
  with pytest.raises(ValueError, match=rf"{TPT - 1} image tokens.*{TPT} feature rows"):
    ours.forward(ids, pixel_values=pixels(1, 0))
  with pytest.raises(ValueError, match=rf"{2 * TPT} image tokens.*{3 * TPT} feature rows"):
    ours.check_image_tokens(np.array([image_tokens(1, 1)[:-1] + [PATCH] * TPT]), pixels(3, 0))


def test_load_roundtrip_no_key_skipped(ckpt, ours, caplog):
  _, d = ckpt
  tensors = st.list_tensors(d)
  places = hf_keys.placements(CFG, hf_keys.MULTIMODAL_TEXT_PREFIX)
  assert {p.key for p in places} == set(tensors)
  assert sum(p.key.startswith(("vision_model.", "multi_modal_projector.")) for p in places) == 1 + 7 + 2 + 16 * 2
  state = dict(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
  for p in places:
    ours_arr = np.asarray(state[p.path][...])
    ours_arr = ours_arr if p.index is None else ours_arr[p.index]
    np.testing.assert_array_equal(p.entry.to_hf(ours_arr, CFG), st.read(tensors[p.key], p.key),
                                  err_msg=p.key)
  with caplog.at_level(logging.INFO, logger=hf_sources.__name__):
    hf_sources.sources(CFG, tensors, None)
  assert not caplog.records


def test_text_only_config_and_text_only_checkpoint(ckpt, caplog):
  _, d = ckpt
  tensors = st.list_tensors(d)
  text_cfg = dataclasses.replace(CFG, vision=None)
  with caplog.at_level(logging.INFO, logger=hf_sources.__name__):
    places = hf_sources.sources(text_cfg, tensors, None)
  assert all(s.placement.path[0] == "text" for s in places)
  assert any("42 vision tower / projector tensors" in r.getMessage() for r in caplog.records)
  causal_lm = {k[len(hf_keys.MULTIMODAL_TEXT_PREFIX):]: v for k, v in tensors.items()
               if k.startswith(hf_keys.MULTIMODAL_TEXT_PREFIX)}
  assert len(hf_sources.sources(text_cfg, causal_lm, None)) == len(places)
  with pytest.raises(CheckpointError, match="multimodal but the checkpoint has no vision"):
    hf_sources.sources(CFG, causal_lm, None)
