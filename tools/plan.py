"""Per-device memory plan (parameters, gradients, AdamW state, fp32 master, activation estimate).

  python -m tools.plan --preset scout --mesh fsdp=8 --rules fsdp --dtype bfloat16
  python -m tools.plan --preset scout,maverick --hardware 8xh100,v5p-128,v6e-256   # choose a mesh per target
  python -m tools.plan --serve ...                                                  # serving: no optimizer
  python -m tools.plan --serve --quant int4 [--group-size 128] [--quant-targets experts,mlp] [--max-context]
      [--kv-cache int8]                                                             # int8 KV cache
  python -m tools.plan --lora-rank 16 [--lora-targets q,k,v,o] [--quant int4 --quant-targets experts,mlp]
                                                                                    # LoRA / QLoRA training

With --mesh, the given layout is planned (--rules picks the preset, default fsdp). Without it, every
--hardware target gets the layout `llama4_jax.apps.plan.choose_mesh` picks. The activation formula is in
`llama4_jax/apps/plan.py`. Nothing is allocated: shapes come from `jax.eval_shape`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # planning needs no accelerator

from llama4_jax import config as C  # noqa: E402
from llama4_jax.apps import plan as planner  # noqa: E402
from llama4_jax.model import llama4  # noqa: E402
from llama4_jax.train import lora as lora_lib  # noqa: E402
from llama4_jax.train.config import LoraConfig  # noqa: E402
from sharding.mesh import MeshConfig  # noqa: E402
from sharding.rules import PRESETS as RULES  # noqa: E402

_COLS = ("model", "target", "mode", "rules", "mesh", "params", "adapters", "grads", "adam m+v", "master", "acts",
         "total", "HBM", "fits")


def _gib(x: float) -> str:
  return f"{x / planner.GiB:.1f}"


def _row(model: str, target: str, hbm: float | None, work: planner.Workload, p: planner.MemoryPlan,
         mode: str = "") -> tuple[str, ...]:
  mesh = ",".join(f"{a}={n}" for a, n in p.mesh.items())
  fits = "-" if hbm is None else ("yes" if p.fits(hbm) else "no")
  adapters = f"{p.adapters / 2 ** 20:.1f}M" if p.adapters else "-"  # MiB: adapters are small
  return (model, target, mode or ("train" if work.train else "serve"), p.rules, mesh, _gib(p.params), adapters,
          _gib(p.grads), _gib(p.optimizer), _gib(p.master), _gib(p.activations), _gib(p.total),
          "-" if hbm is None else f"{hbm:.0f}", fits)


def table(rows: list[tuple[str, ...]]) -> str:
  widths = [max(len(r[i]) for r in [_COLS, *rows]) for i in range(len(_COLS))]
  fmt = " | ".join(f"{{:{w}}}" for w in widths)
  lines = [fmt.format(*_COLS), "-+-".join("-" * w for w in widths)]
  return "\n".join([*lines, *(fmt.format(*r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="scout,maverick", help=f"model presets, comma-separated: {sorted(C.PRESETS)}")
  ap.add_argument("--mesh", help="axis sizes, e.g. fsdp=8 or data=2,expert=4 (unnamed axes are 1)")
  ap.add_argument("--rules", default="fsdp", help=f"sharding preset with --mesh: {sorted(RULES)}")
  ap.add_argument("--hardware", default="8xh100,v5p-128,v6e-256",
                  help=f"targets without --mesh: {sorted(planner.HARDWARE)}")
  ap.add_argument("--dtype", default="bfloat16", help="parameter and activation dtype")
  ap.add_argument("--batch", type=int, help="global sequences per step (default: one per device)")
  ap.add_argument("--seq", type=int, default=8192, help="tokens per sequence")
  ap.add_argument("--remat", default="full", choices=("none", "full", "dots", "minimal"))
  ap.add_argument("--attention", default="auto", choices=C.ATTENTION_IMPLS,
                  help="Policy.attention_impl: auto / blockwise / cudnn / splash keep no T x S scores; xla keeps "
                       "chunk-local ones, dense all")
  ap.add_argument("--prefill-chunk", type=int, default=0,
                  help="with --serve: tokens per forward of a sliced prefill (0: the whole prompt at once)")
  ap.add_argument("--serve", action="store_true", help="serving: parameters + forward activations + KV cache")
  ap.add_argument("--kv-cache", choices=("float32", "bfloat16", "int8"),
                  help="with --serve: KV cache dtype (default: --dtype); int8: per-token-per-head float32 scales")
  ap.add_argument("--no-master", action="store_true", help="no fp32 master copy of low-precision parameters")
  ap.add_argument("--expert-fp8", action="store_true",
                  help="with --serve: routed experts held in FP8 + scales (Policy.expert_fp8, a --keep-fp8 checkpoint)")
  ap.add_argument("--quant", choices=("int8", "int4"),
                  help="with --serve: weight-only integer weights + scales at their real bytes (Policy.quant)")
  ap.add_argument("--group-size", type=int, default=128, help="--quant int4 group along the contracted axis")
  ap.add_argument("--quant-targets", default="experts", help="--quant: experts and/or mlp (shared + dense MLPs)")
  ap.add_argument("--quant-scale-dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--max-context", action="store_true",
                  help="with --serve and --hardware: also the longest sequence that fits (batch --batch or 1)")
  ap.add_argument("--lora-rank", type=int, default=0,
                  help="plan LoRA training of this rank: the base frozen (no grads / optimizer state), adapters "
                       "trained; with --quant or --expert-fp8 the base stays in that form (QLoRA)")
  ap.add_argument("--lora-targets", default="q,k,v,o", help=f"--lora-rank: adapted weights, of {lora_lib.TARGETS}")
  args = ap.parse_args(argv)
  if args.lora_rank and args.serve:
    ap.error("--lora-rank plans training: drop --serve")
  if args.expert_fp8 and not (args.serve or args.lora_rank):
    ap.error("--expert-fp8 is for serving (--serve) or a frozen LoRA base (--lora-rank): FP8-stored experts are "
             "not trained in full")
  if args.quant and not (args.serve or args.lora_rank):
    ap.error("--quant is for serving (--serve) or a frozen LoRA base (--lora-rank, QLoRA): quantised weights are "
             "not trained in full")
  lora = LoraConfig(targets=tuple(args.lora_targets.split(",")), rank=args.lora_rank) if args.lora_rank else None
  mode = f"lora r={args.lora_rank}" if lora else ""
  quant = {} if not args.quant else dict(quant=args.quant, quant_group=args.group_size,
                                         quant_targets=tuple(args.quant_targets.split(",")),
                                         quant_scale_dtype=args.quant_scale_dtype)

  policy = C.Policy(param_dtype=args.dtype, dtype=args.dtype, matmul_precision="default",
                    expert_fp8=args.expert_fp8, attention_impl=args.attention, **quant)
  base = planner.Workload(seq=args.seq, train=not args.serve, remat=args.remat, master_fp32=not args.no_master,
                           prefill_chunk=args.prefill_chunk, kv_cache_dtype=args.kv_cache or "")
  rows, notes = [], []
  for name in args.preset.split(","):
    cfg = C.PRESETS[name.strip()]
    abstract = llama4.abstract(cfg, policy)
    if args.mesh:
      mesh = MeshConfig.parse(args.mesh)
      if -1 in mesh.sizes_dict().values():
        ap.error("--mesh needs explicit sizes (no -1): the planner has no devices to fill with")
      devices = math.prod(mesh.sizes_dict().values())
      work = dataclasses.replace(base, batch=args.batch or devices)
      p = planner.plan(cfg, policy, RULES[args.rules], mesh, work, abstract=abstract, lora=lora)
      rows.append(_row(name, f"{devices} devices", None, work, p, mode))
      notes.extend(p.notes)
      continue
    for hw_name in args.hardware.split(","):
      if hw_name.strip() not in planner.HARDWARE:
        ap.error(f"--hardware {hw_name.strip()!r}: unknown target; targets: {sorted(planner.HARDWARE)}")
      hw = planner.HARDWARE[hw_name.strip()]
      work = dataclasses.replace(base, batch=args.batch or hw.devices)
      _, _, p = planner.choose_mesh(cfg, policy, hw, work, strict=False, abstract=abstract, lora=lora)  # smallest
      rows.append(_row(name, hw.name, hw.hbm_gib, work, p, mode))  # plan if none fits
      notes.extend(p.notes)
      if args.max_context and args.serve:
        n, _ = planner.longest_context(cfg, policy, hw, dataclasses.replace(work, batch=args.batch or 1))
        notes.append(f"{name} on {hw.name}: longest context that fits (batch {args.batch or 1}, prefill chunk "
                     f"{args.prefill_chunk or 'none'}): {n} tokens")
  print(f"GiB per device; dtype {args.dtype}; seq {args.seq}; remat {args.remat}; attention {args.attention}; "
        f"{'quant ' + args.quant + ' (' + args.quant_targets + ') ; ' if args.quant else ''}"
        f"{'KV cache ' + args.kv_cache + '; ' if args.kv_cache and args.serve else ''}"
        f"{f'LoRA rank {lora.rank} on {args.lora_targets}; ' if lora else ''}"
        f"batch {'one sequence per device' if not args.batch else args.batch}")
  print(table(rows))
  for n in notes:
    print("note:", n)
  return 0


if __name__ == "__main__":
  sys.exit(main())
