"""The device benchmark: one H100/H200, one prepared command, at most 8 minutes.

Device session (the device tool's `run`, timeout_s=600; one command; results come back under $OUT):
  timeout 570 python3 -u -m benchmarks.gpu --out $OUT/gpu.json 2>&1 | tee $OUT/gpu.log
(python3 there is the image's, with JAX for CUDA; the project runs from the repository root, nothing installed;
the script lets JAX take 92% of the GPU's memory, XLA_PYTHON_CLIENT_MEM_FRACTION, unless that is set)

then, on the session's own machine, from the fetched JSON (no GPU needed):
  .venv/bin/python -m benchmarks.gpu --report <files_at>/gpu.json --update-docs

  python -m benchmarks.gpu [--out runs/bench/gpu.json] [--update-docs [--force]] [--tiny] [--budget-s 450]
                           [--sections ceilings,train,decode,moe,ep,attention] [--train-moe sorted[,ragged]]
  make bench-gpu ARGS="..."

Sections, in order, each with a time budget (`BUDGETS`, scaled to --budget-s; time a section leaves unused rolls
over): once a section's time is spent its remaining cases are skipped with a note. The JSON is rewritten after
every section, so a run stopped from outside keeps what it measured.
  ceilings   bf16 (and fp8 e4m3) n^3 matmul on random data, a device-to-device copy (bytes read + written).
  train      train step of a ~1B-active Scout-like model (every layer MoE, 16 experts top-1 + shared expert,
             3 chunked RoPE layers then 1 global NoPE layer, qk-norm, llama3 RoPE scaling, the release
             vocabulary) in bf16 (`Policy.for_dtype("bfloat16")`) and with `fp8="train"`: jitted
             value_and_grad of the chunked cross-entropy + optax AdamW, parameters and moments donated
             (the step of benchmarks/model_vs_torch.py; no router losses). MFU = model FLOPs / time /
             peak, model FLOPs by `model_vs_torch.model_flops` (6 N_active tokens + full-rectangle attention).
  decode     `llama4_jax.apps.generate.generate` on the same architecture (bf16, random weights), batch 1
             and 32, greedy, no stop token; tokens/s after the first token against the HBM bound:
             B / ((parameter bytes touched per step + KV-cache bytes read per step) / HBM bandwidth), with
             the routed experts touched = E (1 - (1 - 1/E)^(B k)) per MoE layer (uniform routing), the
             embedding as B rows, every other weight read once, and the cache read whole (its slots).
  moe        one routed-expert layer (router + top-1 experts, bf16) by `Policy.moe_impl` sorted / ragged
             (`lax.ragged_dot`) / dense, forward and forward + backward (all inputs), E = 16 and 128.
  ep         the expert-parallel dispatch with `ExpertDispatch("ragged")` (`lax.ragged_all_to_all`) against
             "dropless" (padded all_to_all): needs >= 2 GPU devices, else skipped with the reason.
  attention  one attention layer of Scout (40 q heads, 8 kv heads, head_dim 128, bf16, batch 1) by
             `attention.attend` with impl cudnn (`fused.cudnn`) and blockwise, chunked (chunk 8192) and
             global, T = 8k and 32k, forward and forward + backward (dq, dk, dv).

Timing: compile (`lower().compile()`) timed apart; warm-up calls, then the median of timed calls, each ending
in `jax.block_until_ready`. Inputs are random, never zeros. A program whose compiled memory (arguments +
temporaries + outputs) exceeds 90% of the device's is reported, not run.

Peaks (dense, vendor datasheets): H100 SXM and H200 bf16 989 TFLOP/s, fp8 1979 TFLOP/s; HBM 3.35 TB/s (H100
SXM), 4.8 TB/s (H200). Any other device: the measured ceilings of this run stand in, and the report says so.

Without a GPU (jax.default_backend() != "gpu") the script runs `--tiny` sizes end to end, says loudly that
none of its figures is a GPU figure, and does not touch docs/BENCHMARKS.md unless `--update-docs --force`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", ".92")  # read when the GPU backend starts

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sharding
from benchmarks import run_all
from benchmarks.gpu_report import render
from benchmarks.model_vs_torch import model_flops
from benchmarks.moe_paths import layer as moe_layer
from llama4_jax import config as C
from llama4_jax.apps import generate as G
from llama4_jax.model import attention, moe
from llama4_jax.model import cache as cache_lib
from llama4_jax.model.counting import count_params
from llama4_jax.model.layers import precision
from llama4_jax.model.llama4 import abstract, init
from llama4_jax.train.losses import chunked_cross_entropy_sum

DOC_NAME = "gpu-device"
TITLE = "## GPU (H100/H200): train MFU, decode vs HBM bound, MoE paths, attention kernels"
REPRO = ("Reproduce on a machine with one H100/H200: `make bench-gpu` (`python -m benchmarks.gpu --update-docs`); "
         "the exact device-session command is at the top of benchmarks/gpu.py.")
SECTIONS = ("ceilings", "train", "decode", "moe", "ep", "attention")
# Seconds per section (GPU run), scaled to --budget-s; unused time rolls over to the next. Compiles dominate.
BUDGETS = {"ceilings": 15, "train": 180, "decode": 75, "moe": 55, "ep": 15, "attention": 100}
MEM_FRACTION = 0.9  # a program needing more of the device's memory than this is not run

# Dense datasheet peaks: (bf16 FLOP/s, fp8 FLOP/s, HBM bytes/s).
PEAKS = {"H100 SXM": (989e12, 1979e12, 3.35e12), "H200": (989e12, 1979e12, 4.8e12)}

NO_GPU = ("NO GPU PRESENT (jax.default_backend() is {backend!r}): tiny sizes, end to end. NONE of these figures "
          "is a GPU figure.")


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Device facts


def peak_entry(kind: str) -> str | None:
  """The PEAKS key of a `device_kind` ("NVIDIA H100 80GB HBM3" -> "H100 SXM"), None if not in the table
  (PCIe and NVL H100s have other clocks and memories)."""
  k = kind.lower()
  if "h200" in k:
    return "H200"
  if "h100" in k and not any(s in k for s in ("pcie", "nvl")):
    return "H100 SXM"
  return None


def device_facts() -> dict:
  d = jax.devices()[0]
  stats = {}
  try:
    stats = d.memory_stats() or {}
  except Exception:  # CPU devices have no allocator statistics
    pass
  entry = peak_entry(d.device_kind) if d.platform == "gpu" else None
  return {"backend": jax.default_backend(), "device_kind": d.device_kind, "devices": jax.device_count(),
          "memory_bytes": stats.get("bytes_limit"), "peak_entry": entry,
          "compute_capability": str(getattr(d, "compute_capability", "")) or None}


def machine() -> dict:
  vers = {m: run_all._version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy")}
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": run_all._git_commit(),
          "cpu": run_all._cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
          "versions": vers, "xla_flags": os.environ.get("XLA_FLAGS", ""), **device_facts()}


# --------------------------------------------------------------------------------------------------
# Budgets, compiling, timing


class Clock:
  """The whole run's deadline and the current section's: its own budget from its start, or the planned end of
  the sections so far if that is later (time an earlier section left unused rolls over), never past the
  run's end."""

  def __init__(self, total_s: float):
    self.t0 = time.perf_counter()
    self.end = self.t0 + total_s
    self.section_end = self.end

  def start(self, budget_s: float, planned_end_s: float) -> None:
    self.section_end = min(max(time.perf_counter() + budget_s, self.t0 + planned_end_s), self.end)

  def left(self) -> float:
    return self.section_end - time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0


class Skip(Exception):
  """A case that is not run; the message is the reason recorded in the JSON."""


def need_time(clock: Clock, what: str) -> None:
  if clock.left() <= 0:
    raise Skip(f"not run: the section's time budget was spent before {what}")


def compile_checked(fn, *args, mem_limit: int | None = None):
  """(compiled, compile seconds, bytes it needs); Skip if that exceeds MEM_FRACTION of the device."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  dt = time.perf_counter() - t0
  need = None
  try:
    m = compiled.memory_analysis()
    need = int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
  except Exception:  # not every backend reports it
    pass
  if mem_limit and need and need > MEM_FRACTION * mem_limit:
    raise Skip(f"not run: needs {need / 2 ** 30:.1f} GiB of the device's {mem_limit / 2 ** 30:.1f} GiB "
               f"(compile {dt:.1f} s)")
  return compiled, dt, need


def median_time(call: Callable[[], object], clock: Clock, runs: int, warmup: int = 1) -> tuple[float, int]:
  """Median seconds of `call()` (which blocks until ready) over up to `runs` calls after `warmup`; fewer (at
  least one) when the section's time runs out."""
  for _ in range(warmup):
    call()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
    if clock.left() < times[-1]:
      break
  return statistics.median(times), len(times)


def guarded(label: str, fn: Callable[[], dict], base: dict) -> dict:
  """Runs one case; a Skip or an error becomes the row's `skipped` reason (the run goes on)."""
  try:
    row = {**base, **fn()}
    log(f"  {label}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k not in base))
    return row
  except Skip as e:
    log(f"  {label}: {e}")
    return {**base, "skipped": str(e)}
  except Exception as e:  # a kernel that does not compile or run here: recorded, the next case runs
    log(f"  {label}: error {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
    return {**base, "skipped": f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def _fmt(v) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def _free() -> None:
  gc.collect()
  jax.clear_caches()


def _normal(key, shape, dtype, scale=1.0):
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


# --------------------------------------------------------------------------------------------------
# Sizes


@dataclasses.dataclass(frozen=True)
class Sizes:
  matmul_n: int
  copy_elems: int
  train_batch: int
  train_seq: int
  train_runs: int
  decode_batches: tuple[int, ...]
  decode_prompt: int
  decode_new: int
  decode_runs: int
  moe_tokens: int
  moe_hidden: int
  moe_width: int
  moe_experts: tuple[int, ...]
  attn_lengths: tuple[int, ...]
  attn_heads: tuple[int, int, int]  # H, K, d
  attn_chunk: int
  attn_block: int
  runs: int


GPU_SIZES = Sizes(matmul_n=8192, copy_elems=1 << 30, train_batch=4, train_seq=4096, train_runs=5,
                  decode_batches=(1, 32), decode_prompt=256, decode_new=64, decode_runs=2, moe_tokens=8192,
                  moe_hidden=2048, moe_width=4096, moe_experts=(16, 128), attn_lengths=(8192, 32768),
                  attn_heads=(40, 8, 128), attn_chunk=8192, attn_block=512, runs=10)
# Without a GPU: every code path once, at sizes that compile fast (one E, one T).
TINY_SIZES = Sizes(matmul_n=256, copy_elems=1 << 20, train_batch=1, train_seq=32, train_runs=1,
                   decode_batches=(1, 2), decode_prompt=8, decode_new=4, decode_runs=1, moe_tokens=64,
                   moe_hidden=32, moe_width=32, moe_experts=(4,), attn_lengths=(256,), attn_heads=(4, 2, 16),
                   attn_chunk=128, attn_block=64, runs=2)


def model_config(tiny: bool) -> C.Llama4Config:
  """~1B active (1.14 B: 12 layers of D 2048, 16 q / 4 kv heads x 128, 16 experts of width 4096 top-1 + a shared
  expert, vocab 202048; 6.1 B in all), Scout's layer pattern; `tiny`: the same pattern at D 64."""
  if tiny:
    text = C.TextConfig(vocab_size=512, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        num_local_experts=4, attention_chunk_size=16, floor_scale=16, pad_token_id=0,
                        bos_token_id=1, eos_token_id=(2,), max_position_embeddings=1 << 16)
  else:
    text = C.TextConfig(vocab_size=202048, hidden_size=2048, intermediate_size=4096, intermediate_size_mlp=8192,
                        num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                        num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
                        attention_chunk_size=2048, floor_scale=2048, max_position_embeddings=1 << 20)
  return C.Llama4Config(text=text, vision=None, dtype="bfloat16")


def param_bytes(cfg: C.Llama4Config, policy: C.Policy) -> dict:
  """Bytes of the parameters by what a decode step reads: embedding table, routed experts, the rest."""
  out = {"embedding": 0, "experts": 0, "other": 0}
  for path, var in nnx.to_flat_state(nnx.state(abstract(cfg, policy), nnx.Param)):
    n = int(np.prod(var.shape)) * jnp.dtype(var.dtype).itemsize
    names = var.get_metadata().get("out_sharding") or ()
    key = "experts" if "experts" in names else "embedding" if path[-1] == "embed" else "other"
    out[key] += n
  return out


# --------------------------------------------------------------------------------------------------
# 0. Ceilings


def ceilings(s: Sizes, clock: Clock, facts: dict) -> dict:
  n = s.matmul_n
  ka, kb = jax.random.split(jax.random.key(0))
  rows = []

  def matmul(dtype_name):
    def run():
      need_time(clock, f"the {dtype_name} matmul")
      a = _normal(ka, (n, n), jnp.bfloat16)
      b = _normal(kb, (n, n), jnp.bfloat16)
      if dtype_name == "fp8":
        a, b = a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn)
      f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.bfloat16))
      c, comp, _ = compile_checked(f, a, b, mem_limit=facts["memory_bytes"])
      t, k = median_time(lambda: jax.block_until_ready(c(a, b)), clock, s.runs, warmup=2)
      return {"tflops": 2 * n ** 3 / t / 1e12, "median_s": t, "runs": k, "compile_s": comp}
    return run

  rows.append(guarded(f"bf16 matmul {n}^3", matmul("bf16"), {"what": "matmul", "dtype": "bf16", "n": n}))
  rows.append(guarded(f"fp8 e4m3 matmul {n}^3", matmul("fp8"), {"what": "matmul", "dtype": "fp8", "n": n}))

  def copy():
    need_time(clock, "the copy")
    x = _normal(ka, (s.copy_elems,), jnp.bfloat16)
    f = jax.jit(lambda v: v * 2)
    c, comp, _ = compile_checked(f, x, mem_limit=facts["memory_bytes"])
    t, k = median_time(lambda: jax.block_until_ready(c(x)), clock, s.runs, warmup=2)
    return {"tb_per_s": 2 * x.nbytes / t / 1e12, "bytes_moved": 2 * x.nbytes, "median_s": t, "runs": k,
            "compile_s": comp}

  rows.append(guarded("copy", copy, {"what": "copy", "dtype": "bf16"}))
  return {"rows": rows}


def peaks(facts: dict, ceil: dict | None) -> dict:
  """bf16 / fp8 FLOP/s and HBM bytes/s used as the denominators, and where each came from."""
  entry = facts.get("peak_entry")
  if entry:
    bf16, f8, hbm = PEAKS[entry]
    src = f"datasheet ({entry}, dense)"
    return {"bf16": bf16, "fp8": f8, "hbm": hbm, "source": src, "fp8_source": src, "hbm_source": src}
  rows = {r["dtype"] if r["what"] == "matmul" else "copy": r for r in (ceil or {}).get("rows", [])}
  bf16 = rows.get("bf16", {}).get("tflops")
  f8 = rows.get("fp8", {}).get("tflops")
  hbm = rows.get("copy", {}).get("tb_per_s")
  kind = facts["device_kind"]
  out = {"bf16": bf16 * 1e12 if bf16 else float("nan"),
         "source": f"measured bf16 matmul ceiling of this run ({kind} is not in the datasheet table)",
         "hbm": hbm * 1e12 if hbm else float("nan"),
         "hbm_source": f"measured copy bandwidth of this run ({kind} is not in the table)"}
  if f8 and facts["backend"] == "gpu":
    out.update(fp8=f8 * 1e12, fp8_source="measured fp8 matmul ceiling of this run")
  else:
    out.update(fp8=out["bf16"], fp8_source="the measured bf16 ceiling (no fp8 matmul rate on this device)")
  return out


# --------------------------------------------------------------------------------------------------
# 1. Train step


def _train_case(cfg: C.Llama4Config, policy: C.Policy, s: Sizes, clock: Clock, facts: dict, pk: dict) -> dict:
  need_time(clock, "this case")
  B, T = s.train_batch, s.train_seq
  model = init(cfg, policy, seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  del model
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01)

  def loss_fn(params, ids):
    m = nnx.merge(graphdef, params, rest)
    h = m.forward(ids[:, :-1], logits=False).hidden
    ce, n = chunked_cross_entropy_sum(m.text.logits, h, ids[:, 1:], jnp.ones_like(ids[:, 1:]), policy.logits_chunk)
    return ce / n

  def step(params, opt_state, ids):
    loss, grads = jax.value_and_grad(loss_fn)(params, ids)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  ids = jax.random.randint(jax.random.key(1), (B, T + 1), 3, cfg.text.vocab_size, jnp.int32)
  opt_state = jax.jit(tx.init)(params)
  compiled, comp, need = compile_checked(jax.jit(step, donate_argnums=(0, 1)), params, opt_state, ids,
                                         mem_limit=facts["memory_bytes"])
  state = {"p": params, "o": opt_state, "loss": []}
  del params, opt_state

  def one():
    state["p"], state["o"], loss = compiled(state["p"], state["o"], ids)
    jax.block_until_ready((state["p"], loss))
    state["loss"].append(float(loss))

  t, k = median_time(one, clock, s.train_runs, warmup=2)
  losses = state.pop("loss")
  state.clear()  # frees the donated parameters and moments
  fl = model_flops(cfg.text, B, T)
  achieved = fl["train"] / t
  row = {"step_s": t, "runs": k, "compile_s": comp, "program_gib": (need or 0) / 2 ** 30,
         "tokens_per_s": B * T / t, "model_tflops": achieved / 1e12, "mfu_vs_bf16_peak": achieved / pk["bf16"],
         "first_loss": losses[0], "last_loss": losses[-1]}
  if policy.fp8 != "off":
    row["mfu_vs_fp8_peak"] = achieved / pk["fp8"]
  _free()
  return row


def train(s: Sizes, clock: Clock, facts: dict, pk: dict, tiny: bool, moe_impls: tuple[str, ...]) -> dict:
  cfg = model_config(tiny)
  t = cfg.text
  fl = model_flops(t, s.train_batch, s.train_seq)
  info = {"layers": t.num_hidden_layers, "hidden": t.hidden_size, "heads": t.num_attention_heads,
          "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim, "experts": t.num_local_experts,
          "top_k": t.num_experts_per_tok, "width": t.intermediate_size, "vocab": t.vocab_size,
          "chunk": t.attention_chunk_size, "layer_kinds": ["chunked" if r else "global" for r in t.rope_flags],
          "batch": s.train_batch, "seq": s.train_seq, "n_active_matmul": fl["n_active_matmul"],
          "total_params": count_params(cfg).total, "train_flops": fl["train"]}
  rows = []
  for impl in moe_impls:
    for label, fp8 in (("bf16", "off"), ("fp8 train", "train")):
      policy = C.Policy.for_dtype("bfloat16", moe_impl=impl, fp8=fp8)
      base = {"precision": label, "moe_impl": impl, "attention_impl": attention.resolve(policy.attention_impl,
                                                                                          jax.default_backend())}
      rows.append(guarded(f"train {label} moe={impl}", lambda p=policy: _train_case(cfg, p, s, clock, facts, pk),
                          base))
  return {"config": info, "rows": rows}


# --------------------------------------------------------------------------------------------------
# 2. Decode


def experts_touched(E: int, assignments: int) -> float:
  """Expected distinct experts hit by `assignments` uniform draws."""
  return E * (1 - (1 - 1 / E) ** assignments)


def decode(s: Sizes, clock: Clock, facts: dict, pk: dict, tiny: bool) -> dict:
  cfg = model_config(tiny)
  t = cfg.text
  policy = C.Policy.for_dtype("bfloat16")
  pb = param_bytes(cfg, policy)
  n_moe = len(t.moe_layer_ids)
  per_expert = pb["experts"] / t.num_local_experts  # all MoE layers together
  rows = []
  model = None
  for B in s.decode_batches:
    def run(B=B):
      nonlocal model
      need_time(clock, f"batch {B}")
      if model is None:
        model = init(cfg, policy, seed=0)
      ids = np.random.RandomState(B).randint(3, t.vocab_size, (B, s.decode_prompt))
      n = s.decode_new
      t0 = time.perf_counter()
      g = G.generate(model, ids, max_new_tokens=n, stop_ids=(), pad_id=0)  # compiles prefill + step
      first = time.perf_counter() - t0
      rates = [g.decode_tokens_per_s]
      for _ in range(s.decode_runs):
        if clock.left() <= 0:
          break
        rates.append(G.generate(model, ids, max_new_tokens=n, stop_ids=(), pad_id=0).decode_tokens_per_s)
      rate = statistics.median(rates[1:]) if len(rates) > 1 else rates[0]
      max_len = -(-(s.decode_prompt + n) // 64) * 64  # generate's cache_multiple
      kv = B * cache_lib.kv_bytes(t, max_len, policy.dtype)
      touched = experts_touched(t.num_local_experts, B * t.num_experts_per_tok)
      weights = pb["other"] + touched * per_expert + B * t.hidden_size * 2
      step_bound_s = (weights + kv) / pk["hbm"]
      bound = B / step_bound_s
      return {"tokens_per_s": rate, "step_ms": 1e3 * B / rate, "runs": len(rates) - 1 or 1,
              "first_call_s": first, "hbm_bound_tokens_per_s": bound, "fraction_of_bound": rate / bound,
              "weight_bytes_per_step": float(weights), "kv_bytes_per_step": float(kv),
              "experts_touched_per_layer": touched, "cache_slots": max_len}
    rows.append(guarded(f"decode B={B}", run, {"batch": B, "prompt": s.decode_prompt, "new_tokens": s.decode_new}))
  del model
  _free()
  return {"param_bytes": pb, "moe_layers": n_moe, "rows": rows}


# --------------------------------------------------------------------------------------------------
# 3. MoE paths


def _moe_programs(impl: str, policy: C.Policy, k: int):
  fwd, grad = moe_layer(impl, policy, k)
  return jax.jit(fwd), jax.jit(grad)


def moe_paths(s: Sizes, clock: Clock, facts: dict, pk: dict) -> dict:
  policy = C.Policy.for_dtype("bfloat16")
  N, D, I, k = s.moe_tokens, s.moe_hidden, s.moe_width, 1
  rows = []
  for E in s.moe_experts:
    ks = jax.random.split(jax.random.key(E), 4)
    bf = jnp.bfloat16
    args = (_normal(ks[0], (N, D), bf), _normal(ks[1], (D, E), bf, 3.0 / math.sqrt(D)),
            _normal(ks[2], (E, D, 2, I), bf, 1 / math.sqrt(D)), _normal(ks[3], (E, I, D), bf, 1 / math.sqrt(I)))
    useful = 2 * N * k * 3 * D * I + 2 * N * D * E
    ref = {}
    for impl in ("sorted", "ragged", "dense"):
      for kind in ("fwd", "fwd+bwd"):
        def run(impl=impl, kind=kind, E=E, args=args, ref=ref, useful=useful):
          need_time(clock, f"E={E} {impl} {kind}")
          f, g = _moe_programs(impl, policy, k)
          c, comp, need = compile_checked(f if kind == "fwd" else g, *args, mem_limit=facts["memory_bytes"])
          out = {"compile_s": comp}
          if kind == "fwd":
            y = np.asarray(c(*args).astype(jnp.float32))
            ref.setdefault("y", y)
            out["max_abs_diff_vs_first"] = float(np.abs(y - ref["y"]).max())
          t, n = median_time(lambda: jax.block_until_ready(c(*args)), clock, s.runs)
          fl = useful * (1 if kind == "fwd" else 3)
          return {**out, "ms": 1e3 * t, "runs": n, "useful_tflops": fl / t / 1e12,
                  "fraction_of_bf16_peak": fl / t / pk["bf16"]}
        rows.append(guarded(f"moe E={E} {impl} {kind}", run,
                            {"experts": E, "impl": impl, "kind": kind, "tokens": N, "hidden": D, "width": I}))
    del args
    _free()
  return {"rows": rows}


# --------------------------------------------------------------------------------------------------
# 4. Expert-parallel dispatch


def ep_dispatch(s: Sizes, clock: Clock, facts: dict) -> dict:
  n = jax.device_count()
  if n < 2:
    return {"rows": [], "skipped": f"not run: the expert-parallel dispatch needs >= 2 devices, this machine has {n}"}
  policy = C.Policy.for_dtype("bfloat16")
  E = max(e for e in s.moe_experts if e % n == 0) if any(e % n == 0 for e in s.moe_experts) else n
  N, D, I = s.moe_tokens * n, s.moe_hidden, s.moe_width
  ks = jax.random.split(jax.random.key(0), 4)
  bf = jnp.bfloat16
  host = (_normal(ks[0], (N, D), bf), _normal(ks[1], (D, E), bf, 3.0 / math.sqrt(D)),
          _normal(ks[2], (E, D, 2, I), bf, 1 / math.sqrt(D)), _normal(ks[3], (E, I, D), bf, 1 / math.sqrt(I)))

  def loss(x, router, gate_up, down):
    idx, scores, _ = moe.route(x, router, 1, policy)
    y = moe.routed(x, idx, scores, gate_up, down, policy).astype(jnp.float32)
    return jnp.mean(y * y)

  rows = []
  for mode in ("ragged", "dropless"):
    def run(mode=mode):
      if mode == "ragged" and facts["backend"] != "gpu":
        raise Skip(f"not run: ragged_all_to_all needs GPU devices (XLA:{facts['backend'].upper()} cannot compile it)")
      need_time(clock, mode)
      rules = dataclasses.replace(sharding.EXPERT_PARALLEL, dispatch=sharding.ExpertDispatch(mode))
      mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1, expert=n))
      with sharding.use(rules, mesh):
        named = lambda names: jax.sharding.NamedSharding(mesh, rules.spec(names))  # noqa: E731
        x = jax.device_put(host[0], named(("act_batch", None)))
        r = jax.device_put(host[1], named((None, None)))
        gu = jax.device_put(host[2], named(moe.GATE_UP_NAMES))
        dn = jax.device_put(host[3], named(moe.DOWN_NAMES))
        c, comp, _ = compile_checked(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))), x, r, gu, dn)
        t, k = median_time(lambda: jax.block_until_ready(c(x, r, gu, dn)), clock, s.runs)
      return {"fwd_bwd_ms": 1e3 * t, "runs": k, "compile_s": comp}
    rows.append(guarded(f"ep {mode} n={n}", run, {"mode": mode, "devices": n, "experts": E, "tokens": N}))
  return {"rows": rows}


# --------------------------------------------------------------------------------------------------
# 5. Attention kernels


def causal_pairs(T: int, chunk: int | None) -> int:
  """Visible (query, key) pairs of one head under the causal (chunked) mask."""
  if chunk is None or chunk >= T:
    return T * (T + 1) // 2
  full, rem = divmod(T, chunk)
  return full * chunk * (chunk + 1) // 2 + rem * (rem + 1) // 2


def attention_kernels(s: Sizes, clock: Clock, facts: dict, pk: dict) -> dict:
  H, K, d = s.attn_heads
  prec = precision(C.Policy.for_dtype("bfloat16"))
  rows = []
  for T in s.attn_lengths:
    ks = jax.random.split(jax.random.key(T), 4)
    bf = jnp.bfloat16
    q, k, v = _normal(ks[0], (1, T, H, d), bf), _normal(ks[1], (1, T, K, d), bf), _normal(ks[2], (1, T, K, d), bf)
    g = _normal(ks[3], (1, T, H, d), bf)
    seg = jnp.ones((1, T), jnp.int32)
    mpos = jnp.arange(T, dtype=jnp.int32)[None]
    for layer, chunk in (("chunked", s.attn_chunk), ("global", None)):
      for impl in ("cudnn", "blockwise"):
        def fwd(q, k, v, seg, mpos, impl=impl, chunk=chunk):
          info = attention.TokenInfo(seg, mpos)
          return attention.attend(q, k, v, info, info, chunk, impl, False, prec, s.attn_block)

        def loss(q, k, v, seg, mpos, g, fwd=fwd):
          return jnp.sum(fwd(q, k, v, seg, mpos).astype(jnp.float32) * g.astype(jnp.float32))

        for kind in ("fwd", "fwd+bwd"):
          def run(impl=impl, kind=kind, fwd=fwd, loss=loss, chunk=chunk, T=T, x=(q, k, v, seg, mpos), g=g):
            if impl == "cudnn" and facts["backend"] != "gpu":
              raise Skip(f"not run: cuDNN attention needs a GPU (backend {facts['backend']!r})")
            need_time(clock, f"T={T} {impl} {kind}")
            if kind == "fwd":
              fn, a = jax.jit(fwd), x
            else:
              fn, a = jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (*x, g)
            c, comp, _ = compile_checked(fn, *a, mem_limit=facts["memory_bytes"])
            t, n = median_time(lambda: jax.block_until_ready(c(*a)), clock, min(s.runs, 5))
            fl = 4 * H * d * causal_pairs(T, chunk) * (1 if kind == "fwd" else 3.5)
            return {"ms": 1e3 * t, "runs": n, "compile_s": comp, "causal_tflops": fl / t / 1e12,
                    "fraction_of_bf16_peak": fl / t / pk["bf16"]}
          rows.append(guarded(f"attention T={T} {layer} {impl} {kind}", run,
                              {"T": T, "layer": layer, "chunk": chunk, "impl": impl, "kind": kind}))
    del q, k, v, g
    _free()
  return {"heads": H, "kv_heads": K, "head_dim": d, "rows": rows}


# --------------------------------------------------------------------------------------------------
# The run


def run(tiny: bool, budget_s: float, sections=SECTIONS, train_moe=("sorted",), out: str | None = None) -> dict:
  facts = device_facts()
  gpu = facts["backend"] == "gpu"
  s = TINY_SIZES if tiny else GPU_SIZES
  clock = Clock(budget_s)
  scale = budget_s / sum(BUDGETS.values())
  planned = 0.0
  r = {"gpu": gpu, "tiny": tiny, "machine": machine(), "budget_s": budget_s, "sizes": dataclasses.asdict(s),
       "note": NO_GPU.format(backend=facts["backend"]) if not gpu else ("--tiny: a smoke test, not a measurement"
                                                                          if tiny else "")}
  if r["note"]:
    log(r["note"])
  for name in SECTIONS:
    if name not in sections:
      r[name] = {"rows": [], "skipped": "not run: not in --sections"}
      continue
    planned += BUDGETS[name] * scale
    clock.start(BUDGETS[name] * scale, planned)
    t0 = time.perf_counter()
    log(f"[{clock.elapsed():6.1f} s] {name} (until {clock.section_end - clock.t0:.0f} s)")
    if clock.end - time.perf_counter() <= 0:
      sec = {"rows": [], "skipped": f"not run: the whole run's budget of {budget_s:.0f} s was spent"}
    elif name == "ceilings":
      sec = ceilings(s, clock, facts)
    else:
      pk = r.setdefault("peaks", peaks(facts, r.get("ceilings")))
      if name == "train":
        sec = train(s, clock, facts, pk, tiny, tuple(train_moe))
      elif name == "decode":
        sec = decode(s, clock, facts, pk, tiny)
      elif name == "moe":
        sec = moe_paths(s, clock, facts, pk)
      elif name == "ep":
        sec = ep_dispatch(s, clock, facts)
      else:
        sec = attention_kernels(s, clock, facts, pk)
    sec["budget_s"], sec["wall_s"] = BUDGETS[name] * scale, time.perf_counter() - t0
    r[name] = sec
    r.setdefault("peaks", peaks(facts, r.get("ceilings")))
    r["wall_s"] = clock.elapsed()
    if out:
      save(r, out)  # after every section: a run stopped from outside keeps what it measured
  return r


def save(r: dict, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(r, f, indent=2, default=float)
  os.replace(tmp, path)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=os.path.join(run_all.ROOT, "runs", "bench", "gpu.json"))
  ap.add_argument("--update-docs", action="store_true", help=f"rewrite this section of {run_all.DOC}")
  ap.add_argument("--force", action="store_true", help="with --update-docs: write docs from a non-GPU or --tiny run")
  ap.add_argument("--tiny", action="store_true", help="tiny sizes (automatic without a GPU)")
  ap.add_argument("--budget-s", type=float, default=450.0, help="the whole run (sections share it pro rata)")
  ap.add_argument("--sections", default=",".join(SECTIONS))
  ap.add_argument("--train-moe", default="sorted", help="moe_impl(s) of the train step, comma-separated")
  ap.add_argument("--report", metavar="JSON", help="render (and with --update-docs write) a saved run; no measuring")
  ap.add_argument("--doc", default=run_all.DOC, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.report:
    with open(args.report) as f:
      r = json.load(f)
  else:
    gpu = jax.default_backend() == "gpu"
    if not gpu:
      log("=" * 100 + "\n" + NO_GPU.format(backend=jax.default_backend()) + "\n" + "=" * 100)
    sections = tuple(x.strip() for x in args.sections.split(",") if x.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
      ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    r = run(args.tiny or not gpu, args.budget_s, sections, tuple(args.train_moe.split(",")), args.out)
    save(r, args.out)
  body = render(r)
  print(f"\n{TITLE}\n\n{body}\n")
  if not args.report:
    print(f"results: {args.out}")
  if args.update_docs:
    if (not r["gpu"] or r["tiny"]) and not args.force:
      print(f"not writing {args.doc}: {'no GPU' if not r['gpu'] else '--tiny'} run (pass --force to write anyway)")
    else:
      run_all.write_block(args.doc, DOC_NAME, TITLE, REPRO, body)
      print(f"updated: {args.doc}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
