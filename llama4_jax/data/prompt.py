"""Llama 4 prompts with images (reference 2.8): image token blocks, chat format, batched model inputs.

An image split into ratio_h x ratio_w tiles (P = `VisionConfig.tokens_per_tile` `<|patch|>` tokens per
tile, 144 for the release) becomes

  1 tile:  <|image_start|> <|image|> P*<|patch|> <|image_end|>
  else:    <|image_start|> per tile row: P*<|patch|> per tile, <|tile_x_separator|> between tiles,
           <|tile_y_separator|> after the row; then <|image|> P*<|patch|> (global tile) <|image_end|>

Prompts mark where images go with the literal text `<|image|>` (one per image, in order). A chat is
`<|begin_of_text|>` then per message `<|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>` (a
leading system message is stripped of surrounding whitespace), then, for generation,
`<|header_start|>assistant<|header_end|>\\n\\n` — transformers' chat template. As transformers'
tokenizer does, each run of text between special tokens is encoded in one piece (so "\\n\\n" joins
the start of the content); text never turns into special tokens except the `<|image|>` placeholder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
import numpy as np
from PIL import Image

from llama4_jax.data.tokenizers import Tokenizer
from llama4_jax.data.images import ImageProcessing, preprocess_images

IMAGE_PLACEHOLDER = "<|image|>"  # what prompts write where an image goes
BEGIN_OF_TEXT = "<|begin_of_text|>"
HEADER_START, HEADER_END, EOT = "<|header_start|>", "<|header_end|>", "<|eot|>"
IMAGE_START, IMAGE_END, IMAGE, PATCH = "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>"
TILE_X_SEPARATOR, TILE_Y_SEPARATOR = "<|tile_x_separator|>", "<|tile_y_separator|>"
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Special:
  """A special token, by name, inside a rendered prompt."""

  name: str


@dataclasses.dataclass(frozen=True)
class ImageSlot:
  """Where the next image's token block goes."""


Part = str | Special | ImageSlot


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


# --------------------------------------------------------------------------------------------------
# Rendering


def _content_parts(content, where: str) -> list[Part]:
  """Text with `<|image|>` placeholders (a string, or transformers-style [{"type": "text"|"image"}])."""
  if isinstance(content, str):
    pieces = content.split(IMAGE_PLACEHOLDER)
    out: list[Part] = [pieces[0]]
    for p in pieces[1:]:
      out += [ImageSlot(), p]
    return [p for p in out if p != ""]
  if isinstance(content, Sequence):
    out = []
    for i, item in enumerate(content):
      kind = item.get("type") if isinstance(item, Mapping) else None
      if kind == "image":
        out.append(ImageSlot())
      elif kind == "text":
        out += _content_parts(item["text"], where)
      else:
        raise ValueError(f"{where}: content item {i} must be {{'type': 'text', 'text': ...}} or "
                         f"{{'type': 'image'}}, got {item!r}")
    return out
  raise ValueError(f"{where}: content must be a string or a list of items, got {type(content).__name__}")


def chat_parts(messages: Sequence[Mapping], add_generation_prompt: bool = True) -> list[Part]:
  """A conversation of {"role", "content"} messages as text, special tokens and image slots."""
  if not messages:
    raise ValueError("a chat needs at least one message")
  parts: list[Part] = [Special(BEGIN_OF_TEXT)]
  for i, m in enumerate(messages):
    where = f"message {i}"
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
      raise ValueError(f"{where}: expected a mapping with 'role' and 'content', got {m!r}")
    if m["role"] not in ROLES:
      raise ValueError(f"{where}: role must be one of {ROLES}, got {m['role']!r}")
    body = _content_parts(m["content"], where)
    if i == 0 and m["role"] == "system":  # transformers' template trims the system prompt
      body = _strip(body)
    parts += [Special(HEADER_START), m["role"], Special(HEADER_END), "\n\n", *body, Special(EOT)]
  if add_generation_prompt:
    parts += [Special(HEADER_START), "assistant", Special(HEADER_END), "\n\n"]
  return parts


def _strip(parts: list[Part]) -> list[Part]:
  parts = list(parts)
  if parts and isinstance(parts[0], str):
    parts[0] = parts[0].lstrip()
  if parts and isinstance(parts[-1], str):
    parts[-1] = parts[-1].rstrip()
  return [p for p in parts if p != ""]


def render(parts: Sequence[Part]) -> str:
  """The prompt as text (image slots shown as `<|image|>`), e.g. to print or compare with a template."""
  return "".join(p if isinstance(p, str) else p.name if isinstance(p, Special) else IMAGE_PLACEHOLDER
                 for p in parts)


def encode_parts(tokenizer: Tokenizer, parts: Sequence[Part], aspect_ratios: Sequence[tuple[int, int]],
                 tokens_per_tile: int) -> list[int]:
  """Token ids: runs of text encoded in one piece, specials by id, image slots filled in order."""
  n_slots = sum(isinstance(p, ImageSlot) for p in parts)
  if n_slots != len(aspect_ratios):
    raise ValueError(f"{n_slots} {IMAGE_PLACEHOLDER} placeholders but {len(aspect_ratios)} images")
  ids: list[int] = []
  text: list[str] = []
  ratios = iter(aspect_ratios)
  for p in [*parts, None]:
    if isinstance(p, str):
      text.append(p)
      continue
    if text:
      ids += tokenizer.encode("".join(text))
      text = []
    if isinstance(p, Special):
      ids.append(tokenizer.token_id(p.name))
    elif isinstance(p, ImageSlot):
      ids += image_token_ids(tokenizer, next(ratios), tokens_per_tile)
  return ids


def prompt_parts(prompt, *, chat: bool = True, add_generation_prompt: bool = True) -> list[Part]:
  """Parts of one prompt: a message list, or a string (one user turn if `chat`, else raw text after bos)."""
  if isinstance(prompt, str):
    if chat:
      return chat_parts([{"role": "user", "content": prompt}], add_generation_prompt)
    return [Special(BEGIN_OF_TEXT), *_content_parts(prompt, "prompt")]
  return chat_parts(prompt, add_generation_prompt)


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

  `prompts`: one prompt or a list; a prompt is a string or a list of {"role", "content"} messages, and
  marks each image with `<|image|>`. `images`: flat, in placeholder order over the batch (or one list per
  prompt, or a single image); PIL images or uint8 [H, W, 3] arrays; `max_images` caps their number.
  Rows are left-padded with `pad_id` (default the tokenizer's). `pixel_values` hold every tile of every
  image in that order, each image's global tile last: the order in which the `<|patch|>` tokens, read
  row-major over the batch, receive the tiles' features (P per tile).
  """
  if isinstance(prompts, str) or (prompts and isinstance(prompts[0], Mapping)):
    prompts = [prompts]
  if not prompts:
    raise ValueError("no prompts given")
  proc = processing if processing is not None else ImageProcessing.from_vision_config(vision_cfg)
  if proc.tile_size != vision_cfg.image_size:
    raise ValueError(f"processing.tile_size={proc.tile_size} differs from "
                     f"vision_cfg.image_size={vision_cfg.image_size}")
  pad = pad_id if pad_id is not None else tokenizer.pad_id
  if pad is None:
    raise ValueError("the tokenizer has no pad id; pass pad_id=")
  parts = [prompt_parts(p, chat=chat, add_generation_prompt=add_generation_prompt) for p in prompts]
  per_prompt = _split_images(images, [sum(isinstance(x, ImageSlot) for x in ps) for ps in parts])
  flat = [im for imgs in per_prompt for im in imgs]
  if flat:
    batch = preprocess_images(flat, proc, max_images=max_images)
    pixel_values, ratios, tiles = batch.pixel_values, batch.aspect_ratios, batch.tiles_per_image
  else:
    pixel_values, ratios, tiles = None, np.zeros((0, 2), np.int64), ()
  rows, start = [], 0
  for ps, imgs in zip(parts, per_prompt):
    rows.append(encode_parts(tokenizer, ps, [tuple(r) for r in ratios[start:start + len(imgs)]],
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
