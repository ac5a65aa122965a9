"""Metrics: JSONL + TensorBoard writer, model FLOPs and MFU, the console progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from llama4_jax.config import Llama4Config


class MetricWriter:
  """Appends one JSON object per record to `metrics.jsonl` and scalars to TensorBoard event files.

  On resume from step s, `purge_after(s)` drops the JSONL records of later steps (written by the run that
  died after its last checkpoint) and tells TensorBoard to hide them, so the curves show each step once.
  """

  def __init__(self, directory: str, purge_after: int | None = None, tensorboard: bool = True):
    os.makedirs(directory, exist_ok=True)
    self.path = os.path.join(directory, "metrics.jsonl")
    if purge_after is not None and os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= purge_after]
      with open(self.path, "w") as f:
        f.writelines(kept)
    self._file = open(self.path, "a")
    self._tb = None
    if tensorboard and jax.process_index() == 0:
      self._tb = _summary_writer()(os.path.join(directory, "tensorboard"),
                               purge_step=None if purge_after is None else purge_after + 1)

  def write(self, step: int, record: Mapping[str, Any], tb_prefix: str | None = None) -> None:
    """One JSONL record {step, **record}; its scalar fields also go to TensorBoard under `tb_prefix/`."""
    rec = {"step": int(step), **{k: _plain(v) for k, v in record.items()}}
    self._file.write(json.dumps(rec) + "\n")
    self._file.flush()
    if self._tb is not None and tb_prefix is not None:
      for k, v in rec.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(f"{tb_prefix}/{k}", v, step)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """TensorBoard-only scalars (e.g. per-layer expert load)."""
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, float(v), step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _summary_writer():
  """tensorboardX's SummaryWriter class. tensorboardX imports torch (2-3 s) at import time when torch is
  installed, only to recognise torch tensors; we log Python floats, so torch is hidden from that one
  import unless something already imported it."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def _plain(v):
  if isinstance(v, (np.ndarray, jax.Array)):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
  if isinstance(v, np.generic):
    return v.item()
  return v


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------------
# FLOPs and MFU


def flops_per_token(cfg: Llama4Config, seq_len: int, active_params: int) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward):
    6 * (active parameters - embedding table)     every weight used by a token: 2 FLOPs per
                                                  multiply-add, forward and two backward matmuls
  + 12 * H * d * S_l summed over layers           attention scores q.k and the weighted sum p.v, with
                                                  S_l the mean number of keys a query sees: (T+1)/2 on
                                                  global (NoPE) layers, ~(C+1)/2 on chunked layers.
  The embedding lookup is a gather (no FLOPs); the routed experts count k of E (active parameters)."""
  t = cfg.text
  dense = 6.0 * (active_params - t.vocab_size * t.hidden_size)
  attn = 0.0
  for i in range(t.num_hidden_layers):
    span = min(t.attention_chunk_size, seq_len) if t.use_rope(i) else seq_len
    attn += 12.0 * t.num_attention_heads * t.head_dim * (span + 1) / 2
  return dense + attn


# Dense bf16 peak FLOP/s per chip of accelerators this code targets (vendor figures, no sparsity).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
}


def measure_matmul_flops(n: int = 2048, repeats: int = 4) -> float:
  """Best-of-`repeats` float32 matmul throughput of device 0 (FLOP/s): the CPU "peak" for MFU."""
  x = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices()[0])
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def peak_flops(override: float = 0.0, devices=None) -> tuple[float, str]:
  """(peak FLOP/s of `devices` together (default: all), where it came from). Per device: `override` if
  given, else the table by device kind; CPU (or an unknown kind): one float32 matmul measurement, which
  is already the whole host's (simulated CPU devices share its cores)."""
  devices = list(jax.devices() if devices is None else devices)
  n, kind = len(devices), devices[0].device_kind
  if override > 0:
    return override * n, "given"
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if kind.lower().startswith(name.lower()):
      return PEAK_FLOPS[name] * n, f"table: {n} x {kind}"
  return measure_matmul_flops(), f"measured float32 matmul on {kind}"


# --------------------------------------------------------------------------------------------------
# Console


class Progress:
  """`step 120/1000 [=====>     ] 12% loss 4.213 | 3.1k tok/s | ETA 4m12s` on one line (rewritten in
  place on a terminal, one line per update otherwise)."""

  def __init__(self, total: int, start: int = 0, width: int = 24, stream=None):
    self.total, self.start, self.width = total, start, width
    self.stream = stream or sys.stdout
    self.tty = self.stream.isatty()
    self.t0 = None
    self.s0 = start

  def update(self, step: int, text: str) -> None:
    now = time.perf_counter()
    if self.t0 is None:  # the clock starts after the first (compiling) step
      self.t0, self.s0 = now, step
    rate = (step - self.s0) / (now - self.t0) if step > self.s0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    frac = step / max(self.total, 1)
    bar = "=" * int(frac * self.width)
    bar = (bar + ">").ljust(self.width)[: self.width]
    line = f"step {step}/{self.total} [{bar}] {frac:4.0%} {text} | ETA {format_duration(eta)}"
    if self.tty:
      self.stream.write("\r" + line.ljust(110))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    """A line that stays above the bar."""
    if self.tty:
      self.stream.write("\r" + " " * 110 + "\r")
    self.stream.write(text + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "--"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
