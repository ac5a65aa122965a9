"""Expert-parallel MoE layer vs the replicated one as the device count grows (fixed global tokens, experts).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.ep_scaling

One MoE layer (router + routed experts, top-1, float32), forward + backward of a scalar loss, on
n = 1, 2, 4, 8 devices of the 8 simulated CPU devices:
  replicated  rules DATA_PARALLEL on mesh data=n: tokens split, every device holds every expert;
  ep          rules EXPERT_PARALLEL on mesh expert=n: tokens split, experts split, two all_to_alls
              (dropless buffers, then capacity_factor 1.25).
Reported per device: the expert weights held, the compiled program's argument + temporary bytes (XLA's
memory analysis of the SPMD program: one device's share), and the step time (median of --steps runs).

On a CPU box the simulated devices share the same cores: times show how the work and the extra
dispatch/communication steps add up, not how a real multi-device system scales.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sharding  # noqa: E402
from llama4_jax import config as C  # noqa: E402
from llama4_jax.model import moe  # noqa: E402
from sharding import rules as R  # noqa: E402

POLICY = C.Policy(matmul_precision="default")


def layer_loss(x, router, gate_up, down):
  idx, scores, _ = moe.route(x, router, 1, POLICY)
  y = moe.routed(x, idx, scores, gate_up, down, POLICY)
  return jnp.mean(y * y)


def measure(rules: R.Rules, mesh_cfg: sharding.MeshConfig, n: int, args) -> dict:
  mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:n])
  ks = jax.random.split(jax.random.key(0), 4)
  D, E, I = args.hidden, args.experts, args.width
  x = jax.random.normal(ks[0], (args.tokens, D))
  router = jax.random.normal(ks[1], (D, E)) / np.sqrt(D)
  gate_up = jax.random.normal(ks[2], (E, D, 2, I)) / np.sqrt(D)
  down = jax.random.normal(ks[3], (E, I, D)) / np.sqrt(I)
  with sharding.use(rules, mesh):
    sizes = dict(mesh.shape)
    tok = jax.sharding.NamedSharding(mesh, rules.spec(("act_batch", None)))
    w_spec, _ = rules.resolve(("experts", "embed", "gate_up", "expert_mlp"), gate_up.shape, sizes)
    d_spec, _ = rules.resolve(("experts", "expert_mlp", "embed"), down.shape, sizes)
    put = jax.device_put
    x = put(x, tok)
    router = put(router, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    gate_up = put(gate_up, jax.sharding.NamedSharding(mesh, w_spec))
    down = put(down, jax.sharding.NamedSharding(mesh, d_spec))
    step = jax.jit(jax.value_and_grad(layer_loss, argnums=(0, 1, 2, 3)))
    compiled = step.lower(x, router, gate_up, down).compile()
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(x, router, gate_up, down))
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(x, router, gate_up, down))
      times.append(time.perf_counter() - t0)
  expert_bytes = gate_up.addressable_shards[0].data.nbytes + down.addressable_shards[0].data.nbytes
  return dict(n=n, expert_mb=expert_bytes / 2 ** 20,
              arg_mb=mem.argument_size_in_bytes / 2 ** 20 if mem else float("nan"),
              temp_mb=mem.temp_size_in_bytes / 2 ** 20 if mem else float("nan"),
              ms=1e3 * statistics.median(times))


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tokens", type=int, default=4096, help="global tokens per step")
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--experts", type=int, default=16)
  ap.add_argument("--width", type=int, default=512, help="expert width I")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--devices", default="1,2,4,8")
  args = ap.parse_args(argv)
  variants = [
      ("replicated", R.DATA_PARALLEL, lambda n: sharding.MeshConfig(data=n, fsdp=1)),
      ("ep dropless", R.EXPERT_PARALLEL, lambda n: sharding.MeshConfig(fsdp=1, expert=n)),
      ("ep capacity 1.25", dataclasses.replace(R.EXPERT_PARALLEL, dispatch=R.ExpertDispatch("capacity", 1.25)),
       lambda n: sharding.MeshConfig(fsdp=1, expert=n)),
  ]
  print(f"tokens {args.tokens}, D {args.hidden}, E {args.experts}, I {args.width}, top-1, float32, "
        f"{jax.device_count()} {jax.devices()[0].platform} devices, jax {jax.__version__}")
  print("| layer | devices | expert weights / device (MiB) | arguments / device (MiB) | temporaries / device (MiB) "
        "| fwd+bwd step (ms) |")
  print("|---|---|---|---|---|---|")
  for label, rules, mesh_of in variants:
    for n in (int(s) for s in args.devices.split(",")):
      r = measure(rules, mesh_of(n), n, args)
      print(f"| {label} | {n} | {r['expert_mb']:.1f} | {r['arg_mb']:.1f} | {r['temp_mb']:.1f} | {r['ms']:.1f} |",
            flush=True)


if __name__ == "__main__":
  main()
