"""Llama 4 prompts with images (reference 2.8): image token blocks and batched model inputs.

An image split into ratio_h x ratio_w tiles (P = `VisionConfig.tokens_per_tile` `<|patch|>` tokens per
tile, 144 for the release) becomes

  1 tile:  <|image_start|> <|image|> P*<|patch|> <|image_end|>
  else:    <|image_start|> per tile row: P*<|patch|> per tile, <|tile_x_separator|> between tiles,
           <|tile_y_separator|> after the row; then <|image|> P*<|patch|> (global tile) <|image_end|>

Prompts mark where images go with the literal text `<|image|>` (one per image, in order) or with
`{"type": "image"}` content items. The chat format and its tokenisation are `chat.py`'s, the one renderer
shared with SFT; this module fills its image slots with the blocks above.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

from llama4_jax.data.chat import (
  IMAGE_PLACEHOLDER,
  ImageSlot,
  Part,
  Piece,
  Special,
  chat_parts,
  encode,
  prompt_list,
  prompt_parts,
  prompt_pieces,
  render,
)
from llama4_jax.data.images import ImageProcessing, preprocess_images
from llama4_jax.data.tokenizers import Tokenizer

# The rendering names below live in chat.py; they stay importable from here.
__all__ = ["IMAGE_PLACEHOLDER", "ImageSlot", "ModelInputs", "Part", "Special", "build_inputs", "chat_parts",
           "check_special_tokens", "encode_parts", "image_parts", "image_token_ids", "prompt_parts", "render"]

IMAGE_START, IMAGE_END, IMAGE, PATCH = "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>"
TILE_X_SEPARATOR, TILE_Y_SEPARATOR = "<|tile_x_separator|>", "<|tile_y_separator|>"


@dataclasses.dataclass(frozen=True)
class ModelInputs:
  """One batch, ready for `Llama4ForConditionalGeneration`-style models."""

  input_ids: np.ndarray  # [B, T] int32, left-padded with the pad id
  attention_mask: np.ndarray  # [B, T] int32, 1 on prompt tokens, 0 on padding
  pixel_values: np.ndarray | None  # [N_tiles, 3, S, S]: all tiles of all images in order (None: no image)
  aspect_ratios: np.ndarray  # [n_images, 2] int64 (ratio_h, ratio_w)
  tiles_per_image: tuple[int, ...]  # rows of pixel_values per image


# --------------------------------------------------------------------------------------------------
# Token blocks


def image_parts(aspect_ratio: tuple[int, int], tokens_per_tile: int) -> list[Special]:
  """The special tokens standing for one image of ratio_h x ratio_w tiles (module docstring)."""
  ratio_h, ratio_w = aspect_ratio
  patches = [Special(PATCH)] * tokens_per_tile
  parts = [Special(IMAGE_START)]
  if ratio_h * ratio_w > 1:
    for _ in range(ratio_h):
      for x in range(ratio_w):
        parts += patches
        if x < ratio_w - 1:
          parts.append(Special(TILE_X_SEPARATOR))
      parts.append(Special(TILE_Y_SEPARATOR))
  return parts + [Special(IMAGE)] + patches + [Special(IMAGE_END)]


def image_token_ids(tokenizer: Tokenizer, aspect_ratio: tuple[int, int], tokens_per_tile: int) -> list[int]:
  """Token ids of one image's block."""
  return [tokenizer.token_id(p.name) for p in image_parts(aspect_ratio, tokens_per_tile)]


def encode_parts(tokenizer: Tokenizer, parts: Sequence[Part], aspect_ratios: Sequence[tuple[int, int]],
                 tokens_per_tile: int) -> list[int]:
  """Token ids of rendered parts (`chat.encode`), image slots filled in order with the blocks of `aspect_ratios`."""
  return _encode_pieces(tokenizer, [Piece(p) for p in parts], aspect_ratios, tokens_per_tile)


def _encode_pieces(tokenizer: Tokenizer, pieces: Sequence[Piece], aspect_ratios: Sequence[tuple[int, int]],
                   tokens_per_tile: int) -> list[int]:
  blocks = [image_token_ids(tokenizer, r, tokens_per_tile) for r in aspect_ratios]
  return encode(tokenizer, pieces, blocks)[0]


# --------------------------------------------------------------------------------------------------
# Batches


def _split_images(images, counts: list[int]) -> list[list]:
  """Images per prompt from a flat list (in placeholder order) or one list per prompt."""
  if images is None:
    images = []
  images = [images] if isinstance(images, (np.ndarray, Image.Image)) else list(images)
  nested = bool(images) and all(isinstance(x, (list, tuple)) for x in images)
  if nested:
    if len(images) != len(counts):
      raise ValueError(f"{len(images)} image lists for {len(counts)} prompts")
    for i, (imgs, n) in enumerate(zip(images, counts)):
      if len(imgs) != n:
        raise ValueError(f"prompt {i} has {n} {IMAGE_PLACEHOLDER} placeholders but {len(imgs)} images were given")
    return [list(x) for x in images]
  if len(images) != sum(counts):
    raise ValueError(f"the prompts have {sum(counts)} {IMAGE_PLACEHOLDER} placeholders in all "
                     f"but {len(images)} images were given")
  out, start = [], 0
  for n in counts:
    out.append(images[start:start + n])
    start += n
  return out


def build_inputs(tokenizer: Tokenizer, prompts, images, vision_cfg, *, processing: ImageProcessing | None = None,
                 chat: bool = True, add_generation_prompt: bool = True, max_images: int | None = None,
                 pad_id: int | None = None) -> ModelInputs:
  """Token ids, mask and pixel values for a batch of prompts with images.

  `prompts`: one prompt or a list; a prompt is a string or a list of messages (`Message`s or {"role",
  "content"} mappings, rendered by `chat.chat_pieces`), and marks each image with `<|image|>`. `images`: flat, in placeholder order over the batch (or one list per
  prompt, or a single image); PIL images or uint8 [H, W, 3] arrays; `max_images` caps their number.
  Rows are left-padded with `pad_id` (default the tokenizer's). `pixel_values` hold every tile of every
  image in that order, each image's global tile last: the order in which the `<|patch|>` tokens, read
  row-major over the batch, receive the tiles' features (P per tile).
  """
  prompts = prompt_list(prompts)
  if not prompts:
    raise ValueError("no prompts given")
  proc = processing if processing is not None else ImageProcessing.from_vision_config(vision_cfg)
  if proc.tile_size != vision_cfg.image_size:
    raise ValueError(f"processing.tile_size={proc.tile_size} differs from "
                     f"vision_cfg.image_size={vision_cfg.image_size}")
  pad = pad_id if pad_id is not None else tokenizer.pad_id
  if pad is None:
    raise ValueError("the tokenizer has no pad id; pass pad_id=")
  pieces = [prompt_pieces(p, chat=chat, add_generation_prompt=add_generation_prompt) for p in prompts]
  per_prompt = _split_images(images, [sum(isinstance(x.part, ImageSlot) for x in ps) for ps in pieces])
  flat = [im for imgs in per_prompt for im in imgs]
  if flat:
    batch = preprocess_images(flat, proc, max_images=max_images)
    pixel_values, ratios, tiles = batch.pixel_values, batch.aspect_ratios, batch.tiles_per_image
  else:
    pixel_values, ratios, tiles = None, np.zeros((0, 2), np.int64), ()
  rows, start = [], 0
  for ps, imgs in zip(pieces, per_prompt):
    rows.append(_encode_pieces(tokenizer, ps, [tuple(r) for r in ratios[start:start + len(imgs)]],
                               vision_cfg.tokens_per_tile))
    start += len(imgs)
  width = max(len(r) for r in rows)
  input_ids = np.full((len(rows), width), pad, np.int32)
  attention_mask = np.zeros((len(rows), width), np.int32)
  for b, r in enumerate(rows):
    input_ids[b, width - len(r):] = r
    attention_mask[b, width - len(r):] = 1
  return ModelInputs(input_ids, attention_mask, pixel_values, ratios, tiles)


def check_special_tokens(tokenizer: Tokenizer, cfg) -> None:
  """Raises if the tokenizer's image tokens are not the ids a `Llama4Config` model expects."""
  for name, want, field in ((IMAGE_START, cfg.boi_token_index, "boi_token_index"),
                            (IMAGE_END, cfg.eoi_token_index, "eoi_token_index"),
                            (PATCH, cfg.image_token_index, "image_token_index")):
    got = tokenizer.token_id(name)
    if got != want:
      raise ValueError(f"tokenizer maps {name} to {got} but config.{field} is {want}")
