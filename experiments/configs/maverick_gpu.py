"""Llama 4 Maverick (17B active / 400B total, 128 experts, MoE every other layer) fine-tuned on chat data
on 8-GPU H100 nodes.

Target: 32 nodes of 8x H100 80GB (256 GPUs). Layout from the memory planner
(`python -m tools.plan --preset maverick --mesh fsdp=32,expert=8 --rules expert_parallel --seq 4096`):
rules "expert_parallel", mesh fsdp=32 x expert=8. The expert axis (8) is the minor one, so each
node's 8 GPUs hold 8 expert shards and the per-layer all_to_all stays on NVLink; FSDP gathers cross
nodes. Per GPU: 7.4 GiB float32 parameters (the master copy) + 7.4 float32 gradients + 14.8 AdamW moments
+ 20.5 activations (bfloat16, remat "full", 4096-token rows) = 50 GiB of 80.

On 16 nodes of 8x H200 (141 GB): --set mesh.fsdp=16 (80 GiB per GPU). Fewer H100s do not fit: 16 nodes
need 80 GiB per GPU of 80.

Launch: one identical command per node (docs/LAUNCH.md); jax.distributed needs the coordinator address,
the number of processes and each process's id (SLURM and Open MPI are detected automatically).
"""

from llama4_jax import config as C
from llama4_jax.train.config import DataConfig, Experiment, MoEConfig, OptimConfig, RunConfig
from sharding.mesh import MeshConfig


def get_config() -> Experiment:
  return Experiment(
      name="maverick_sft",
      model=C.MAVERICK,  # replaced by the config.json of --init-from (the converted release checkpoint)
      policy=C.Policy(param_dtype="float32", dtype="bfloat16", residual_dtype="float32",
                      matmul_precision="default", moe_impl="sorted", remat="full"),
      mesh=MeshConfig(data=1, fsdp=32, expert=8, distributed=True),
      rules="expert_parallel",
      optim=OptimConfig(lr=5e-6, min_lr_ratio=0.1, warmup_steps=100, b2=0.95, weight_decay=0.05, clip_norm=1.0),
      moe=MoEConfig(aux_loss_coef=1e-3, z_loss_coef=1e-4),
      data=DataConfig(source="chat", train_paths=("/data/sft/train.jsonl",), val_paths=("/data/sft/val.jsonl",),
                      tokenizer="llama4", seq_len=4096, batch_size=256),
      run=RunConfig(steps=1000, eval_every=100, eval_batches=8, ckpt_every=100, keep=2, log_every=10,
                    out_dir="/shared/runs", init_from="/shared/models/maverick-orbax", freeze_vision=True,
                    sample_prompt="", sample_tokens=0),
  )
