"""Quality of weight-only quantisation on the `make train` model: held-out Shakespeare perplexity and bits per
byte for fp32, bf16, fp8 experts, int8, int4 (RTN), int4 (clip search, data-free and calibrated) and int4 GPTQ
(calibrated), and greedy generations of a few prompts side by side.

  python -m benchmarks.quant_quality                            # runs/shakespeare_cpu, all validation works
  python -m benchmarks.quant_quality --max-docs 2 --update-docs # a quicker subset; rewrite the BENCHMARKS section

The run directory is only read: every quantised model directory is written under a temporary directory
(`apps.quantize.quantize_model`, the path `tools.convert quantize` takes) and loaded back with `load`. Quantised
variants run with bfloat16 compute (their weights dequantised to bfloat16 inside the matmul), so the reference
for them is the bf16 row. The fp8 row holds the routed experts as float8_e4m3fn with per-output-channel scales
and per-token FP8 activations (`Policy.expert_fp8`), built in memory from the float weights. Calibration
("int4 clip+calib", "int4 GPTQ") uses the first --calib-tokens (GPTQ also --gptq-tokens) tokens of the training
works (never the held-out ones).
"KL vs fp32": mean over the first --kl-tokens held-out tokens of KL(p_fp32 || p_variant) of the next-token
distributions (nats per token), and "top-1 = fp32" the share of those tokens whose most likely next token is
the fp32 model's: model-level measures that, unlike perplexity, do not average signed changes away (the bf16
row is the floor every bfloat16-compute variant starts from).
"routed-expert output error": sum ||y_q - y||^2 / sum ||y||^2 of the routed experts' outputs (float64, numpy)
on what they receive over the first --error-tokens held-out tokens: a finer measure than perplexity of how
close each quantizer stays to the float experts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.evaluate import sample_prompts
from llama4_jax import config as C
from llama4_jax import load
from llama4_jax.apps import evaluate as E
from llama4_jax.apps import generate as G
from llama4_jax.apps import quantize as Q
from llama4_jax.data import shakespeare
from llama4_jax.io import orbax_store
from llama4_jax.io import quantize as qio
from llama4_jax.model import fp8, quant
from llama4_jax.model.llama4 import abstract

BEGIN, END = "<!-- bench-quant:quality:begin -->", "<!-- bench-quant:quality:end -->"
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "BENCHMARKS.md")


def fp8_experts(model, cfg: C.Llama4Config):
  """The model with its routed experts as stored FP8 (values + per-output-channel scales), bf16 compute."""
  graph, target = nnx.split(abstract(cfg, C.Policy.for_dtype("bfloat16", expert_fp8=True)))
  src = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
  for path in list(src):
    if _routed(path):
      s = fp8.quantize_stored(src[path], (2,))  # stacked [blocks, E, D|I, ...]: the contracted axis is 2
      src[path], src[path[:-1] + (f"{path[-1]}_scale",)] = s.q, s.scale
  leaves = [(p, v.replace(src[p] if not jnp.issubdtype(v.dtype, jnp.floating) or v.dtype == src[p].dtype
                          else src[p].astype(v.dtype))) for p, v in nnx.to_flat_state(target)]
  return nnx.merge(graph, nnx.from_flat_state(leaves))


def _routed(path) -> bool:
  """A routed expert weight (not the shared expert's) of a text layer."""
  return path[:3] == ("text", "blocks", "layers") and path[-2] == "ffn" and path[-1] in ("gate_up", "down")


def without_experts(model, cfg: C.Llama4Config):
  """Sensitivity reference: the bf16 model with every routed expert weight zeroed (shared expert kept)."""
  graph, target = nnx.split(abstract(cfg, C.Policy.for_dtype("bfloat16")))
  src = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
  leaves = [(p, v.replace(jnp.zeros(v.shape, v.dtype) if _routed(p) else src[p].astype(v.dtype)))
            for p, v in nnx.to_flat_state(target)]
  return nnx.merge(graph, nnx.from_flat_state(leaves))


def expert_inputs(run: str, ids: np.ndarray, window: int) -> dict[tuple, list]:
  """{(block, layer): [(x, idx, scores), ...]}: what the routed experts of each MoE layer receive on `ids`."""
  m = load(run, policy=C.Policy(scan_layers=False)).model
  t = m.cfg.text
  p = t.layer_period
  order = [(b, j) for b in range(t.num_hidden_layers // p) for j in range(p) if t.is_moe(b * p + j)]
  seen: dict[tuple, list] = {}

  def observer(x, idx, scores, gate_up, down):
    key = order[sum(len(v) for v in seen.values()) % len(order)]
    seen.setdefault(key, []).append((np.asarray(x), np.asarray(idx), np.asarray(scores)))

  with quant.calibrating(observer):
    for a in range(0, len(ids), window):
      m.text.forward(jnp.asarray(ids[None, a:a + window]), logits=False)
  return seen


def next_token_logprobs(model, ids: np.ndarray, window: int) -> np.ndarray:
  """Log-probabilities [T, V] (float32) of the next token after each of `ids`, in windows of `window` tokens."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, x):
    logits = nnx.merge(graphdef, state).forward(x).logits.astype(jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1)[0]

  n = len(ids) // window * window
  return np.concatenate([np.asarray(run(state, jnp.asarray(ids[None, a:a + window]))) for a in range(0, n, window)])


def kl_and_agreement(ref: np.ndarray, lp: np.ndarray) -> tuple[float, float]:
  """(mean KL(p_ref || p) in nats per token, share of tokens with the same argmax) of log-probabilities [T, V]."""
  kl = np.sum(np.exp(ref) * (ref - lp), axis=-1, dtype=np.float64)
  return float(kl.mean()), float(np.mean(ref.argmax(-1) == lp.argmax(-1)))


def _experts_out(x, idx, scores, gu, dn):
  """Routed-expert output (float64 numpy) of one layer: gate_up [E, D, 2, I], down [E, I, D]."""
  y = np.zeros_like(x, np.float64)
  for e in range(gu.shape[0]):
    tok, slot = np.nonzero(idx == e)
    u = x[tok].astype(np.float64) * scores[tok, slot][:, None]
    g, up = u @ gu[e, :, 0], u @ gu[e, :, 1]
    np.add.at(y, tok, (g / (1 + np.exp(-g)) * up) @ dn[e])
  return y


def output_errors(inputs: dict, floats: dict, quantised: dict) -> float:
  """sum ||y_q - y||^2 / sum ||y||^2 of the routed experts over every MoE layer and token."""
  num = den = 0.0
  for (b, j), calls in inputs.items():
    key = ("text", "blocks", "layers", j, "ffn")
    ref = [floats[(*key, n)][b] for n in ("gate_up", "down")]
    q = [quantised[(*key, n)][b] for n in ("gate_up", "down")]
    for x, idx, sc in calls:
      y = _experts_out(x, idx, sc, *ref)
      num += float(np.sum((_experts_out(x, idx, sc, *q) - y) ** 2))
      den += float(np.sum(y ** 2))
  return num / den


def dequantised_leaves(directory: str) -> dict:
  """{leaf path: float32 array} of a (quantised) model directory, int leaves dequantised."""
  r = orbax_store.ParamReader(os.path.join(directory, "params"))
  out = {}
  for path in r.paths:
    path = tuple(int(k) if k.isdigit() else k for k in path)
    if str(path[-1]).endswith(qio.SUFFIX):
      continue
    x = r.read(path)
    s = qio.scale_path(path)
    out[path] = qio.dequantize_leaf(path, x, r.read(s), np.float32) if r.has(s) else x.astype(np.float32)
  return out


def rows_table(rows: list[dict], ref_bf16: float) -> str:
  lines = ["| variant | routed experts (and MLPs) | stored routed-expert bytes | perplexity | vs bf16 | bits/byte | "
           "KL vs fp32 (nats/token) | top-1 = fp32 | routed-expert output error |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    rel = (r["ppl"] / ref_bf16 - 1) * 100
    lines.append(f"| {r['name']} | {r['experts']} | {r['expert_bytes'] / 1e6:.2f} MB | {r['ppl']:.3f} | "
                 f"{rel:+.2f}% | {r['bpb']:.4f} | {r['kl']:.2e} | {100 * r['top1']:.2f}% | "
                 f"{_err(r.get('output_error'))} |")
  return "\n".join(lines)


def expert_bytes(model) -> int:
  return sum(int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize for p, v in nnx.to_flat_state(nnx.state(model))
             if p[:3] == ("text", "blocks", "layers") and p[-2] == "ffn"
             and re.match(r"(gate_up|down)(_q?scale)?$", str(p[-1])))


def _err(e) -> str:
  return "-" if e is None else f"{e:.2e}"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", default="runs/shakespeare_cpu", help="the float checkpoint (read only)")
  ap.add_argument("--shakespeare-root", default="data/shakespeare")
  ap.add_argument("--max-docs", type=int, default=0, help="held-out works evaluated (0: all)")
  ap.add_argument("--seq-len", type=int, default=0, help="window (default: the run's training seq_len)")
  ap.add_argument("--group-size", type=int, default=128)
  ap.add_argument("--calib-tokens", type=int, default=1024)
  ap.add_argument("--gptq-tokens", type=int, default=8192, help="calibration tokens of the larger GPTQ rows")
  ap.add_argument("--prompts", type=int, default=3)
  ap.add_argument("--error-tokens", type=int, default=2048, help="held-out tokens of the output-error column")
  ap.add_argument("--kl-tokens", type=int, default=16384, help="held-out tokens of the KL and top-1 columns")
  ap.add_argument("--new-tokens", type=int, default=40)
  ap.add_argument("--json", help="also write the results here")
  ap.add_argument("--update-docs", action="store_true", help=f"rewrite the quality section of {DOCS}")
  args = ap.parse_args(argv)

  train, val = shakespeare.split_works(shakespeare.load_works(args.shakespeare_root))
  texts = [w.text for w in (val[: args.max_docs] if args.max_docs else val)]
  base = load(args.run, dtype="float32")
  tok, cfg = base.tokenizer, base.model.cfg
  seq = args.seq_len or json.load(open(os.path.join(args.run, "experiment.json")))["data"]["seq_len"]
  prompts = [p[-200:] for p in sample_prompts(texts, args.prompts)]
  results, gens = [], {}
  held_ids = np.asarray(tok.encode("\n".join(texts), bos=True), np.int32)
  held_out = held_ids[: args.error_tokens]
  kl_ids = held_ids[: args.kl_tokens]
  ref_lp = next_token_logprobs(base.model, kl_ids, seq)
  inputs = expert_inputs(args.run, held_out, seq)
  floats = dequantised_leaves(os.path.join(args.run, "checkpoints", str(max(
      int(e) for e in os.listdir(os.path.join(args.run, "checkpoints")) if e.isdigit()))))

  def run(name, experts, model):
    t0 = time.perf_counter()
    lm = E.evaluate_lm(model, tok, texts, seq_len=seq, batch_size=8)
    outs = G.generate_text(model, tok, prompts, chat=False, max_new_tokens=args.new_tokens)
    kl, top1 = kl_and_agreement(ref_lp, next_token_logprobs(model, kl_ids, seq))
    r = {"name": name, "experts": experts, "ppl": lm.perplexity, "bpb": lm.bits_per_byte, "tokens": lm.tokens,
         "kl": kl, "top1": top1, "kl_tokens": len(ref_lp), "expert_bytes": expert_bytes(model),
         "seconds": time.perf_counter() - t0}
    results.append(r)
    gens[name] = outs
    print(json.dumps(r), flush=True)

  run("fp32", "float32", base.model)
  run("bf16", "bfloat16", load(args.run, dtype="bfloat16").model)
  run("fp8 experts", "float8_e4m3fn, per-channel scales, fp8 activations", fp8_experts(base.model, cfg))
  run("no routed experts", "zeroed (sensitivity reference)", without_experts(base.model, cfg))
  with tempfile.TemporaryDirectory() as tmp:
    calib = os.path.join(tmp, "calib.txt")
    with open(calib, "w") as f:
      f.write("\n".join(w.text for w in train)[: 40 * max(args.calib_tokens, args.gptq_tokens)])  # ~4 chars/token
    G_ = args.group_size
    variants = [("int8", "int8", {}, "int8, per output channel"),
                ("int4 RTN", "int4", {}, f"int4, groups of {G_}, round to nearest"),
                ("int4 clip", "int4", {"method": "clip"}, f"int4, groups of {G_}, clip search (weight MSE)"),
                ("int4 clip+calib", "int4", {"method": "clip", "calib": calib, "calib_tokens": args.calib_tokens},
                 f"int4, groups of {G_}, clip search on the output error of {args.calib_tokens} calibration tokens")]
    gptq = {"method": "gptq", "calib": calib}
    variants += [(f"int4 GPTQ ({n})", "int4", {**gptq, "calib_tokens": n},
                  f"int4, groups of {G_}, GPTQ on {n} calibration tokens")
                 for n in (args.calib_tokens, args.gptq_tokens)]
    mlp = {"targets": ("experts", "mlp")}  # also the shared expert: a harder test than the routed experts alone
    variants += [("int4 RTN +mlp", "int4", mlp, f"int4 g{G_} RTN, routed and shared experts"),
                 ("int4 clip +mlp", "int4", {**mlp, "method": "clip"}, f"int4 g{G_} clip, routed and shared experts"),
                 ("int4 clip+calib +mlp", "int4", {**mlp, "method": "clip", "calib": calib,
                                                   "calib_tokens": args.calib_tokens},
                  f"int4 g{G_} clip (calibrated), routed and shared experts"),
                 (f"int4 GPTQ ({args.gptq_tokens}) +mlp", "int4", {**mlp, **gptq, "calib_tokens": args.gptq_tokens},
                  f"int4 g{G_} GPTQ on {args.gptq_tokens} calibration tokens, routed and shared experts")]
    for name, scheme, kw, desc in variants:
      d = os.path.join(tmp, re.sub(r"\W+", "_", name))
      Q.quantize_model(args.run, d, scheme, group_size=G_, **kw)
      run(name, desc, load(d, dtype="bfloat16").model)
      results[-1]["output_error"] = output_errors(inputs, floats, dequantised_leaves(d))

  ref = next(r["ppl"] for r in results if r["name"] == "bf16")
  table = rows_table(results, ref)
  print("\n" + table)
  samples = ["", "Greedy continuations (" + str(args.new_tokens) + " tokens) of held-out prompts:", ""]
  for i, p in enumerate(prompts):
    samples.append(f"Prompt {i + 1}: `{p.strip()[-80:]!r}`")
    samples.append("")
    samples += [f"- **{name}**: `{outs[i].strip()[:160]!r}`" for name, outs in gens.items()]
    samples.append("")
  print("\n".join(samples))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "rows": results, "generations": gens, "prompts": prompts}, f, indent=2)
  if args.update_docs:
    header = (f"`python -m benchmarks.quant_quality{' --max-docs ' + str(args.max_docs) if args.max_docs else ''}` "
              f"on `{args.run}` ({len(texts)} held-out works, {results[0]['tokens']:,} scored tokens, windows of "
              f"{seq}); int4 group size {args.group_size}; KL and top-1 over the first {results[0]['kl_tokens']:,} "
              f"held-out tokens.\n\n")
    body = f"{BEGIN}\n{header}{table}\n" + "\n".join(samples) + f"\n{END}"
    doc = open(DOCS).read()
    doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: body, doc, flags=re.S) if BEGIN in doc else (
        doc.rstrip() + "\n\n## Quantised serving: quality\n\n" + body + "\n")
    with open(DOCS, "w") as f:
      f.write(doc)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
