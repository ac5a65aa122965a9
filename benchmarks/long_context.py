"""Long context on this CPU: `attention_impl="xla"` (today's einsum, scores materialised) vs `"blockwise"`
(flash-style, O(T * block) memory), and the memory plans of long-context targets.

  .venv/bin/python -m benchmarks.long_context [--update-docs] [--quick] [--out runs/bench/long_context.json]

Model: the `make train` architecture (experiments/configs/cpu_default.py: 4 layers, D 256, 8 experts top-1,
chunk 64, one global NoPE layer), random weights, float32, batch 1, with `max_position_embeddings` lifted to
the longest length measured (the config declares 4096; this measures memory and speed, not quality).
  forward     logits of the last position (`last_only`) of T tokens, jitted
  train step  the summed cross-entropy of all T tokens (chunked lm_head, `Policy.logits_chunk`) and its
              gradient with respect to every parameter, jitted
For each (implementation, T): XLA's compiled memory analysis (temporaries: what the program allocates
besides its arguments and outputs) and the median wall time of `--runs` calls after one warm-up. A program
whose temporaries exceed `--max-temp-gib` is compiled and reported, not run. The 128k forward runs blockwise
only (xla's global-layer scores alone would be 128k^2 * 4 heads * 4 B = 256 GiB).

Plans: `python -m tools.plan` for Scout serving 128k / 1M / 10M tokens and training at 8k / 32k / 128k on
8xH100, 8xH200, v5p-128, v5p-512, v6e-256 (the mesh each target gets, what fits).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import run_all
from benchmarks.matmul_ceiling import median_s
from experiments.configs import cpu_default
from llama4_jax import config as C
from llama4_jax.model import llama4
from llama4_jax.train.losses import chunked_cross_entropy_sum

GiB = 2 ** 30
TITLE = "## Long context: xla vs blockwise attention on CPU, and long-context plans"
REPRO = "Reproduce: `.venv/bin/python -m benchmarks.long_context --update-docs`."
PLAN_TARGETS = "8xh100,8xh200,v5p-128,v5p-512,v6e-256"
PLANS = [  # (label, tools.plan arguments)
    ("serve 128k", ["--serve", "--batch", "1", "--seq", "131072", "--prefill-chunk", "32768"]),
    ("serve 1M", ["--serve", "--batch", "1", "--seq", "1048576", "--prefill-chunk", "32768"]),
    ("serve 10M", ["--serve", "--batch", "1", "--seq", "10485760", "--prefill-chunk", "32768"]),
    ("train 8k", ["--seq", "8192"]),
    ("train 32k", ["--seq", "32768", "--batch", "32"]),
    ("train 128k", ["--seq", "131072", "--batch", "8"]),
]


def model_config(max_len: int) -> C.Llama4Config:
  cfg = cpu_default.get_config().model
  return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, max_position_embeddings=max_len))


def _programs(cfg: C.Llama4Config, impl: str, T: int):
  policy = C.Policy(param_dtype="float32", dtype="float32", matmul_precision="default", attention_impl=impl,
                    logits_chunk=4096)
  graphdef, state = nnx.split(llama4.init(cfg, policy, seed=0))
  ids = jnp.asarray(np.random.RandomState(0).randint(3, cfg.text.vocab_size, (1, T)), jnp.int32)

  def forward(state, ids):
    return nnx.merge(graphdef, state).forward(ids, last_only=True).logits

  def loss(state, ids):
    model = nnx.merge(graphdef, state)
    h = model.forward(ids, logits=False).hidden
    total, n = chunked_cross_entropy_sum(model.text.logits, h[:, :-1], ids[:, 1:], jnp.ones_like(ids[:, 1:]),
                                         policy.logits_chunk)
    return total / n

  return state, ids, {"forward": jax.jit(forward), "train step": jax.jit(jax.value_and_grad(loss))}


def measure(impls=("xla", "blockwise"), lengths=(2048, 8192, 32768), long=131072, runs=2,
            max_temp_gib=12.0, log=print) -> list[dict]:
  rows = []
  cfg = model_config(max(max(lengths), long or 0))
  cases = [(impl, T, kind) for T in lengths for impl in impls for kind in ("forward", "train step")]
  if long:
    cases.append(("blockwise", long, "forward"))
  for impl, T, kind in cases:
    state, ids, fns = _programs(cfg, impl, T)
    t0 = time.perf_counter()
    compiled = fns[kind].lower(state, ids).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = mem.temp_size_in_bytes if mem is not None else float("nan")
    row = dict(impl=impl, T=T, kind=kind, temp_bytes=temp, temp_per_token=temp / T, compile_s=compile_s)
    if temp / GiB > max_temp_gib:
      row.update(ms=None, note=f"not run: temporaries {temp / GiB:.1f} GiB > {max_temp_gib} GiB")
    else:
      s, times = median_s(lambda c=compiled, st=state, x=ids: jax.block_until_ready(c(st, x)), runs)
      row.update(ms=s * 1e3, runs=len(times), tokens_per_s=T / s)
    took = "-" if row["ms"] is None else f"{row['ms']:.0f} ms"
    log(f"{impl:9} T={T:6} {kind:10} temp {temp / 2 ** 20:9.1f} MiB  {took}")
    rows.append(row)
  return rows


def plans(presets: str = "scout") -> list[dict]:
  from tools import plan as plan_cli

  out = []
  for label, args in PLANS:
    argv = ["--preset", presets, "--hardware", PLAN_TARGETS, *args]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      plan_cli.main(argv)
    out.append(dict(label=label, command="python -m tools.plan " + " ".join(argv), table=buf.getvalue().rstrip()))
  return out


def section(r: dict) -> str:
  lines = [f"Machine: {r['machine']}; jax {r['jax']}; load average at start {r['load'][0]:.2f}, end "
           f"{r['load'][1]:.2f}{' (quick: tiny sizes, not a measurement)' if r['quick'] else ''}.", "",
           "| implementation | T | program | temporaries (MiB) | temporaries / token (KiB) | median (ms) "
           "| tokens/s |", "|---|---|---|---|---|---|---|"]
  for x in r["attention"]:
    ms = "-" if x["ms"] is None else f"{x['ms']:.0f}"
    tps = "-" if x["ms"] is None else f"{x['tokens_per_s']:.0f}"
    note = f" ({x['note']})" if x.get("note") else ""
    lines.append(f"| {x['impl']} | {x['T']} | {x['kind']} | {x['temp_bytes'] / 2 ** 20:.1f} | "
                 f"{x['temp_per_token'] / 1024:.2f} | {ms}{note} | {tps} |")
  by = {(x["impl"], x["T"], x["kind"]): x for x in r["attention"]}
  ratios = []
  for (impl, T, kind), x in sorted(by.items()):
    y = by.get(("xla", T, kind))
    if impl == "blockwise" and y is not None and x["ms"] and y["ms"]:
      ratios.append(f"T={T} {kind}: blockwise {y['ms'] / x['ms']:.2f}x the speed of xla, "
                    f"{y['temp_bytes'] / max(x['temp_bytes'], 1):.0f}x less temporary memory")
  if ratios:
    lines += ["", "Ratios (same run): " + "; ".join(ratios) + "."]
  lines += ["", "Plans (GiB per device; `fits` against the target's HBM):", ""]
  for p in r["plans"]:
    lines += [f"{p['label']}: `{p['command']}`", "", "```", p["table"], "```", ""]
  return "\n".join(lines).rstrip()


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=os.path.join(run_all.ROOT, "runs", "bench", "long_context.json"))
  ap.add_argument("--update-docs", action="store_true", help=f"rewrite this section of {run_all.DOC}")
  ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
  ap.add_argument("--runs", type=int, default=2)
  ap.add_argument("--max-temp-gib", type=float, default=12.0)
  ap.add_argument("--report", metavar="JSON", help="rebuild the section from a results file; measure nothing")
  args = ap.parse_args(argv)
  if args.report:
    with open(args.report) as f:
      body = section(json.load(f))
    print(body)
    if args.update_docs:
      run_all.write_block(run_all.DOC, "long-context", TITLE, REPRO, body)
    return
  load0 = os.getloadavg()[0]
  kw = dict(lengths=(256, 512), long=1024, runs=1) if args.quick else dict(runs=args.runs)
  rows = measure(max_temp_gib=args.max_temp_gib, log=lambda s: print(s, file=sys.stderr, flush=True), **kw)
  r = dict(quick=args.quick, machine=run_all._cpu_model(), jax=jax.__version__, attention=rows, plans=plans(),
           load=(load0, os.getloadavg()[0]))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(r, f, indent=2)
  body = section(r)
  print(f"\n{TITLE}\n\n{body}\n\nresults: {args.out}")
  if args.update_docs:
    run_all.write_block(run_all.DOC, "long-context", TITLE, REPRO, body)
    print(f"updated: {run_all.DOC}")


if __name__ == "__main__":
  main()
