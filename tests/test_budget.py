"""`run.time_budget_s`: the length arithmetic and the `TimeBudget` fits (probe, refits at evaluations,
bounds, the multi-host decision), on a fake clock; no model is built."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import pytest

from llama4_jax import config as C
from llama4_jax.train import budget
from llama4_jax.train import config as tc
from llama4_jax.train.metrics import Progress
from llama4_jax.train.state import TrainState


def _exp(**run) -> tc.Experiment:
  defaults = dict(steps=1000, time_budget_s=600.0, final_reserve_s=60.0, eval_every=100, eval_batches=3)
  return tc.Experiment(name="budget", model=C.TINY_SCOUT, run=tc.RunConfig(**{**defaults, **run}))


def _state(total: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), total_steps=jnp.asarray(total, jnp.int32), params={},
                    frozen={}, bias={}, opt_state=(), rng=jax.random.key_data(jax.random.key(0)))


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self) -> float:
    return self.now


def _budget(exp, start=0, resumed=False, **kw):
  clock, bar = _Clock(), Progress(exp.run.steps, start, stream=io.StringIO())
  b = budget.TimeBudget(exp, start, 0.0, resumed, jax.sharding.SingleDeviceSharding(jax.devices()[0]), bar,
                        clock=clock, **kw)
  return b, clock, bar


def test_budgeted_steps_fits_the_steps_into_what_is_left():
  exp = _exp()
  # 600 - 40 elapsed - 60 reserve = 500 s left
  assert budget.budgeted_steps(exp, 6, 1.0, 40.0) == 6 + 500
  assert budget.budgeted_steps(exp, 6, 0.01, 40.0) == 1000  # capped by run.steps
  assert budget.budgeted_steps(exp, 6, 1.0, 700.0) == 7  # already over: one last step at the floor rate
  assert budget.budgeted_steps(exp, 1000, 1.0, 700.0) == 1000
  # the first fit counts the periodic validation batches (3 per 100 steps, each a third of a train step)
  assert budget.probe_step_s(exp, 1.0) == pytest.approx(1.01)
  assert budget.probe_step_s(_exp(eval_every=0), 1.0) == 1.0


def test_the_probe_fixes_the_length_from_the_timed_steps():
  exp = _exp()
  b, clock, bar = _budget(exp)
  probe = 1 + budget.BUDGET_PROBE_STEPS
  state = _state(exp.run.steps)
  clock.now = 30.0
  assert b.fit_after_step(state, probe - 1, [1.0] * 4, 1000) == (state, 1000)  # not yet
  assert b.fit_after_eval(state, probe - 1, 1000) == (state, 1000)  # no refit before the probe
  clock.now = 40.0
  state, total = b.fit_after_step(state, probe, [1.0] * 5, 1000)
  assert total == probe + int(500 // 1.01) == 501
  assert int(state.total_steps) == total and bar.total == total
  assert "1.00s per step measured -> 501 steps in all" in bar.stream.getvalue()
  assert b.fit_after_step(state, probe + 1, [1.0] * 6, total) == (state, total)  # the probe fits once


def test_evaluations_refit_from_the_wall_time_since_the_probe():
  exp = _exp()
  b, clock, bar = _budget(exp)
  probe = 1 + budget.BUDGET_PROBE_STEPS
  clock.now = 40.0
  state, total = b.fit_after_step(_state(1000), probe, [1.0] * 5, 1000)
  assert b.fit_after_eval(state, probe, total) == (state, total)  # no step timed since the probe
  clock.now = 40.0 + 94 * 2.0  # 2 s per step since the probe, evaluations included
  state, total = b.fit_after_eval(state, 100, total)
  assert total == 100 + (600 - 228 - 60) // 2.0 == 256
  assert int(state.total_steps) == 256 and bar.total == 256


def test_a_fit_is_never_below_the_next_step_nor_above_run_steps():
  exp = _exp()
  b, clock, _ = _budget(exp)
  probe = 1 + budget.BUDGET_PROBE_STEPS
  clock.now = 1.0
  state, total = b.fit_after_step(_state(1000), probe, [1e-4] * 5, 1000)
  assert total == 1000  # everything fits: run.steps
  clock.now = 5000.0  # far over the budget
  state, total = b.fit_after_eval(state, 200, total)
  assert total == 201 and int(state.total_steps) == 201


def test_the_probe_follows_the_start_step_and_resumed_runs_keep_their_length():
  exp = _exp()
  b, clock, _ = _budget(exp, start=40)
  clock.now = 40.0
  state = _state(1000)
  assert b.fit_after_step(state, 1 + budget.BUDGET_PROBE_STEPS, [1.0] * 5, 1000) == (state, 1000)
  assert b.fit_after_step(state, 41 + budget.BUDGET_PROBE_STEPS, [1.0] * 5, 1000)[1] == 541
  for b, _, _ in (_budget(exp, resumed=True), _budget(_exp(time_budget_s=0.0))):
    assert b.fit_after_step(state, 1 + budget.BUDGET_PROBE_STEPS, [1.0] * 5, 1000) == (state, 1000)
    assert b.fit_after_eval(state, 100, 1000) == (state, 1000)


def test_process_0_decides_the_length():
  """Every host must run the same number of steps: the broadcast value, not the local fit, is applied."""
  exp = _exp()
  asked = []
  b, clock, bar = _budget(exp, agree=lambda n: asked.append(n) or 77)
  clock.now = 40.0
  state, total = b.fit_after_step(_state(1000), 1 + budget.BUDGET_PROBE_STEPS, [1.0] * 5, 1000)
  assert asked == [501] and total == 77 and int(state.total_steps) == 77 and bar.total == 77
  assert budget.process0_decides(123) == 123  # one process: its own
