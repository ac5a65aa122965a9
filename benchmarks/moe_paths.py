"""The three routed-expert paths of `Policy.moe_impl` on the same layer and tokens, as E grows.

  .venv/bin/python -m benchmarks.moe_paths [--tokens 2048 --hidden 512 --width 1024 --experts 8,16,64]

One MoE layer without its shared expert (identical in all paths): router, top-k, then the routed experts
by `moe.sorted_experts` (sparse: sort + block-grouped scan), `moe.ragged_experts` (`lax.ragged_dot`) or
`moe.dense_experts` (every expert on every token, the oracle). Timed: the forward, and forward + backward
of loss = mean(y^2) with respect to the tokens and every weight. Float32, precision HIGHEST (our float32
policy), jitted, compile excluded, median of `runs` calls. The outputs of the three paths are checked to
agree before timing.

Useful FLOPs (what the GFLOP/s column divides): 2 * N * k * 3 * D * I forward (gate, up, down on the routed
assignments) plus 2 * N * D * E for the router; backward counted as twice the forward.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.matmul_ceiling import median_s
from llama4_jax import config as C
from llama4_jax.model import moe

IMPLS = ("sorted", "ragged", "dense")


def layer(impl: str, policy: C.Policy, k: int):
  """(forward, value_and_grad of mean(y^2)) of one routed-expert layer by `impl` (also benchmarks/gpu.py)."""
  experts_fn = moe.EXPERT_IMPLS[impl]

  def fwd(x, router, gate_up, down):
    idx, scores, _ = moe.route(x, router, k, policy)
    return experts_fn(x, idx, scores, gate_up, down, policy)

  def loss(x, router, gate_up, down):
    y = fwd(x, router, gate_up, down).astype(jnp.float32)
    return jnp.mean(y * y)

  return fwd, jax.value_and_grad(loss, argnums=(0, 1, 2, 3))


def measure(tokens: int = 2048, hidden: int = 512, width: int = 512, experts=(8, 16, 64), top_k: int = 1,
            runs: int = 3, budget_s: float | None = 20.0, log=print) -> list[dict]:
  policy = C.Policy(matmul_precision="highest")
  rows = []
  for E in experts:
    ks = jax.random.split(jax.random.key(E), 4)
    D, I, N = hidden, width, tokens
    args = (jax.random.normal(ks[0], (N, D)),
            3.0 * jax.random.normal(ks[1], (D, E)) / np.sqrt(D),
            jax.random.normal(ks[2], (E, D, 2, I)) / np.sqrt(D),
            jax.random.normal(ks[3], (E, I, D)) / np.sqrt(I))
    flops_fwd = 2 * N * top_k * 3 * D * I + 2 * N * D * E
    ref = None
    row = {"experts": E, "tokens": N, "hidden": D, "width": I, "top_k": top_k}
    for impl in IMPLS:
      fwd, grad = layer(impl, policy, top_k)
      f = jax.jit(fwd).lower(*args).compile()
      g = jax.jit(grad).lower(*args).compile()
      y = np.asarray(f(*args))
      if ref is None:
        ref = y
      err = float(np.abs(y - ref).max())
      assert err < 1e-3 * max(1.0, float(np.abs(ref).max())), f"E={E}: {impl} disagrees with sorted by {err}"
      t_f, runs_f = median_s(lambda f=f, a=args: jax.block_until_ready(f(*a)), runs, budget_s=budget_s)
      t_g, runs_g = median_s(lambda g=g, a=args: jax.block_until_ready(g(*a)), runs, budget_s=budget_s)
      row[impl] = {"fwd_ms": 1e3 * t_f, "fwd_bwd_ms": 1e3 * t_g, "runs": [len(runs_f), len(runs_g)],
                   "fwd_gflops": flops_fwd / t_f / 1e9,
                   "fwd_bwd_gflops": 3 * flops_fwd / t_g / 1e9, "max_abs_diff_vs_sorted": err}
      log(f"  moe E={E} {impl}: fwd {1e3 * t_f:.1f} ms, fwd+bwd {1e3 * t_g:.1f} ms")
    for impl in ("dense", "ragged"):
      row[f"sorted_speedup_vs_{impl}"] = {
          "fwd": row[impl]["fwd_ms"] / row["sorted"]["fwd_ms"],
          "fwd_bwd": row[impl]["fwd_bwd_ms"] / row["sorted"]["fwd_bwd_ms"]}
    rows.append(row)
  return rows


def table(rows: list[dict]) -> str:
  out = ["| E | path | fwd (ms) | fwd+bwd (ms) | useful GFLOP/s fwd / fwd+bwd | sorted speedup fwd | "
         "sorted speedup fwd+bwd |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    for impl in IMPLS:
      m = r[impl]
      sp = ("1 (itself)", "1 (itself)") if impl == "sorted" else (
          f"{r[f'sorted_speedup_vs_{impl}']['fwd']:.2f}x", f"{r[f'sorted_speedup_vs_{impl}']['fwd_bwd']:.2f}x")
      out.append(f"| {r['experts']} | {impl} | {m['fwd_ms']:.1f} | {m['fwd_bwd_ms']:.1f} | "
                 f"{m['fwd_gflops']:.0f} / {m['fwd_bwd_gflops']:.0f} | {sp[0]} | {sp[1]} |")
  return "\n".join(out)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tokens", type=int, default=2048)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--width", type=int, default=512, help="expert width I")
  ap.add_argument("--experts", default="8,16,64")
  ap.add_argument("--top-k", type=int, default=1)
  ap.add_argument("--runs", type=int, default=3)
  args = ap.parse_args(argv)
  rows = measure(args.tokens, args.hidden, args.width, tuple(int(e) for e in args.experts.split(",")),
                 args.top_k, args.runs)
  print(table(rows))


if __name__ == "__main__":
  main()
