"""Llama 4 (Scout, Maverick) in JAX / Flax NNX."""

from llama4_jax.config import MAVERICK, SCOUT, Llama4Config, Policy, TextConfig, VisionConfig, from_hf, to_hf
from llama4_jax.hf_load import load_hf

__all__ = ["MAVERICK", "SCOUT", "Llama4Config", "Policy", "TextConfig", "VisionConfig", "from_hf", "load_hf",
           "to_hf"]
