"""The tensors of a HF checkpoint, FP8 releases included (reference section 5): validated against the config,
then read one at a time. The one place that says what a HF directory must hold; loading (`io.load`) and
`hf_to_orbax` both go through `sources`.

`sources(cfg, tensors, layout)` checks every file, key, shape and dtype against the config (`validate`) and
returns one `Source` per tensor of the plain HF layout (`hf_keys.placements`: fused expert tensors, bf16
names), each knowing which stored tensors it is made of and how to read them (`safetensors.read`). A
multimodal config needs the vision tower and projector in the checkpoint (a text-only `Llama4ForCausalLM`
checkpoint is refused); a text-only config reads only the text part of a multimodal checkpoint.

* plain (`layout=None`): the float tensor itself.
* `"compressed-tensors"` (the hub's FP8 release): routed experts unfused, per expert,
  `…experts.{e}.{gate,up,down}_proj.weight` float8_e4m3fn [out, in] with `….weight_scale` [out, 1]
  (per output row); they are dequantised (`W = float32(q) * scale`) and fused back into
  `gate_up_proj` [E, D, 2I] = concat(gate.T, up.T) and `down_proj` [E, I, D] = down.T.
* `"fbgemm_fp8"`: fused `experts.gate_up_proj` fp8 [E, D, 2I] + `gate_up_proj_scale` [E, 1, 2I] (one scale
  per output column), `experts.down_proj` fp8 [E, I, D] + `down_proj_scale` [E, D, 1].
In both, any other Linear may be FP8 too (`weight` fp8 [out, in] + `weight_scale` [out, 1]); it is
dequantised. The scale of key K is always stored under `K + "_scale"`.

FP8 layout stored by `--keep-fp8` (routed experts only; everything else is dequantised): our leaves
  `ffn.gate_up`        float8_e4m3fn [blocks, E, D, 2, I]   with `ffn.gate_up_scale` float32 [blocks, E, 2, I]
  `ffn.down`           float8_e4m3fn [blocks, E, I, D]      with `ffn.down_scale`    float32 [blocks, E, D]
  W[..., d, g, i] = q[..., d, g, i] * gate_up_scale[..., g, i];  W[..., i, d] = q[..., i, d] * down_scale[..., d]
(one scale per output column of `x @ W`, i.e. per output row of the HF Linear: the values are the source's
fp8 bytes, transposed, never re-rounded). Expert layers the source left unquantised (Meta's fp8_mixed keeps
the last layer bf16) are quantised per output column the FBGEMM way (scale = max|w| / 448).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Mapping

import ml_dtypes
import numpy as np

from llama4_jax.config import ConfigError, Llama4Config
from llama4_jax.io import hf_keys
from llama4_jax.io import safetensors as st
from llama4_jax.io.safetensors import TensorInfo
from llama4_jax.io.validate import CheckpointError, Validator

log = logging.getLogger(__name__)

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = 448.0
COMPRESSED_TENSORS = "compressed-tensors"
FBGEMM = "fbgemm_fp8"
LAYOUTS = (COMPRESSED_TENSORS, FBGEMM)
SCALE_SUFFIX = "_scale"
_SCALE_DTYPES = ("F32", "BF16")

# Our leaves that `--keep-fp8` stores as fp8 (relative to a text layer), and their scale leaves.
FP8_LEAVES = {("ffn", "gate_up"): ("ffn", "gate_up_scale"), ("ffn", "down"): ("ffn", "down_scale")}
_VISION_KEY_PREFIXES = (hf_keys.VISION_PREFIX, hf_keys.PROJECTOR.hf)


def layout_of(config: Mapping) -> str | None:
  """The FP8 layout named by a config.json's `quantization_config`, or None for a plain checkpoint."""
  qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
  if not qc:
    return None
  method = qc.get("quant_method")
  if method not in LAYOUTS:
    raise ConfigError(f"config field 'quantization_config.quant_method': {method!r} is not supported "
                      f"(supported: {', '.join(LAYOUTS)})")
  return method


@dataclasses.dataclass
class Source:
  """One tensor of the plain HF layout and how to read it. `read(dtype)` gives it in HF layout (dequantised
  if stored in FP8); `read_fp8()`, for routed-expert tensors of FP8 checkpoints, gives (fp8 values in the
  fused HF layout, float32 scales per output column: [E, 2I] for gate_up, [E, D] for down)."""

  placement: hf_keys.Placement
  keys: tuple[str, ...]
  read: Callable[[np.dtype], np.ndarray]
  read_fp8: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None


# --------------------------------------------------------------------------------------------------
# Quantisation arithmetic


def dequantize(q: np.ndarray, scale: np.ndarray, dtype) -> np.ndarray:
  """float32(q) * scale (broadcast), rounded once to `dtype`."""
  return (q.astype(np.float32) * scale.astype(np.float32)).astype(dtype)


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per output column (last axis) FP8 quantisation of w [..., in, out]: (q, scale [..., out]) with
  w ≈ q * scale, scale = max|w| / 448 (FBGEMM's `quantize_fp8_per_row` on the transposed weight)."""
  w = w.astype(np.float32)
  amax = np.abs(w).max(axis=-2)
  scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
  q = np.clip(w / scale[..., None, :], -FP8_MAX, FP8_MAX).astype(FP8)
  return q, scale


def dequantize_ours(leaf: tuple, q: np.ndarray, scale: np.ndarray, dtype) -> np.ndarray:
  """Our stored FP8 expert leaf (one block or all) back to floats: gate_up q [..., E, D, 2, I] with scale
  [..., E, 2, I]; down q [..., E, I, D] with scale [..., E, D]."""
  if tuple(leaf[-2:]) == ("ffn", "gate_up"):
    return dequantize(q, scale[..., None, :, :], dtype)
  return dequantize(q, scale[..., None, :], dtype)


# --------------------------------------------------------------------------------------------------
# Planning


class _Expect(Validator):
  """The validator of one checkpoint, with the HF rule for weights that may be FP8 (a scale beside them)."""

  def __init__(self, tensors: Mapping[str, TensorInfo], fp8: bool):
    where = os.path.dirname(next(iter(tensors.values())).file) if tensors else "checkpoint"
    super().__init__({k: t.stored() for k, t in tensors.items()}, where)
    self.tensors, self.fp8 = tensors, fp8

  def weight(self, key: str, shape, scale_shape) -> tuple[TensorInfo, TensorInfo | None]:
    """A float tensor, or (FP8 layouts only) an fp8 one with its scale."""
    s = self.need(key, shape, (*st.FLOAT_NAMES, st.FP8_NAME) if self.fp8 else st.FLOAT_NAMES)
    if s.dtype != st.FP8_NAME:
      return self.tensors[key], None
    self.need(key + SCALE_SUFFIX, scale_shape, _SCALE_DTYPES)
    return self.tensors[key], self.tensors[key + SCALE_SUFFIX]


def text_prefix(keys) -> str:
  """"language_model." for the multimodal layout, "" for the text-only `Llama4ForCausalLM` one."""
  return hf_keys.MULTIMODAL_TEXT_PREFIX if any(
      k.startswith(hf_keys.MULTIMODAL_TEXT_PREFIX) for k in keys) else hf_keys.TEXT_ONLY_PREFIX


def _plain_or_linear(p: hf_keys.Placement, cfg: Llama4Config, ex: _Expect) -> Source:
  shape = p.entry.hf_shape(cfg)
  info, sinfo = ex.weight(p.key, shape, (shape[0], 1))
  if sinfo is None:
    return Source(p, (p.key,), lambda dt: st.read(info, p.key).astype(dt, copy=False))
  sk = p.key + SCALE_SUFFIX
  return Source(p, (p.key, sk), lambda dt: dequantize(st.read(info, p.key), st.read(sinfo, sk), dt))


def _is_experts(p: hf_keys.Placement, name: str) -> bool:
  return p.entry.hf.endswith(f"experts.{name}")


def _fused_experts(p: hf_keys.Placement, cfg: Llama4Config, ex: _Expect) -> Source:
  """fbgemm_fp8 (or bf16) fused expert tensor."""
  E, a, b = p.entry.hf_shape(cfg)
  gate_up = _is_experts(p, "gate_up_proj")
  scale_shape = (E, 1, b) if gate_up else (E, b, 1)
  info, sinfo = ex.weight(p.key, (E, a, b), scale_shape)
  if sinfo is None:
    def quantized():
      log.warning("%s: experts stored unquantised; quantising them per output column for --keep-fp8", p.key)
      return quantize_columns(st.read(info, p.key))
    return Source(p, (p.key,), lambda dt: st.read(info, p.key).astype(dt, copy=False), quantized)
  sk = p.key + SCALE_SUFFIX

  def cols(s):  # scale per output column [E, b]
    return s[:, 0, :] if gate_up else s[:, :, 0]

  def read(dt):
    q, s = st.read(info, p.key), cols(st.read(sinfo, sk))
    out = np.empty(q.shape, dt)
    for e in range(E):
      out[e] = dequantize(q[e], s[e][None, :], dt)
    return out

  def read_fp8():
    return st.read(info, p.key), cols(st.read(sinfo, sk)).astype(np.float32)

  return Source(p, (p.key, sk), read, read_fp8)


def _unfused_experts(p: hf_keys.Placement, cfg: Llama4Config, ex: _Expect) -> Source:
  """compressed-tensors: per-expert Linear weights [out, in] (fp8 + scale, or float), fused on read."""
  t = cfg.text
  E, D, I = t.num_local_experts, t.hidden_size, t.intermediate_size
  base = p.key[: -len("gate_up_proj" if _is_experts(p, "gate_up_proj") else "down_proj")]
  if _is_experts(p, "gate_up_proj"):
    parts = [(f"{base}{e}.{n}_proj.weight", (I, D)) for e in range(E) for n in ("gate", "up")]
  else:
    parts = [(f"{base}{e}.down_proj.weight", (D, I)) for e in range(E)]
  infos = {k: ex.weight(k, shape, (shape[0], 1)) for k, shape in parts}
  keys = tuple(k for k, _ in parts) + tuple(k + SCALE_SUFFIX for k, _ in parts if infos[k][1] is not None)
  gate_up = _is_experts(p, "gate_up_proj")

  def linear(k, dt):  # one Linear [out, in], dequantised
    info, sinfo = infos[k]
    w = st.read(info, k)
    return w.astype(dt, copy=False) if sinfo is None else dequantize(w, st.read(sinfo, k + SCALE_SUFFIX), dt)

  def linear_fp8(k):  # (q [in, out], scale [out]); quantised here if stored in float
    info, sinfo = infos[k]
    w = st.read(info, k)
    if sinfo is None:
      return quantize_columns(w.T)
    return w.T, st.read(sinfo, k + SCALE_SUFFIX)[:, 0].astype(np.float32)

  def assemble(one, dtype_of):
    out = scale = None
    for e in range(E):
      if gate_up:
        (g, gs), (u, us) = one(f"{base}{e}.gate_proj.weight"), one(f"{base}{e}.up_proj.weight")
        w, s = np.concatenate([g, u], axis=-1), None if gs is None else np.concatenate([gs, us])
      else:
        w, s = one(f"{base}{e}.down_proj.weight")
      if out is None:
        out = np.empty((E, *w.shape), dtype_of(w))
        scale = None if s is None else np.empty((E, *s.shape), np.float32)
      out[e] = w
      if s is not None:
        scale[e] = s
    return out, scale

  def read(dt):
    return assemble(lambda k: (linear(k, dt).T, None), lambda w: dt)[0]

  def read_fp8():
    if all(infos[k][1] is None for k, _ in parts):
      log.warning("%s: experts stored unquantised; quantising them per output column for --keep-fp8", p.key)
    return assemble(linear_fp8, lambda w: FP8)

  return Source(p, keys, read, read_fp8)


def sources(cfg: Llama4Config, tensors: Mapping[str, TensorInfo], layout: str | None) -> list[Source]:
  """Validates the checkpoint (keys, shapes, dtypes) against the config; one Source per tensor of the plain
  HF layout, in `hf_keys.placements` order. Nothing is read yet."""
  ex = _Expect(tensors, fp8=layout is not None)
  vision = [k for k in tensors if k.startswith(_VISION_KEY_PREFIXES)]
  if cfg.vision is not None and not vision:
    raise CheckpointError(f"{ex.where}: the config is multimodal but the checkpoint has no vision_model. / "
                          "multi_modal_projector. tensors (a text-only Llama4ForCausalLM checkpoint?); "
                          "load it with a text-only config (vision=None)")
  places = hf_keys.placements(cfg, text_prefix(tensors))
  absent = sorted(p.key for p in places if p.key not in tensors and not _unfused(p, tensors, layout))
  if absent:
    ex.need_all({k: ((), ()) for k in absent})  # raises, naming the first and counting the others
  out = []
  for p in places:
    if _unfused(p, tensors, layout):
      out.append(_unfused_experts(p, cfg, ex))
    elif layout is not None and (_is_experts(p, "gate_up_proj") or _is_experts(p, "down_proj")):
      out.append(_fused_experts(p, cfg, ex))
    else:
      out.append(_plain_or_linear(p, cfg, ex))
  ex.finish(ignore=vision if cfg.vision is None else (),
            why="this config" + (f" and the {layout} layout" if layout else ""))
  if cfg.vision is None and vision:
    log.info("text-only config: %d vision tower / projector tensors of the checkpoint are not loaded", len(vision))
  return out


def _unfused(p: hf_keys.Placement, tensors, layout) -> bool:
  """A routed-expert tensor stored unfused, per expert (the compressed-tensors layout)."""
  return (layout == COMPRESSED_TENSORS and p.key not in tensors
          and (_is_experts(p, "gate_up_proj") or _is_experts(p, "down_proj")))


def is_quantized(src: Source) -> bool:
  return src.read_fp8 is not None


def describe(layout: str) -> dict:
  """The `fp8` record of llama4_jax.json for a `--keep-fp8` conversion."""
  return {"dtype": "float8_e4m3fn", "source_layout": layout,
          "leaves": {".".join(k): ".".join(v) for k, v in FP8_LEAVES.items()},
          "dequantize": {"ffn.gate_up": "W[..., d, g, i] = float32(q[..., d, g, i]) * scale[..., g, i]",
                         "ffn.down": "W[..., i, d] = float32(q[..., i, d]) * scale[..., d]"}}

