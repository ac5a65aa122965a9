"""Mesh, logical-axis rules and placement. The only package that names physical mesh axes.

`context` is imported first: the model imports `constrain` / `routed_experts` from here, and the
placement helpers import the model lazily.
"""

from sharding.context import active, constrain, routed_experts, use
from sharding.mesh import MeshConfig, describe, initialize_distributed, make_mesh
from sharding.params import batch_sharding, init_sharded, param_shardings, param_specs, shard_model
from sharding.rules import (DATA_PARALLEL, EXPERT_PARALLEL, FSDP, FSDP_TP, INFERENCE, PRESETS, AxisCollision,
                            ExpertParallel, Rules, UnknownAxisName, preset)

__all__ = [
    "active", "constrain", "routed_experts", "use",
    "MeshConfig", "describe", "initialize_distributed", "make_mesh",
    "batch_sharding", "init_sharded", "param_shardings", "param_specs", "shard_model",
    "DATA_PARALLEL", "EXPERT_PARALLEL", "FSDP", "FSDP_TP", "INFERENCE", "PRESETS", "AxisCollision",
    "ExpertParallel", "Rules", "UnknownAxisName", "preset",
]
