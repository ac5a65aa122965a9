"""Applications over a loaded model: generation (the one sampler, KV-cached), evaluation (perplexity, bits per
byte, multiple choice) and the memory planner. Training lives in `llama4_jax.train`."""
