"""Device mesh from a small frozen config: axes (data, fsdp, expert, context, tensor), single or multi-host.

Axis order is major to minor: `data` spans hosts / slices first, `tensor` (the most talkative: two
all-reduces per layer) lies on the closest devices, `context` (ring or boundary ppermutes per attention
layer) next to it, then `expert` (all_to_all per MoE layer).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from sharding.rules import MESH_AXES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the five mesh axes. Size 1 is allowed; one axis may be -1 (all remaining devices)."""

  data: int = 1  # pure data-parallel replicas
  fsdp: int = -1  # parameter (ZeRO-3) sharding; also splits the batch
  expert: int = 1  # routed-expert sharding; also splits the batch
  context: int = 1  # sequence sharding (context parallelism: rules with act_seq="context")
  tensor: int = 1  # heads / mlp width sharding
  # Of the `data` axis, the factor that crosses DCN (TPU slices, or GPU hosts): builds a hybrid mesh so
  # that only `data` traffic (one gradient all-reduce per step) leaves a slice / host. 1: single granule.
  dcn_data: int = 1
  # Call `jax.distributed.initialize()` before looking at devices (multi-host: TPU-VM pods, multi-node GPU).
  distributed: bool = False

  def __post_init__(self):
    sizes = [getattr(self, a) for a in MESH_AXES]
    if any(not isinstance(s, int) or (s < 1 and s != -1) for s in sizes):
      raise ValueError(f"mesh sizes must be positive integers or -1, got {self.sizes_dict()}")
    if sizes.count(-1) > 1:
      raise ValueError(f"at most one mesh axis may be -1, got {self.sizes_dict()}")
    if self.dcn_data < 1:
      raise ValueError(f"dcn_data must be >= 1, got {self.dcn_data}")

  def sizes_dict(self) -> dict[str, int]:
    return {a: getattr(self, a) for a in MESH_AXES}

  def shape(self, n_devices: int) -> dict[str, int]:
    """Axis sizes with -1 resolved for `n_devices` devices."""
    sizes = self.sizes_dict()
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
      if n_devices % fixed:
        raise ValueError(f"mesh {sizes}: the fixed axes ({fixed} devices) do not divide {n_devices} devices")
      sizes = {a: (n_devices // fixed if s == -1 else s) for a, s in sizes.items()}
    if math.prod(sizes.values()) != n_devices:
      raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, {n_devices} available")
    if sizes["data"] % self.dcn_data:
      raise ValueError(f"dcn_data={self.dcn_data} must divide data={sizes['data']}")
    return sizes

  @classmethod
  def parse(cls, text: str, **kw) -> "MeshConfig":
    """From "fsdp=8", "data=2,expert=4", "fsdp=-1,tensor=2" (unnamed axes: 1; fsdp defaults to 1 here
    unless given, so the string states the whole mesh)."""
    sizes = {a: 1 for a in MESH_AXES}
    for part in filter(None, (p.strip() for p in text.split(","))):
      key, sep, val = part.partition("=")
      if not sep or key.strip() not in MESH_AXES:
        raise ValueError(f"mesh spec {text!r}: expected axis=size with axis in {MESH_AXES}, got {part!r}")
      sizes[key.strip()] = int(val)
    return cls(**sizes, **kw)


def initialize_distributed(**kwargs) -> None:
  """`jax.distributed.initialize(**kwargs)` once per process. With no arguments it auto-detects the
  cluster (TPU-VM pods, SLURM, Open MPI); on a bare multi-node GPU job pass `coordinator_address`,
  `num_processes` and `process_id`."""
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(**kwargs)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None,
              log: Callable[[str], None] | None = None) -> Mesh:
  """The mesh of `cfg` over `devices` (default: all devices of all processes).

  Multi-host: with `cfg.distributed` the JAX runtime is initialised first and the layout is printed
  (every process prints its own line; pass `log` to redirect, or to print on a single host too).
  `jax.make_mesh` orders devices by the physical topology (TPU torus / NVLink islands); with
  `cfg.dcn_data > 1` a hybrid mesh keeps every axis but `data` inside one slice / host.
  """
  if cfg.distributed:
    initialize_distributed()
    log = log or print
  devices = list(jax.devices() if devices is None else devices)
  sizes = cfg.shape(len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  types = (AxisType.Auto,) * len(MESH_AXES)  # XLA propagates shardings from the constraints
  if cfg.dcn_data > 1:
    ici = (sizes["data"] // cfg.dcn_data, *shape[1:])
    dcn = (cfg.dcn_data, 1, 1, 1)
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                               process_is_granule=devices[0].platform != "tpu")
    mesh = Mesh(arr, MESH_AXES, axis_types=types)
  else:
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
  if log is not None:
    log(describe(mesh))
  return mesh


def describe(mesh: Mesh) -> str:
  """Process / device layout: this process, its devices, and where they sit in the mesh."""
  sizes = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
  pid = jax.process_index()
  local = [d for d in mesh.devices.flat if d.process_index == pid]
  coords = {d.id: idx for idx, d in np.ndenumerate(mesh.devices)}
  kinds = sorted({d.device_kind for d in mesh.devices.flat})
  types = sorted({t.name for t in mesh.axis_types})
  lines = [f"[process {pid}/{jax.process_count()}] mesh ({sizes}) axis types {types} over {mesh.devices.size} "
           f"{'/'.join(kinds)} devices; {len(local)} local:"]
  for d in local:
    lines.append(f"  device {d.id} at mesh index {dict(zip(mesh.axis_names, coords[d.id]))}")
  return "\n".join(lines)


def sizes_of(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
  return dict(mesh) if isinstance(mesh, Mapping) else dict(mesh.shape)
