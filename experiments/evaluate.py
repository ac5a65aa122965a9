"""Evaluate a model: perplexity, bits per byte and tokens/s on held-out text, a few samples, and (optionally)
multiple-choice accuracy. Prints a table and writes JSON.

  python -m experiments.evaluate                        # `make eval`: the run `make train` leaves, held-out plays
  python -m experiments.evaluate --checkpoint runs/my_run --data notes.txt more.jsonl --mc items.jsonl
  python -m experiments.evaluate --hf /models/Llama-4-Scout-17B-16E-Instruct --data eval.jsonl --seq-len 2048

--checkpoint: anything `llama4_jax.load` reads: a training run directory (latest step, its tokenizer.json),
its checkpoints/ directory, one step, a converted model directory (config.json + params/) or a HF release
directory (--hf is the same option, kept for clarity).
Default data: the validation works of the Shakespeare corpus (`data.shakespeare.split_works`).
--data: text files (one document each) and/or JSONL files (field --field).
--mc: JSONL of {"context", "choices", "answer"} scored like lm-evaluation-harness.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def default_run_dir() -> str:
  """Where `make train` (experiment config cpu_default) writes its run."""
  from experiments.train import load_config

  exp = load_config("cpu_default")
  return os.path.join(exp.run.out_dir, exp.name)


def sample_prompts(texts: list[str], n: int, chars: int = 200) -> list[str]:
  """Up to `n` prompts: whole lines from the middle of each document, at most `chars` characters."""
  out = []
  for t in texts[:n]:
    start = t.rfind("\n", 0, len(t) // 2) + 1
    end = t.rfind("\n", start, start + chars)
    out.append(t[start:end + 1] if end > start else t[start:start + chars])
  return [p for p in out if p.strip()]


def _read_data(paths: list[str], field: str) -> list[str]:
  from llama4_jax.data import sources

  texts = []
  for p in paths:
    texts += sources.read_jsonl_texts(p, field) if p.endswith(".jsonl") else sources.read_text_documents([p])
  return texts


def _run_seq_len(run_dir: str | None) -> int | None:
  """The training context of a run (experiment.json, data.seq_len)."""
  path = os.path.join(run_dir, "experiment.json") if run_dir else None
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get("data", {}).get("seq_len")


def _table(rows: list[tuple[str, str]]) -> str:
  w = max(len(k) for k, _ in rows)
  return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = ap.add_mutually_exclusive_group()
  src.add_argument("--checkpoint", help="Orbax checkpoint (default: the run of `make train`)")
  src.add_argument("--hf", help="HF release-format model directory")
  ap.add_argument("--tokenizer", help="tokenizer spec (default: the run's / model's; 'llama4' for --hf)")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), help="parameters and compute (default: as stored)")
  ap.add_argument("--data", nargs="+", default=[], help="text / JSONL files (default: held-out Shakespeare)")
  ap.add_argument("--field", default="text", help="JSONL text field")
  ap.add_argument("--shakespeare-root", default="data/shakespeare")
  ap.add_argument("--seq-len", type=int, help="predictions per window (default: the run's training seq_len, "
                  "else 256)")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--mc", help="multiple-choice JSONL")
  ap.add_argument("--mc-delimiter", default=" ", help="text between context and each choice")
  ap.add_argument("--samples", type=int, default=3, help="sampled continuations to show (0: none)")
  ap.add_argument("--sample-tokens", type=int, default=100)
  ap.add_argument("--temperature", type=float, default=0.8)
  ap.add_argument("--top-k", type=int, default=0)
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", help="JSON results (default: <run dir>/eval.json, else ./eval.json)")
  args = ap.parse_args(argv)

  from llama4_jax import load
  from llama4_jax.apps import evaluate as E
  from llama4_jax.apps import generate as G

  if args.checkpoint is None and args.hf is None:
    args.checkpoint = default_run_dir()
    if not os.path.exists(args.checkpoint):
      print(f"error: {args.checkpoint} not found: run `make train` first, or pass --checkpoint / --hf",
            file=sys.stderr)
      return 2
  loaded = load(args.checkpoint or args.hf, tokenizer=args.tokenizer, dtype=args.dtype)
  if loaded.tokenizer is None:
    print("error: no tokenizer found with the checkpoint: pass --tokenizer", file=sys.stderr)
    return 2
  model, tok = loaded.model, loaded.tokenizer
  print(f"model: {loaded.description}")
  if args.seq_len is None:
    args.seq_len = _run_seq_len(loaded.source.run_dir) or 256

  if args.data:
    texts, data_desc = _read_data(args.data, args.field), ", ".join(args.data)
  else:
    from llama4_jax.data import shakespeare

    _, val = shakespeare.split_works(shakespeare.load_works(args.shakespeare_root))
    texts, data_desc = [w.text for w in val], "Shakespeare validation works: " + ", ".join(w.key for w in val)
  print(f"data: {data_desc} ({len(texts)} documents, {sum(len(t) for t in texts):,} characters)")

  results: dict = {"model": loaded.description, "data": data_desc,
                   "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}}
  lm = E.evaluate_lm(model, tok, texts, seq_len=args.seq_len, batch_size=args.batch_size)
  results["lm"] = lm.as_dict()
  rows = [("perplexity", f"{lm.perplexity:.3f}"), ("bits per byte", f"{lm.bits_per_byte:.4f}"),
          ("nats per token", f"{lm.nats_per_token:.4f}"), ("scored tokens", f"{lm.tokens:,}"),
          ("scored bytes", f"{lm.bytes:,}"), ("tokens/s (scoring)", f"{lm.tokens_per_s:,.0f}")]

  if args.mc:
    mc = E.score_multiple_choice(model, tok, E.read_mc_jsonl(args.mc), delimiter=args.mc_delimiter,
                                 batch_size=args.batch_size)
    results["mc"] = {"file": args.mc, **mc.as_dict(with_scores=True)}
    rows += [("mc items", str(mc.items)), ("mc acc", f"{mc.acc:.4f}"), ("mc acc_norm (char)", f"{mc.acc_norm:.4f}"),
             ("mc acc_bytes", f"{mc.acc_bytes:.4f}")]

  samples = []
  if args.samples > 0:
    prompts = sample_prompts(texts, args.samples)
    sampling = G.Sampling(args.temperature, args.top_k, args.top_p)
    t0 = time.perf_counter()
    outs, gen = G.generate_text(model, tok, prompts, chat=False, max_new_tokens=args.sample_tokens,
                                sampling=sampling, seed=args.seed, details=True)
    results["generation"] = {"seconds_with_compilation": time.perf_counter() - t0, "rows": len(prompts),
                             "steps": int(gen.tokens.shape[1]), "decode_tokens_per_s": gen.decode_tokens_per_s}
    rows.append(("tokens/s (sampling, batch %d)" % len(prompts), f"{gen.decode_tokens_per_s:,.0f}"))
    samples = [{"prompt": p, "completion": o} for p, o in zip(prompts, outs)]
  results["samples"] = samples

  print(_table(rows))
  for s in samples:
    print("\n--- prompt ---\n" + s["prompt"].rstrip("\n") + "\n--- sample ---\n" + s["completion"])
  out = args.out or os.path.join(loaded.source.run_dir or ".", "eval.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"\nwrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
