"""The machine's float32 matmul ceiling (one large jitted matmul), and the timing helpers of the suite.

  .venv/bin/python -m benchmarks.matmul_ceiling [--n 2048]

The ceiling is the rate of a single n x n x n float32 matmul (2 n^3 FLOPs) at precision HIGHEST, the
same precision our float32 policy uses; torch's `a @ b` on the same thread count is reported beside it.
Achieved model FLOP/s elsewhere in the suite are quoted as a fraction of the JAX figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def threads() -> int:
  """Cores this process may use: XLA:CPU sizes its intra-op pool to them; torch is set to the same."""
  return len(os.sched_getaffinity(0))


def median_s(fn: Callable[[], object], runs: int, warmup: int = 1,
             budget_s: float | None = None) -> tuple[float, list[float]]:
  """Median wall time in seconds of `fn()` over `runs` calls after `warmup` calls. `fn` must block until its
  result is ready (JAX: `jax.block_until_ready`). With `budget_s`, fewer runs (at least one) are made when
  `runs` calls as slow as the last warm-up call would exceed it; the list of times says how many."""
  t_warm = 0.0
  for _ in range(warmup):
    t0 = time.perf_counter()
    fn()
    t_warm = time.perf_counter() - t0
  if budget_s is not None and warmup and t_warm > 0:
    runs = max(1, min(runs, int(budget_s / t_warm)))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def jax_ceiling(n: int = 2048, runs: int = 5) -> dict:
  """GFLOP/s of one jitted float32 n^3 matmul (HIGHEST and DEFAULT precision)."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  out = {}
  for name, prec in (("highest", jax.lax.Precision.HIGHEST), ("default", jax.lax.Precision.DEFAULT)):
    f = jax.jit(lambda x, y, p=prec: jnp.matmul(x, y, precision=p)).lower(a, b).compile()
    med, _ = median_s(lambda f=f: jax.block_until_ready(f(a, b)), runs)
    out[name] = 2 * n ** 3 / med / 1e9
  return out


def torch_ceiling(n: int = 2048, runs: int = 5) -> float:
  import torch
  torch.set_num_threads(threads())
  g = torch.Generator().manual_seed(0)
  a = torch.randn(n, n, generator=g)
  b = torch.randn(n, n, generator=g)
  med, _ = median_s(lambda: a @ b, runs)
  return 2 * n ** 3 / med / 1e9


def measure(n: int = 2048, runs: int = 5) -> dict:
  j = jax_ceiling(n, runs)
  return {"n": n, "jax_gflops": j["highest"], "jax_default_precision_gflops": j["default"],
          "torch_gflops": torch_ceiling(n, runs)}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", type=int, default=2048)
  ap.add_argument("--runs", type=int, default=5)
  args = ap.parse_args(argv)
  r = measure(args.n, args.runs)
  print(f"float32 {args.n}^3 matmul, {threads()} threads: JAX {r['jax_gflops']:.0f} GFLOP/s "
        f"(precision DEFAULT {r['jax_default_precision_gflops']:.0f}), torch {r['torch_gflops']:.0f} GFLOP/s")


if __name__ == "__main__":
  main()
