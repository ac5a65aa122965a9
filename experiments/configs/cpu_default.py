"""`make train`: a small Llama 4 (sigmoid top-1 MoE + iRoPE, the Scout code path at small sizes) trained from
scratch on Shakespeare's plays on a 2-core CPU in under 15 minutes, setup and evaluation included.

Architecture as Scout: every layer MoE (8 routed experts, top-1, plus the shared expert), three RoPE layers
with chunked attention then one NoPE layer with global attention and temperature tuning, qk-norm.
Sizes scaled down; the chunk (64) and the temperature floor (64) scaled with the 256-token context.
Tokenizer: a byte-level BPE of 4096 tokens trained on the train works (about 1 s).
"""

from llama4_jax import config as C
from llama4_jax.train.config import DataConfig, Experiment, MoEConfig, OptimConfig, RunConfig
from sharding.mesh import MeshConfig

VOCAB = 4096


def get_config() -> Experiment:
  text = C.TextConfig(
      vocab_size=VOCAB, hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024,
      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
      num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=1,
      attention_chunk_size=64, floor_scale=64, attn_scale=0.1, no_rope_layer_interval=4,
      rope_theta=10000.0, rope_scaling=None, use_qk_norm=True,
      # ids of the BPE's specials (llama4_jax.data.hf_tokenizer.BPE_SPECIAL_TOKENS)
      bos_token_id=0, eos_token_id=(1, 5, 6), pad_token_id=2, max_position_embeddings=4096)
  return Experiment(
      name="shakespeare_cpu",
      model=C.Llama4Config(text=text, vision=None, dtype="float32"),
      policy=C.Policy(param_dtype="float32", dtype="float32", matmul_precision="default"),
      mesh=MeshConfig(fsdp=-1),
      rules="fsdp",
      optim=OptimConfig(lr=2e-3, min_lr_ratio=0.1, warmup_steps=50, b2=0.95, weight_decay=0.1, clip_norm=1.0),
      moe=MoEConfig(aux_loss_coef=1e-2, z_loss_coef=1e-3),
      data=DataConfig(source="shakespeare", tokenizer="bpe", bpe_vocab=VOCAB, seq_len=256, batch_size=16),
      # as many steps as fit in 11 minutes (timed after 5 steps, refitted at each evaluation; the learning-rate
      # schedule follows), leaving `make train` on a fresh machine (setup ~1.5 min) inside 15 minutes;
      # time_limit_s is a hard stop
      run=RunConfig(steps=5000, eval_every=100, eval_batches=8, ckpt_every=200, log_every=10,
                    sample_prompt="ROMEO:\n", sample_tokens=120, time_budget_s=660.0, final_reserve_s=20.0,
                    time_limit_s=720.0),
  )
