"""`run.time_budget_s`: the run's length fitted to a wall-clock budget.

With a budget (and not resuming: a resumed run keeps the length its checkpoint holds) the length is fitted
  1. once after the probe, the first `BUDGET_PROBE_STEPS` steps timed after the compiling one: from their
     mean time (`probe_step_s`, periodic validation passes added),
  2. again at each periodic evaluation after it: from the wall time per step measured since the probe
     (evaluations and checkpoints included).
Each fit is `budgeted_steps` (at least one more step, at most `run.steps`); with several processes, process
0's clock decides, so that every host runs the same number of steps. The fit goes into the state's
`total_steps`, where the learning-rate schedule ends (a traced value: no recompilation).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llama4_jax.train.config import Experiment
from llama4_jax.train.metrics import Progress
from llama4_jax.train.state import TrainState

BUDGET_PROBE_STEPS = 5  # steps timed (after the compiling one) before `run.time_budget_s` first fixes the length


def budgeted_steps(exp: Experiment, step: int, per_step_s: float, elapsed_s: float) -> int:
  """The run's length under `run.time_budget_s`: `step` plus as many steps of `per_step_s` (wall time per
  step, periodic evaluations and checkpoints included) as fit in what is left of the budget after
  `run.final_reserve_s` (final evaluation, checkpoint, sample); at most `run.steps`. Called after step `step`
  ran, so at least one more step (run on the refitted schedule's last, floor learning rate) when the budget
  is already spent."""
  r = exp.run
  left = r.time_budget_s - elapsed_s - r.final_reserve_s
  return int(min(r.steps, max(step + 1, step + left // per_step_s)))


def probe_step_s(exp: Experiment, train_step_s: float) -> float:
  """Wall time per step predicted from the first train steps alone: the periodic validation passes
  added (a validation batch costs about a third of a train step)."""
  r = exp.run
  return train_step_s * (1.0 + (r.eval_batches / (3.0 * r.eval_every) if r.eval_every else 0.0))


def with_total_steps(state: TrainState, n: int, sharding) -> TrainState:
  """`state` with the run's length (where the learning-rate schedule ends) set to `n`, placed by `sharding`."""
  return dataclasses.replace(state, total_steps=jax.device_put(jnp.asarray(n, jnp.int32), sharding))


def process0_decides(n: int) -> int:
  """`n` as process 0 computed it, on every process."""
  if jax.process_count() > 1:
    n = int(multihost_utils.broadcast_one_to_all(np.int32(n)))
  return n


class TimeBudget:
  """Fits the run's length to `run.time_budget_s` (see the module docstring); does nothing without a budget
  or when resuming. `fit_after_step` and `fit_after_eval` take and return (state, run length)."""

  def __init__(self, exp: Experiment, start: int, t_start: float, resumed: bool, total_steps_sharding,
               progress: Progress | None = None, clock: Callable[[], float] = time.perf_counter,
               agree: Callable[[int], int] = process0_decides):
    """`start`: the step the loop starts from; `t_start`: the run's start on `clock`; `total_steps_sharding`:
    the placement of `TrainState.total_steps`; `progress`: the bar whose total follows the fits (process 0)."""
    self.exp, self.t_start, self.clock, self.agree = exp, t_start, clock, agree
    self.enabled = bool(exp.run.time_budget_s) and not resumed
    self.probe_step = start + 1 + BUDGET_PROBE_STEPS
    self.sharding = total_steps_sharding
    self.progress = progress
    self.t_probe: float | None = None  # when the probe fit was made (None: not yet, or no budget)

  def fit_after_step(self, state: TrainState, step: int, step_times: list[float],
                     total: int) -> tuple[TrainState, int]:
    """At the probe's last step: the first fit, from the mean of `step_times` (the timed train steps)."""
    if not self.enabled or step != self.probe_step:
      return state, total
    self.t_probe = self.clock()
    mean_s = float(np.mean(step_times))
    state, total = self._set(state, budgeted_steps(self.exp, step, probe_step_s(self.exp, mean_s),
                                                   self.t_probe - self.t_start))
    if self.progress:
      r = self.exp.run
      self.progress.message(f"[{self.exp.name}] time budget {r.time_budget_s:.0f}s: {mean_s:.2f}s per "
                            f"step measured -> {total} steps in all (at most run.steps={r.steps}); refitted "
                            f"at each evaluation")
    return state, total

  def fit_after_eval(self, state: TrainState, step: int, total: int) -> tuple[TrainState, int]:
    """After a periodic evaluation past the probe: a refit from the wall time per step since the probe."""
    if self.t_probe is None or step <= self.probe_step:
      return state, total
    now = self.clock()
    per_step_s = (now - self.t_probe) / (step - self.probe_step)
    return self._set(state, budgeted_steps(self.exp, step, per_step_s, now - self.t_start))

  def _set(self, state: TrainState, n: int) -> tuple[TrainState, int]:
    """Process 0's length `n` into the state's schedule and the progress bar."""
    n = self.agree(n)
    state = with_total_steps(state, n, self.sharding)
    if self.progress:
      self.progress.total = n
    return state, n
