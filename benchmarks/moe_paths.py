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

The matmul-only floor (`floor`): the sorted path's matmuls alone, on the blocks this routing fills, with the
block size and operand forms `moe.grouped_ffn` uses: the forward's two (tokens x gate_up, swiglu x down) and the
backward's four (two input gradients, two weight gradients), each in a loop of its own over the blocks with
one expert's weights (no slicing, no elementwise work, no accumulation). (forward + backward) / forward of
those times is the sorted path's ratio with every non-matmul cost at zero.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.matmul_ceiling import median_s
from llama4_jax import config as C
from llama4_jax.model import moe

IMPLS = ("sorted", "ragged", "dense")
FLOOR_ROUNDS = 15  # rounds of `fastest` for the floor and the sorted ratio: each call 10-200 ms, noise in bursts


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
      if impl == "sorted":
        best = fastest({"f": lambda f=f, a=args: jax.block_until_ready(f(*a)),
                        "g": lambda g=g, a=args: jax.block_until_ready(g(*a))}, FLOOR_ROUNDS)
        row["sorted_fastest"] = {"fwd_ms": 1e3 * best["f"], "fwd_bwd_ms": 1e3 * best["g"],
                                 "ratio": best["g"] / best["f"]}
      row[impl] = {"fwd_ms": 1e3 * t_f, "fwd_bwd_ms": 1e3 * t_g, "runs": [len(runs_f), len(runs_g)],
                   "fwd_gflops": flops_fwd / t_f / 1e9,
                   "fwd_bwd_gflops": 3 * flops_fwd / t_g / 1e9, "max_abs_diff_vs_sorted": err}
      log(f"  moe E={E} {impl}: fwd {1e3 * t_f:.1f} ms, fwd+bwd {1e3 * t_g:.1f} ms")
    blocks, b = _filled_blocks(args[0], args[1], E, top_k, policy)
    row["floor"] = floor(D, I, E, blocks, b, rounds=FLOOR_ROUNDS)
    log(f"  moe E={E} matmul-only floor: {row['floor']['ratio']:.2f}x ({blocks} blocks of {b})")
    for impl in ("dense", "ragged"):
      row[f"sorted_speedup_vs_{impl}"] = {
          "fwd": row[impl]["fwd_ms"] / row["sorted"]["fwd_ms"],
          "fwd_bwd": row[impl]["fwd_bwd_ms"] / row["sorted"]["fwd_bwd_ms"]}
    rows.append(row)
  return rows


def _dot(a, b, contract: tuple[int, int]):
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision="highest")


def _loop(fn, xs, w, per_block: bool = False):
  """A compiled program running `fn(xs[i], w[i] if per_block else w)` for every i in one loop, each result
  overwriting the last."""
  n = xs.shape[0]
  w_of = (lambda i: w[i]) if per_block else (lambda i: w)  # noqa: E731

  def run(xs, w):
    return jax.lax.fori_loop(1, n, lambda i, o: fn(xs[i], w_of(i)), fn(xs[0], w_of(0)))

  f = jax.jit(run).lower(xs, w).compile()
  return lambda: jax.block_until_ready(f(xs, w))


def fastest(progs: dict, rounds: int) -> dict:
  """Seconds of each blocking call in `progs` at its fastest of `rounds` rounds, the calls taking turns after a
  warm-up round: on a shared machine other work only ever adds time, and turns expose all to the same load."""
  best = {}
  for r in range(rounds + 1):
    for k, f in progs.items():
      t0 = time.perf_counter()
      f()
      if r:
        best[k] = min(best.get(k, float("inf")), time.perf_counter() - t0)
  return best


def floor(hidden: int, width: int, experts: int, blocks: int, b: int, rounds: int = 5) -> dict:
  """The sorted path's six matmuls alone over `blocks` blocks of `b` tokens, each at its `fastest` (see the
  module docstring)."""
  D, I, n = hidden, width, blocks
  ks = jax.random.split(jax.random.key(experts), 6)
  u, gy = jax.random.normal(ks[0], (n, b, D)), jax.random.normal(ks[1], (n, b, D))
  a, dh = jax.random.normal(ks[2], (n, b, I)), jax.random.normal(ks[3], (n, b, 2 * I))
  w1, w2 = jax.random.normal(ks[4], (D, 2 * I)), jax.random.normal(ks[5], (I, D))
  progs = {"gate_up": _loop(lambda x, w: _dot(x, w, (1, 0)), u, w1),
           "down": _loop(lambda x, w: _dot(x, w, (1, 0)), a, w2),
           "d_swiglu": _loop(lambda g, w: _dot(w, g, (1, 1)), gy, w2),
           "d_tokens": _loop(lambda g, w: _dot(w, g, (1, 1)), dh, w1),
           "d_gate_up": _loop(lambda x, g: _dot(x, g, (1, 0)), jnp.swapaxes(u, 1, 2), dh, per_block=True),
           "d_down": _loop(lambda x, g: _dot(x, g, (0, 0)), a, gy, per_block=True)}
  best = fastest(progs, rounds)
  t_f = best["gate_up"] + best["down"]
  t_b = sum(best.values()) - t_f
  return {"blocks": n, "block": b, "rounds": rounds, "fwd_ms": 1e3 * t_f, "bwd_ms": 1e3 * t_b,
          "ratio": (t_f + t_b) / t_f, "ms": {k: 1e3 * v for k, v in best.items()},
          "gflops": {"fwd": 2 * n * b * 3 * D * I / t_f / 1e9, "bwd": 4 * n * b * 3 * D * I / t_b / 1e9}}


def _filled_blocks(x, router, E: int, top_k: int, policy: C.Policy) -> tuple[int, int]:
  """(blocks the sorted path runs for this routing, its block size)."""
  idx = np.asarray(moe.route(x, router, top_k, policy)[0]).reshape(-1)
  b = moe.block_size(idx.size, E, policy.moe_block)
  return int((-(-np.bincount(idx, minlength=E) // b)).sum()), b


def floor_table(rows: list[dict]) -> str:
  out = ["| E | blocks x tokens | forward matmuls (ms) | backward matmuls (ms) | GFLOP/s fwd / bwd | floor "
         "(fwd+bwd)/fwd | sorted path: fwd / fwd+bwd (ms), ratio |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    f, m = r["floor"], r["sorted_fastest"]
    out.append(f"| {r['experts']} | {f['blocks']} x {f['block']} | {f['fwd_ms']:.1f} | {f['bwd_ms']:.1f} | "
               f"{f['gflops']['fwd']:.0f} / {f['gflops']['bwd']:.0f} | {f['ratio']:.2f}x | "
               f"{m['fwd_ms']:.1f} / {m['fwd_bwd_ms']:.1f}, {m['ratio']:.2f}x |")
  return "\n".join(out)


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
  print()
  print(floor_table(rows))


if __name__ == "__main__":
  main()
