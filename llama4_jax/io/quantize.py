"""Quantised model directories: weight-only int8 / int4 weights (`model/quant.py`), written leaf by leaf.

A model directory whose weights `Policy.quant` holds as integers stores, for each quantised weight leaf
(`ffn.gate_up`, `ffn.down` of the routed experts; with the "mlp" target also the shared-expert and dense MLP
`gate`/`up`/`down`), the integer values under the weight's own name and the per-group scales beside it as
`<name>_qscale`, and records the scheme in llama4_jax.json:

  "quant": {"scheme": "int4", "group_size": 128, "scale_dtype": "float32", "targets": ["experts"],
            "method": "clip", "calibration": null | {"file": ..., "tokens": n}, "layout": ...}

`load` gives such a directory a quantised model (`policy_for` switches the recorded scheme on and refuses a
policy asking for another); `orbax-to-hf` dequantises.

Two ways in, both streamed one leaf (one block of a stacked leaf) at a time through a `Plan`, bounded by the
largest tensor: `convert.hf_to_orbax(..., quantize=Plan)` quantises as it converts; `apps.quantize.
quantize_model(src, dst, ...)` rewrites an existing float model directory, training step or run. Methods: "rtn"
(round to nearest, per-group absmax), "clip" (per-group clipping ratio search, data-free: plain weight MSE,
`quant.clip_ratios`), and
"gptq" (`quant.gptq`, with the calibration inputs' second moments H of each matmul; `apps.quantize` only, as it
needs calibration data). With H (`apps.quantize`) "clip" minimises the output error on the calibration inputs
(`quant.clip_ratios_calibrated`); a leaf without statistics (a dense MLP layer) is quantised data-free.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax.config import Llama4Config, Policy
from llama4_jax.io import orbax_store
from llama4_jax.io import targets as targets_lib
from llama4_jax.model import quant
from llama4_jax.model.llama4 import abstract

METHODS = ("rtn", "clip", "gptq")
SUFFIX = "_qscale"
_AXIS = {"gate_up": -3}  # the contracted axis of each quantisable leaf, counted from the end (else -2)


def check_method(method: str) -> str:
  if method not in METHODS:
    raise quant.QuantError(f"unknown quantisation method {method!r}; expected one of {METHODS}")
  return method


def serving_policy(scheme: str, group_size: int = quant.DEFAULT_GROUP, scale_dtype: str = "float32",
                   targets: tuple[str, ...] = ("experts",), base: Policy | None = None) -> Policy:
  """`base` (default `Policy()`) with the quantisation fields set; QuantError naming a bad value."""
  quant.check_scheme(scheme)
  if scheme == "int4" and (group_size <= 0 or group_size % 2):
    raise quant.QuantError(f"int4 group size must be a positive even number, got {group_size!r}")
  return dataclasses.replace(base or Policy(), quant=scheme, quant_group=group_size, quant_scale_dtype=scale_dtype,
                             quant_targets=tuple(targets))


def record(policy: Policy, method: str | None, calibration: dict | None = None) -> dict:
  """The `quant` entry of llama4_jax.json."""
  return {"scheme": policy.quant, "group_size": policy.quant_group if policy.quant == "int4" else None,
          "scale_dtype": policy.quant_scale_dtype, "targets": list(policy.quant_targets), "method": method,
          "calibration": calibration,
          "layout": "W[..., g*G+j, ...] = float32(v[..., g*G+j, ...]) * <name>_qscale[..., g, ...] along the "
                    "contracted axis; int8 values as int8 (one group), int4 packed two per uint8 (low nibble first)"}


def policy_for(info: dict, policy: Policy, where: str) -> Policy:
  """The policy a model directory with llama4_jax.json `info` runs with: a recorded scheme is switched on (a
  policy asking for none gets it); a policy asking for another scheme, group size, scale dtype or targets, or
  for quantisation of a float checkpoint, is a QuantError naming both values."""
  rec = info.get("quant")
  if not rec:
    if policy.quant != "none":
      raise quant.QuantError(f"{where}: policy.quant={policy.quant!r} but the checkpoint is not quantised; make a "
                             f"quantised model directory first (python -m tools.convert quantize SRC DST "
                             f"--quantize {policy.quant})")
    return policy
  stored = serving_policy(rec["scheme"], rec.get("group_size") or quant.DEFAULT_GROUP,
                          rec.get("scale_dtype", "float32"), tuple(rec.get("targets", ("experts",))), policy)
  if policy.quant == "none":
    if policy.expert_fp8:
      raise quant.QuantError(f"{where}: stored as {rec['scheme']} but policy.expert_fp8 is set")
    return stored
  for f in ("quant", "quant_group", "quant_scale_dtype", "quant_targets"):
    if getattr(policy, f) != getattr(stored, f) and not (f == "quant_group" and stored.quant == "int8"):
      raise quant.QuantError(f"{where}: stored with {f}={getattr(stored, f)!r}, the policy asks for "
                             f"{f}={getattr(policy, f)!r}")
  return stored


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which float leaves of a model are quantised and how (`policy`'s scheme, `method`)."""

  policy: Policy
  method: str = "rtn"
  leaves: dict = dataclasses.field(default_factory=dict)  # float leaf path -> (scale path, axis)
  shapes: dict = dataclasses.field(default_factory=dict)  # quantised leaf path -> (shape, dtype)

  @classmethod
  def of(cls, cfg: Llama4Config, policy: Policy, method: str = "rtn") -> Plan:
    """Raises QuantError when a group size does not divide a contracted axis (the value named)."""
    check_method(method)
    for name, dim in (("hidden_size", cfg.text.hidden_size), ("intermediate_size", cfg.text.intermediate_size),
                      ("intermediate_size_mlp", cfg.text.intermediate_size_mlp)):
      if policy.quant == "int4" and dim % policy.quant_group and (name != "intermediate_size_mlp" or
                                                                  "mlp" in policy.quant_targets):
        raise quant.QuantError(f"int4 group size {policy.quant_group} does not divide {name}={dim} (a contracted "
                               "axis of the quantised weights)")
    flat = {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in nnx.to_flat_state(nnx.state(abstract(cfg, policy)))}
    leaves = {}
    for p in flat:
      if p[-1].endswith(SUFFIX):
        w = p[:-1] + (p[-1][: -len(SUFFIX)],)
        leaves[w] = (p, _AXIS.get(w[-1], -2))
    return cls(policy, method, leaves, flat)

  def create(self, writer: orbax_store.ParamWriter, path: tuple, stacked: bool) -> bool:
    """Declares the values and scales of a quantised leaf (False when `path` is not quantised)."""
    if path not in self.leaves:
      return False
    for p in (path, self.leaves[path][0]):
      shape, dtype = self.shapes[p]
      writer.create(p, shape, dtype, stacked)
    return True

  def items(self, path: tuple, x: np.ndarray, h: np.ndarray | None = None) -> list[tuple[tuple, np.ndarray]]:
    """[(path, values), (scale path, scales)] of one float leaf (or block), or [(path, x)] if not quantised.
    `h`: the second moments H [*x.shape[:axis], n, n] of the leaf's input on calibration data (methods "clip"
    and "gptq"; None: data-free, i.e. weight MSE for "clip", rounding to nearest for "gptq")."""
    if path not in self.leaves:
      return [(path, x)]
    scale_path, axis = self.leaves[path]
    p = self.policy
    w = jnp.asarray(x, jnp.float32)
    ratios = None
    if self.method == "gptq":
      q = quant.gptq(w, axis, p.quant, p.quant_group, h, p.quant_scale_dtype)
      return [(path, np.asarray(q.q)), (scale_path, np.asarray(q.scale))]
    if self.method == "clip" and h is None:
      ratios = quant.clip_ratios(w, axis, p.quant, p.quant_group, scale_dtype=p.quant_scale_dtype)
    elif self.method == "clip":
      ratios = quant.clip_ratios_calibrated(w, axis, p.quant, p.quant_group, h, scale_dtype=p.quant_scale_dtype)
    q = quant.quantize(w, axis, p.quant, p.quant_group, p.quant_scale_dtype, ratios)
    return [(path, np.asarray(q.q)), (scale_path, np.asarray(q.scale))]


def record_of(params: Any) -> dict | None:
  """The `quant` record of parameters (`nnx.State` or pure dict) holding quantised leaves, else None."""
  flat = targets_lib.flat_leaves(params)
  scales = [p for p in flat if str(p[-1]).endswith(SUFFIX)]
  if not scales:
    return None
  s = scales[0]
  w = s[:-1] + (s[-1][: -len(SUFFIX)],)
  axis, v, sc = _AXIS.get(w[-1], -2), flat[w], flat[s]
  scheme = "int8" if np.dtype(v.dtype) == np.int8 else "int4"
  names = {p[-1] for p in scales}
  targets = tuple(t for t, ok in (("experts", "gate_up" + SUFFIX in names), ("mlp", "gate" + SUFFIX in names)) if ok)
  policy = serving_policy(scheme, v.shape[axis] * 2 // sc.shape[axis] if scheme == "int4" else quant.DEFAULT_GROUP,
                          np.dtype(sc.dtype).name, targets)
  return record(policy, method=None)


def scale_path(path: tuple) -> tuple:
  """The scale leaf stored beside a quantised leaf."""
  return tuple(path[:-1]) + (f"{path[-1]}{SUFFIX}",)


def dequantize_leaf(path: tuple, q: np.ndarray, scale: np.ndarray, dtype) -> np.ndarray:
  """A stored quantised leaf (or block) back to floats."""
  w = quant.dequantize(jnp.asarray(q), jnp.asarray(scale), _AXIS.get(path[-1], -2), jnp.float32)
  return np.asarray(w).astype(dtype)


def refuse_training(policy: Policy) -> None:
  """Full training updates float weights: a quantised model trains only as the frozen base of LoRA adapters
  (QuantError naming the scheme; the LoRA loop does not call this)."""
  if policy.quant != "none":
    raise quant.QuantError(f"policy.quant={policy.quant!r}: integer weights cannot be trained in full; train LoRA "
                           "adapters on the frozen quantised base instead (QLoRA: set the experiment's lora, e.g. "
                           "make lora), or train the float model and quantise it afterwards (python -m tools.convert "
                           "quantize)")
