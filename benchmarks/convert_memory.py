"""Peak host memory and throughput of `tools.convert` in both directions, on a synthetic checkpoint.

  python -m benchmarks.convert_memory --dir /tmp/convbench            # ~4 GB bf16: D 2048, 16 layers, 16 experts
  python -m benchmarks.convert_memory --dir /tmp/convbench --hidden 1024 --layers 8 --keep

Builds a random HF checkpoint (text-only `Llama4ForCausalLM` layout, sharded safetensors, bf16) tensor by
tensor, then runs `python -m tools.convert hf-to-orbax` and `orbax-to-hf` under `/usr/bin/time -v` and reports
each run's peak RSS ("Maximum resident set size") and wall time, plus the same for a tiny checkpoint (the
fixed cost: Python, JAX, tensorstore). The files are removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

from llama4_jax import config as C
from llama4_jax.io import hf_keys
from llama4_jax.io import safetensors as st


def synthetic_config(hidden: int = 2048, layers: int = 16, experts: int = 16, intermediate: int = 2048,
                     vocab: int = 32768, heads: int = 16, kv_heads: int = 4) -> C.Llama4Config:
  """A text-only Scout-shaped config (every layer MoE, NoPE every 4th layer) of the given size."""
  text = C.TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      intermediate_size_mlp=2 * intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=hidden // heads, num_local_experts=experts,
                      pad_token_id=0, bos_token_id=1, eos_token_id=(2,))
  return C.Llama4Config(text=text, vision=None, dtype="bfloat16")


def build_hf(cfg: C.Llama4Config, directory: str, max_shard_size: str = "1GB", seed: int = 0) -> int:
  """Writes a random checkpoint of `cfg` (dtype `cfg.dtype`) as sharded safetensors + config.json, one tensor
  in memory at a time; returns its size in bytes."""
  import ml_dtypes
  dtype = np.dtype({"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[cfg.dtype])
  prefix = hf_keys.MULTIMODAL_TEXT_PREFIX if cfg.vision is not None else hf_keys.TEXT_ONLY_PREFIX
  places = hf_keys.placements(cfg, prefix)
  specs = [st.TensorSpec(p.key, tuple(p.entry.hf_shape(cfg)), dtype) for p in places]
  shards = st.plan_shards(specs, max_shard_size)
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  for name, group in shards:
    w = st.SafetensorsWriter(os.path.join(directory, name), group)
    for s in group:
      x = rng.standard_normal(s.shape, dtype=np.float32)
      x *= 1.0 / math.sqrt(s.shape[-1])
      w.write(s.key, x.astype(dtype))
      del x
    w.close()
  st.write_index(directory, shards)
  C.save_hf(cfg, directory)
  return sum(s.nbytes for s in specs)


def timed(cmd: list[str]) -> dict:
  """Runs `cmd` under /usr/bin/time -v; peak RSS (bytes) and wall seconds."""
  t = time.time()
  r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
  wall = time.time() - t
  if r.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
  rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
  return {"rss": rss_kb * 1024, "wall": wall}


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--dir", required=True, help="scratch directory (created; removed at the end unless --keep)")
  ap.add_argument("--hidden", type=int, default=2048)
  ap.add_argument("--layers", type=int, default=16)
  ap.add_argument("--experts", type=int, default=16)
  ap.add_argument("--intermediate", type=int, default=1024)
  ap.add_argument("--vocab", type=int, default=32768)
  ap.add_argument("--max-shard-size", default="1GB")
  ap.add_argument("--keep", action="store_true")
  args = ap.parse_args(argv)
  base = os.path.abspath(args.dir)
  os.makedirs(base, exist_ok=True)
  py = [sys.executable, "-m", "tools.convert"]
  try:
    cfg = synthetic_config(args.hidden, args.layers, args.experts, args.intermediate, args.vocab)
    tiny = synthetic_config(64, 4, 4, 32, 512, heads=4, kv_heads=2)
    sizes = {}
    for name, c in (("tiny", tiny), ("big", cfg)):
      t = time.time()
      sizes[name] = build_hf(c, os.path.join(base, f"{name}_hf"), args.max_shard_size)
      print(f"built {name}: {sizes[name] / 1e9:.2f} GB in {time.time() - t:.1f} s", file=sys.stderr)
    largest = max(math.prod(p.entry.hf_shape(cfg)) for p in hf_keys.placements(cfg, "")) * 2
    rows = {}
    for name in ("tiny", "big"):
      hf, ob, back = (os.path.join(base, f"{name}_{s}") for s in ("hf", "orbax", "back"))
      rows[name, "hf-to-orbax"] = timed([*py, "hf-to-orbax", "-q", hf, ob])
      rows[name, "orbax-to-hf"] = timed([*py, "orbax-to-hf", "-q", ob, back, "--max-shard-size", args.max_shard_size])
      rows[name, "orbax size"] = _du(ob)
    result = {"config": {"hidden": args.hidden, "layers": args.layers, "experts": args.experts,
                         "intermediate": args.intermediate, "vocab": args.vocab},
              "checkpoint_bytes": sizes["big"], "largest_tensor_bytes": largest,
              "orbax_bytes": rows["big", "orbax size"], "runs": {}}
    for d in ("hf-to-orbax", "orbax-to-hf"):
      big, small = rows["big", d], rows["tiny", d]
      result["runs"][d] = {"peak_rss_bytes": big["rss"], "baseline_rss_bytes": small["rss"],
                           "wall_s": big["wall"], "baseline_wall_s": small["wall"],
                           "MB_per_s": sizes["big"] / 1e6 / max(big["wall"] - small["wall"], 1e-9)}
    print(json.dumps(result, indent=2))
    gb = sizes["big"] / 1e9
    orbax_gb = rows['big', 'orbax size'] / 1e9
    print(f"\ncheckpoint {gb:.2f} GB (largest tensor {largest / 1e6:.0f} MB), Orbax copy {orbax_gb:.2f} GB")
    print("| direction | peak RSS | fixed cost (tiny ckpt) | peak − fixed | (peak − fixed) / ckpt | wall "
          "| throughput |")
    print("|---|---|---|---|---|---|---|")
    for d, r in result["runs"].items():
      extra = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
      print(f"| {d} | {r['peak_rss_bytes'] / 2**20:.0f} MiB | {r['baseline_rss_bytes'] / 2**20:.0f} MiB | "
            f"{extra / 2**20:.0f} MiB | {extra / sizes['big']:.3f} | {r['wall_s']:.1f} s | {r['MB_per_s']:.0f} MB/s |")
  finally:
    if not args.keep:
      shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
  main()
