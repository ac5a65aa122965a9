"""Logical-axis rules: one frozen object that says, for every logical axis name of the model, on which
mesh axis (or none) that dimension is split. Presets for the usual parallelism layouts.

Mesh axes (see `sharding.mesh`): `data` (pure replicas), `fsdp` (ZeRO-3: parameters split, batch split),
`expert` (routed experts split, batch split), `context` (the sequence split: context parallelism,
`sharding.sequence`), `tensor` (Megatron heads / mlp split).

A rule value is `None` (replicated), one mesh axis, or -- the one sanctioned extension -- a tuple of
mesh axes, meaning the dimension is split over their product (major to minor). The tuple exists for the
batch: with FSDP every device must see different data, so the batch has to be split over `data` x
`fsdp` (x `expert`), and fusing those into a single mesh axis would forbid putting `data` across hosts
or slices while `fsdp` stays on the fast links. A tuple is a product, never a fallback list: a name
still has exactly one placement, and each mesh axis of the tuple counts for the collision check.

Two failure modes are errors, never silent: a name the rules do not know (`UnknownAxisName`), and two
names of one array landing on the same mesh axis (`AxisCollision`, naming the array). A dimension whose
size the mesh axes do not divide falls back to replicated for that dimension only (`resolve` returns a
note saying so).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence, Union

from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
Axis = Union[str, tuple[str, ...], None]


class UnknownAxisName(KeyError):
  """A logical axis name that the rules do not define."""

  def __str__(self) -> str:  # KeyError would quote the whole message
    return str(self.args[0])


class AxisCollision(ValueError):
  """Two logical names of one array map to the same mesh axis."""


@dataclasses.dataclass(frozen=True)
class ExpertDispatch:
  """How tokens travel to the devices holding their routed experts (`sharding.dispatch`), when the rules
  split the experts over a mesh axis.

  mode:
    "dropless"  padded `all_to_all`; the send buffer holds, per destination, every local assignment
                (the worst case: all of them to one device), so nothing is ever dropped.
    "capacity"  padded `all_to_all` with `capacity_factor * assignments / devices` slots per destination;
                overflowing assignments contribute zero (the fraction is reported to the `on_drop`
                callback of `sharding.use`).
    "ragged"    `jax.lax.ragged_all_to_all`: only the real rows travel (GPU/TPU only; XLA:CPU cannot
                compile it, so it is not exercised by the CPU tests).
  """

  mode: str = "dropless"
  capacity_factor: float = 1.25  # slots per destination, relative to the balanced load (mode "capacity")

  def __post_init__(self):
    if self.mode not in ("dropless", "capacity", "ragged"):
      raise ValueError(f"ExpertDispatch.mode must be 'dropless', 'capacity' or 'ragged', got {self.mode!r}")
    if not self.capacity_factor > 0:
      raise ValueError(f"ExpertDispatch.capacity_factor must be positive, got {self.capacity_factor!r}")


@dataclasses.dataclass(frozen=True)
class SequenceDispatch:
  """How global (NoPE) layers attend across the devices of the sequence axis (`sharding.sequence`)."""

  global_layers: str = "auto"  # "auto" | "ring" | "all_gather"
  gather_limit_bytes: int = 256 << 20  # "auto": gather when one layer's gathered keys + values fit in this

  def __post_init__(self):
    if self.global_layers not in ("auto", "ring", "all_gather"):
      raise ValueError(f"SequenceDispatch.global_layers must be 'auto', 'ring' or 'all_gather', "
                       f"got {self.global_layers!r}")


@dataclasses.dataclass(frozen=True)
class Rules:
  """Logical axis name -> mesh axis. Every field below except `name`, `dispatch` and `sequence` is a logical
  name."""

  name: str = "custom"  # shown in error messages and plans
  # Parameters (names used by `llama4_jax.layers.param`).
  vocab: Axis = None  # embedding rows / lm_head columns
  embed: Axis = None  # hidden size D of every weight
  norm: Axis = None  # RMSNorm weights
  q_heads: Axis = None  # query heads of q / o
  kv_heads: Axis = None  # key/value heads of k / v
  head_dim: Axis = None  # per-head width
  mlp: Axis = None  # dense layer and shared-expert width
  experts: Axis = None  # routed experts E
  expert_mlp: Axis = None  # routed expert width I
  gate_up: Axis = None  # the size-2 gate/up axis
  router: Axis = None  # router output (one logit per expert)
  layers: Axis = None  # stacked scan axis
  vis_embed: Axis = None  # vision tower width
  vis_heads: Axis = None  # vision attention heads
  vis_head_dim: Axis = None  # vision per-head width
  vis_mlp: Axis = None  # vision MLP width
  vis_patch: Axis = None  # flattened patch pixels (patch embedding input)
  vis_pos: Axis = None  # vision position-embedding rows
  vis_adapter: Axis = None  # pixel-shuffle adapter width
  vis_out: Axis = None  # vision output width (projector input)
  # Activations (names used by `sharding.constrain`).
  act_batch: Axis = None  # batch B (and the flattened tokens of the MoE when act_tokens is unset)
  act_seq: Axis = None  # sequence T
  act_embed: Axis = None  # hidden D
  act_heads: Axis = None  # query heads
  act_kv_heads: Axis = None  # key/value heads
  act_vocab: Axis = None  # logits' vocab axis
  act_tokens: Axis = None  # flattened tokens N = B*T
  act_cache: Axis = None  # slots of the global layers' KV cache (decoding at long context)
  # Routed experts split over a mesh axis travel by this dispatch; None: the plain (GSPMD-partitioned)
  # computation with the expert weights gathered.
  dispatch: ExpertDispatch | None = dataclasses.field(default_factory=ExpertDispatch)
  # Global layers of a sequence split over a mesh axis (act_seq) attend by this (`sharding.sequence`).
  sequence: SequenceDispatch = dataclasses.field(default_factory=SequenceDispatch)

  def __post_init__(self):
    for name in LOGICAL_NAMES:
      object.__setattr__(self, name, _normalise(getattr(self, name), name, self.name))

  # ------------------------------------------------------------------------------------------------
  def axes(self, name: str) -> tuple[str, ...]:
    """Mesh axes of one logical name (empty: replicated)."""
    if name not in _NAME_SET:
      raise UnknownAxisName(f"rules {self.name!r}: unknown logical axis name {name!r}; "
                            f"known names: {', '.join(LOGICAL_NAMES)}")
    v = getattr(self, name)
    return () if v is None else (v,) if isinstance(v, str) else v

  def resolve(self, names: Sequence[str | None], shape: Sequence[int] | None = None,
              axis_sizes: Mapping[str, int] | None = None, what: str = "array") -> tuple[P, list[str]]:
    """PartitionSpec of an array whose dimensions carry `names`, and notes on fallbacks.

    With `shape` and `axis_sizes`, a dimension not divisible by the product of its mesh axes' sizes is
    replicated instead (one note per such dimension). Raises `UnknownAxisName` or `AxisCollision`.
    """
    if shape is not None and len(shape) != len(names):
      raise ValueError(f"{what}: {len(names)} axis names {tuple(names)} for shape {tuple(shape)}")
    used: dict[str, str] = {}
    out, notes = [], []
    for i, name in enumerate(names):
      if name is None:
        out.append(None)
        continue
      axes = self.axes(name)
      for ax in axes:
        if ax in used:
          raise AxisCollision(f"{what}: logical axes {used[ax]!r} and {name!r} both map to mesh axis {ax!r} "
                              f"under rules {self.name!r} (names {tuple(names)})")
        used[ax] = name
      if axes and shape is not None and axis_sizes is not None:
        missing = [a for a in axes if a not in axis_sizes]
        if missing:
          raise ValueError(f"{what}: rules {self.name!r} map {name!r} to mesh axes {missing} absent from the "
                           f"mesh {dict(axis_sizes)}")
        n = math.prod(axis_sizes[a] for a in axes)
        if shape[i] % n:
          notes.append(f"{what}: dim {i} ({name!r}, size {shape[i]}) is not divisible by {'x'.join(axes)}={n}; "
                       "replicated instead")
          out.append(None)
          continue
      out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out), notes

  def spec(self, names: Sequence[str | None], what: str = "array") -> P:
    """PartitionSpec of logical `names` (no divisibility check). Raises on unknown names / collisions."""
    return self.resolve(names, what=what)[0]


LOGICAL_NAMES = tuple(f.name for f in dataclasses.fields(Rules) if f.name not in ("name", "dispatch", "sequence"))
_NAME_SET = frozenset(LOGICAL_NAMES)


def _normalise(v, name: str, rules_name: str) -> Axis:
  if v is None or v == ():
    return None
  axes = (v,) if isinstance(v, str) else v
  if not isinstance(axes, tuple) or not all(isinstance(a, str) for a in axes):
    raise TypeError(f"rules {rules_name!r}: {name!r} must be None, a mesh axis or a tuple of mesh axes, got {v!r}")
  bad = [a for a in axes if a not in MESH_AXES]
  if bad:
    raise ValueError(f"rules {rules_name!r}: {name!r} maps to unknown mesh axes {bad}; mesh axes are {MESH_AXES}")
  if len(set(axes)) != len(axes):
    raise AxisCollision(f"rules {rules_name!r}: {name!r} lists a mesh axis twice: {axes}")
  return axes[0] if len(axes) == 1 else axes


def from_mapping(mapping: Mapping[str, Axis], name: str = "custom",
                 dispatch: ExpertDispatch | None = ExpertDispatch()) -> Rules:
  """Rules from a {logical name: mesh axis} dict; an unknown key raises `UnknownAxisName`."""
  unknown = sorted(set(mapping) - _NAME_SET)
  if unknown:
    raise UnknownAxisName(f"rules {name!r}: unknown logical axis names {unknown}; known names: "
                          f"{', '.join(LOGICAL_NAMES)}")
  return Rules(name=name, dispatch=dispatch, **mapping)


# --------------------------------------------------------------------------------------------------
# Presets. The batch is split over every mesh axis that does not split the weights' inner dimensions
# (data, fsdp, expert), so no two devices of those axes compute the same thing; size-1 axes are free.

_BATCH = ("data", "fsdp", "expert")

DATA_PARALLEL = Rules(name="data_parallel", act_batch=_BATCH)
"""Every weight replicated; the batch split over all devices (gradients all-reduced by XLA)."""

_FSDP_VISION = dict(vis_embed="fsdp", vis_adapter="fsdp")  # the vision tower's own widths (projector: embed)

FSDP = Rules(name="fsdp", embed="fsdp", act_batch=_BATCH, **_FSDP_VISION)
"""ZeRO-3: every weight split along its hidden dimension over `fsdp` (gathered per layer for use)."""

FSDP_TP = Rules(name="fsdp_tp", embed="fsdp", vocab="tensor", q_heads="tensor", kv_heads="tensor", mlp="tensor",
                expert_mlp="tensor", vis_heads="tensor", vis_mlp="tensor", act_batch=_BATCH,
                act_heads="tensor", act_kv_heads="tensor", act_vocab="tensor", **_FSDP_VISION)
"""FSDP over `fsdp` plus Megatron tensor parallelism over `tensor` (heads, mlp widths, vocab)."""

EXPERT_PARALLEL = Rules(name="expert_parallel", embed="fsdp", experts="expert", act_batch=_BATCH, **_FSDP_VISION)
"""Routed experts split over `expert` (tokens travel by all_to_all); everything else FSDP over `fsdp`."""

INFERENCE = Rules(name="inference", vocab="tensor", q_heads="tensor", kv_heads="tensor", mlp="tensor",
                  expert_mlp="tensor", experts="expert", vis_heads="tensor", vis_mlp="tensor",
                  act_batch="data", act_heads="tensor", act_kv_heads="tensor",
                  act_vocab="tensor")
"""Serving: tensor parallel + expert parallel, no FSDP (no per-layer weight gathers). The batch is split
over `data` only; the MoE dispatch splits each data shard's tokens over `expert` itself."""

CONTEXT_PARALLEL = Rules(name="context_parallel", embed="fsdp", experts="expert", act_batch=_BATCH, act_seq="context",
                         act_cache="context", **_FSDP_VISION)
"""Long sequences: the sequence split over `context` (tokens stay split through every layer; attention
communicates as `sharding.sequence` says) and so are the global layers' KV-cache slots, with FSDP over
`fsdp` and routed experts over `expert`."""


def with_context(rules: Rules) -> Rules:
  """`rules` with the sequence split over the `context` axis as well (any preset: fsdp, fsdp_tp, ...)."""
  return dataclasses.replace(rules, name=f"{rules.name}+context", act_seq="context", act_cache="context")


PRESETS = {r.name: r for r in (DATA_PARALLEL, FSDP, FSDP_TP, EXPERT_PARALLEL, INFERENCE, CONTEXT_PARALLEL)}


def preset(name: str) -> Rules:
  try:
    return PRESETS[name]
  except KeyError:
    raise KeyError(f"unknown sharding preset {name!r}; presets: {sorted(PRESETS)}") from None

