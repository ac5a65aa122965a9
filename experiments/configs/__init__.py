"""Experiment configs: each module defines `get_config() -> llama4_jax.train.config.Experiment`."""
