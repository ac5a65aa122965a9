"""Step checkpoints of a training run: parameters, optimizer state, data-iterator state and metadata.

A `Checkpointer` directory holds one subdirectory per step with the items `params` (the pure dict of the
parameters, the layout of a model directory's `params/`, see `targets`), `opt_state` (Orbax StandardSave),
`data_state` and `meta` (JSON; `meta` always has "step", and "config" the HF config dict of the model).
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from llama4_jax.io import targets

ITEMS = ("params", "opt_state", "data_state", "meta")


class Checkpointer:
  """Step checkpoints of a training run (Orbax `CheckpointManager`): parameters, optimizer state, the
  data-iterator state (a JSON-able dict, e.g. grain's `get_state()`) and small JSON metadata.

  Saves are asynchronous by default (`save` returns once arrays are copied off the accelerator; the write
  continues in the background; `wait()` blocks until it is on disk). Only the last `keep` steps are kept
  (`None`: all). A step directory appears only once complete (Orbax writes a temporary directory and renames
  it), so a crash mid-save leaves the previous steps intact; leftovers are removed on the next start."""

  def __init__(self, directory: str | os.PathLike, keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True)
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "data_state": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def save(self, step: int, params: Any, opt_state: Any = None, data_state: dict | None = None,
           meta: dict | None = None, force: bool = False) -> bool:
    """Saves one step; returns whether a save was started (False if the manager's policy skipped it).
    `params`/`opt_state`: pytrees of arrays (an `nnx.State` inside is stored as its pure dict).
    `meta` is stored with "step" added; put `config.to_hf(cfg)` under "config" so that
    `tools.convert orbax-to-hf` can export the step."""
    args = {"params": ocp.args.StandardSave(targets.to_pure(params)),
            "meta": ocp.args.JsonSave({**(meta or {}), "step": int(step)})}
    if opt_state is not None:
      args["opt_state"] = ocp.args.StandardSave(targets.to_pure(opt_state))
    if data_state is not None:
      args["data_state"] = ocp.args.JsonSave(data_state)
    return bool(self._mngr.save(int(step), args=ocp.args.Composite(**args), force=force))

  def restore(self, step: int | None = None, params_target: Any = None, opt_target: Any = None) -> dict:
    """{"step", "params", "opt_state", "data_state", "meta"} of `step` (default: the latest). Targets are
    abstract trees (`abstract_target`) giving shapes, dtypes (cast on read) and shardings; None restores as
    saved on the default device. Items that step does not have come back as None."""
    self.wait()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
    step_dir = os.path.join(self.directory, str(step))
    if step not in self.all_steps():
      raise FileNotFoundError(f"{step_dir}: no checkpoint for step {step} (steps: {self.all_steps()})")
    present = [i for i in ITEMS if os.path.isdir(os.path.join(step_dir, i))]
    md = self._mngr.item_metadata(step)
    args = {}
    for item, target in (("params", params_target), ("opt_state", opt_target)):
      if item in present:
        tgt = targets.pure_target(target) if target is not None else targets.default_target(tree_of(md[item]))
        args[item] = ocp.args.StandardRestore(tgt)
    for item in ("data_state", "meta"):
      if item in present:
        args[item] = ocp.args.JsonRestore()
    r = self._mngr.restore(step, args=ocp.args.Composite(**args))
    out = {"step": step, "params": None, "opt_state": None, "data_state": None, "meta": None}
    for item in present:
      out[item] = r[item]
    if params_target is not None and out["params"] is not None:
      out["params"] = targets.like(params_target, out["params"])
    if opt_target is not None and out["opt_state"] is not None:
      out["opt_state"] = targets.like(opt_target, out["opt_state"])
    return out

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def tree_of(item_metadata: Any) -> Any:
  """The tree of per-leaf metadata inside what Orbax returns for a StandardSave item."""
  return getattr(item_metadata, "tree", item_metadata)


def read_meta(step_dir: str) -> dict:
  """The `meta` item of one step directory."""
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as c:
    return c.restore(os.path.join(os.path.abspath(step_dir), "meta"))
