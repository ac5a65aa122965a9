"""`make lora`: LoRA SFT of the `make train` model (runs/shakespeare_cpu) on dialogue pairs from the plays
(`python -m experiments.shakespeare_chat`: one speaker's line as the user turn, the reply as the assistant
turn; loss on the assistant turns only; validation pairs from the held-out plays): 40 steps of 8 x 256 tokens,
about 8 minutes on an idle 2-core CPU.

Rank-8 adapters (alpha 16) on the attention projections, the shared expert and the routed experts (one pair per
expert); base and routers frozen, no weight decay on the adapters. The full fine-tuning comparison:
`make lora ARGS="--set lora=none name=lora_cpu_full optim.lr=1e-3 run.steps=15"`.
"""

import dataclasses

from experiments.configs import cpu_default
from llama4_jax.train.config import DataConfig, LoraConfig

BASE = "runs/shakespeare_cpu"  # what `make train` writes
CHAT = "data/shakespeare_chat"  # what `python -m experiments.shakespeare_chat` writes


def get_config():
  base = cpu_default.get_config()
  return dataclasses.replace(
      base, name="lora_cpu",
      data=DataConfig(source="chat", train_paths=(f"{CHAT}/train.jsonl",), val_paths=(f"{CHAT}/val.jsonl",),
                      tokenizer=f"{BASE}/tokenizer.json", seq_len=256, batch_size=8),
      optim=dataclasses.replace(base.optim, lr=3e-3, warmup_steps=10, weight_decay=0.0),
      lora=LoraConfig(targets=("q", "k", "v", "o", "shared", "experts"), rank=8, alpha=16.0),
      # a fixed length (the time budget would count the minute of chat tokenisation and the base's loading)
      run=dataclasses.replace(base.run, init_from=BASE, steps=40, eval_every=10, eval_batches=4, ckpt_every=100,
                              time_budget_s=0.0, time_limit_s=0.0, sample_prompt="", sample_tokens=0))
