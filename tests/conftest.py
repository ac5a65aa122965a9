"""Test setup: 8 simulated CPU devices (must precede the first jax import), float32 parity defaults."""

import os

# LLVM optimisation level 0 halves XLA:CPU compile time of the tiny test models; it does not change numerics.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
