"""Training: experiment configs, optimiser, losses and router signals, the sharded step, the run loop.

Modules (import them directly):
  config       `Experiment` (model + policy + mesh/rules + optimiser + MoE + data + run) and `--set` overrides
  data         tokenizer, tokenised splits, checkpointable batch iterators of an experiment
  optim        AdamW, warmup + cosine schedule, clipping, the weight-decay mask
  losses       token cross-entropy under a loss mask
  router       load-balancing loss for the sigmoid router, z-loss, expert load, selection-bias update
  state        the train state as pure dicts and the bridge to the NNX model
  step         train / eval steps (micro-batching, shardings)
  checkpoints  train state <-> `llama4_jax.io.checkpointer.Checkpointer`
  metrics      JSONL + TensorBoard, FLOPs and MFU, the progress bar
  plots        the loss-curve PNG
  budget       `run.time_budget_s`: the run length fitted to the time, refitted at each evaluation
  loop         `run(experiment)`: the whole training run, in named stages
"""
