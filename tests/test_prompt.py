"""Prompt layout (reference 2.8): image token blocks, chat format, batched inputs, real special-token ids."""

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from llama4_jax.config import SCOUT, TINY_SCOUT, VisionConfig
from llama4_jax.data import images as pp
from llama4_jax.data import prompt as P

# Reference 2.8 (llama-models tokenizer.py): the ids the release checkpoints use.
SPECIAL_IDS = {
    "<|begin_of_text|>": 200000, "<|end_of_text|>": 200001, "<|header_start|>": 200005, "<|header_end|>": 200006,
    "<|eom|>": 200007, "<|eot|>": 200008, "<|finetune_right_pad|>": 200018, "<|image_start|>": 200080,
    "<|image_end|>": 200081, "<|tile_x_separator|>": 200084, "<|tile_y_separator|>": 200085,
    "<|image|>": 200090, "<|patch|>": 200092,
}
BOS, HS, HE, EOT, PAD = 200000, 200005, 200006, 200008, 200018
BOI, EOI, XSEP, YSEP, IMG, PATCH = 200080, 200081, 200084, 200085, 200090, 200092


class CharTokenizer:
  """One id per character (its code point), plus the real Llama 4 special-token ids."""

  vocab_size = 202048
  bos_id = BOS
  eos_ids = (200001, 200007, 200008)
  pad_id = PAD

  def encode(self, text, *, bos=False, eos=False):
    return [BOS] * bos + [ord(c) for c in text] + [200001] * eos

  def decode(self, ids):
    names = {v: k for k, v in SPECIAL_IDS.items()}
    return "".join(names[i] if i in names else chr(i) for i in ids)

  def token_id(self, special):
    if special not in SPECIAL_IDS:
      raise ValueError(f"unknown special token {special!r}")
    return SPECIAL_IDS[special]


TOK = CharTokenizer()


def text_ids(s):
  return [ord(c) for c in s]


def block(rh, rw, p):
  """The image block written out directly from the reference layout."""
  if rh * rw == 1:
    return [BOI, IMG] + [PATCH] * p + [EOI]
  row = []
  for x in range(rw):
    row += [PATCH] * p + ([XSEP] if x < rw - 1 else [])
  return [BOI] + (row + [YSEP]) * rh + [IMG] + [PATCH] * p + [EOI]


def solid(h, w, v):
  return np.full((h, w, 3), v, np.uint8)


# --------------------------------------------------------------------------------------------------
# Image blocks


@pytest.mark.parametrize("vision", [VisionConfig(), TINY_SCOUT.vision])
@pytest.mark.parametrize("ratio", [(1, 1), (1, 2), (2, 3)])
def test_image_block_layout(vision, ratio):
  p = vision.tokens_per_tile
  got = P.image_token_ids(TOK, ratio, p)
  assert got == block(*ratio, p)
  if ratio == (1, 2):  # spelled out once more, token by token
    assert got == [BOI] + [PATCH] * p + [XSEP] + [PATCH] * p + [YSEP] + [IMG] + [PATCH] * p + [EOI]
  assert got.count(PATCH) == p * (ratio[0] * ratio[1] + (ratio != (1, 1)))


def test_tokens_per_tile_of_release():
  assert VisionConfig().tokens_per_tile == 144 and TINY_SCOUT.vision.tokens_per_tile == 16


# --------------------------------------------------------------------------------------------------
# Chat format


def test_chat_format_text():
  msgs = [{"role": "user", "content": "Hi there"}]
  assert P.render(P.chat_parts(msgs)) == (
      "<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi there<|eot|>"
      "<|header_start|>assistant<|header_end|>\n\n")
  assert P.render(P.chat_parts(msgs, add_generation_prompt=False)) == (
      "<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi there<|eot|>")


def test_chat_token_ids_with_system_and_assistant_turns():
  msgs = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "A<|image|>B"},
          {"role": "assistant", "content": "ok"},
          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
  ids = P.encode_parts(TOK, P.chat_parts(msgs), [(1, 1), (1, 2)], 3)
  want = ([BOS, HS] + text_ids("system") + [HE] + text_ids("\n\nBe brief.") + [EOT]
          + [HS] + text_ids("user") + [HE] + text_ids("\n\nA") + block(1, 1, 3) + text_ids("B") + [EOT]
          + [HS] + text_ids("assistant") + [HE] + text_ids("\n\nok") + [EOT]
          + [HS] + text_ids("user") + [HE] + text_ids("\n\n") + block(1, 2, 3) + text_ids("?") + [EOT]
          + [HS] + text_ids("assistant") + [HE] + text_ids("\n\n"))
  assert ids == want


def _transformers_chat_template():
  """transformers' Llama 4 chat template, read from its source (importing the processor is slow)."""
  spec = importlib.util.find_spec("transformers")
  if spec is None or importlib.util.find_spec("jinja2") is None:
    pytest.skip("transformers / jinja2 not installed")
  src = Path(spec.origin).parent / "models" / "llama4" / "processing_llama4.py"
  for node in ast.parse(src.read_text()).body:
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "chat_template":
      return ast.literal_eval(node.value)
  pytest.skip("no chat_template in transformers' processing_llama4.py")


@pytest.mark.parametrize("gen", [True, False])
def test_chat_format_matches_transformers_template(gen):
  import jinja2

  template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(_transformers_chat_template())
  msgs = [{"role": "system", "content": "\n You are helpful.  "}, {"role": "user", "content": "a <|image|> b"},
          {"role": "assistant", "content": " ok "},
          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this?"}]}]
  want = template.render(messages=msgs, bos_token="<|begin_of_text|>", add_generation_prompt=gen)
  assert P.render(P.chat_parts(msgs, add_generation_prompt=gen)) == want


# --------------------------------------------------------------------------------------------------
# build_inputs


def test_build_inputs_batch_with_different_image_counts():
  vision = VisionConfig()
  p = vision.tokens_per_tile
  # prompt 0: two images (1x1, then 1x2 -> 3 tiles); prompt 1: one image (1x1)
  imgs = [solid(300, 200, 0), solid(336, 672, 255), solid(100, 100, 128)]
  prompts = ["Compare <|image|> with <|image|>.", [{"role": "user", "content": "<|image|>What is it?"}]]
  out = P.build_inputs(TOK, prompts, imgs, vision)
  assert out.tiles_per_image == (1, 3, 1)
  np.testing.assert_array_equal(out.aspect_ratios, [[1, 1], [1, 2], [1, 1]])
  assert out.pixel_values.shape == (5, 3, 336, 336)
  tiles = out.pixel_values.astype(np.float32)
  assert np.all(tiles[0, :, :, :224] == -1.0)  # black 300x200 image, width padded from 224 on
  assert np.all(tiles[1:4] == 1.0) and np.all(tiles[4] == 0.0078125)  # white (3 tiles), then grey 128
  row0 = ([BOS, HS] + text_ids("user") + [HE] + text_ids("\n\nCompare ") + block(1, 1, p) + text_ids(" with ")
          + block(1, 2, p) + text_ids(".") + [EOT, HS] + text_ids("assistant") + [HE] + text_ids("\n\n"))
  row1 = ([BOS, HS] + text_ids("user") + [HE] + text_ids("\n\n") + block(1, 1, p) + text_ids("What is it?")
          + [EOT, HS] + text_ids("assistant") + [HE] + text_ids("\n\n"))
  t = max(len(row0), len(row1))
  assert out.input_ids.shape == out.attention_mask.shape == (2, t)
  assert out.input_ids.dtype == np.int32
  for b, row in enumerate((row0, row1)):
    assert out.input_ids[b].tolist() == [PAD] * (t - len(row)) + row  # left padding
    assert out.attention_mask[b].tolist() == [0] * (t - len(row)) + [1] * len(row)
  assert (out.input_ids == PATCH).sum() == out.pixel_values.shape[0] * p
  assert (out.input_ids[0] == PATCH).sum() == 4 * p and (out.input_ids[1] == PATCH).sum() == p


def test_build_inputs_nested_images_raw_text_and_no_images():
  vision = TINY_SCOUT.vision  # 56-px tiles, 16 patch tokens
  out = P.build_inputs(TOK, ["x<|image|>", "y"], [[solid(56, 112, 9)], []], vision, chat=False)
  p = vision.tokens_per_tile
  assert out.input_ids[0].tolist() == [BOS] + text_ids("x") + block(1, 2, p)
  assert out.input_ids[1].tolist() == [PAD] * (len(out.input_ids[0]) - 2) + [BOS] + text_ids("y")
  assert out.pixel_values.shape == (3, 3, 56, 56)
  single = P.build_inputs(TOK, "x<|image|>", solid(56, 112, 9), vision, chat=False)  # one image, no list
  np.testing.assert_array_equal(single.input_ids, out.input_ids[:1])
  text_only = P.build_inputs(TOK, "hello", None, vision)
  assert text_only.pixel_values is None and text_only.input_ids.shape[0] == 1
  assert PATCH not in text_only.input_ids


def test_count_mismatch_and_other_errors():
  vision = TINY_SCOUT.vision
  img = solid(20, 20, 0)
  with pytest.raises(ValueError, match=r"3 <\|image\|> placeholders in all but 2 images"):
    P.build_inputs(TOK, ["<|image|><|image|>", "<|image|>"], [img, img], vision)
  with pytest.raises(ValueError, match=r"prompt 1 has 1 <\|image\|> placeholders but 0 images"):
    P.build_inputs(TOK, ["<|image|>", "<|image|>"], [[img], []], vision)
  with pytest.raises(ValueError, match="more than max_images=1"):
    P.build_inputs(TOK, ["<|image|><|image|>"], [img, img], vision, max_images=1)
  with pytest.raises(ValueError, match="role must be one of"):
    P.build_inputs(TOK, [[{"role": "robot", "content": "hi"}]], None, vision)
  with pytest.raises(ValueError, match="content item 0"):
    P.build_inputs(TOK, [[{"role": "user", "content": [{"type": "video"}]}]], None, vision)
  with pytest.raises(ValueError, match="tile_size=336 differs"):
    P.build_inputs(TOK, "hi", None, vision, processing=pp.ImageProcessing())

  class NoPad(CharTokenizer):
    pad_id = None

  with pytest.raises(ValueError, match="no pad id"):
    P.build_inputs(NoPad(), "hi", None, vision)
  n = 1 + 1 + len("user") + 1 + len("\n\nhi") + 1 + 1 + len("assistant") + 1 + len("\n\n")
  assert P.build_inputs(NoPad(), "hi", None, vision, pad_id=0).input_ids.shape == (1, n)


# --------------------------------------------------------------------------------------------------
# The real Llama 4 tokenizer (tiktoken model shipped by llama_models)


@pytest.fixture(scope="module")
def meta_tokenizer():
  pytest.importorskip("tiktoken")
  tokenizer_mod = pytest.importorskip("llama_models.llama4.tokenizer")
  path = Path(tokenizer_mod.__file__).parent / "tokenizer.model"
  if not path.is_file():
    pytest.skip("llama_models ships no tokenizer.model")
  return tokenizer_mod.Tokenizer(path)


class MetaAdapter:
  """The protocol of docs/DESIGN.md over Meta's tiktoken tokenizer (specials in text stay plain text)."""

  def __init__(self, tok):
    self.tok, self.vocab_size, self.bos_id, self.pad_id = tok, tok.n_words, tok.bos_id, tok.pad_id
    self.eos_ids = tuple(tok.stop_tokens)

  def encode(self, text, *, bos=False, eos=False):
    return self.tok.encode(text, bos=bos, eos=eos)

  def decode(self, ids):
    return self.tok.decode(list(ids))

  def token_id(self, special):
    return self.tok.special_tokens[special]


def test_real_special_token_ids(meta_tokenizer):
  assert meta_tokenizer.n_words == 202048
  for name, want in SPECIAL_IDS.items():
    assert meta_tokenizer.special_tokens[name] == want, name
  tok = MetaAdapter(meta_tokenizer)
  P.check_special_tokens(tok, SCOUT)
  with pytest.raises(ValueError, match="config.boi_token_index is 300"):
    P.check_special_tokens(tok, TINY_SCOUT)


def test_build_inputs_with_real_tokenizer(meta_tokenizer):
  tok, vision = MetaAdapter(meta_tokenizer), VisionConfig()
  out = P.build_inputs(tok, ["Describe <|image|> briefly.", "Hi"], [np.zeros((336, 700, 3), np.uint8)], vision)
  row = out.input_ids[0][out.attention_mask[0] == 1].tolist()
  image = "<|image_start|>" + ("<|patch|>" * 144 + "<|tile_x_separator|>") * 2 + "<|patch|>" * 144
  image += "<|tile_y_separator|><|image|>" + "<|patch|>" * 144 + "<|image_end|>"
  assert tuple(out.aspect_ratios[0]) == (1, 3)
  assert tok.decode(row) == ("<|begin_of_text|><|header_start|>user<|header_end|>\n\nDescribe " + image
                             + " briefly.<|eot|><|header_start|>assistant<|header_end|>\n\n")
  assert row.count(PATCH) == out.pixel_values.shape[0] * 144 == 4 * 144
  assert out.input_ids[1][0] == PAD and out.attention_mask[1][0] == 0
