"""Convert Llama 4 checkpoints between the HF safetensors layout and Orbax, streaming tensor by tensor.

  python -m tools.convert hf-to-orbax HF_DIR ORBAX_DIR [--dtype bfloat16] [--keep-fp8] [--overwrite] [--strict]
  python -m tools.convert orbax-to-hf ORBAX_DIR HF_DIR [--max-shard-size 5GB] [--dtype bfloat16] [--overwrite]
      [--strict]
  python -m tools.convert hf-to-orbax HF_DIR ORBAX_DIR --quantize int8|int4 [--group-size 128] [--method rtn|clip]
  python -m tools.convert quantize ORBAX_DIR OUT_DIR --quantize int8|int4 [--group-size 128]
      [--method rtn|clip|gptq] [--calib FILE.txt] [--calib-tokens 512] [--quant-targets experts,mlp]

hf-to-orbax reads plain (fp32/bf16/fp16) checkpoints and the FP8 releases (compressed-tensors, fbgemm_fp8;
dequantised to --dtype, default bfloat16, unless --keep-fp8). orbax-to-hf takes a converted model directory,
a training run or Checkpointer directory (latest step) or one of its step directories. Output is atomic; an existing
destination is replaced only with --overwrite; an output that is, lies inside or contains the input is refused.
NaN / inf weights are converted with a warning naming the tensor; --strict refuses them. Pickle weights
(.bin / .pth) are never loaded. Exit status 1 with a message naming the file and key on a bad checkpoint or an
unwritable destination. The library is `llama4_jax.io.convert`.
--quantize stores the routed experts as weight-only integers for serving (int8 per output channel, int4 in groups
of --group-size along the contracted axis; `llama4_jax.io.quantize`); `quantize` does it to an existing float
model directory, training step or run (`llama4_jax.apps.quantize`; --calib weights the clip search with the
routed experts' inputs on a text file; --method gptq needs --calib: GPTQ with those inputs' second moments).
orbax-to-hf exports a quantised model dequantised (floats in --dtype).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion runs on the host; no accelerator needed

from llama4_jax.apps import quantize  # noqa: E402
from llama4_jax.config import ConfigError  # noqa: E402
from llama4_jax.io import convert  # noqa: E402
from llama4_jax.io.atomic import WriteError  # noqa: E402
from llama4_jax.io.validate import CheckpointError  # noqa: E402

_DTYPES = ("float32", "bfloat16", "float16")


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
  common.add_argument("--strict", action="store_true",
                      help="refuse tensors holding NaN or inf values (default: convert them with a warning)")
  ap = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__.split("\n\n")[0])
  sub = ap.add_subparsers(dest="command", required=True)
  a = sub.add_parser("hf-to-orbax", parents=[common], help="HF safetensors directory -> Orbax model directory")
  a.add_argument("src", metavar="HF_DIR")
  a.add_argument("dst", metavar="ORBAX_DIR")
  a.add_argument("--dtype", choices=_DTYPES, help="stored dtype (default: the checkpoint's; bfloat16 for FP8)")
  a.add_argument("--keep-fp8", action="store_true",
                 help="store the routed experts of an FP8 checkpoint as float8_e4m3fn + per-column scales")
  a.add_argument("--overwrite", action="store_true", help="replace an existing ORBAX_DIR once the new one is complete")
  _quant_args(a)
  b = sub.add_parser("orbax-to-hf", parents=[common],
                     help="Orbax model (or training checkpoint) -> HF safetensors directory")
  b.add_argument("src", metavar="ORBAX_DIR")
  b.add_argument("dst", metavar="HF_DIR")
  b.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
  b.add_argument("--dtype", choices=_DTYPES, help="tensor dtype (default: the stored one)")
  b.add_argument("--overwrite", action="store_true", help="replace an existing HF_DIR once the new one is complete")
  c = sub.add_parser("quantize", parents=[common],
                     help="float Orbax model (or training checkpoint) -> int8 / int4 model directory")
  c.add_argument("src", metavar="ORBAX_DIR")
  c.add_argument("dst", metavar="OUT_DIR")
  c.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR once the new one is complete")
  _quant_args(c, required=True)
  c.add_argument("--calib", metavar="FILE",
                 help="text file: calibration inputs of the clip search (weights) or of gptq (required there)")
  c.add_argument("--quant-targets", default="experts",
                 help="comma-separated: experts (routed), mlp (shared expert and dense MLPs); default experts")
  c.add_argument("--calib-tokens", type=int, default=512, help="calibration tokens read from --calib (default 512)")
  return ap


def _quant_args(p: argparse.ArgumentParser, required: bool = False) -> None:
  p.add_argument("--quantize", choices=("int8", "int4"), required=required,
                 help="routed experts as weight-only integers + scales (serving; orbax-to-hf dequantises)")
  p.add_argument("--group-size", type=int, default=128, help="int4 group along the contracted axis (default 128)")
  p.add_argument("--method", choices=("rtn", "clip", "gptq"), default="rtn",
                 help="rtn: round to nearest, per-group absmax; clip: per-group clipping search; gptq: GPTQ with "
                      "calibration statistics (quantize --calib only) (default rtn)")


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
  try:
    if args.command == "hf-to-orbax":
      stats = convert.hf_to_orbax(args.src, args.dst, dtype=args.dtype, keep_fp8=args.keep_fp8,
                                  overwrite=args.overwrite, strict=args.strict, quantize=args.quantize,
                                  group_size=args.group_size, method=args.method)
    elif args.command == "quantize":
      stats = quantize.quantize_model(args.src, args.dst, args.quantize, args.group_size, args.method, args.calib,
                                      args.calib_tokens, targets=tuple(args.quant_targets.split(",")),
                                      overwrite=args.overwrite)
    else:
      stats = convert.orbax_to_hf(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                  overwrite=args.overwrite, strict=args.strict)
  except (CheckpointError, ConfigError, WriteError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if not args.quiet:
    print(f"{args.command}: {os.path.abspath(args.dst)}: {stats}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
