"""The model layer: pure JAX math (`layers`, `rope`, `attention`, `moe`, `fp8`, `cache`, `lora`) and the thin Flax NNX
modules over it (`text`, `vision`, `llama4`), plus parameter counts. Depends on `llama4_jax.config` and on
`sharding` (logical-axis constraints and the expert dispatch); nothing here reads or writes files."""
