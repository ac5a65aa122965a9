"""Llama 4 (Scout, Maverick) in JAX / Flax NNX.

Layers (docs/DESIGN.md): `config` (architecture, presets, run-time policy) -> `model` (pure math + thin NNX
modules) -> `io` (checkpoints, conversion, the one loader) -> `data` (tokenizers, chat format, images,
pipelines) -> `apps` (generation, evaluation, the memory planner) and `train`. `sharding` (outside the
package) places everything by logical axis names and imports nothing from here.
"""

from llama4_jax.apps.generate import GREEDY, Generation, Sampling, generate, generate_text, stream
from llama4_jax.config import (
                               MAVERICK,
                               SCOUT,
                               TINY_MAVERICK,
                               TINY_SCOUT,
                               ConfigError,
                               Llama4Config,
                               Policy,
                               TextConfig,
                               VisionConfig,
                               from_hf,
                               save_hf,
                               to_hf,
)
from llama4_jax.io.checkpointer import Checkpointer
from llama4_jax.io.convert import hf_to_orbax, orbax_to_hf
from llama4_jax.io.load import Loaded, Source, load, resolve
from llama4_jax.io.model_dir import save_params
from llama4_jax.io.validate import CheckpointError
from llama4_jax.model.counting import count_params
from llama4_jax.model.llama4 import Llama4, abstract, init

__all__ = [
    "GREEDY", "Generation", "Sampling", "generate", "generate_text", "stream",
    "MAVERICK", "SCOUT", "TINY_MAVERICK", "TINY_SCOUT", "ConfigError", "Llama4Config", "Policy", "TextConfig",
    "VisionConfig", "from_hf", "save_hf", "to_hf",
    "Checkpointer", "hf_to_orbax", "orbax_to_hf", "Loaded", "Source", "load", "resolve", "save_params",
    "CheckpointError", "count_params", "Llama4", "abstract", "init",
]
