"""Convert Llama 4 checkpoints between the HF safetensors layout and Orbax, streaming tensor by tensor.

  python -m tools.convert hf-to-orbax HF_DIR ORBAX_DIR [--dtype bfloat16] [--keep-fp8] [--overwrite]
  python -m tools.convert orbax-to-hf ORBAX_DIR HF_DIR [--max-shard-size 5GB] [--dtype bfloat16] [--overwrite]

hf-to-orbax reads plain (fp32/bf16/fp16) checkpoints and the FP8 releases (compressed-tensors, fbgemm_fp8;
dequantised to --dtype, default bfloat16, unless --keep-fp8). orbax-to-hf takes a converted model directory,
a training run or Checkpointer directory (latest step) or one of its step directories. Output is atomic; an existing
destination is replaced only with --overwrite. Exit status 1 with a message naming the file and key on a bad
checkpoint or an unwritable destination. The library is `llama4_jax.io.convert`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion runs on the host; no accelerator needed

from llama4_jax.config import ConfigError  # noqa: E402
from llama4_jax.io import convert  # noqa: E402
from llama4_jax.io.atomic import WriteError  # noqa: E402
from llama4_jax.io.validate import CheckpointError  # noqa: E402

_DTYPES = ("float32", "bfloat16", "float16")


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
  ap = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__.split("\n\n")[0])
  sub = ap.add_subparsers(dest="command", required=True)
  a = sub.add_parser("hf-to-orbax", parents=[common], help="HF safetensors directory -> Orbax model directory")
  a.add_argument("src", metavar="HF_DIR")
  a.add_argument("dst", metavar="ORBAX_DIR")
  a.add_argument("--dtype", choices=_DTYPES, help="stored dtype (default: the checkpoint's; bfloat16 for FP8)")
  a.add_argument("--keep-fp8", action="store_true",
                 help="store the routed experts of an FP8 checkpoint as float8_e4m3fn + per-column scales")
  a.add_argument("--overwrite", action="store_true", help="replace an existing ORBAX_DIR once the new one is complete")
  b = sub.add_parser("orbax-to-hf", parents=[common],
                     help="Orbax model (or training checkpoint) -> HF safetensors directory")
  b.add_argument("src", metavar="ORBAX_DIR")
  b.add_argument("dst", metavar="HF_DIR")
  b.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
  b.add_argument("--dtype", choices=_DTYPES, help="tensor dtype (default: the stored one)")
  b.add_argument("--overwrite", action="store_true", help="replace an existing HF_DIR once the new one is complete")
  return ap


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
  try:
    if args.command == "hf-to-orbax":
      stats = convert.hf_to_orbax(args.src, args.dst, dtype=args.dtype, keep_fp8=args.keep_fp8,
                                  overwrite=args.overwrite)
    else:
      stats = convert.orbax_to_hf(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                  overwrite=args.overwrite)
  except (CheckpointError, ConfigError, WriteError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if not args.quiet:
    print(f"{args.command}: {os.path.abspath(args.dst)}: {stats}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
