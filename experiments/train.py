"""Train or fine-tune a Llama 4 from an experiment config.

  python -m experiments.train --config cpu_default                      # what `make train` runs
  python -m experiments.train --config cpu_default --set optim.lr=1e-3 run.steps=200
  python -m experiments.train --config cpu_default --resume             # continue runs/<name>/ exactly
  python -m experiments.train --config scout_tpu --init-from /ckpt/scout-orbax --freeze-vision

--config is a module of experiments/configs/ or a path to a .py file defining `get_config()`.
--set takes `field.path=value` items (any field of llama4_jax.train.config.Experiment; see there).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys


def load_config(name: str):
  """`get_config()` of experiments/configs/<name>.py, or of the file `name`."""
  if name.endswith(".py"):
    spec = importlib.util.spec_from_file_location(f"experiment_config_{os.path.basename(name)[:-3]}", name)
    if spec is None or not os.path.exists(name):
      raise FileNotFoundError(f"{name}: no such config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  else:
    try:
      module = importlib.import_module(f"experiments.configs.{name}")
    except ModuleNotFoundError:
      here = os.path.join(os.path.dirname(__file__), "configs")
      known = sorted(f[:-3] for f in os.listdir(here) if f.endswith(".py") and not f.startswith("_"))
      raise SystemExit(f"unknown config {name!r}; configs: {known} (or a path to a .py file)") from None
  return module.get_config()


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="cpu_default", help="experiment config (default: cpu_default)")
  ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                  help="override config fields, e.g. optim.lr=1e-3 model.text.num_hidden_layers=8")
  ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run directory")
  ap.add_argument("--init-from", metavar="ORBAX_DIR",
                  help="fine-tune from a converted checkpoint (python -m tools.convert hf-to-orbax ...)")
  ap.add_argument("--freeze-vision", action="store_true", help="no updates to the vision tower and projector")
  ap.add_argument("--print-config", action="store_true", help="print the resolved experiment and exit")
  dist = ap.add_argument_group("multi-host without a cluster manager (TPU VMs, SLURM and Open MPI are detected)")
  dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (jax.distributed)")
  dist.add_argument("--num-processes", type=int, help="number of processes (one per host)")
  dist.add_argument("--process-id", type=int, help="this process's index, 0 .. num_processes - 1")
  args = ap.parse_args(argv)

  from llama4_jax.train import config as tc

  exp = load_config(args.config)
  overrides = list(args.overrides)
  if args.init_from:
    overrides.append(f"run.init_from={args.init_from}")
  if args.freeze_vision:
    overrides.append("run.freeze_vision=true")
  try:
    exp = tc.apply_overrides(exp, overrides)
  except tc.OverrideError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    print(json.dumps(tc.to_dict(exp), indent=2))
    return 0

  if args.coordinator or args.num_processes is not None or args.process_id is not None:
    import sharding

    sharding.initialize_distributed(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                    process_id=args.process_id)

  from llama4_jax.train.loop import TrainingDiverged, run

  try:
    run(exp, resume=args.resume)
  except TrainingDiverged as e:
    print(f"\nerror: {e}", file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
