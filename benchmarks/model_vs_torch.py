"""Our model vs transformers on CPU: forward tokens/s and train-step time, same config, weights and threads.

  .venv/bin/python -m benchmarks.model_vs_torch [--quick]

For each config (a small Scout-like one: every layer MoE, qk-norm, llama3 RoPE scaling; a Maverick-like
one: MoE every other layer, dense MLP between, no qk-norm, plain RoPE) a random transformers
`Llama4ForCausalLM` is built and saved by `tests/hf_ref.py`, and our model is loaded from that directory
with `llama4_jax.load`: identical weights. The logits of both on the benchmark batch are compared first.

  torch   eager attention, float32, `torch.set_num_threads` = the cores JAX uses; forward under
          `no_grad` with `use_cache=False`; train step = forward with labels, `loss.backward()`,
          `torch.optim.AdamW.step()`.
  ours    float32 policy (precision HIGHEST), jitted, compile time reported apart; forward = logits;
          train step = the same shifted cross-entropy, `jax.value_and_grad`, `optax.adamw` update,
          parameters and optimizer state donated. Two policies: the default (`moe_impl="sorted"`, sparse
          experts; `attention_impl="xla"`, chunk-local attention on the RoPE layers) and "like for like"
          (`moe_impl="dense"`, `attention_impl="dense"`: every expert on every token and the full T x T
          masked attention, which is what transformers' eager code computes).
Times are medians of `runs` calls after one warm-up call (fewer runs, at least one, when they would take
more than `BUDGET_S`; each result records its counts).

Model FLOPs (the convention of `model_flops`): per step, 2 * N_active * tokens forward, where N_active
counts the matmul weights a token uses (attention q, k, v, o; router; shared expert; k of E routed
experts; dense MLPs; lm_head; not the embedding gather, not norms), plus attention
4 * B * T * S_l * H * d per layer forward (QK^T and PV over the full T x S_l rectangle, no causal
discount), S_l = T on global (NoPE) layers and min(chunk, T) on chunked (RoPE) layers. A train step
counts 3x the forward: 6 * N_active * tokens + 12 * B * T * H * d * sum_l S_l.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.matmul_ceiling import median_s, threads
from llama4_jax import config as C
from llama4_jax import load
from llama4_jax.train import losses

_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")

LR, WEIGHT_DECAY = 1e-4, 0.01  # both optimizers: betas (0.9, 0.999), eps 1e-8
BUDGET_S = 30.0  # per timed quantity: fewer runs (at least one) when a call is slower than BUDGET_S / runs


# --------------------------------------------------------------------------------------------------
# Configs


def scout_like(layers=4, hidden=512, experts=16, width=1024, vocab=8192, chunk=256) -> C.Llama4Config:
  """Scout's layer pattern and features (every layer MoE, qk-norm, llama3 scaling 16/1/1/8192, chunked
  RoPE layers, temperature-tuned NoPE layers) at a CPU-sized width."""
  text = C.TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=width,
                      intermediate_size_mlp=2 * width, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=hidden // 8, num_local_experts=experts,
                      interleave_moe_layer_step=1, use_qk_norm=True,
                      rope_scaling=C.RopeScaling(16.0, 1.0, 1.0, 8192), attention_chunk_size=chunk,
                      floor_scale=chunk, pad_token_id=0, bos_token_id=1, eos_token_id=(2,),
                      max_position_embeddings=1 << 20)
  return C.Llama4Config(text=text, vision=None, dtype="float32")


def maverick_like(layers=4, hidden=512, experts=16, width=1024, vocab=8192, chunk=256) -> C.Llama4Config:
  """Maverick's pattern: MoE on odd layers (step 2) with dense MLPs (width 2I) between, no qk-norm,
  no RoPE scaling."""
  cfg = scout_like(layers, hidden, experts, width, vocab, chunk)
  return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, interleave_moe_layer_step=2, moe_layers=None,
                                                           use_qk_norm=False, rope_scaling=None))


CONFIGS = {"scout-like": scout_like, "maverick-like": maverick_like}


def model_flops(t: C.TextConfig, batch: int, seq: int) -> dict:
  """Forward and train-step model FLOPs of one batch (see the module docstring), and N_active."""
  D, H, K, d = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
  n_active, attn_fwd = D * t.vocab_size, 0  # lm_head
  for layer in range(t.num_hidden_layers):
    n_active += D * H * d + 2 * D * K * d + H * d * D
    if t.is_moe(layer):
      n_active += D * t.num_local_experts + 3 * D * t.intermediate_size * (1 + t.num_experts_per_tok)
    else:
      n_active += 3 * D * t.intermediate_size_mlp
    s = min(t.attention_chunk_size, seq) if t.use_rope(layer) else seq
    attn_fwd += 4 * batch * seq * s * H * d
  fwd = 2 * n_active * batch * seq + attn_fwd
  return {"n_active_matmul": n_active, "fwd": fwd, "train": 3 * fwd}


# --------------------------------------------------------------------------------------------------
# Ours


def _ours(model, ids: jax.Array, runs_fwd: int, runs_train: int, log) -> dict:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY)

  def forward(params, ids):
    return nnx.merge(graphdef, params, rest)(ids)

  def loss_fn(params, ids):  # the training loop's cross-entropy (train.losses), mean over the shifted tokens
    ce, tokens = losses.cross_entropy_sum(forward(params, ids)[:, :-1], ids[:, 1:], jnp.ones_like(ids[:, 1:]))
    return ce / tokens

  def step(params, opt_state, ids):
    loss, grads = jax.value_and_grad(loss_fn)(params, ids)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  t0 = _now()
  f = jax.jit(forward).lower(params, ids).compile()
  compile_fwd = _now() - t0
  logits = np.asarray(f(params, ids))
  t_fwd, n_fwd = median_s(lambda: jax.block_until_ready(f(params, ids)), runs_fwd, budget_s=BUDGET_S)
  log(f"    ours forward {1e3 * t_fwd:.0f} ms (compile {compile_fwd:.1f} s)")

  opt_state = jax.jit(tx.init)(params)
  t0 = _now()
  s = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, ids).compile()
  compile_train = _now() - t0
  state = {"p": jax.tree.map(jnp.copy, params), "o": opt_state}
  first_loss = []

  def one_step():
    state["p"], state["o"], loss = s(state["p"], state["o"], ids)
    jax.block_until_ready((state["p"], loss))
    if not first_loss:
      first_loss.append(float(loss))

  t_train, n_train = median_s(one_step, runs_train, budget_s=BUDGET_S)
  log(f"    ours train step {1e3 * t_train:.0f} ms (compile {compile_train:.1f} s)")
  return {"fwd_s": t_fwd, "train_s": t_train, "runs": [len(n_fwd), len(n_train)], "fwd_times_s": n_fwd,
          "train_times_s": n_train, "compile_fwd_s": compile_fwd,
          "compile_train_s": compile_train, "first_loss": first_loss[0], "logits": logits}


# --------------------------------------------------------------------------------------------------
# transformers


def _torch(model, ids: np.ndarray, runs_fwd: int, runs_train: int, log) -> dict:
  import torch
  tids = torch.as_tensor(ids, dtype=torch.long)
  model.eval()

  def fwd():
    with torch.no_grad():
      return model(input_ids=tids, use_cache=False).logits

  logits = fwd().numpy()
  t_fwd, n_fwd = median_s(fwd, runs_fwd, budget_s=BUDGET_S)
  log(f"    torch forward {1e3 * t_fwd:.0f} ms")
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
  first_loss = []

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=tids, labels=tids, use_cache=False).loss
    loss.backward()
    opt.step()
    if not first_loss:
      first_loss.append(float(loss.detach()))

  t_train, n_train = median_s(step, runs_train, budget_s=BUDGET_S)
  model.eval()
  log(f"    torch train step {1e3 * t_train:.0f} ms")
  return {"fwd_s": t_fwd, "train_s": t_train, "runs": [len(n_fwd), len(n_train)], "fwd_times_s": n_fwd,
          "train_times_s": n_train, "first_loss": first_loss[0], "logits": logits}


# --------------------------------------------------------------------------------------------------


def _now() -> float:
  import time
  return time.perf_counter()


def measure_config(name: str, cfg: C.Llama4Config, batch: int, seq: int, runs_fwd: int, runs_train: int,
                   like_for_like: bool = True, log=print) -> dict:
  import torch
  import transformers
  transformers.logging.set_verbosity_error()  # its llama3 check warns on Scout's own high == low factors
  sys.path.insert(0, _TESTS)
  import hf_ref  # noqa: E402  (tests/hf_ref.py: the random transformers model builder)

  torch.set_num_threads(threads())
  t = cfg.text
  ids = np.random.RandomState(0).randint(3, t.vocab_size, (batch, seq))
  flops = model_flops(t, batch, seq)
  policies = {"ours": C.Policy()}
  if like_for_like:
    policies["ours_like_for_like"] = C.Policy(moe_impl="dense", attention_impl="dense")
  log(f"  {name}: B {batch} T {seq}, N_active {flops['n_active_matmul'] / 1e6:.1f} M, "
      f"{flops['train'] / 1e9:.0f} GFLOP per train step")
  with tempfile.TemporaryDirectory() as d:
    ref = hf_ref.build(cfg, d, causal_lm=True)
    total_params = sum(p.numel() for p in ref.parameters())
    res = {"torch": _torch(ref, ids, runs_fwd, runs_train, log)}
    for key, policy in policies.items():
      res[key] = _ours(load(d, policy=policy).model, jnp.asarray(ids), runs_fwd, runs_train, log)
    del ref
  tokens = batch * seq
  out = {"name": name, "batch": batch, "seq": seq, "tokens": tokens, "total_params": total_params,
         "config": {"layers": t.num_hidden_layers, "hidden": t.hidden_size, "experts": t.num_local_experts,
                    "top_k": t.num_experts_per_tok, "width": t.intermediate_size,
                    "mlp_width": t.intermediate_size_mlp, "heads": t.num_attention_heads,
                    "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim, "vocab": t.vocab_size,
                    "chunk": t.attention_chunk_size, "moe_step": t.interleave_moe_layer_step,
                    "qk_norm": t.use_qk_norm, "rope_scaling": t.rope_scaling is not None},
         "flops": flops}
  ref_logits = res["torch"].pop("logits")
  for key, r in res.items():
    if key != "torch":
      r["max_abs_logit_diff_vs_torch"] = float(np.abs(r.pop("logits") - ref_logits).max())
    r["fwd_tokens_per_s"] = tokens / r["fwd_s"]
    r["fwd_gflops"] = flops["fwd"] / r["fwd_s"] / 1e9
    r["train_gflops"] = flops["train"] / r["train_s"] / 1e9
    out[key] = r
  for key in policies:
    out[key]["fwd_speedup_vs_torch"] = out["torch"]["fwd_s"] / out[key]["fwd_s"]
    out[key]["train_speedup_vs_torch"] = out["torch"]["train_s"] / out[key]["train_s"]
  return out


def measure(batch: int = 1, seq: int = 1024, runs_fwd: int = 5, runs_train: int = 3, quick: bool = False,
            log=print, **size) -> list[dict]:
  if quick:
    size = dict(layers=4, hidden=64, experts=4, width=64, vocab=512, chunk=16) | size
    batch, seq = 1, 64
  return [measure_config(name, make(**size), batch, seq, runs_fwd, runs_train, log=log)
          for name, make in CONFIGS.items()]


def table(rows: list[dict], ceiling_gflops: float | None = None, torch_ceiling_gflops: float | None = None) -> str:
  """Speedup = torch time / our time (> 1: ours faster)."""
  hdr = ("| config | implementation | fwd tokens/s | fwd speedup vs torch | train step (ms): median (fastest) | "
         "train speedup vs torch | train model GFLOP/s | of own f32 ceiling | compile fwd / train (s) | "
         "max abs logit diff |")
  out = [hdr, "|---" * (hdr.count("|") - 1) + "|"]
  labels = {"torch": "transformers (eager)", "ours": "ours (sorted MoE, chunk-local attn)",
            "ours_like_for_like": "ours (dense MoE, dense attn)"}
  for r in rows:
    for key, label in labels.items():
      if key not in r:
        continue
      m = r[key]
      ceil = torch_ceiling_gflops if key == "torch" else ceiling_gflops
      frac = f"{m['train_gflops'] / ceil:.0%}" if ceil else "-"
      if key == "torch":
        sp_f = sp_t = "1 (reference)"
        comp = diff = "-"
      else:
        sp_f, sp_t = f"{m['fwd_speedup_vs_torch']:.2f}x", f"{m['train_speedup_vs_torch']:.2f}x"
        comp = f"{m['compile_fwd_s']:.1f} / {m['compile_train_s']:.1f}"
        diff = f"{m['max_abs_logit_diff_vs_torch']:.1e}"
      out.append(f"| {r['name']} | {label} | {m['fwd_tokens_per_s']:.0f} | {sp_f} | {1e3 * m['train_s']:.0f} "
                 f"({1e3 * min(m['train_times_s']):.0f}) | "
                 f"{sp_t} | {m['train_gflops']:.0f} | {frac} | {comp} | {diff} |")
  return "\n".join(out)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--runs-fwd", type=int, default=5)
  ap.add_argument("--runs-train", type=int, default=3)
  ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the script)")
  args = ap.parse_args(argv)
  rows = measure(args.batch, args.seq, args.runs_fwd, args.runs_train, args.quick)
  print(table(rows))


if __name__ == "__main__":
  main()
