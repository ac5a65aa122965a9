"""The CPU benchmark suite in one run (what `make bench` runs).

  .venv/bin/python -m benchmarks.run_all [--update-docs] [--quick] [--out runs/bench/results.json]

In order: machine facts; the float32 matmul ceiling; the MoE paths (sorted / ragged / dense, E = 8, 16,
64); our model vs transformers (Scout-like and Maverick-like, forward and train step); the ceiling again
(a drift check: the load of a shared machine shows up as a gap between the two). Prints the tables,
writes every figure to the JSON file, and with `--update-docs` rewrites the generated blocks of
docs/BENCHMARKS.md (between `<!-- bench-cpu:NAME:begin -->` and `<!-- bench-cpu:NAME:end -->`; text
outside the markers is left alone, missing sections are appended). `--quick` runs tiny sizes: a smoke
test of the scripts, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

import jax

from benchmarks import matmul_ceiling, model_vs_torch, moe_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "BENCHMARKS.md")
DOC_HEADER = """# Benchmarks

Each section below is produced by a script under `benchmarks/`; the machine, versions and the command
that reproduces it are stated in the section. Figures from a shared machine carry its load average.
"""


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          flags = line.split(":", 1)[1].split()
          return sorted(f for f in flags if re.match(r"^(avx|amx|fma)", f))
  except OSError:
    pass
  return []


def _mem_gib() -> float:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal"):
          return int(line.split()[1]) / 2 ** 20
  except OSError:
    pass
  return float("nan")


def _version(mod: str) -> str:
  try:
    return __import__(mod).__version__
  except Exception:  # an optional package that is absent or broken: say so in the report
    return "not installed"


def _git_commit() -> str:
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
    return f"{head} + uncommitted changes" if dirty else head
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def machine() -> dict:
  import torch
  return {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "commit": _git_commit(),
      "cpu": _cpu_model(),
      "cpu_flags": _cpu_flags(),
      "cores": os.cpu_count(),
      "threads_used": matmul_ceiling.threads(),
      "torch_threads": torch.get_num_threads(),
      "mem_gib": round(_mem_gib(), 1),
      "python": platform.python_version(),
      "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers")},
      "jax_devices": [str(d) for d in jax.devices()],
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "accelerator": None,
  }


GPU_NOTE = ("No accelerator was available to this session: H100/H200 MFU, decode tokens/s against the HBM "
            "bandwidth bound, and the expert-parallel grouped matmul were **not measured: no accelerator "
            "available**. Nothing in this file is a GPU figure.")


# --------------------------------------------------------------------------------------------------
# Report


def _facts_line(r: dict) -> str:
  m, v = r["machine"], r["machine"]["versions"]
  la = r["load_average"]
  return (f"Measured {m['date']} at commit {m['commit']}: {m['cpu']} ({', '.join(m['cpu_flags'])}), "
          f"{m['cores']} cores ({m['threads_used']} threads for JAX and torch), {m['mem_gib']} GiB; "
          f"python {m['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, optax {v['optax']}, "
          f"torch {v['torch']}, transformers {v['transformers']}. "
          f"1-minute load average {la['start'][0]:.2f} at the start, {la['end'][0]:.2f} at the end "
          f"(5-minute {la['start'][1]:.2f} / {la['end'][1]:.2f}); whole run {r['wall_s']:.0f} s."
          + (" **--quick: tiny sizes, not a measurement.**" if r["quick"] else ""))


def sections(r: dict) -> dict[str, str]:
  """Generated markdown of each section, keyed by marker name."""
  c = r["ceiling"]
  ceil = c["jax_gflops"]
  facts = _facts_line(r)
  mvt = r["model_vs_torch"]
  cfg_lines = []
  for row in mvt:
    k = row["config"]
    cfg_lines.append(
        f"- {row['name']}: L {k['layers']}, D {k['hidden']}, H {k['heads']} / K {k['kv_heads']} x d {k['head_dim']}, "
        f"E {k['experts']} top-{k['top_k']}, I {k['width']}, dense MLP {k['mlp_width']}, MoE every "
        f"{k['moe_step']} layer(s), qk-norm {'on' if k['qk_norm'] else 'off'}, llama3 RoPE scaling "
        f"{'on' if k['rope_scaling'] else 'off'}, vocab {k['vocab']}, chunk {k['chunk']}; batch "
        f"{row['batch']} x {row['seq']} tokens; {row['total_params'] / 1e6:.1f} M parameters, "
        f"N_active {row['flops']['n_active_matmul'] / 1e6:.1f} M, {row['flops']['fwd'] / 1e9:.1f} GFLOP forward, "
        f"{row['flops']['train'] / 1e9:.1f} GFLOP train step; first-step loss torch "
        f"{row['torch']['first_loss']:.5f}, ours {row['ours']['first_loss']:.5f}.")
  model = "\n".join([
      facts, "",
      "Speedup = transformers' time / our time (> 1: ours faster). \"of own f32 ceiling\" = achieved model "
      f"GFLOP/s / the {c['n']}^3 float32 matmul rate of the same framework in this run (JAX {ceil:.0f}, torch "
      f"{c['torch_gflops']:.0f} GFLOP/s). Forward: median of {r['params']['runs_fwd']}, train step: median of "
      f"{r['params']['runs_train']} (and its fastest call), after one warm-up call (fewer where a call is slow: the "
      "JSON has the counts and times).",
      "",
      model_vs_torch.table(mvt, ceil, c["torch_gflops"]), "",
      *cfg_lines, "",
      "Model FLOPs convention: 6 * N_active * tokens + 12 * B * T * H * d * sum_l S_l per train step "
      "(forward: a third), N_active = matmul weights a token uses (attention q/k/v/o, router, shared "
      "expert, top-k of E routed experts, dense MLPs, lm_head; not the embedding, not norms), S_l = T on "
      "global layers and min(chunk, T) on chunked layers, full rectangle (no causal discount). The same "
      "count divides every implementation's time, whatever it computes (transformers runs every expert on "
      "every token and the full T x T attention on chunked layers)."])
  moe = "\n".join([
      facts, "",
      f"One MoE layer without the shared expert, {r['moe_paths'][0]['tokens']} tokens, D "
      f"{r['moe_paths'][0]['hidden']}, I {r['moe_paths'][0]['width']}, top-{r['moe_paths'][0]['top_k']}, "
      f"float32 (precision HIGHEST); forward and forward + backward (gradients of every input) of mean(y^2); "
      f"median of {r['params']['runs_moe']} (fewer where a call is slow). Speedup = that path's time / the "
      "sorted path's time. Useful GFLOP/s divide the routed work only "
      "(2 N k 3 D I + router; backward = 2x forward).", "",
      moe_paths.table(r["moe_paths"]), "",
      "The sorted path's matmuls alone (`moe_paths.floor`): the forward's two and the backward's four at the "
      "block size and operand forms `moe.grouped_ffn` uses, on the blocks this routing fills, each looped over "
      f"those blocks with one expert's weights; fastest of {moe_paths.FLOOR_ROUNDS} interleaved rounds. "
      "Their (fwd+bwd)/fwd is the sorted path's ratio with every non-matmul cost at zero; the last column is the "
      "sorted path's own ratio, fastest of interleaved forward / forward + backward calls.", "",
      moe_paths.floor_table(r["moe_paths"])])
  c2 = r["ceiling_end"]
  mat = "\n".join([
      facts, "",
      "| | float32 GFLOP/s |", "|---|---|",
      f"| JAX, jitted {c['n']}^3 matmul, precision HIGHEST (start of run) | {c['jax_gflops']:.0f} |",
      f"| JAX, same, precision DEFAULT (start of run) | {c['jax_default_precision_gflops']:.0f} |",
      f"| torch `a @ b` (start of run) | {c['torch_gflops']:.0f} |",
      f"| JAX HIGHEST / torch (end of run, drift check) | {c2['jax_gflops']:.0f} / {c2['torch_gflops']:.0f} |",
      "", "Train-step model GFLOP/s as a fraction of the JAX ceiling (start of run):", "",
      "| config | ours (sorted) | ours (like for like) | transformers (vs torch ceiling) |", "|---|---|---|---|",
      *[f"| {row['name']} | {row['ours']['train_gflops']:.0f} ({row['ours']['train_gflops'] / ceil:.0%}) | "
        + (f"{row['ours_like_for_like']['train_gflops']:.0f} ({row['ours_like_for_like']['train_gflops'] / ceil:.0%})"
           if "ours_like_for_like" in row else "-")
        + f" | {row['torch']['train_gflops']:.0f} ({row['torch']['train_gflops'] / c['torch_gflops']:.0%}) |"
        for row in mvt]])
  return {"model": model, "moe": moe, "matmul": mat, "gpu": GPU_NOTE}


TITLES = {"model": "## CPU: model vs transformers", "moe": "## MoE paths", "matmul": "## Matmul ceiling",
          "gpu": "## GPU: not measured"}
REPRO = "Reproduce: `make bench` (`.venv/bin/python -m benchmarks.run_all --update-docs`)."


def _markers(name: str) -> tuple[str, str]:
  return f"<!-- bench-cpu:{name}:begin -->", f"<!-- bench-cpu:{name}:end -->"


def _with_block(text: str, name: str, title: str, repro: str, body: str) -> str:
  begin, end = _markers(name)
  block = f"{begin}\n{body}\n{end}"
  if begin in text and end in text:
    i, j = text.index(begin), text.index(end) + len(end)
    return text[:i] + block + text[j:]
  return text.rstrip("\n") + f"\n\n{title}\n\n{repro}\n\n{block}\n"


def write_block(path: str, name: str, title: str, repro: str, body: str) -> None:
  """Rewrites (or appends) one generated block of `path`, atomically; the rest of the file is left alone."""
  text = open(path).read() if os.path.exists(path) else DOC_HEADER
  _write(path, _with_block(text, name, title, repro, body))


def update_docs(r: dict, path: str = DOC) -> None:
  """Rewrites the generated block of each section; creates the file / appends missing sections."""
  text = open(path).read() if os.path.exists(path) else DOC_HEADER
  for name, body in sections(r).items():
    text = _with_block(text, name, TITLES[name], REPRO, body)
  _write(path, text)


def _write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------


def run(quick: bool = False, runs_fwd: int = 5, runs_train: int = 5, runs_moe: int = 3) -> dict:
  t0 = time.perf_counter()
  log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731 (progress on stderr, tables on stdout)
  r = {"quick": quick, "load_average": {"start": os.getloadavg()}, "machine": machine(),
       "params": {"runs_fwd": runs_fwd, "runs_train": runs_train, "runs_moe": runs_moe}}
  n = 512 if quick else 2048
  log(f"matmul ceiling {n}^3 ...")
  r["ceiling"] = matmul_ceiling.measure(n)
  log("MoE paths ...")
  moe_kw = dict(tokens=256, hidden=64, width=128, experts=(8, 16, 64)) if quick else {}
  r["moe_paths"] = moe_paths.measure(runs=runs_moe, log=log, **moe_kw)
  log("model vs transformers ...")
  r["model_vs_torch"] = model_vs_torch.measure(runs_fwd=runs_fwd, runs_train=runs_train, quick=quick, log=log)
  log("matmul ceiling again ...")
  r["ceiling_end"] = matmul_ceiling.measure(n)
  r["load_average"]["end"] = os.getloadavg()
  r["wall_s"] = time.perf_counter() - t0
  r["gpu"] = GPU_NOTE
  return r


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench", "results.json"))
  ap.add_argument("--update-docs", action="store_true", help=f"rewrite the generated blocks of {DOC}")
  ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
  ap.add_argument("--runs-fwd", type=int, default=5)
  ap.add_argument("--runs-train", type=int, default=5)
  ap.add_argument("--runs-moe", type=int, default=3)
  args = ap.parse_args(argv)
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    print("warning: XLA_FLAGS simulates several CPU devices; the figures are for one device", file=sys.stderr)
  r = run(args.quick, args.runs_fwd, args.runs_train, args.runs_moe)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(r, f, indent=2)
  for name, body in sections(r).items():
    print(f"\n{TITLES[name]}\n\n{body}")
  print(f"\nresults: {args.out}")
  if args.update_docs:
    update_docs(r)
    print(f"updated: {DOC}")


if __name__ == "__main__":
  main()
