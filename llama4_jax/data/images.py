"""Llama 4 image preprocessing (reference 2.9) in numpy: canvas choice, resize, pad, normalise, tiles.

Sizes are (height, width) everywhere, as in transformers. For one H x W image and tile side S:

1. RGB uint8 [H, W, 3]; PIL images are converted, alpha is composited onto white.
2. Canvas: among (a*S, b*S) with a*b <= max_patches, take the one needing the least upscaling to hold
   the image undistorted, or, when every canvas shrinks it, the least downscaling; ties -> least area.
3. Resize undistorted into the canvas, upscaling no side past max(side, S); bilinear with antialias.
4. Zero-pad bottom/right to the canvas, then rescale (v/255) and normalise ((x-mean)/std) with every
   step rounded to bfloat16 as the reference does: 128 -> 0.0078125, padding 0 -> -1.0.
5. Split into a x b tiles, row-major; when a*b > 1 append the global tile: the original image resized
   straight to S x S (aspect not kept) and normalised the same way.

Resize numerics. `resize_bilinear_aa` reimplements the kernel torchvision runs for
`resize(uint8 image, antialias=True)` on x86 CPUs with AVX2 (torch's separable fixed-point kernel:
a triangle filter widened by the downscale factor, int16 weights whose precision is set by the largest
weight, a horizontal pass then a vertical pass, each rounded to uint8). Against
`torch.nn.functional.interpolate(uint8, mode="bilinear", antialias=True)` it is bit-exact (tested).
For scale: Pillow's BILINEAR (same filter, 22-bit weights) differs from it by 1 in 0.05-20 % of the
values, and torchvision on CPUs without AVX2 (float32 path, rounded once) by 1 in 7-20 %.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import ml_dtypes
import numpy as np
from PIL import Image

# PIL modes whose convert("RGB") is meaningful for 8-bit pictures.
_PIL_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
  """How images become tiles. Defaults are the release `Llama4ImageProcessor` settings."""

  tile_size: int = 336  # S: tile side in pixels (= VisionConfig.image_size)
  max_patches: int = 16  # most tiles a*b on the canvas; the global tile comes on top
  image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per RGB channel, after rescaling
  image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per RGB channel, after rescaling
  rescale_factor: float = 1 / 255  # uint8 -> [0, 1]
  resize_to_max_canvas: bool = False  # True: upscale as far as the largest fitting canvas allows
  dtype: str = "bfloat16"  # dtype of the tiles: "bfloat16" or "float32" (same values)
  bf16_math: bool = True  # round each normalisation step to bf16 (reference); False: one float32 expression

  def __post_init__(self):
    if self.tile_size <= 0 or self.max_patches <= 0:
      raise ValueError(f"tile_size and max_patches must be positive, got {self.tile_size}, {self.max_patches}")
    if len(self.image_mean) != 3 or len(self.image_std) != 3:
      raise ValueError(f"image_mean and image_std need 3 (RGB) values, got {self.image_mean}, {self.image_std}")
    if any(s == 0 for s in self.image_std):
      raise ValueError(f"image_std has a zero: {self.image_std}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

  @classmethod
  def from_vision_config(cls, vision, **overrides) -> ImageProcessing:
    """Settings for a `VisionConfig` (its tile side), with any field overridden."""
    return cls(**{"tile_size": vision.image_size, **overrides})


class ProcessedImage(NamedTuple):
  tiles: np.ndarray  # [n_tiles, 3, S, S]: ratio_h*ratio_w tiles row-major, then the global tile if any
  aspect_ratio: tuple[int, int]  # (ratio_h, ratio_w): tiles down and across the canvas


class ProcessedBatch(NamedTuple):
  pixel_values: np.ndarray  # [N, 3, S, S]: every image's tiles, in image order
  aspect_ratios: np.ndarray  # [n_images, 2] int64 (ratio_h, ratio_w)
  tiles_per_image: tuple[int, ...]  # rows of pixel_values per image


# --------------------------------------------------------------------------------------------------
# Input conversion


def to_rgb(image, index: int = 0) -> np.ndarray:
  """uint8 [H, W, 3] RGB from an image file path, a PIL image or a uint8 [H, W, 3] array; `index` (and the
  file name) name it in errors, a file that is not a decodable image included."""
  where = f"image {index}"
  if isinstance(image, (str, os.PathLike)):
    where = f"image {index} ({os.fspath(image)})"
    try:
      image = Image.open(image)
      image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's decode errors
      raise ValueError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
  if isinstance(image, Image.Image):
    if getattr(image, "filename", ""):
      where = f"image {index} ({image.filename})"
    if image.width == 0 or image.height == 0:
      raise ValueError(f"{where}: zero size ({image.width}x{image.height} pixels)")
    if image.mode not in _PIL_MODES:
      raise ValueError(f"{where}: unsupported PIL mode {image.mode!r}; expected one of {', '.join(_PIL_MODES)}")
    try:
      if "A" in image.getbands() or "transparency" in image.info:  # as transformers: composite onto white
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
      return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # a lazily opened file whose data is corrupt or truncated
      raise ValueError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from None
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f"{where}: numpy images must be uint8, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"{where}: expected shape [H, W, 3] (RGB, channels last), got {list(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
      raise ValueError(f"{where}: zero size (shape {list(image.shape)})")
    return np.ascontiguousarray(image)
  raise ValueError(f"{where}: expected a PIL image or a uint8 numpy array [H, W, 3], got {type(image).__name__}")


# --------------------------------------------------------------------------------------------------
# Canvas and target size


def candidate_canvases(max_patches: int, tile_size: int) -> list[tuple[int, int]]:
  """Every (a*S, b*S) with a*b <= max_patches, in transformers' order (matters only for exact ties)."""
  by_ratio: dict[tuple[int, int], list[tuple[int, int]]] = {}
  for n in range(max_patches, 0, -1):
    for a in (d for d in range(1, n + 1) if n % d == 0):
      b = n // a
      g = math.gcd(a, b)
      by_ratio.setdefault((a // g, b // g), []).append((a * tile_size, b * tile_size))
  return [c for group in by_ratio.values() for c in group]


def choose_canvas(size: tuple[int, int], canvases: Sequence[tuple[int, int]],
                  resize_to_max_canvas: bool = False) -> tuple[int, int]:
  """The canvas an image of `size` (H, W) goes on.

  The scale of a canvas is min(canvH/H, canvW/W) (the limiting side), computed in float32 as
  transformers does. If some scale is >= 1, the smallest such (the largest with resize_to_max_canvas)
  wins; otherwise the largest scale < 1. Among canvases with the winning scale, the smallest area.
  """
  h, w = size
  ch = np.asarray([c[0] for c in canvases], np.float32)
  cw = np.asarray([c[1] for c in canvases], np.float32)
  scales = np.minimum(ch / np.float32(h), cw / np.float32(w))
  up = scales[scales >= 1]
  if up.size:
    best = up.max() if resize_to_max_canvas else up.min()
  else:
    best = scales.max()
  picks = [c for c, s in zip(canvases, scales) if s == best]
  return min(picks, key=lambda c: c[0] * c[1])  # min() keeps the first of equal areas, like argmin


def fit_size(size: tuple[int, int], canvas: tuple[int, int], tile_size: int,
             resize_to_max_canvas: bool = False) -> tuple[int, int]:
  """(H', W') the image is resized to before padding to `canvas`.

  The target box is the canvas, or (without resize_to_max_canvas) min(max(side, S), canvas side) per
  side, so small images are upscaled to at most S. The image is fitted into the box keeping its aspect:
  the limiting side takes the box side, the other floor(side * scale), capped by the box; both >= 1.
  Arithmetic follows transformers: box sides taken from the canvas are float32 there, the others float64.
  """
  h, w = size
  if resize_to_max_canvas:
    box = [(canvas[0], True), (canvas[1], True)]
  else:  # (value, from_canvas): transformers picks the canvas value only when strictly smaller
    box = [(c, True) if c < max(s, tile_size) else (max(s, tile_size), False) for s, c in zip(size, canvas)]
  (bh, h32), (bw, w32) = box
  scale_h = np.float32(bh) / np.float32(h) if h32 else bh / h
  scale_w = np.float32(bw) / np.float32(w) if w32 else bw / w
  f32 = h32 or w32
  if (np.float32(scale_w) < np.float32(scale_h)) if f32 else (scale_w < scale_h):
    new_h, new_w = min(math.floor(np.float32(h) * scale_w if w32 else h * scale_w), bh), bw
  else:
    new_h, new_w = bh, min(math.floor(np.float32(w) * scale_h if h32 else w * scale_h), bw)
  return max(int(new_h), 1), max(int(new_w), 1)


# --------------------------------------------------------------------------------------------------
# Resize (torchvision / torch uint8 antialiased bilinear, reimplemented)


def _aa_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Source indices [n_out, K], int weights [n_out, K] and their precision (bits) for one axis.

  Output i is centred at c = scale*(i+0.5) (scale = n_in/n_out); it reads inputs
  [int(c - support + 0.5), int(c + support + 0.5)) with support = max(scale, 1), weighted by the
  triangle filter 1 - |(j - c + 0.5) * (1 / max(scale, 1))|, normalised to sum 1 (summed in order). Weights
  become ints round(w * 2^p), with p the largest precision (<= 22) that keeps the largest weight below 2^15.
  """
  scale = n_in / n_out
  support = max(scale, 1.0)
  k = int(math.ceil(support)) * 2 + 1
  centre = scale * (np.arange(n_out) + 0.5)
  lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)
  size = np.clip(np.minimum((centre + support + 0.5).astype(np.int64), n_in) - lo, 0, k)
  j = np.arange(k)
  weights = np.maximum(0.0, 1.0 - np.abs((j[None] + lo[:, None] - centre[:, None] + 0.5) * (1.0 / support)))
  weights = np.where(j[None] < size[:, None], weights, 0.0)
  total = np.cumsum(weights, axis=1)[:, -1:]  # sequential sum, as the reference loop
  weights = np.divide(weights, total, out=np.zeros_like(weights), where=total != 0)
  precision, w_max = 0, weights.max()
  while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
    precision += 1
  int_weights = np.floor(0.5 + weights * (1 << precision)).astype(np.int32)
  index = np.where(j[None] < size[:, None], lo[:, None] + j[None], lo[:, None])
  return index, int_weights, precision


def _aa_pass(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
  index, weights, precision = _aa_taps(x.shape[axis], n_out)
  shape = [1] * x.ndim
  shape[axis] = n_out
  out_shape = list(x.shape)
  out_shape[axis] = n_out
  acc = np.full(out_shape, 1 << (precision - 1) if precision else 0, np.int32)
  for k in range(index.shape[1]):
    acc += np.take(x, index[:, k], axis=axis).astype(np.int32) * weights[:, k].reshape(shape)
  return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_bilinear_aa(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [h, w, 3], antialiased bilinear (horizontal pass, then vertical)."""
  h, w = size
  if rgb.shape[1] != w:
    rgb = _aa_pass(rgb, w, axis=1)
  if rgb.shape[0] != h:
    rgb = _aa_pass(rgb, h, axis=0)
  return rgb


# --------------------------------------------------------------------------------------------------
# Normalisation and tiling


def normalization_table(proc: ImageProcessing) -> np.ndarray:
  """[3, 256] output value of each uint8 value per channel: (v*rescale - mean)/std.

  With bf16_math, as the reference: x = bf16(v * f32(rescale)), y = bf16(x - bf16(mean)),
  out = bf16(y / bf16(std)), each product/difference/quotient computed in float32.
  """
  v = np.arange(256, dtype=np.float32)[None]
  mean = np.asarray(proc.image_mean, np.float32)[:, None]
  std = np.asarray(proc.image_std, np.float32)[:, None]
  if not proc.bf16_math:
    return ((v * np.float32(proc.rescale_factor) - mean) / std).astype(_DTYPES[proc.dtype])

  def bf16(a):
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)

  x = bf16(v * np.float32(proc.rescale_factor))
  y = bf16(x - bf16(mean))
  return bf16(y / bf16(std)).astype(_DTYPES[proc.dtype])


def _normalize(rgb: np.ndarray, table: np.ndarray) -> np.ndarray:
  return np.stack([table[c][rgb[..., c]] for c in range(3)])  # [3, H, W]


def preprocess_image(image, proc: ImageProcessing = ImageProcessing(), *, index: int = 0) -> ProcessedImage:
  """Tiles and aspect ratio of one image (steps 1-5 of the module docstring)."""
  rgb = to_rgb(image, index)
  s = proc.tile_size
  size = rgb.shape[:2]
  canvas = choose_canvas(size, candidate_canvases(proc.max_patches, s), proc.resize_to_max_canvas)
  resized = resize_bilinear_aa(rgb, fit_size(size, canvas, s, proc.resize_to_max_canvas))
  padded = np.zeros((*canvas, 3), np.uint8)
  padded[:resized.shape[0], :resized.shape[1]] = resized
  table = normalization_table(proc)
  rows, cols = canvas[0] // s, canvas[1] // s
  tiles = _normalize(padded, table).reshape(3, rows, s, cols, s).transpose(1, 3, 0, 2, 4)
  tiles = tiles.reshape(rows * cols, 3, s, s)
  if rows * cols > 1:
    global_tile = _normalize(resize_bilinear_aa(rgb, (s, s)), table)
    tiles = np.concatenate([tiles, global_tile[None]])
  return ProcessedImage(tiles, (rows, cols))


def preprocess_images(images: Sequence, proc: ImageProcessing = ImageProcessing(), *,
                      max_images: int | None = None) -> ProcessedBatch:
  """All tiles of several images (any sizes), concatenated in image order."""
  if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
    images = [images]
  if max_images is not None and len(images) > max_images:
    raise ValueError(f"{len(images)} images given, more than max_images={max_images}")
  if not images:
    raise ValueError("no images given")
  done = [preprocess_image(im, proc, index=i) for i, im in enumerate(images)]
  return ProcessedBatch(np.concatenate([d.tiles for d in done]),
                        np.asarray([d.aspect_ratio for d in done], np.int64),
                        tuple(len(d.tiles) for d in done))
