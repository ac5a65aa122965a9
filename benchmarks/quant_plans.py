"""Serving memory plans of Scout and Maverick with bf16 / fp8 / int8 / int4 routed experts (`tools.plan --serve`
with `--expert-fp8` / `--quant`), on 1x H100, 1x H200, 8x H100, v5e-8 and v6e-8, and the longest context each
fits at batch 1.

  python -m benchmarks.quant_plans              # markdown table on stdout (a few minutes of eval_shape)

Per target the planner's chosen serving layout (`apps.plan.choose_mesh`; the smallest plan when none fits),
8192-token sequences, one per device, prefill sliced in 8192-token forwards; parameters at their stored bytes
(int4: packed values + float32 scales per group of 128 along the contracted axis). "longest" bisects the
sequence length (steps of 1024, batch 1) up to the model's max_position_embeddings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from llama4_jax import config as C  # noqa: E402
from llama4_jax.apps import plan as planner  # noqa: E402

TARGETS = ("1xh100", "1xh200", "8xh100", "v5e-8", "v6e-8")


def variants(group: int) -> dict[str, C.Policy]:
  bf16 = C.Policy.for_dtype("bfloat16")
  q = dict(quant_group=group)
  return {"bf16": bf16, "fp8 experts": dataclasses.replace(bf16, expert_fp8=True),
          "int8 experts": dataclasses.replace(bf16, quant="int8", **q),
          "int4 experts": dataclasses.replace(bf16, quant="int4", **q),
          "int4 experts+MLPs": dataclasses.replace(bf16, quant="int4", quant_targets=("experts", "mlp"), **q)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--presets", default="scout,maverick")
  ap.add_argument("--targets", default=",".join(TARGETS))
  ap.add_argument("--seq", type=int, default=8192)
  ap.add_argument("--group-size", type=int, default=128)
  ap.add_argument("--no-longest", action="store_true", help="skip the longest-context bisection")
  args = ap.parse_args(argv)
  print("| model | weights | target | layout | params GiB/dev | total GiB/dev (8K) | fits | longest context (batch 1) "
        "|")
  print("|---|---|---|---|---:|---:|---|---:|")
  for name in args.presets.split(","):
    cfg = C.PRESETS[name]
    for vname, policy in variants(args.group_size).items():
      for t in args.targets.split(","):
        hw = planner.HARDWARE[t]
        work = planner.Workload(batch=hw.devices, seq=args.seq, train=False, prefill_chunk=8192)
        mesh, rules, p = planner.choose_mesh(cfg, policy, hw, work, strict=False)
        fits = p.fits(hw.hbm_gib)
        longest = "-"
        if fits and not args.no_longest:
          n, _ = planner.longest_context(cfg, policy, hw, dataclasses.replace(work, batch=1))
          longest = f"{n:,}"
        layout = f"{p.rules} " + ",".join(f"{a}={s}" for a, s in p.mesh.items())
        print(f"| {name} | {vname} | {hw.name} | {layout} | {p.params / planner.GiB:.1f} | "
              f"{p.total / planner.GiB:.1f} | {'yes' if fits else 'no'} | {longest} |", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
