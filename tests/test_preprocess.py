"""Image preprocessing (reference 2.9): canvases, tiles, exact pixel values, errors, resize kernel.

Sizes are (height, width), the order transformers uses (`image.shape[-2:]`): 500x1000 is 500 rows
by 1000 columns and gives 2 tile rows by 3 tile columns. Expected pixel values are computed here from
the formula with a bf16 rounding written on the float32 bits, not from the module's own tables.
"""

import numpy as np
import pytest
from PIL import Image

from llama4_jax.config import TINY_SCOUT, VisionConfig
from llama4_jax.data import images as pp

S = 336


def bf16(x):
  """Round float32 to the nearest bfloat16 (ties to even), kept in float32: done on the raw bits."""
  bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
  bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
  return bits.astype(np.uint32).view(np.float32)


def expected(v, mean=0.5, std=0.5):
  """Reference pixel value of uint8 v: bf16(bf16(bf16(v * f32(1/255)) - mean) / std), float32 ops."""
  x = bf16(np.float32(v) * np.float32(1 / 255))
  return bf16(bf16(x - np.float32(mean)) / np.float32(std))


def solid(h, w, rgb):
  return np.broadcast_to(np.asarray(rgb, np.uint8), (h, w, 3)).copy()


def f32(a):
  return np.asarray(a, np.float32)


# --------------------------------------------------------------------------------------------------
# Canvas and tiles


@pytest.mark.parametrize("size, ratio, n_tiles", [
    ((200, 300), (1, 1), 1), ((336, 336), (1, 1), 1), ((500, 1000), (2, 3), 7), ((1200, 800), (4, 3), 13),
    ((3000, 300), (9, 1), 10), ((100, 100), (1, 1), 1)])
def test_reference_tile_counts(size, ratio, n_tiles):
  out = pp.preprocess_image(solid(*size, (10, 20, 30)))
  assert out.aspect_ratio == ratio
  assert out.tiles.shape == (n_tiles, 3, S, S)
  assert out.tiles.dtype == np.dtype("bfloat16")


def test_candidate_canvases():
  c = pp.candidate_canvases(16, S)
  pairs = {(h // S, w // S) for h, w in c}
  assert len(c) == len(pairs) == 50
  assert pairs == {(a, b) for a in range(1, 17) for b in range(1, 17) if a * b <= 16}


@pytest.mark.parametrize("size, canvas, fitted", [
    ((200, 300), (336, 336), (224, 336)),  # upscaled until the width reaches S: 200 * 336/300 = 224
    ((100, 100), (336, 336), (336, 336)),  # small images are upscaled to S
    ((500, 1000), (672, 1008), (500, 1000)),  # no upscaling past the image's own size (>= S)
    ((3000, 300), (3024, 336), (3000, 300)),
    ((69, 5888), (336, 5376), (63, 5376)),  # 69 * 5376/5888 = 63.0000 in float32 (transformers), 62.99.. in f64
])
def test_canvas_and_fit(size, canvas, fitted):
  assert pp.choose_canvas(size, pp.candidate_canvases(16, S)) == canvas
  assert pp.fit_size(size, canvas, S) == fitted


def test_downscale_prefers_largest_scale_then_smallest_area():
  # 4000x3000: no canvas holds it at scale >= 1; the largest scale < 1 is 0.336, reached by 4x3, 4x4, 5x3...
  assert pp.choose_canvas((4000, 3000), pp.candidate_canvases(16, S)) == (4 * S, 3 * S)


def test_configurable_tile_size_and_max_patches():
  proc = pp.ImageProcessing.from_vision_config(TINY_SCOUT.vision, max_patches=4)
  assert proc.tile_size == 56
  # 100x150 with S=56, <= 4 tiles: no canvas upscales; 2x2 shrinks least (112/150); fit 74x112.
  assert pp.choose_canvas((100, 150), pp.candidate_canvases(4, 56)) == (112, 112)
  assert pp.fit_size((100, 150), (112, 112), 56) == (74, 112)
  out = pp.preprocess_image(solid(100, 150, (0, 128, 255)), proc)
  assert out.aspect_ratio == (2, 2) and out.tiles.shape == (5, 3, 56, 56)
  # the bottom rows 74..111 of the canvas are padding: tiles 2 and 3 (bottom row) from row 74-56=18 on
  assert np.all(f32(out.tiles[2:4, :, 18:]) == -1.0)
  assert np.all(f32(out.tiles[2:4, 1, :18]) == expected(128))


# --------------------------------------------------------------------------------------------------
# Pixel values


def test_normalisation_formula_on_all_uint8_values():
  # one 336x336 image whose pixels run through every value: no resize, one tile
  v = (np.arange(S * S) % 256).astype(np.uint8).reshape(S, S)
  img = np.stack([v, 255 - v, v[::-1]], axis=-1)
  tiles = f32(pp.preprocess_image(img).tiles)
  for c in range(3):
    np.testing.assert_array_equal(tiles[0, c], expected(img[..., c]))
  assert expected(128) == 0.0078125 and expected(0) == -1.0 and expected(255) == 1.0  # reference 2.9


def test_mean_std_configurable_and_float32_output():
  img = (np.arange(S * S * 3) % 251).astype(np.uint8).reshape(S, S, 3)
  proc = pp.ImageProcessing(image_mean=(0.48, 0.46, 0.41), image_std=(0.27, 0.26, 0.28), dtype="float32")
  tiles = pp.preprocess_image(img, proc).tiles
  assert tiles.dtype == np.float32
  for c in range(3):
    want = expected(img[..., c], mean=bf16(proc.image_mean[c]), std=bf16(proc.image_std[c]))
    np.testing.assert_array_equal(tiles[0, c], want)
  plain = pp.preprocess_image(img, pp.ImageProcessing(dtype="float32", bf16_math=False)).tiles
  np.testing.assert_allclose(plain[0], (img.transpose(2, 0, 1) / 255 - 0.5) / 0.5, atol=1e-6)


def test_padding_is_minus_one():
  out = pp.preprocess_image(solid(200, 300, (200, 100, 50)))  # resized to 224x336, padded to 336x336
  t = f32(out.tiles[0])
  for c, v in enumerate((200, 100, 50)):
    assert np.all(t[c, :224] == expected(v))
  assert np.all(t[:, 224:] == -1.0)


def test_tiles_row_major_then_global_tile():
  # 672x1008 needs no resize: canvas 2x3, each tile region painted its own grey level
  levels = np.array([[10, 60, 110], [160, 210, 250]], np.uint8)
  img = np.repeat(np.repeat(levels, S, axis=0), S, axis=1)[..., None].repeat(3, axis=-1)
  out = pp.preprocess_image(img)
  assert out.aspect_ratio == (2, 3) and len(out.tiles) == 7
  for k, v in enumerate(levels.ravel()):
    assert np.all(f32(out.tiles[k]) == expected(v)), k
  # global tile: the whole image squeezed to 336x336 (aspect not kept): tile columns map to 112-px bands
  g = f32(out.tiles[6])
  assert np.all(g[:, 10:150, 10:100] == expected(10)) and np.all(g[:, 190:320, 240:330] == expected(250))


def test_resize_keeps_solid_colours():
  out = pp.preprocess_image(solid(1200, 777, (3, 128, 254)))
  assert out.aspect_ratio == (4, 3)
  t = f32(out.tiles)
  assert np.all(t[-1, 0] == expected(3)) and np.all(t[-1, 1] == expected(128)) and np.all(t[-1, 2] == expected(254))


def test_pil_inputs():
  rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))  # fully transparent -> white, as transformers
  assert np.all(pp.to_rgb(rgba) == 255)
  gray = Image.new("L", (40, 30), 77)
  assert pp.to_rgb(gray).shape == (30, 40, 3) and np.all(pp.to_rgb(gray) == 77)
  rgb = Image.fromarray(solid(30, 40, (1, 2, 3)))
  from_array = pp.preprocess_image(solid(30, 40, (1, 2, 3))).tiles
  np.testing.assert_array_equal(f32(pp.preprocess_image(rgb).tiles), f32(from_array))


# --------------------------------------------------------------------------------------------------
# Batches and errors


def test_batch_of_different_sizes():
  imgs = [solid(336, 336, (0, 0, 0)), solid(672, 336, (255, 255, 255)), solid(200, 300, (128, 128, 128))]
  batch = pp.preprocess_images(imgs)
  assert batch.tiles_per_image == (1, 3, 1)
  assert batch.pixel_values.shape == (5, 3, S, S)
  np.testing.assert_array_equal(batch.aspect_ratios, [[1, 1], [2, 1], [1, 1]])
  start = 0
  for img, n in zip(imgs, batch.tiles_per_image):
    np.testing.assert_array_equal(f32(batch.pixel_values[start:start + n]), f32(pp.preprocess_image(img).tiles))
    start += n
  assert np.all(f32(batch.pixel_values[0]) == -1.0) and np.all(f32(batch.pixel_values[1:4]) == 1.0)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((0, 10, 3), np.uint8), "zero size"),
    (np.zeros((10, 10, 4), np.uint8), r"shape \[H, W, 3\]"),
    (np.zeros((10, 10), np.uint8), r"shape \[H, W, 3\]"),
    (np.zeros((10, 10, 3), np.float32), "must be uint8"),
    (Image.new("F", (10, 10)), "unsupported PIL mode 'F'"),
    (Image.new("RGB", (0, 5)), "zero size"),
    ([[1, 2, 3]], "expected a PIL image"),
])
def test_bad_images_name_the_problem_and_index(bad, message):
  with pytest.raises(ValueError, match="image 1: .*" + message):
    pp.preprocess_images([solid(20, 20, (1, 1, 1)), bad])


def test_max_images_and_bad_settings():
  with pytest.raises(ValueError, match="3 images given, more than max_images=2"):
    pp.preprocess_images([solid(8, 8, (0, 0, 0))] * 3, max_images=2)
  with pytest.raises(ValueError, match="3 .*values"):
    pp.ImageProcessing(image_mean=(0.5, 0.5))
  with pytest.raises(ValueError, match="dtype"):
    pp.ImageProcessing(dtype="float16")
  assert pp.ImageProcessing.from_vision_config(VisionConfig()).tile_size == S


# --------------------------------------------------------------------------------------------------
# Resize kernel


def test_resize_matches_torch_uint8_antialias_kernel():
  """Bit-exact against the kernel torchvision uses on AVX2 CPUs; Pillow BILINEAR is within 1."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  worst_pil = 0
  for (h, w), (nh, nw) in [((200, 300), (224, 336)), ((100, 100), (336, 336)), ((1200, 777), (336, 336)),
                           ((3000, 300), (336, 336)), ((97, 1333), (25, 336)), ((61, 59), (29, 233))]:
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    ref = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    ours = pp.resize_bilinear_aa(img, (nh, nw))
    np.testing.assert_array_equal(ours, ref[0].permute(1, 2, 0).numpy())
    pil = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR))
    worst_pil = max(worst_pil, int(np.abs(pil.astype(int) - ours).max()))
  assert worst_pil == 1


def test_resize_to_max_canvas():
  # 200x300 upscaled as far as possible: 3x5 tiles give min(1008/200, 1680/300) = 5.04, the best with a*b <= 16
  out = pp.preprocess_image(solid(200, 300, (5, 5, 5)), pp.ImageProcessing(resize_to_max_canvas=True))
  assert out.aspect_ratio == (3, 5) and out.tiles.shape == (16, 3, S, S)


# transformers' Llama4ImageProcessor needs torchvision, which is not installable here. This runs it with a
# stand-in whose resize is torchvision's CPU uint8 path (torch.nn.functional.interpolate on uint8, as
# torchvision does with AVX2), pad/normalize as torchvision's, in a subprocess (it patches transformers).
_HF_PARITY = r'''
import enum, sys, types
import numpy as np, torch, torch.nn.functional as F
import transformers, transformers.utils.import_utils as iu

class Mode(enum.Enum):
  BILINEAR, BICUBIC, LANCZOS = "bilinear", "bicubic", "lanczos"

def resize(x, size, interpolation=None, antialias=True, **_):
  size = [int(v) for v in size]
  if list(x.shape[-2:]) == size:
    return x
  shape = x.shape
  y = F.interpolate(x.reshape(-1, *shape[-3:]), size=size, mode="bilinear", align_corners=False, antialias=antialias)
  return y.reshape(*shape[:-2], *size)

def pad(x, padding, fill=0, **_):
  return F.pad(x, [padding[0], padding[2], padding[1], padding[3]], value=0)

def normalize(x, mean, std, inplace=False):
  m = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
  return x.sub(m).div_(torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1))

tvf = types.SimpleNamespace(resize=resize, pad=pad, normalize=normalize, InterpolationMode=Mode,
                            grayscale_to_rgb=lambda x: x)
for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2"):
  sys.modules[name] = types.ModuleType(name)
sys.modules["torchvision.transforms.v2"].functional = tvf
sys.modules["torchvision.transforms.v2.functional"] = tvf
iu.BACKENDS_MAPPING["torchvision"] = (lambda: True, "")
import transformers.image_processing_backends as backends
from transformers.image_utils import PILImageResampling
backends.tvF = tvf
backends.pil_torch_interpolation_mapping = {PILImageResampling.BILINEAR: Mode.BILINEAR}
from transformers.models.llama4 import image_processing_llama4 as ipl
from llama4_jax.data import images as pp

hf = ipl.Llama4ImageProcessor()
rng = np.random.default_rng(0)
sizes = [(200, 300), (336, 336), (500, 1000), (1200, 800), (3000, 300), (100, 100), (69, 5888), (1, 1),
         (4000, 3000), (777, 555), (123, 457), (2, 900)]
for h, w in sizes:
  img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  ref = hf(images=[img], return_tensors="pt", input_data_format="channels_last")
  out = pp.preprocess_image(img)
  assert out.aspect_ratio == tuple(ref["aspect_ratios"][0].tolist()), (h, w)
  assert np.array_equal(out.tiles.astype(np.float32), ref["pixel_values"].float().numpy()), (h, w)
print("parity", len(sizes))
'''


@pytest.mark.slow
def test_bit_identical_to_transformers_processor():
  import subprocess
  import sys

  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  run = subprocess.run([sys.executable, "-c", _HF_PARITY], capture_output=True, text=True, timeout=600)
  assert run.returncode == 0 and "parity 12" in run.stdout, run.stdout + run.stderr
