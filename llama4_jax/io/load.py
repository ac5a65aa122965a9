"""The one way to get a model from disk: `load(path)` takes any of the four directories this project reads and
says which it found (`resolve`, the one resolver, also used by `convert.orbax_to_hf`):

  "hf"     a HF release directory: config.json + model.safetensors (or shards + index), plain or FP8
  "model"  a model directory (`model_dir`): config.json + params/ (+ llama4_jax.json, assets/)
  "step"   one step of a training run's checkpoints (`checkpointer`): params/ + meta/ (the config in meta)
  "run"    a training run directory (`runs/<name>/`, with checkpoints/) or its checkpoints/ directory: the
           latest complete step
  "adapter" LoRA adapters saved alone (`io.adapters`: adapter_config.json + params/, written by
           `train.lora.save_adapters`), applied to the base directory their config records (CheckpointError
           naming it when it is missing)

A step of a LoRA run (its meta experiment has "lora"; the step holds the adapters and the frozen base, in the
form the run kept it: float, int8 / int4 or FP8) and an adapter directory load as the merged float model:
base + scale * A @ B folded in, exactly what the run's `merged/` directory holds.

Everything is validated before a byte of weights is read (files present and readable, every expected key or
leaf there with the right shape and dtype, nothing unexpected: `hf_sources.sources`, `model_dir.check_stored`),
so a bad checkpoint fails with an error naming the file and key and nothing is loaded half. HF tensors are
then read one at a time straight into the (optionally sharded) parameter arrays: each device shard is filled
by a callback reading only the tensors it needs (a HF tensor holding NaN / inf is loaded with a warning naming
it). Orbax parameters are restored slice by slice onto the target shardings. A step trained with aux-loss-free
balancing gets its MoE selection biases back. A directory never reads outside itself (`safetensors.inside`),
and pickle weights (`.bin`, `.pth`) are refused unread: unpickling can run code.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals

from llama4_jax.config import Llama4Config, Policy, from_hf
from llama4_jax.data.tokenizers import Tokenizer, load_tokenizer
from llama4_jax.io import adapters, checkpointer, hf_sources, model_dir, orbax_store, quantize, targets
from llama4_jax.io import safetensors as st
from llama4_jax.io.validate import CheckpointError, check_finite
from llama4_jax.model import lora
from llama4_jax.model.llama4 import Llama4, abstract
from llama4_jax.model.text import enable_selection_bias

log = logging.getLogger(__name__)

KINDS = ("hf", "model", "step", "run", "adapter")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# PyTorch's pickle formats: loading one can execute arbitrary code, so they are refused, never read.
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")
_PICKLE_INDEX = "pytorch_model.bin.index.json"
_PICKLE_REFUSED = ("not supported: pickle (PyTorch .bin / .pth files can run code when loaded); convert it to "
                   "safetensors first, e.g. transformers' save_pretrained(..., safe_serialization=True)")


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved checkpoint: which kind of directory `path` is and where its parts are."""

  kind: str  # one of KINDS
  path: str  # the directory given, absolute
  directory: str  # the directory holding the weights: the HF or model directory, or the step directory
  config: Llama4Config
  step: int | None = None  # the training step ("step" and "run")
  run_dir: str | None = None  # the run directory ("step" and "run"), when there is one
  meta: dict | None = None  # the step's meta item ("step" and "run")
  layout: str | None = None  # the FP8 layout of a HF directory (`hf_sources.layout_of`), else None
  base: Source | None = None  # "adapter": the resolved base the adapters apply to

  @property
  def lora(self) -> dict | None:
    """The LoRA config (JSON form) of a LoRA run's step or of an adapter directory, else None."""
    if self.kind == "adapter":
      return adapters.read_adapter_config(self.directory)[1]["lora"]
    return ((self.meta or {}).get("experiment") or {}).get("lora")

  @property
  def params_dir(self) -> str:
    """The Orbax parameter checkpoint (not for "hf")."""
    return os.path.join(self.directory, model_dir.PARAMS)

  @property
  def info(self) -> dict:
    """llama4_jax.json of a model directory (defaults for the other kinds)."""
    return model_dir.read_info(self.directory)

  @property
  def assets_dir(self) -> str | None:
    """The directory of the non-weight files travelling with the model (tokenizer, generation config)."""
    if self.kind == "hf":
      return self.directory
    if self.kind == "adapter":
      return self.base.assets_dir
    if self.kind == "model":
      return os.path.join(self.directory, model_dir.ASSETS)
    return self.run_dir

  @property
  def tokenizer_file(self) -> str | None:
    """tokenizer.json (or Meta's tokenizer.model) found with the model, else None."""
    d = self.assets_dir
    return next((os.path.join(d, n) for n in _TOKENIZER_FILES if d and os.path.isfile(os.path.join(d, n))), None)

  def describe(self) -> str:
    if self.kind == "adapter":
      return f"adapter {self.path} (LoRA on {self.base.describe()})"
    if self.kind in ("step", "run"):
      return f"{self.kind} {self.path} (step {self.step} of {os.path.dirname(self.directory)})"
    return f"{self.kind} {self.path}"


def _refuse_pickle_only(d: str) -> None:
  """CheckpointError for a directory whose weights are only in pickle files (never unpickled: that runs code),
  and for safetensors without their config.json."""
  names = os.listdir(d)
  has_safetensors = any(n.endswith(".safetensors") or n == st.INDEX_FILE for n in names)
  pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES) or n == _PICKLE_INDEX)
  if pickles and not has_safetensors:
    raise CheckpointError(f"{os.path.join(d, pickles[0])}: {_PICKLE_REFUSED}")
  if has_safetensors and not os.path.isfile(os.path.join(d, "config.json")):
    raise CheckpointError(f"{os.path.join(d, 'config.json')}: missing (a HF directory needs config.json beside its "
                          "*.safetensors)")


def _is_hf(d: str) -> bool:
  return os.path.isfile(os.path.join(d, "config.json")) and (
      os.path.isfile(os.path.join(d, st.SINGLE_FILE)) or os.path.isfile(os.path.join(d, st.INDEX_FILE)))


def _is_step(d: str) -> bool:
  return orbax_store.is_params_dir(os.path.join(d, model_dir.PARAMS)) and os.path.isdir(os.path.join(d, "meta"))


def _latest_step(ck_dir: str) -> int | None:
  """The newest complete step of a checkpoints directory (a step directory appears only once complete)."""
  steps = [int(e) for e in os.listdir(ck_dir) if e.isdigit() and _is_step(os.path.join(ck_dir, e))]
  return max(steps) if steps else None


def _step_config(step_dir: str) -> tuple[Llama4Config, dict]:
  meta = checkpointer.read_meta(step_dir)
  if "config" not in meta:
    raise CheckpointError(f"{step_dir}/meta has no 'config' (the HF config.json dict): cannot rebuild the model "
                          "(save it with Checkpointer.save(meta={'config': config.to_hf(cfg)}))")
  return from_hf(meta["config"]), meta


def resolve(path: str | os.PathLike) -> Source:
  """What `path` is (see the module docstring); CheckpointError when it is none of the four."""
  p = os.path.abspath(os.fspath(path))
  if not os.path.isdir(p):
    if p.endswith(_PICKLE_SUFFIXES) or os.path.basename(p) == _PICKLE_INDEX:
      raise CheckpointError(f"{p}: {_PICKLE_REFUSED}")
    raise CheckpointError(f"{p}: no such directory")
  _refuse_pickle_only(p)
  if adapters.is_adapter_dir(p):
    return _resolve_adapter(p)
  if _is_hf(p):
    for name in ("config.json", st.INDEX_FILE):  # the shards are checked by `safetensors.list_tensors`
      if os.path.lexists(os.path.join(p, name)):
        st.inside(p, name)
    cfg = from_hf(p)  # names a missing, malformed or absurd config.json
    with open(os.path.join(p, "config.json")) as f:
      layout = hf_sources.layout_of(json.load(f))
    return Source("hf", p, p, cfg, layout=layout)
  if os.path.isfile(os.path.join(p, model_dir.CONFIG)) and orbax_store.is_params_dir(os.path.join(p, model_dir.PARAMS)):
    return Source("model", p, p, from_hf(os.path.join(p, model_dir.CONFIG)))
  if _is_step(p):
    cfg, meta = _step_config(p)
    ck_dir = os.path.dirname(p)
    run_dir = os.path.dirname(ck_dir) if os.path.basename(ck_dir) == "checkpoints" else None
    return Source("step", p, p, cfg, int(meta.get("step", os.path.basename(p))), run_dir, meta)
  ck_dir, run_dir = (os.path.join(p, "checkpoints"), p) if os.path.isdir(os.path.join(p, "checkpoints")) else (
      p, os.path.dirname(p) if os.path.basename(p) == "checkpoints" else None)
  step = _latest_step(ck_dir) if os.path.isdir(ck_dir) else None
  if step is None:
    raise CheckpointError(f"{p}: not a HF directory (config.json + *.safetensors), a model directory (config.json "
                          "+ params/), a checkpoint step (params/ + meta/) nor a run directory with a complete step")
  step_dir = os.path.join(ck_dir, str(step))
  cfg, meta = _step_config(step_dir)
  return Source("run", p, step_dir, cfg, step, run_dir, meta)


def _resolve_adapter(p: str) -> Source:
  """An adapter directory and the base its adapter_config.json records (resolved; CheckpointError when the
  record names none or a directory that is not there)."""
  _, record = adapters.read_adapter_config(p)
  base = record.get("base") or ""
  if not base:
    raise CheckpointError(f"{p}: LoRA adapters of a run that started from random weights (adapter_config.json "
                          "records no base): load the run directory, one of its checkpoint steps or its merged/")
  base_path = base if os.path.isabs(base) else os.path.abspath(base)
  if not os.path.isdir(base_path):
    raise CheckpointError(f"{p}: the base these LoRA adapters apply to, {base!r} (adapter_config.json \"base\"), "
                          f"is missing ({base_path} is not a directory): put it back, or load the run directory or "
                          "its merged/")
  base_src = resolve(base_path)
  return Source("adapter", p, p, base_src.config, base=base_src)


# --------------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class Loaded:
  """A ready model and where it came from. `tokenizer` is loaded on first use: the `tokenizer` spec given to
  `load`, else the one found with the model (`Source.tokenizer_file`), else Meta's Llama 4 tokenizer for a
  HF directory; None when there is none."""

  model: Llama4
  source: Source
  tokenizer_spec: str | None = None

  @functools.cached_property
  def tokenizer(self) -> Tokenizer | None:
    spec = self.tokenizer_spec or self.source.tokenizer_file or ("llama4" if self.source.kind == "hf" else None)
    return None if spec is None else load_tokenizer(spec)

  @property
  def description(self) -> str:
    return self.source.describe()


def load(path: str | os.PathLike, *, dtype: str | None = None, policy: Policy | None = None, shardings: Any = None,
         text_only: bool = False, tokenizer: str | None = None) -> Loaded:
  """A ready `Llama4` from any directory `resolve` knows, and its source.

  `dtype` sets parameters and compute (`Policy.for_dtype`; default: the checkpoint's dtype, float16 read as
  bfloat16, bfloat16 for FP8 releases); `policy` overrides it entirely. A model directory written with
  `--keep-fp8` loads with its routed experts in FP8 as stored (`Policy.expert_fp8` switched on), one written with
  `--quantize int8|int4` with its recorded scheme (`Policy.quant`; `io.quantize.policy_for`). `shardings`:
  a state of shardings with the model's structure (`sharding.param_shardings(abstract(cfg, policy), rules,
  mesh)`; default: the first device). `text_only` builds the text model alone (vision tensors not read).
  `tokenizer`: a `load_tokenizer` spec overriding the one found with the model."""
  source = resolve(path)
  cfg = dataclasses.replace(source.config, vision=None) if text_only else source.config
  fp8_stored = source.kind == "model" and bool(source.info.get("fp8"))
  if source.lora:  # a LoRA step / adapter directory: the merged float model
    fp8_stored = False
  if policy is None:
    policy = Policy.for_dtype(dtype or ("bfloat16" if source.layout else cfg.dtype))
  if fp8_stored:
    policy = dataclasses.replace(policy, expert_fp8=True)
  # a model directory stored as int8 / int4 (llama4_jax.json "quant") loads quantised; a conflicting policy fails
  policy = quantize.policy_for(source.info if source.kind == "model" else {}, policy, source.path)
  if source.kind == "adapter":
    model = _from_adapters(cfg, source, policy, shardings, text_only)
  elif source.kind == "hf":
    model = _from_hf(cfg, source, policy, shardings)
  elif source.lora:
    bias = bool((source.meta.get("experiment") or {}).get("moe", {}).get("bias_balancing", False))
    model = _from_lora_step(cfg, source, policy, shardings, bias, skip_vision=cfg.vision is None)
  else:
    bias = bool(((source.meta or {}).get("experiment") or {}).get("moe", {}).get("bias_balancing", False))
    model = _from_orbax(cfg, source, policy, shardings, bias, skip_vision=cfg.vision is None)
  log.info("loaded %s", source.describe())
  return Loaded(model, source, tokenizer)


def _from_orbax(cfg: Llama4Config, source: Source, policy: Policy, shardings, bias: bool,
                skip_vision: bool) -> Llama4:
  model = abstract(cfg, policy)
  if bias:
    enable_selection_bias(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  model_dir.check_stored(orbax_store.ParamReader(source.params_dir), params,
                         ignore_prefixes=("vision.", "projector") if skip_vision else ())
  params = model_dir.restore_params(source.directory, targets.abstract_target(params, shardings))
  rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), rest)
  if bias:  # the selection biases of aux-loss-free balancing live in the step's opt_state
    with checkpointer.Checkpointer(os.path.dirname(source.directory), keep=None, async_save=False) as ck:
      saved = ck.restore(source.step)["opt_state"]["bias"]
    nnx.replace_by_pure_dict(rest, saved)
  return nnx.merge(graphdef, params, rest)


def _merged_model(cfg: Llama4Config, policy: Policy, merged: dict, shardings, bias: dict | None) -> Llama4:
  """The float model of `policy` holding the merged parameters (cast to its dtypes, placed by `shardings`) and
  the selection biases `bias` (None: none)."""
  model = abstract(cfg, policy)
  if bias is not None:
    enable_selection_bias(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  flat = targets.flat_leaves(merged)
  shard_flat = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
  leaves = []
  for path, var in nnx.to_flat_state(params):
    x = jnp.asarray(flat[path], var.dtype)
    sh = shard_flat.get(path)
    sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
    leaves.append((path, var.replace(x if sh is None else jax.device_put(x, sh))))
  rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), rest)
  if bias is not None:
    nnx.replace_by_pure_dict(rest, bias)
  return nnx.merge(graphdef, nnx.from_flat_state(leaves), rest)


def _from_lora_step(cfg: Llama4Config, source: Source, policy: Policy, shardings, bias: bool,
                    skip_vision: bool) -> Llama4:
  """A LoRA run's step: its adapters and frozen base (as the run stored it) restored, then merged."""
  exp = source.meta["experiment"]
  base = abstract(cfg, lora.stored_policy(exp.get("policy") or {}, policy))
  if bias:
    enable_selection_bias(base)
  parts = adapters.LoraLayout.build(base, lora.config_from_dict(source.lora))
  stored = nnx.from_flat_state(list(nnx.to_flat_state(parts.params)) + list(nnx.to_flat_state(parts.frozen)))
  model_dir.check_stored(orbax_store.ParamReader(source.params_dir), stored,
                         ignore_prefixes=("vision.", "projector") if skip_vision else ())
  flat = targets.flat_leaves(model_dir.restore_params(source.directory, targets.abstract_target(stored)))
  params, frozen = ({p: flat[p] for p in targets.flat_leaves(nnx.to_pure_dict(t))} for t in (parts.params,
                                                                                            parts.frozen))
  merged = jax.jit(parts.merged_params)(traversals.unflatten_mapping(params), traversals.unflatten_mapping(frozen))
  saved_bias = None
  if bias:
    with checkpointer.Checkpointer(os.path.dirname(source.directory), keep=None, async_save=False) as ck:
      saved_bias = ck.restore(source.step)["opt_state"]["bias"]
  return _merged_model(cfg, policy, merged, shardings, saved_bias)


def _from_adapters(cfg: Llama4Config, source: Source, policy: Policy, shardings, text_only: bool) -> Llama4:
  """Adapters saved alone, applied to their base (loaded as stored: float, int8 / int4 or FP8)."""
  lcfg, _ = adapters.read_adapter_config(source.directory)
  if lcfg.train_router:
    raise CheckpointError(f"{source.path}: the run trained the routers (lora.train_router), which an adapter "
                          "directory does not hold: load the run directory, one of its steps or its merged/")
  base = load(source.base.path, policy=dataclasses.replace(policy, expert_fp8=False), text_only=text_only).model
  parts = adapters.LoraLayout.build(base, lcfg)
  _, frozen, bias = parts.split_values(base, seed=0)
  weights = model_dir.restore_params(source.directory, nnx.to_pure_dict(parts.params))
  merged = jax.jit(parts.merged_params)(weights, frozen)
  return _merged_model(cfg, policy, merged, shardings, bias if jax.tree.leaves(bias) else None)


def _leaf_builder(srcs: list, cfg: Llama4Config, dtype, tensors: dict, checked: set) -> Callable[[Any], np.ndarray]:
  """Callback for `jax.make_array_from_callback`: the requested slice of one (possibly stacked) leaf. Each HF
  tensor is checked for NaN / inf the first time it is read (a warning naming file and key)."""
  stacked = srcs[0].placement.index is not None
  by_block = {s.placement.index: s for s in srcs}

  def read(s):
    x = s.read(dtype)
    if s.placement.key not in checked:
      checked.add(s.placement.key)
      check_finite(x, f"{tensors[s.keys[0]].file}: key {s.placement.key!r}")
    return s.placement.entry.to_ours(x, cfg).astype(dtype, copy=False)

  def callback(index):
    if not stacked:
      return read(srcs[0])[index]
    blocks = range(*index[0].indices(len(by_block)))
    return np.stack([read(by_block[b])[index[1:]] for b in blocks])

  return callback


def _from_hf(cfg: Llama4Config, source: Source, policy: Policy, shardings) -> Llama4:
  if policy.expert_fp8:
    raise CheckpointError(f"{source.path}: policy.expert_fp8 needs a --keep-fp8 model directory "
                          "(python -m tools.convert hf-to-orbax SRC DST --keep-fp8); HF directories load dequantised")
  tensors = st.list_tensors(source.directory)
  srcs = hf_sources.sources(cfg, tensors, source.layout)
  graphdef, abs_state = nnx.split(abstract(cfg, policy))
  by_leaf: dict[tuple, list] = collections.defaultdict(list)
  for s in srcs:
    by_leaf[s.placement.path].append(s)
  flat = dict(nnx.to_flat_state(abs_state))
  if set(by_leaf) != set(flat):
    missing = sorted(set(flat) - set(by_leaf), key=str)
    raise CheckpointError(f"{source.path}: no tensor maps to parameter {'.'.join(map(str, missing[0]))}")
  shard_flat = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  dtype = np.dtype(jnp.dtype(policy.param_dtype))
  leaves, checked = [], set()
  for path, var in flat.items():
    sh = shard_flat.get(path, default)
    sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
    arr = jax.make_array_from_callback(var.shape, sh, _leaf_builder(by_leaf[path], cfg, dtype, tensors, checked))
    leaves.append((path, var.replace(arr)))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))

