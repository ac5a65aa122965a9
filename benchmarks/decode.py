"""Decode speed: our jitted KV-cache decoding against transformers `generate` on the same weights and machine.

  python -m benchmarks.decode                               # batch sizes 1, 4, 16; small config; float32 CPU
  python -m benchmarks.decode --batch-sizes 1 --new-tokens 32 --repeats 1     # a quick check

Model: the `make train` architecture (experiments/configs/cpu_default: D 256, 4 layers, 8 experts top-1 +
shared, chunk 64, vocab 4096), random weights, built in transformers, saved, and loaded into ours. Prompt of
--prompt-len random tokens (no padding), then --new-tokens greedy tokens with no stop token, so both run the
same number of steps (chunk boundaries crossed). Per batch size, the median of --repeats runs after a
warm-up run (our compilation is excluded):
  decode tok/s   B * (new_tokens - 1) / (time of the steps after the first token)
                 ours: measured between the first and last streamed token; transformers: generate(new_tokens)
                 minus generate(1) (its prefill and first token)
  total tok/s    B * new_tokens / wall time of the whole generate call (prefill included)
transformers runs its default attention (sdpa) in float32; it is timed with each of --torch-threads intra-op
thread counts and the faster is reported (on a shared 2-core box two contending torch threads can be 20x slower
than one).

  python -m benchmarks.decode --quant     # ours only: bf16 weights vs int8 vs int4 routed experts (bf16 compute)

--quant times the same architecture (random init) held in bfloat16 and with its routed experts as int8 / int4
(`Policy.quant`, group --group-size), the variants interleaved run by run so that a shared machine's load hits
them alike; reported as decode tok/s and as ratios to bf16 from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from llama4_jax import config as C
from llama4_jax import load
from llama4_jax.apps import generate as G


def small_config() -> C.Llama4Config:
  from experiments.configs.cpu_default import get_config

  return get_config().model


def hf_model(cfg: C.Llama4Config, directory: str):
  d = C.to_hf(cfg)
  hf_cfg = transformers.Llama4TextConfig(**{k: v for k, v in d.items() if k != "architectures"})
  torch.manual_seed(0)
  model = transformers.Llama4ForCausalLM(hf_cfg).eval()
  model.save_pretrained(directory)
  return model


def time_hf(model, ids: np.ndarray, n: int) -> float:
  x = torch.as_tensor(ids)
  t0 = time.perf_counter()
  with torch.no_grad():
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
  dt = time.perf_counter() - t0
  assert out.shape[1] == ids.shape[1] + n
  return dt


def time_ours(model, ids: np.ndarray, n: int) -> tuple[float, float]:
  """(decode seconds after the first token, total seconds)."""
  t0 = time.perf_counter()
  g = G.generate(model, ids, max_new_tokens=n, stop_ids=(), pad_id=0)
  total = time.perf_counter() - t0
  assert g.tokens.shape == (ids.shape[0], n)
  return g.decode_s, total


def quant_compare(args) -> int:
  """bf16 vs int8 vs int4 routed experts, our decoder only; interleaved repeats, medians, ratios to bf16."""
  from llama4_jax.model.llama4 import init

  cfg, n = small_config(), args.new_tokens
  variants = {"bf16": C.Policy.for_dtype("bfloat16")}
  for q in ("int8", "int4"):
    variants[q] = C.Policy.for_dtype("bfloat16", quant=q, quant_group=args.group_size)
  models = {k: init(cfg, p, seed=0) for k, p in variants.items()}
  rows = []
  for B in args.batch_sizes:
    ids = np.random.RandomState(B).randint(10, cfg.text.vocab_size, (B, args.prompt_len))
    runs = {k: [] for k in models}
    for m in models.values():
      time_ours(m, ids, n)  # compile
    for _ in range(args.repeats):
      for k, m in models.items():
        runs[k].append(B * (n - 1) / time_ours(m, ids, n)[0])
    med = {k: statistics.median(v) for k, v in runs.items()}
    rows.append({"batch": B, **{f"{k}_decode_tok_s": v for k, v in med.items()},
                 **{f"{k}_vs_bf16": med[k] / med["bf16"] for k in med}})
    print(f"B={B}: {rows[-1]}", flush=True)
  print(f"\n{jax.devices()[0].device_kind} ({os.cpu_count()} CPUs), jax {jax.__version__}; prompt {args.prompt_len}, "
        f"{n} new tokens, median of {args.repeats} interleaved runs; int4 groups of {args.group_size}\n")
  print("| batch | bf16 decode tok/s | int8 decode tok/s | int4 decode tok/s | int8 / bf16 | int4 / bf16 |")
  print("|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['batch']} | {r['bf16_decode_tok_s']:,.0f} | {r['int8_decode_tok_s']:,.0f} | "
          f"{r['int4_decode_tok_s']:,.0f} | {r['int8_vs_bf16']:.2f}x | {r['int4_vs_bf16']:.2f}x |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "rows": rows}, f, indent=2)
  return 0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--torch-threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
  ap.add_argument("--json", help="also write the results here")
  ap.add_argument("--quant", action="store_true", help="ours only: bf16 vs int8 vs int4 routed experts")
  ap.add_argument("--group-size", type=int, default=128, help="--quant: int4 group size")
  args = ap.parse_args(argv)
  if args.quant:
    return quant_compare(args)

  cfg = small_config()
  n = args.new_tokens
  with tempfile.TemporaryDirectory() as d:
    ref = hf_model(cfg, d)
    ours = load(d, dtype="float32").model
  rows = []
  for B in args.batch_sizes:
    ids = np.random.RandomState(B).randint(10, cfg.text.vocab_size, (B, args.prompt_len))
    time_ours(ours, ids, n)  # compile
    ours_runs = [time_ours(ours, ids, n) for _ in range(args.repeats)]
    o_dec, o_tot = statistics.median(r[0] for r in ours_runs), statistics.median(r[1] for r in ours_runs)
    best = None
    for threads in args.torch_threads:
      torch.set_num_threads(threads)
      time_hf(ref, ids, 2)  # warm up
      h_tot = statistics.median(time_hf(ref, ids, n) for _ in range(args.repeats))
      h_first = statistics.median(time_hf(ref, ids, 1) for _ in range(args.repeats))
      if best is None or h_tot < best[1]:
        best = (threads, h_tot, max(h_tot - h_first, 1e-9))
    threads, h_tot, h_dec = best
    row = {"batch": B, "ours_decode_tok_s": B * (n - 1) / o_dec, "hf_decode_tok_s": B * (n - 1) / h_dec,
           "ours_total_tok_s": B * n / o_tot, "hf_total_tok_s": B * n / h_tot, "torch_threads": threads}
    row["decode_ratio"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
    row["total_ratio"] = row["ours_total_tok_s"] / row["hf_total_tok_s"]
    rows.append(row)
    print(f"B={B}: {row}", flush=True)

  print(f"\n{jax.devices()[0].device_kind} ({os.cpu_count()} CPUs), jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; prompt {args.prompt_len}, {n} new tokens, median of "
        f"{args.repeats}\n")
  print("| batch | ours decode tok/s | transformers decode tok/s | ratio | ours total tok/s | "
        "transformers total tok/s | ratio | torch threads |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['batch']} | {r['ours_decode_tok_s']:,.0f} | {r['hf_decode_tok_s']:,.0f} | {r['decode_ratio']:.1f}x "
          f"| {r['ours_total_tok_s']:,.0f} | {r['hf_total_tok_s']:,.0f} | {r['total_ratio']:.1f}x | "
          f"{r['torch_threads']} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "rows": rows}, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
