"""`make distill`: the `make train` model (runs/shakespeare_cpu, 4 layers, 8 experts) distilled into a student with
half the layers and half the experts, on the same plays and tokenizer, on a 2-core CPU in under 12 minutes.

Teacher online in the same jitted step (frozen, float32 like the student). Temperature 2; adaptive alpha from
0.9 (soft) to 0.1 (hard): alpha = 0.1 + 0.8 * clip((CE_student - CE_teacher) / (ln V - CE_teacher), 0, 1) per
batch, so the soft target leads while the student is far from the teacher and the data take over as it closes
the gap. The baseline (same student, same tokens, no teacher): `make distill ARGS="--set distill=none
name=distill_cpu_scratch run.time_budget_s=0 run.steps=<steps of the distilled run>"`.
"""

import dataclasses

from experiments.configs import cpu_default
from llama4_jax import config as C
from llama4_jax.train.config import DistillConfig

TEACHER = "runs/shakespeare_cpu"  # what `make train` writes


def get_config():
  base = cpu_default.get_config()
  text = dataclasses.replace(base.model.text, num_hidden_layers=2, num_local_experts=4)
  return dataclasses.replace(
      base, name="distill_cpu", model=C.Llama4Config(text=text, vision=None, dtype="float32"),
      data=dataclasses.replace(base.data, tokenizer=f"{TEACHER}/tokenizer.json"),  # the teacher's BPE
      optim=dataclasses.replace(base.optim, warmup_steps=20),
      distill=DistillConfig(teacher=TEACHER, temperature=2.0, alpha=0.9, alpha_end=0.1, schedule="adaptive"),
      # as many steps as fit in 9.5 minutes (the schedule follows), final evaluation of the held-out plays kept
      run=dataclasses.replace(base.run, eval_every=50, ckpt_every=100, time_budget_s=570.0, final_reserve_s=100.0,
                              time_limit_s=630.0, sample_tokens=60))
