"""Mesh, logical-axis rules and placement: the only package that names physical mesh axes.

Placement is data: `Rules` (logical name -> mesh axis), meshes (`MeshConfig`), specs and shardings of
any NNX state carrying logical names, and the expert-parallel dispatch of a local experts function the
model supplies (`dispatch`). Nothing here imports the model; the model imports `constrain` and
`routed_experts` from here.
"""

from sharding.context import cache_write, cached_attention, constrain, routed_experts, sequence_attention, use
from sharding.mesh import MeshConfig, describe, initialize_distributed, make_mesh
from sharding.params import batch_sharding, param_shardings, param_specs, shard_model
from sharding.rules import (
                            CONTEXT_PARALLEL,
                            DATA_PARALLEL,
                            EXPERT_PARALLEL,
                            FSDP,
                            FSDP_TP,
                            INFERENCE,
                            PRESETS,
                            AxisCollision,
                            ExpertDispatch,
                            Rules,
                            SequenceDispatch,
                            UnknownAxisName,
                            preset,
                            with_context,
)

__all__ = [
    "cache_write", "cached_attention", "constrain", "routed_experts", "sequence_attention", "use",
    "MeshConfig", "describe", "initialize_distributed", "make_mesh",
    "batch_sharding", "param_shardings", "param_specs", "shard_model",
    "CONTEXT_PARALLEL", "DATA_PARALLEL", "EXPERT_PARALLEL", "FSDP", "FSDP_TP", "INFERENCE", "PRESETS",
    "AxisCollision", "ExpertDispatch", "Rules", "SequenceDispatch", "UnknownAxisName", "preset", "with_context",
]
