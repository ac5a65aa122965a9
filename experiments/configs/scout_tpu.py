"""Llama 4 Scout (17B active / 109B total, 16 experts, multimodal) fine-tuned on chat data on a TPU slice.

Target: TPU v5p-128 (64 chips, 95 GiB HBM each). Layout from the memory planner
(`python -m tools.plan --preset scout --hardware v5p-128 --seq 4096`): rules "fsdp", mesh data=2 x fsdp=32
(a full copy of parameters + AdamW state per 32 chips, the batch over all 64). Per chip: 12.7 GiB float32
parameters (they are the master copy) + 12.7 float32 gradients + 25.3 AdamW moments + 19.4 activations
(bfloat16, remat "full", 4096-token rows) = 70 GiB of 95 (the planner's bf16 params + grads + fp32
master add up to the same 32 GiB).

On a TPU v6e-256 (32 GiB per chip) the planner picks rules "expert_parallel", mesh fsdp=128 x expert=2
(26.7 GiB per chip):
  --set rules=expert_parallel mesh.data=1 mesh.fsdp=128 mesh.expert=2

Launch: one identical command per host (docs/LAUNCH.md). Paths must be visible from every host: the
checkpoint directory (out_dir) on a shared filesystem or bucket mount, the data on each host's disk.
"""

from llama4_jax import config as C
from llama4_jax.train.config import DataConfig, Experiment, MoEConfig, OptimConfig, RunConfig
from sharding.mesh import MeshConfig


def get_config() -> Experiment:
  return Experiment(
      name="scout_sft",
      model=C.SCOUT,  # replaced by the config.json of --init-from (the converted release checkpoint)
      # float32 master weights, bfloat16 matmuls and activations; the residual stream stays float32.
      policy=C.Policy(param_dtype="float32", dtype="bfloat16", residual_dtype="float32",
                      matmul_precision="default", moe_impl="ragged", remat="full"),
      mesh=MeshConfig(data=2, fsdp=32, distributed=True),
      rules="fsdp",
      optim=OptimConfig(lr=1e-5, min_lr_ratio=0.1, warmup_steps=100, b2=0.95, weight_decay=0.05, clip_norm=1.0),
      # The release router is already balanced: a light balance loss keeps it so.
      moe=MoEConfig(aux_loss_coef=1e-3, z_loss_coef=1e-4),
      data=DataConfig(source="chat", train_paths=("/data/sft/train.jsonl",), val_paths=("/data/sft/val.jsonl",),
                      tokenizer="llama4", seq_len=4096, batch_size=64),
      run=RunConfig(steps=2000, eval_every=200, eval_batches=16, ckpt_every=200, keep=3, log_every=10,
                    out_dir="/mnt/shared/runs", init_from="/mnt/shared/models/scout-orbax", freeze_vision=True,
                    sample_prompt="", sample_tokens=0),
  )
