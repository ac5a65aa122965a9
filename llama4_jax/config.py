"""Llama 4 configuration: frozen dataclasses mirroring transformers' config, presets, HF (de)serialisation.

`TextConfig` / `VisionConfig` hold every field of transformers' `Llama4TextConfig` /
`Llama4VisionConfig` (reference sections 1 and 4). `Llama4Config` is the multimodal wrapper; a
text-only (`Llama4ForCausalLM`) checkpoint has `vision=None`. `Policy` holds run-time choices
(dtypes, kernels) that are not part of the architecture.

The dataclasses store exactly what they are given and only validate it (a value of the wrong type is a
`ConfigError` naming the field). The layer layout is derived, not stored: `no_rope_layers=()` and
`moe_layers=None` mean "the default pattern", resolved by `TextConfig.rope_flags` / `moe_layer_ids`, so
that `dataclasses.replace(text, num_hidden_layers=8)` gives an 8-layer pattern.

`from_hf` is the parser: it reads both spellings of config.json, the 4.51 release one (`rope_theta` +
`rope_scaling`, `torch_dtype`, `no_rope_layers: []`) and the 5.x one (`rope_parameters`, `dtype`,
materialised lists), and turns JSON values into the field types (lists into tuples, an int
`eos_token_id` into a tuple, a `rope_scaling` dict into `RopeScaling`, a materialised default layout back
into `()` / `None`). `to_hf` writes the materialised lists transformers expects.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from typing import Any, Mapping

# --------------------------------------------------------------------------------------------------
# Errors and field validation


class ConfigError(ValueError):
  """A config.json or preset that cannot describe a Llama 4 model; the message names the field."""


MAX_SIZE = 2 ** 31  # sizes and counts must lie below it: token ids are int32, and nothing larger is a real model


def _require(cond: bool, field: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"config field {field!r}: {msg}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
  """The resolved annotation of every field of a config dataclass."""
  return typing.get_type_hints(cls)


def _members(tp: Any) -> tuple[Any, ...]:
  """The alternatives of a union annotation (`int | None` -> int, NoneType), else just `tp`."""
  return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _type_ok(v: Any, tp: Any) -> bool:
  """Whether `v` is a value of annotation `tp`. A bool is not an int; an int is a float (PEP 484)."""
  if len(_members(tp)) > 1:
    return any(_type_ok(v, m) for m in _members(tp))
  if typing.get_origin(tp) is tuple:  # tuple[X, ...]
    return isinstance(v, tuple) and all(_type_ok(x, typing.get_args(tp)[0]) for x in v)
  if tp is int or tp is float:
    return isinstance(v, int if tp is int else (int, float)) and not isinstance(v, bool)
  return v is None if tp is type(None) else isinstance(v, tp)


def _type_name(tp: Any) -> str:
  if len(_members(tp)) > 1:
    return " | ".join(_type_name(m) for m in _members(tp))
  if typing.get_origin(tp) is tuple:
    return f"tuple[{_type_name(typing.get_args(tp)[0])}, ...]"
  return "None" if tp is type(None) else tp.__name__


def _check_types(obj: Any, section: str) -> None:
  """Rejects a field of `obj` whose value is not of the declared type, naming it as `section + name`."""
  for name, tp in _field_types(type(obj)).items():
    v = getattr(obj, name)
    hint = " (from_hf converts config.json lists and dicts)" if isinstance(v, (list, dict)) else ""
    _require(_type_ok(v, tp), section + name, f"expected {_type_name(tp)}, got {type(v).__name__} {v!r}{hint}")


def _rope_scaling_from_dict(d: Mapping[str, Any], where: str) -> RopeScaling | None:
  kind = d.get("rope_type", d.get("type", "default"))
  if kind == "default":
    return None
  _require(kind == "llama3", where, f"unsupported rope_type {kind!r} (Llama 4 uses 'llama3' or none)")
  try:
    return RopeScaling(factor=float(d["factor"]), low_freq_factor=float(d["low_freq_factor"]),
                       high_freq_factor=float(d["high_freq_factor"]),
                       original_max_position_embeddings=int(d["original_max_position_embeddings"]))
  except KeyError as e:
    raise ConfigError(f"config field {where!r}: llama3 scaling lacks {e.args[0]!r}") from None


def _every_nth_nope(layers: int, interval: int) -> tuple[int, ...]:
  """Use-RoPE flags with every `interval`-th layer NoPE (transformers' default `no_rope_layers`)."""
  return tuple(int((i + 1) % interval != 0) for i in range(layers))


def _every_nth_moe(layers: int, step: int) -> tuple[int, ...]:
  """Every `step`-th layer MoE, the last of each group (transformers' default `moe_layers`)."""
  return tuple(range(step - 1, layers, step))


# --------------------------------------------------------------------------------------------------
# Text


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """llama3-style frequency scaling (reference 1.5); Scout uses factor 16, low 1, high 1, L0 8192."""

  factor: float = 16.0  # divides the low frequencies
  low_freq_factor: float = 1.0  # wavelengths above L0/low are fully scaled
  high_freq_factor: float = 1.0  # wavelengths below L0/high are untouched
  original_max_position_embeddings: int = 8192  # L0
  rope_type: str = "llama3"  # the only scaling Llama 4 uses (config.json "default" is `rope_scaling=None`)

  def __post_init__(self):
    _check_types(self, "text_config.rope_scaling.")
    _require(self.rope_type == "llama3", "text_config.rope_scaling.rope_type",
             f"only 'llama3' is supported, got {self.rope_type!r}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The text decoder (`Llama4TextConfig`). Defaults are Scout's.

  The layer layout fields hold what was given: `no_rope_layers=()` and `moe_layers=None` stand for the
  default patterns; read the resolved layout from `rope_flags`, `moe_layer_ids`, `use_rope`, `is_moe`."""

  vocab_size: int = 202048  # token embedding rows / lm_head columns
  hidden_size: int = 5120  # D
  intermediate_size: int = 8192  # routed and shared expert width I
  intermediate_size_mlp: int = 16384  # dense (non-MoE) layer width
  num_hidden_layers: int = 48  # L
  num_attention_heads: int = 40  # H
  num_key_value_heads: int = 8  # K (GQA)
  head_dim: int = 128  # d
  hidden_act: str = "silu"  # only silu is defined for Llama 4
  max_position_embeddings: int = 10485760  # no runtime effect (llama3/default rope)
  initializer_range: float = 0.02  # std of the normal init
  rms_norm_eps: float = 1e-5  # RMSNorm and qk-norm epsilon
  pad_token_id: int | None = 200018  # <|finetune_right_pad|>
  bos_token_id: int | None = 200000  # <|begin_of_text|>
  eos_token_id: tuple[int, ...] = (200001, 200007, 200008)  # end_of_text, eom, eot
  tie_word_embeddings: bool = False  # false for every release
  rope_theta: float = 500000.0  # RoPE base
  rope_scaling: RopeScaling | None = dataclasses.field(default_factory=lambda: RopeScaling())  # None: plain RoPE
  attention_bias: bool = False  # q/k/v/o biases (false for the release)
  attention_dropout: float = 0.0  # unused at inference
  num_experts_per_tok: int = 1  # top-k of the router
  num_local_experts: int = 16  # E
  moe_layers: tuple[int, ...] | None = None  # MoE layer indices; None: every step-th, range(step-1, L, step)
  interleave_moe_layer_step: int = 1  # 1: every layer MoE (Scout); 2: odd layers (Maverick)
  use_qk_norm: bool = True  # weightless RMS norm on q, k of RoPE layers
  output_router_logits: bool = False  # HF forward option; unused here
  router_aux_loss_coef: float = 0.001  # HF stores it, its forward does not use it
  router_jitter_noise: float = 0.0  # HF stores it, its forward does not use it
  no_rope_layers: tuple[int, ...] = ()  # use-RoPE flag (1) or NoPE (0) per layer; (): every interval-th is NoPE
  no_rope_layer_interval: int = 4  # NoPE/global layer period
  attention_chunk_size: int = 8192  # chunk of the local attention on RoPE layers
  attn_temperature_tuning: bool = True  # scale q on NoPE layers by 1 + attn_scale*log1p(floor((p+1)/floor_scale))
  floor_scale: int = 8192  # temperature tuning step
  attn_scale: float = 0.1  # temperature tuning strength
  for_llm_compressor: bool = False  # HF flag for unfused experts; no effect here
  use_cache: bool = True  # HF generation default

  def __post_init__(self):
    _check_types(self, "text_config.")
    _require(self.hidden_act == "silu", "text_config.hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
              "interleave_moe_layer_step", "no_rope_layer_interval", "attention_chunk_size", "floor_scale"):
      v = getattr(self, f)
      _require(0 < v < MAX_SIZE, f"text_config.{f}", f"must be a positive integer below 2**31, got {v!r}")
    _require(self.num_attention_heads % self.num_key_value_heads == 0, "text_config.num_key_value_heads",
             f"{self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}")
    _require(self.head_dim % 2 == 0, "text_config.head_dim", f"must be even for RoPE, got {self.head_dim}")
    _require(self.num_experts_per_tok <= self.num_local_experts, "text_config.num_experts_per_tok",
             f"{self.num_experts_per_tok} exceeds num_local_experts={self.num_local_experts}")
    L = self.num_hidden_layers
    if self.no_rope_layers:
      _require(len(self.no_rope_layers) == L, "text_config.no_rope_layers",
               f"has {len(self.no_rope_layers)} entries for num_hidden_layers={L}")
      _require(set(self.no_rope_layers) <= {0, 1}, "text_config.no_rope_layers", "entries must be 0 or 1")
    if self.moe_layers is not None:
      _require(all(0 <= i < L for i in self.moe_layers), "text_config.moe_layers",
               f"indices must lie in [0, {L}), got {list(self.moe_layers)}")

  # Derived layout -------------------------------------------------------------------------------
  @property
  def rope_flags(self) -> tuple[int, ...]:
    """1 (RoPE + chunked attention) or 0 (NoPE + global attention) per layer: `no_rope_layers`, or when
    that is () every `no_rope_layer_interval`-th layer NoPE."""
    return self.no_rope_layers or _every_nth_nope(self.num_hidden_layers, self.no_rope_layer_interval)

  @property
  def moe_layer_ids(self) -> tuple[int, ...]:
    """Indices of the MoE layers: `moe_layers`, or when that is None every `interleave_moe_layer_step`-th."""
    if self.moe_layers is None:
      return _every_nth_moe(self.num_hidden_layers, self.interleave_moe_layer_step)
    return self.moe_layers

  def use_rope(self, layer: int) -> bool:
    """RoPE + chunked local attention (+ qk-norm) layer; otherwise NoPE + global attention."""
    return bool(self.rope_flags[layer])

  def is_moe(self, layer: int) -> bool:
    return layer in self.moe_layer_ids

  @property
  def layer_types(self) -> tuple[str, ...]:
    return tuple("chunked_attention" if r else "full_attention" for r in self.rope_flags)

  @property
  def layer_kinds(self) -> tuple[tuple[bool, bool], ...]:
    """(use_rope, is_moe) for every layer."""
    moe = set(self.moe_layer_ids)
    return tuple((bool(r), i in moe) for i, r in enumerate(self.rope_flags))

  @property
  def layer_period(self) -> int:
    """Smallest p dividing L with kinds[i] == kinds[i % p]: layers are scanned in blocks of p."""
    kinds, L = self.layer_kinds, self.num_hidden_layers
    for p in range(1, L + 1):
      if L % p == 0 and all(kinds[i] == kinds[i % p] for i in range(L)):
        return p
    return L


# --------------------------------------------------------------------------------------------------
# Vision


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision encoder, pixel-shuffle adapter and projector (`Llama4VisionConfig`)."""

  hidden_size: int = 1408  # encoder width
  num_hidden_layers: int = 34  # encoder depth
  num_attention_heads: int = 16  # head_dim = 88
  num_channels: int = 3  # RGB
  intermediate_size: int = 5632  # encoder MLP width; also adapter fc1 input (= hidden / ratio^2)
  vision_output_dim: int = 4096  # projector input width
  image_size: int = 336  # tile side in pixels
  patch_size: int = 14  # patch side in pixels
  norm_eps: float = 1e-5  # LayerNorm epsilon (HF reads 1e-5 regardless)
  vision_feature_layer: int = -1  # HF stores it, its forward ignores it
  vision_feature_select_strategy: str = "default"  # HF stores it, its forward ignores it
  initializer_range: float = 0.02  # std of the normal init
  pixel_shuffle_ratio: float = 0.5  # token merge ratio r (2x2 patches -> 1 token)
  projector_input_dim: int = 4096  # adapter fc1 output
  projector_output_dim: int = 4096  # adapter fc2 output
  multi_modal_projector_bias: bool = False  # release: no bias
  projector_dropout: float = 0.0  # unused at inference
  attention_dropout: float = 0.0  # unused at inference
  rope_theta: float = 10000.0  # 2-D vision RoPE base
  hidden_act: str = "gelu"  # exact-erf GELU

  def __post_init__(self):
    _check_types(self, "vision_config.")
    _require(self.hidden_act == "gelu", "vision_config.hidden_act",
             f"only 'gelu' is supported, got {self.hidden_act!r}")
    for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_channels", "intermediate_size",
              "vision_output_dim", "image_size", "patch_size", "projector_input_dim", "projector_output_dim"):
      v = getattr(self, f)
      _require(0 < v < MAX_SIZE, f"vision_config.{f}", f"must be a positive integer below 2**31, got {v!r}")
    _require(self.hidden_size % self.num_attention_heads == 0, "vision_config.num_attention_heads",
             f"{self.num_attention_heads} does not divide hidden_size={self.hidden_size}")
    _require((self.hidden_size // self.num_attention_heads) % 4 == 0, "vision_config.num_attention_heads",
             "head_dim must be a multiple of 4 for the 2-D RoPE")
    _require(self.image_size % self.patch_size == 0, "vision_config.patch_size",
             f"{self.patch_size} does not divide image_size={self.image_size}")
    r = self.pixel_shuffle_ratio
    side = self.image_size // self.patch_size
    inv = round(1 / r)
    _require(0 < r <= 1 and abs(1 / r - inv) < 1e-9 and side % inv == 0, "vision_config.pixel_shuffle_ratio",
             f"{r} must be 1/n with n dividing the patch grid side {side}")
    width = round(self.hidden_size / (r * r))
    _require(self.intermediate_size == width, "vision_config.intermediate_size",
             f"{self.intermediate_size} must equal hidden_size / pixel_shuffle_ratio^2 = {width}")
    _require(self.projector_input_dim == self.projector_output_dim, "vision_config.projector_input_dim",
             f"{self.projector_input_dim} must equal projector_output_dim={self.projector_output_dim}")
    _require(self.vision_output_dim == self.projector_output_dim, "vision_config.vision_output_dim",
             f"{self.vision_output_dim} must equal projector_output_dim={self.projector_output_dim}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def grid(self) -> int:
    """Patches per tile side (24 for the release)."""
    return self.image_size // self.patch_size

  @property
  def tokens_per_tile(self) -> int:
    """`<|patch|>` tokens per tile after pixel shuffle (144 for the release)."""
    return round(self.grid * self.grid * self.pixel_shuffle_ratio ** 2)


# --------------------------------------------------------------------------------------------------
# Whole model


@dataclasses.dataclass(frozen=True)
class Llama4Config:
  """`Llama4Config` (multimodal) or, with `vision=None`, a text-only `Llama4ForCausalLM`."""

  text: TextConfig = dataclasses.field(default_factory=lambda: TextConfig())
  vision: VisionConfig | None = dataclasses.field(default_factory=lambda: VisionConfig())
  boi_token_index: int = 200080  # <|image_start|>
  eoi_token_index: int = 200081  # <|image_end|>
  image_token_index: int = 200092  # <|patch|>: the tokens replaced by image features
  tie_word_embeddings: bool = False  # top-level copy of the text flag
  dtype: str = "bfloat16"  # dtype the checkpoint was saved in (torch_dtype / dtype)

  def __post_init__(self):
    _check_types(self, "")
    _require(self.dtype in _DTYPES, "dtype", f"unknown dtype {self.dtype!r}; expected one of {sorted(_DTYPES)}")
    if self.vision is not None:
      _require(self.image_token_index < self.text.vocab_size, "image_token_index",
               f"{self.image_token_index} is outside vocab_size={self.text.vocab_size}")


_DTYPES = {"float32", "bfloat16", "float16"}
ATTENTION_IMPLS = ("auto", "blockwise", "cudnn", "splash", "xla", "dense")


# --------------------------------------------------------------------------------------------------
# Run-time policy (not part of the checkpoint)


@dataclasses.dataclass(frozen=True)
class Policy:
  """How to run the model: dtypes and implementation choices."""

  param_dtype: str = "float32"  # storage dtype of parameters ("float32" master weights or "bfloat16")
  dtype: str = "float32"  # activation / matmul dtype
  residual_dtype: str = "float32"  # residual stream dtype between layers (float32 keeps bf16 runs closer to fp32)
  matmul_precision: str = "highest"  # jax.lax.Precision for dots: "default" | "high" | "highest"
  moe_impl: str = "sorted"  # "sorted" (sparse, block-grouped) | "ragged" (lax.ragged_dot) | "dense" (oracle)
  moe_block: int = 128  # token block of the sorted grouped matmul
  # "auto" (the backend's fused kernel: cudnn on GPU, splash on TPU, else blockwise) | "blockwise" (flash-style,
  # pure JAX, O(T) memory) | "cudnn" | "splash" | "xla" (einsum, chunk-local blocks) | "dense" (full mask, oracle)
  attention_impl: str = "auto"
  attention_block: int = 512  # query / key block of the blockwise kernel
  logits_chunk: int = 8192  # the training loss computes logits [tokens, V] this many tokens at a time (0: all)
  scan_layers: bool = True  # lax.scan over repeating blocks of layers
  remat: str = "none"  # "none" | "full" | "dots" (save matmul outputs) | "minimal"
  fp8: str = "off"  # "off" | "train" (per-tensor e4m3/e5m2) | "inference" (rowwise, FBGEMM) | "auto" (see fp8.py)
  fp8_lm_head: bool = False  # also quantise the lm_head matmul
  expert_fp8: bool = False  # routed expert weights held as float8_e4m3fn + per-output-channel scales (inference)
  # Weight-only integer serving (model/quant.py): "none" | "int8" (per output channel) | "int4" (groups along the
  # contracted axis, two values per byte); applies to the weights named by quant_targets. Inference only.
  quant: str = "none"
  quant_group: int = 128  # int4 group size along the contracted axis (must divide it)
  quant_scale_dtype: str = "float32"  # dtype of the per-group scales: "float32" | "bfloat16"
  quant_targets: tuple[str, ...] = ("experts",)  # which weights: "experts" (routed) and/or "mlp" (shared + dense)

  def __post_init__(self):
    _check_types(self, "policy.")
    for f in ("param_dtype", "dtype", "residual_dtype"):
      _require(getattr(self, f) in _DTYPES, f"policy.{f}", f"unknown dtype {getattr(self, f)!r}")
    _require(self.matmul_precision in ("default", "high", "highest"), "policy.matmul_precision",
             f"got {self.matmul_precision!r}")
    _require(self.moe_impl in ("sorted", "ragged", "dense"), "policy.moe_impl", f"got {self.moe_impl!r}")
    _require(self.attention_impl in ATTENTION_IMPLS, "policy.attention_impl",
             f"got {self.attention_impl!r}; choose one of {ATTENTION_IMPLS}")
    _require(self.logits_chunk >= 0, "policy.logits_chunk", f"must be >= 0, got {self.logits_chunk!r}")
    _require(self.attention_block > 0 and self.attention_block % 8 == 0, "policy.attention_block",
             f"must be a positive multiple of 8, got {self.attention_block!r}")
    _require(self.remat in ("none", "full", "dots", "minimal"), "policy.remat", f"got {self.remat!r}")
    _require(self.moe_block > 0, "policy.moe_block", f"got {self.moe_block!r}")
    _require(self.fp8 in ("off", "train", "inference", "auto"), "policy.fp8", f"got {self.fp8!r}")
    _require(self.quant in ("none", "int8", "int4"), "policy.quant",
             f"unknown scheme {self.quant!r}; expected 'none', 'int8' or 'int4'")
    _require(self.quant_group > 0 and self.quant_group % 2 == 0, "policy.quant_group",
             f"must be a positive even number, got {self.quant_group!r}")
    _require(self.quant_scale_dtype in ("float32", "bfloat16"), "policy.quant_scale_dtype",
             f"got {self.quant_scale_dtype!r}")
    _require(set(self.quant_targets) <= {"experts", "mlp"} and bool(self.quant_targets), "policy.quant_targets",
             f"got {self.quant_targets!r}; choose from ('experts', 'mlp')")
    _require(not (self.quant != "none" and self.expert_fp8), "policy.quant",
             f"{self.quant!r} and expert_fp8 both set: choose one format for the routed experts")


  @classmethod
  def for_dtype(cls, dtype: str, **kw) -> Policy:
    """The policy of a model held and run in `dtype`: float32 with HIGHEST matmuls (the parity setting),
    bfloat16 with default-precision matmuls; float16 (a checkpoint's dtype) runs as bfloat16. `kw`
    overrides any other field."""
    dt = "bfloat16" if dtype == "float16" else dtype
    _require(dt in ("float32", "bfloat16"), "policy.dtype", f"{dtype!r} not supported (float32 or bfloat16)")
    return cls(**{"param_dtype": dt, "dtype": dt, "matmul_precision": "highest" if dt == "float32" else "default",
                  **kw})


BF16 = Policy.for_dtype("bfloat16")
FP32 = Policy()


# --------------------------------------------------------------------------------------------------
# Low-rank adapters


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters (`llama4_jax.model.lora`, trained by `llama4_jax.train.lora`): W + (alpha / rank) * A @ B
  on the target weights, the base frozen, optimizer state for the adapters only (and the router when
  `train_router`). An experiment's `lora` field; its JSON form is that of adapter_config.json."""

  targets: tuple[str, ...] = ("q", "k", "v", "o")  # of: q k v o (attention), shared (shared expert),
  #                                                   mlp (dense MLPs), experts (routed, per expert)
  rank: int = 8  # r
  alpha: float = 16.0  # the update is scaled by alpha / rank
  train_router: bool = False  # the MoE routers get full updates too


# --------------------------------------------------------------------------------------------------
# Presets


SCOUT = Llama4Config(text=TextConfig(), vision=VisionConfig())
MAVERICK = Llama4Config(
    text=TextConfig(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                    rope_scaling=None, max_position_embeddings=1048576),
    vision=VisionConfig(),
)


def _tiny_vision() -> VisionConfig:
  return VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                      vision_output_dim=48, image_size=56, patch_size=7, projector_input_dim=48,
                      projector_output_dim=48)


def _tiny_text(**kw) -> TextConfig:
  base = dict(vocab_size=320, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
              attention_chunk_size=8, floor_scale=4, pad_token_id=0, bos_token_id=1, eos_token_id=(2,),
              max_position_embeddings=4096,
              rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0))
  base.update(kw)
  return TextConfig(**base)


# Debug presets: same code paths as the real models (qk-norm, llama3 rope, chunking, temperature tuning
# active on short sequences), tiny sizes. Token ids laid out like the real vocabulary's specials.
_TINY_TOKENS = dict(boi_token_index=300, eoi_token_index=301, image_token_index=312, dtype="float32")
TINY_SCOUT = Llama4Config(text=_tiny_text(interleave_moe_layer_step=1,
                                          rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192)),
                          vision=_tiny_vision(), **_TINY_TOKENS)
TINY_MAVERICK = Llama4Config(text=_tiny_text(interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None,
                                             num_local_experts=8),
                             vision=_tiny_vision(), **_TINY_TOKENS)
PRESETS = {"scout": SCOUT, "maverick": MAVERICK, "tiny-scout": TINY_SCOUT, "tiny-maverick": TINY_MAVERICK}


# --------------------------------------------------------------------------------------------------
# HF config.json <-> dataclasses


_TEXT_FIELDS = {f.name for f in dataclasses.fields(TextConfig)}
_VISION_FIELDS = {f.name for f in dataclasses.fields(VisionConfig)}


def _pick(d: Mapping[str, Any], fields: set[str]) -> dict:
  """The known fields of a config dict; other keys (bookkeeping, generation defaults) are ignored,
  as transformers does."""
  return {k: v for k, v in d.items() if k in fields}


def _from_json(cls: type, kw: dict[str, Any]) -> dict[str, Any]:
  """config.json values as `cls`'s field types: a list into a tuple for a tuple field, an integer into a
  float for a float field. Anything else is left for the dataclass to validate."""
  out = {}
  for k, v in kw.items():
    members = _members(_field_types(cls)[k])
    if isinstance(v, list) and any(typing.get_origin(m) is tuple for m in members):
      v = tuple(v)
    elif isinstance(v, int) and not isinstance(v, bool) and float in members and int not in members:
      v = float(v)
    out[k] = v
  return out


def _default_layout(t: TextConfig) -> TextConfig:
  """`t` with a materialised `no_rope_layers` / `moe_layers` equal to the default pattern stored as the
  default ((), None): presets read back equal, and a later `num_hidden_layers` change re-derives them."""
  if t.no_rope_layers == _every_nth_nope(t.num_hidden_layers, t.no_rope_layer_interval):
    t = dataclasses.replace(t, no_rope_layers=())
  if t.moe_layers == _every_nth_moe(t.num_hidden_layers, t.interleave_moe_layer_step):
    t = dataclasses.replace(t, moe_layers=None)
  return t


def _text_from_dict(d: Mapping[str, Any]) -> TextConfig:
  mt = d.get("model_type", "llama4_text")
  _require(mt == "llama4_text", "text_config.model_type", f"expected 'llama4_text', got {mt!r}")
  kw = _from_json(TextConfig, _pick(d, _TEXT_FIELDS))
  rp = d.get("rope_parameters")
  if rp is not None:  # 5.x spelling
    kw["rope_theta"] = float(rp.get("rope_theta", kw.get("rope_theta", 500000.0)))
    kw["rope_scaling"] = _rope_scaling_from_dict(rp, "text_config.rope_parameters")
  elif "rope_scaling" in d:  # 4.51 spelling
    kw["rope_scaling"] = None if d["rope_scaling"] is None else _rope_scaling_from_dict(
        d["rope_scaling"], "text_config.rope_scaling")
  else:
    kw["rope_scaling"] = None
  if "attn_temperature_tuning" in kw:
    v = kw["attn_temperature_tuning"]
    # Some 4.5x fine-tune configs store an int here; transformers 5 rejects it, we read it as a flag.
    _require(isinstance(v, (bool, int)), "text_config.attn_temperature_tuning", f"expected a bool, got {v!r}")
    kw["attn_temperature_tuning"] = bool(v)
  if "eos_token_id" in kw:  # transformers allows one id, a list of ids, or none
    v = kw["eos_token_id"]
    kw["eos_token_id"] = () if v is None else v if isinstance(v, tuple) else (v,)
  try:
    return _default_layout(TextConfig(**kw))
  except TypeError as e:
    raise ConfigError(f"text_config: {e}") from None


def _vision_from_dict(d: Mapping[str, Any]) -> VisionConfig:
  mt = d.get("model_type", "llama4_vision_model")
  _require(mt == "llama4_vision_model", "vision_config.model_type", f"expected 'llama4_vision_model', got {mt!r}")
  kw = _from_json(VisionConfig, _pick(d, _VISION_FIELDS))
  rp = d.get("rope_parameters")
  if rp is not None and "rope_theta" in rp:  # 5.x spelling
    kw["rope_theta"] = float(rp["rope_theta"])
  try:
    return VisionConfig(**kw)
  except TypeError as e:
    raise ConfigError(f"vision_config: {e}") from None


def _dtype_from(d: Mapping[str, Any], default: str) -> str:
  dt = d.get("dtype", d.get("torch_dtype", default)) or default
  return str(dt).replace("torch.", "")


def from_hf(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> Llama4Config:
  """Reads a HF config.json (path to the file or its directory, or the parsed dict)."""
  if isinstance(path_or_dict, Mapping):
    d, where = dict(path_or_dict), "<dict>"
  else:
    p = os.fspath(path_or_dict)
    if os.path.isdir(p):
      p = os.path.join(p, "config.json")
    where = p
    try:
      with open(p, encoding="utf-8") as f:
        d = json.load(f)
    except FileNotFoundError:
      raise ConfigError(f"{p}: no config.json there") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConfigError(f"{p}: not valid JSON ({e})") from None
  if not isinstance(d, Mapping):
    raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
  mt = d.get("model_type")
  try:
    if mt == "llama4":
      _require(isinstance(d.get("text_config"), Mapping), "text_config", "missing from a 'llama4' config (or not "
               "an object)")
      _require(isinstance(d.get("vision_config"), (Mapping, type(None))), "vision_config", "must be an object")
      text = _text_from_dict(d["text_config"])
      vision = _vision_from_dict(d["vision_config"]) if d.get("vision_config") is not None else None
      top = {k: d[k] for k in ("boi_token_index", "eoi_token_index", "image_token_index", "tie_word_embeddings")
             if k in d}
      return Llama4Config(text=text, vision=vision, dtype=_dtype_from(d, "bfloat16"), **top)
    if mt == "llama4_text":
      text = _text_from_dict(d)
      return Llama4Config(text=text, vision=None, tie_word_embeddings=text.tie_word_embeddings,
                          dtype=_dtype_from(d, "bfloat16"))
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None
  raise ConfigError(f"{where}: config field 'model_type': expected 'llama4' or 'llama4_text', got {mt!r}")


def _text_to_dict(t: TextConfig, legacy: bool) -> dict:
  d = {f.name: getattr(t, f.name) for f in dataclasses.fields(TextConfig)}
  d["eos_token_id"] = list(t.eos_token_id)
  d["no_rope_layers"] = list(t.rope_flags)  # transformers 5 expects the materialised layout
  d["moe_layers"] = list(t.moe_layer_ids)
  rs = t.rope_scaling
  rs_dict = None if rs is None else {"rope_type": rs.rope_type, "factor": rs.factor,
                                     "low_freq_factor": rs.low_freq_factor,
                                     "high_freq_factor": rs.high_freq_factor,
                                     "original_max_position_embeddings": rs.original_max_position_embeddings}
  d.pop("rope_scaling")
  if legacy:
    d["rope_scaling"] = rs_dict
  else:
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": t.rope_theta} if rs_dict is None else {
        **rs_dict, "rope_theta": t.rope_theta}
    d["layer_types"] = list(t.layer_types)
  d["model_type"] = "llama4_text"
  return d


def to_hf(cfg: Llama4Config, legacy: bool = False) -> dict:
  """A config.json dict transformers loads into the same config (5.x spelling, or 4.51 with legacy)."""
  dkey = "torch_dtype" if legacy else "dtype"
  text = _text_to_dict(cfg.text, legacy)
  if cfg.vision is None:
    return {"architectures": ["Llama4ForCausalLM"], **text, dkey: cfg.dtype}
  vision = {f.name: getattr(cfg.vision, f.name) for f in dataclasses.fields(VisionConfig)}
  vision["model_type"] = "llama4_vision_model"
  if not legacy:
    vision["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.vision.rope_theta}
  return {
      "architectures": ["Llama4ForConditionalGeneration"],
      "model_type": "llama4",
      "boi_token_index": cfg.boi_token_index,
      "eoi_token_index": cfg.eoi_token_index,
      "image_token_index": cfg.image_token_index,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      dkey: cfg.dtype,
      "text_config": text,
      "vision_config": vision,
  }


def save_hf(cfg: Llama4Config, directory: str | os.PathLike, legacy: bool = False) -> str:
  """Writes config.json atomically into `directory`; returns its path."""
  path = os.path.join(os.fspath(directory), "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(to_hf(cfg, legacy), f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
  return path
