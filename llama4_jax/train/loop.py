"""The training run: data, model, sharded steps, evaluation, checkpoints, metrics, the closing sample.

`run(exp)` writes into `exp.run.out_dir/exp.name/`:
  experiment.json       the experiment (after overrides)
  tokenizer.json        the trained BPE (source tokenizer "bpe")
  checkpoints/<step>/   Orbax checkpoints (every `ckpt_every` steps and at the end)
  metrics.jsonl         one record per train step ("split": "train"), per evaluation ("val") and at the end
  tensorboard/          the same scalars as TensorBoard event files, plus per-layer expert load
  loss.png              the loss curves
  summary.json          final figures (also returned)

Resuming (`resume=True`) restores parameters, optimizer state, selection biases, rng, step and the data
iterator from the latest checkpoint, so the run continues exactly as if it had never stopped.
A non-finite loss or gradient norm stops the run (`TrainingDiverged`) before anything is saved from it:
the last checkpoint on disk is the last good one.

Stages of `run`: `setup` (mesh, rules, corpus, the abstract train state and its shardings, the jitted
steps), `restore_or_init`, `Reporter` (records, progress bar, MFU), `budget.TimeBudget`
(`run.time_budget_s`), `train_loop`, `finish` (last checkpoint, final evaluation, sample), `summarize` and
`write_outputs`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sharding
from llama4_jax import config as config_lib
from llama4_jax.apps.generate import Sampling, generate_text
from llama4_jax.io import quantize
from llama4_jax.io.checkpointer import Checkpointer, read_meta
from llama4_jax.io.load import load, resolve
from llama4_jax.model import llama4
from llama4_jax.model.counting import ParamCount, count_params
from llama4_jax.model.text import enable_selection_bias
from llama4_jax.train import checkpoints, data, distill, lora, metrics, optim, plots
from llama4_jax.train import step as step_lib
from llama4_jax.train.budget import TimeBudget, with_total_steps
from llama4_jax.train.config import Experiment, to_dict
from llama4_jax.train.state import ModelParts, TrainState


class TrainingDiverged(RuntimeError):
  """The loss or the gradient norm became NaN/inf; the message names the step and the last good checkpoint."""


def model_config(exp: Experiment) -> tuple[config_lib.Llama4Config, str]:
  """The architecture: the experiment's, or that of the checkpoint given by `run.init_from` (any directory
  `llama4_jax.load` reads)."""
  if exp.run.init_from:
    source = resolve(exp.run.init_from)
    return source.config, source.describe()
  return exp.model, "experiment"


class DropMonitor:
  """Fraction of routed assignments dropped by a capacity-limited expert-parallel dispatch (reported through
  the `on_drop` callback of `sharding.use`); the dropless paths drop nothing and report 0."""

  def __init__(self):
    self.values: list[float] = []

  def on_drop(self, fraction: float) -> None:
    self.values.append(float(fraction))

  def take(self) -> float:
    v = float(np.mean(self.values)) if self.values else 0.0
    self.values.clear()
    return v


# --------------------------------------------------------------------------------------------------
# Setup


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
  """What the run needs, built before its first step."""

  exp: Experiment
  t_start: float  # the run's start (time.perf_counter)
  run_dir: str  # out_dir/name, absolute
  main: bool  # process 0: writes the files and the log
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  cfg: config_lib.Llama4Config  # the architecture (`model_config`)
  corpus: data.Corpus
  counts: ParamCount  # total and active parameters
  freeze: bool  # the vision tower and projector get no updates
  parts: ModelParts  # abstract templates of the model's variable groups
  tx: optax.GradientTransformation
  shardings: TrainState  # the placement of every part of the train state
  batch_sharding: jax.sharding.NamedSharding
  train_step: Callable  # jitted (state, batch) -> (state, metrics); donates the state
  eval_step: Callable  # jitted (state, batch) -> {"ce_sum", "tokens"}
  ck: Checkpointer
  it: Any  # the checkpointable train-batch iterator
  drops: DropMonitor
  distill: distill.Plan | None = None  # the teacher / precomputed logits of `exp.distill`


def setup(exp: Experiment, devices, log, t_start: float) -> Setup:
  """Mesh, rules, architecture, corpus (writes tokenizer.json, and experiment.json on process 0), the
  abstract train state with its shardings, the jitted steps, the checkpointer and the batch iterator."""
  exp = _with_base_policy(exp)
  if not exp.lora:  # a quantised / FP8 base trains only frozen, under LoRA adapters (QLoRA)
    quantize.refuse_training(exp.policy)
    if exp.policy.expert_fp8:
      raise ValueError("policy.expert_fp8: FP8-stored expert weights cannot be trained in full; train LoRA adapters "
                       "on them (set the experiment's lora), or train in full with policy.fp8='train'")
  run_dir = os.path.abspath(os.path.join(exp.run.out_dir, exp.name))
  mesh = sharding.make_mesh(exp.mesh, devices)  # first: multi-host runs initialise jax.distributed here
  main = jax.process_index() == 0
  os.makedirs(run_dir, exist_ok=True)
  rules = sharding.preset(exp.rules)
  cfg, cfg_source = model_config(exp)
  corpus = _load_corpus(exp, cfg, run_dir)
  counts = count_params(cfg, exp.policy)
  # the checks of LoRA targets, the run's kind and the teacher come before experiment.json is (re)written
  freeze = exp.run.freeze_vision and cfg.vision is not None
  parts, tx = _abstract_parts(exp, cfg, freeze)
  ck_dir = os.path.join(run_dir, "checkpoints")
  if os.path.isdir(ck_dir):
    with Checkpointer(ck_dir, keep=exp.run.keep) as existing:
      _check_same_kind(existing, exp)
  plan = distill.plan(exp, cfg, parts, corpus.tokenizer, rules, mesh) if exp.distill else None
  ck = Checkpointer(ck_dir, keep=exp.run.keep)
  if main:
    with open(os.path.join(run_dir, "experiment.json"), "w") as f:
      json.dump(to_dict(exp), f, indent=2)
    _log_setup(exp, corpus, cfg_source, counts, mesh, rules, log)
    if plan:
      log(f"[{exp.name}] {plan.describe()}")
    if exp.lora:
      log(f"[{exp.name}] LoRA rank {exp.lora.rank} alpha {exp.lora.alpha} on {', '.join(exp.lora.targets)}: "
          f"{len(parts.specs)} weights, {_size(parts.params) / 1e6:.3f}M trainable parameters")
  shardings = step_lib.state_shardings(parts, tx, rules, mesh)
  batch_sh = sharding.batch_sharding(rules, mesh, (exp.data.batch_size, exp.data.seq_len))
  train_step, eval_step = _jitted_steps(exp, cfg, parts, tx, shardings, batch_sh, plan)
  return Setup(exp=exp, t_start=t_start, run_dir=run_dir, main=main, mesh=mesh, rules=rules, cfg=cfg,
               corpus=corpus, counts=counts, freeze=freeze, parts=parts, tx=tx, shardings=shardings,
               batch_sharding=batch_sh, train_step=train_step, eval_step=eval_step, ck=ck,
               it=data.train_iterator(corpus, exp.data), drops=DropMonitor(), distill=plan)


def _with_base_policy(exp: Experiment) -> Experiment:
  """A LoRA run from `run.init_from` keeps the base as that directory stores it: a quantised (int8 / int4) or
  FP8-expert model directory switches the policy's storage fields on (QLoRA; a conflicting policy is a
  QuantError naming both). The experiment recorded in the run then says how its checkpoints hold the base."""
  if not (exp.lora and exp.run.init_from):
    return exp
  source = resolve(exp.run.init_from)
  info = source.info if source.kind == "model" else {}
  policy = quantize.policy_for(info, exp.policy, source.path)
  if info.get("fp8"):
    policy = dataclasses.replace(policy, expert_fp8=True)
  return dataclasses.replace(exp, policy=policy)


def _size(template) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.to_pure_dict(template)))


def _load_corpus(exp: Experiment, cfg: config_lib.Llama4Config, run_dir: str) -> data.Corpus:
  """The tokenised splits; fails if the tokenizer has more tokens than the model has embeddings."""
  corpus = data.load_corpus(exp.data, run_dir)
  vocab = corpus.tokenizer.vocab_size
  if vocab > cfg.text.vocab_size:
    raise ValueError(f"the tokenizer has {vocab} tokens but the model only {cfg.text.vocab_size} embeddings "
                     f"(set model.text.vocab_size >= {vocab})")
  return corpus


def _log_setup(exp: Experiment, corpus: data.Corpus, cfg_source: str, pc: ParamCount, mesh, rules, log) -> None:
  n_train = sum(len(e["tokens"]) for e in corpus.train)
  n_val = sum(len(e["tokens"]) for e in corpus.val)
  log(f"[{exp.name}] {corpus.description}; tokenizer {corpus.tokenizer.vocab_size} tokens; {n_train:,} train / "
      f"{n_val:,} validation tokens" + (f"; unigram baseline {corpus.unigram_baseline:.3f} nats/token"
                                        if corpus.unigram_baseline is not None else ""))
  log(f"[{exp.name}] model ({cfg_source}): {pc.total / 1e6:.2f}M parameters, {pc.active / 1e6:.2f}M active; "
      f"mesh {dict(mesh.shape)} rules {rules.name}; policy {exp.policy.param_dtype}/{exp.policy.dtype} "
      f"remat {exp.policy.remat}")


def _abstract_parts(exp: Experiment, cfg, freeze: bool) -> tuple[ModelParts, optax.GradientTransformation]:
  """The model's variable groups as abstract templates, and the optimizer over the trainable ones."""
  # Setup happens outside the sharding context (nnx.eval_shape there would place logical names on the
  # mesh); the jitted steps are traced inside it, at their first call.
  abstract_model = llama4.abstract(cfg, exp.policy)
  if exp.moe.bias_balancing:
    enable_selection_bias(abstract_model)
  if exp.lora:
    parts = lora.LoraParts.build(abstract_model, exp.lora)
  else:
    parts, *_ = ModelParts.split(abstract_model, freeze)
  return parts, optim.make(exp.optim, parts.params)


def _jitted_steps(exp: Experiment, cfg, parts: ModelParts, tx, shardings: TrainState,
                  batch_sh, plan: distill.Plan | None = None) -> tuple[Callable, Callable]:
  """(train step, eval step), jitted with the state's and the batch's shardings (traced at the first call).
  With distillation the train step also takes the teacher's parameters (bound here) or top-k batch keys."""
  k = cfg.text.num_experts_per_tok
  eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(parts, k), shardings, batch_sh)
  if plan is None:
    step_fn = step_lib.make_train_step(parts, tx, exp.optim, exp.moe, k, exp.optim.grad_accum)
    return step_lib.jit_train_step(step_fn, shardings, batch_sh), eval_step
  step_fn = step_lib.make_train_step(parts, tx, exp.optim, exp.moe, k, exp.optim.grad_accum, plan.terms_fn)
  jitted = step_lib.jit_train_step(step_fn, shardings, batch_sh, step_lib.BATCH_KEYS + plan.batch_keys,
                                   plan.aux_shardings)
  return functools.partial(_with_aux, jitted, plan.aux_args), eval_step


def _with_aux(jitted: Callable, aux: tuple, state: TrainState, batch: dict):
  return jitted(state, batch, *aux)


# --------------------------------------------------------------------------------------------------
# Restore or init


def _new_state(exp: Experiment, tx: optax.GradientTransformation, params: dict, frozen: dict,
               bias: dict) -> TrainState:
  """Step 0 of the run from its parameters."""
  key = jax.random.key_data(jax.random.key(exp.run.seed))
  return TrainState(step=jnp.zeros((), jnp.int32), total_steps=jnp.asarray(exp.run.steps, jnp.int32),
                    params=params, frozen=frozen, bias=bias, opt_state=tx.init(params), rng=key)


def _fresh_params(exp: Experiment, cfg, rules, mesh, freeze: bool) -> tuple[dict, dict, dict]:
  """(params, frozen, bias) pure dicts, placed by the rules: random init, or loaded from `run.init_from`
  (every device reads its own slice; floating leaves cast to the policy's parameter dtype)."""
  shardings = sharding.param_shardings(llama4.abstract(cfg, exp.policy), rules, mesh, warn=False)
  if exp.run.init_from:
    if resolve(exp.run.init_from).info.get("fp8") and not exp.lora:
      raise ValueError(f"run.init_from={exp.run.init_from}: holds FP8 expert weights (converted with --keep-fp8, "
                       f"for inference); convert the release without --keep-fp8 to fine-tune it, or train LoRA "
                       f"adapters on it (set the experiment's lora)")
    model = load(exp.run.init_from, policy=exp.policy, shardings=shardings, text_only=cfg.vision is None).model
  else:
    model = llama4.init(cfg, exp.policy, seed=exp.run.seed, shardings=shardings)
  if exp.moe.bias_balancing:
    enable_selection_bias(model)
  if exp.lora:
    return lora.LoraParts.build(model, exp.lora).split_values(model, exp.run.seed)
  _, params, frozen, bias = ModelParts.split(model, freeze)
  return params, frozen, bias


def restore_or_init(s: Setup, resume: bool, log) -> tuple[TrainState, int | None]:
  """(the state to start from, the checkpoint step it was restored from; None: a fresh state)."""
  step = s.ck.latest_step() if resume else None
  if step is not None:
    return _restore(s, step, log), step
  return _init(s, resume, log), None


def _restore(s: Setup, step: int, log) -> TrainState:
  """Checkpoint `step`'s state, and its position of the batch iterator. Without a time budget the run's
  length follows `run.steps` (e.g. `--set run.steps=...` to extend the run)."""
  exp = s.exp
  templates = (nnx.to_pure_dict(s.parts.params), nnx.to_pure_dict(s.parts.frozen), nnx.to_pure_dict(s.parts.bias))
  abstract = jax.eval_shape(functools.partial(_new_state, exp, s.tx), *templates)
  state, data_state, _ = checkpoints.restore(s.ck, s.parts, s.shardings, abstract, step)
  s.it.set_state(data_state)
  if not exp.run.time_budget_s and int(state.total_steps) != exp.run.steps:
    if s.main:
      log(f"[{exp.name}] run length {int(state.total_steps)} -> {exp.run.steps} steps (run.steps)")
    state = with_total_steps(state, exp.run.steps, s.shardings.total_steps)
  if s.main:
    log(f"[{exp.name}] resumed from step {step} of {int(state.total_steps)} ({s.ck.directory})")
  return state


def _check_same_kind(ck: Checkpointer, exp: Experiment) -> None:
  """The run directory's checkpoints, if any, were written by a run of the same kind (LoRA with the same
  settings, or full): ValueError naming both settings otherwise, before anything is read or written."""
  step = ck.latest_step()
  if step is None:
    return
  saved = (read_meta(os.path.join(ck.directory, str(step))).get("experiment") or {}).get("lora")
  now = to_dict(exp).get("lora")
  if saved != now:
    def what(x):
      return "a full run (lora=None)" if x is None else f"a LoRA run (lora={x})"
    raise ValueError(f"{ck.directory}: step {step} was written by {what(saved)}; continuing it as {what(now)} is "
                     "not possible: resume with the run's own lora settings, or start a new run (another name / "
                     "out_dir)")


def _init(s: Setup, resume: bool, log) -> TrainState:
  """A fresh state (random or `run.init_from` parameters); refuses a directory that holds checkpoints
  unless resuming."""
  exp = s.exp
  if resume and s.main:
    log(f"[{exp.name}] --resume: no checkpoint in {s.ck.directory}, starting from scratch")
  if s.ck.latest_step() is not None and not resume:
    raise FileExistsError(f"{s.ck.directory} already holds checkpoints (steps {s.ck.all_steps()}): pass --resume "
                          "to continue that run, or choose another name / out_dir")
  make_state = jax.jit(functools.partial(_new_state, exp, s.tx), out_shardings=s.shardings)
  state = make_state(*_fresh_params(exp, s.cfg, s.rules, s.mesh, s.freeze))
  if s.main and exp.run.init_from:
    log(f"[{exp.name}] parameters from {exp.run.init_from}" + (" (vision tower frozen)" if s.freeze else ""))
  return state


def _save(s: Setup, state: TrainState, force: bool = False) -> None:
  meta = {"config": config_lib.to_hf(s.cfg), "experiment": to_dict(s.exp)}
  checkpoints.save(s.ck, state, s.it.get_state(), meta, force=force)


# --------------------------------------------------------------------------------------------------
# Records and console


class Reporter:
  """metrics.jsonl / TensorBoard records and the progress bar on process 0 (the other processes write
  nothing), with throughput and MFU from the model's FLOPs per token and the devices' peak."""

  def __init__(self, s: Setup, start: int, total: int, resumed: bool, log):
    """Opens the writer (on resume, dropping records of steps after `start`) and the bar; logs the FLOPs."""
    exp = self.exp = s.exp
    self.drops = s.drops
    self.writer = metrics.MetricWriter(s.run_dir, purge_after=start if resumed else None) if s.main else None
    self.flops_tok = metrics.flops_per_token(s.cfg, exp.data.seq_len, s.counts.active)
    self.peak, peak_src = metrics.peak_flops(exp.run.peak_flops, list(s.mesh.devices.flat))
    self.tokens_per_step = exp.data.batch_size * exp.data.seq_len
    if s.main:
      log(f"[{exp.name}] {self.flops_tok / 1e6:.1f} MFLOP/token; peak {self.peak / 1e12:.2f} TFLOP/s ({peak_src}); "
          f"{total} steps of {self.tokens_per_step:,} tokens")
    self.progress = metrics.Progress(total, start) if s.main else None

  def train(self, step: int, m: dict, dt: float, log_now: bool) -> None:
    """The step's record; on logging steps also its TensorBoard scalars and the per-layer expert load."""
    tok_s = self.tokens_per_step / dt
    rec = {"split": "train", "loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
           "balance": m["balance"], "z_loss": m["z_loss"], "tokens": m["tokens"], "step_s": dt,
           "tokens_per_s": tok_s, "mfu": tok_s * self.flops_tok / self.peak, "load": m["load"],
           "dropped": self.drops.take(),
           **{k: m[k] for k in ("objective", "ce", "kl", "teacher_ce", "alpha") if k in m}}
    if not self.writer:
      return
    self.writer.write(step, rec, tb_prefix="train" if log_now else None)
    if log_now and np.size(m["load"]):
      E = m["load"].shape[-1]
      self.writer.scalars(step, {f"experts/max_load_layer{i}": E * row.max() for i, row in enumerate(m["load"])})
      self.writer.scalars(step, {f"experts/min_load_layer{i}": E * row.min() for i, row in enumerate(m["load"])})

  def val(self, step: int, val: dict) -> None:
    if self.writer:
      self.writer.write(step, {"split": "val", **val}, tb_prefix="val")

  def line(self, step: int, m: dict, val: dict | None, recent_s: list[float]) -> None:
    """The progress bar at `step`: throughput over the `recent_s` step times, the latest validation loss."""
    if not self.progress:
      return
    rate = self.tokens_per_step / float(np.mean(recent_s))
    text = (f"loss {float(m['loss']):.3f}" + (f" val {val['loss']:.3f}" if val else "")
            + f" | {rate / 1e3:.1f}k tok/s MFU {rate * self.flops_tok / self.peak:.0%} | lr {float(m['lr']):.1e}"
            + f" gnorm {float(m['grad_norm']):.2f}" + (f" bal {float(m['balance']):.2f}" if np.size(m["load"]) else ""))
    self.progress.update(step, text)

  def end_loop(self, stopped_early: str) -> None:
    if self.progress:
      self.progress.close()
      if stopped_early:
        self.progress.message(f"[{self.exp.name}] {stopped_early}")

  def abort(self) -> None:
    """Closes the bar and the writer of a run that stops with an error."""
    if self.progress:
      self.progress.close()
    if self.writer:
      self.writer.close()

  def train_records(self) -> list[dict]:
    return [r for r in metrics.read_jsonl(self.writer.path) if r.get("split") == "train"] if self.writer else []


# --------------------------------------------------------------------------------------------------
# The loop


def _global(batch: dict, batch_sharding) -> dict:
  """This process's rows -> global arrays split over the data axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(batch[k]))
          for k in step_lib.BATCH_KEYS}


def evaluate(eval_fn, state: TrainState, batches, batch_sharding) -> dict:
  """Token-weighted mean cross-entropy ("loss"), its perplexity and the token count over `batches`."""
  ce, n = 0.0, 0.0
  for b in batches:
    out = jax.device_get(eval_fn(state, _global(b, batch_sharding)))
    ce, n = ce + float(out["ce_sum"]), n + float(out["tokens"])
  loss = ce / max(n, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n}


@dataclasses.dataclass
class StepTimes:
  """Wall times of the train steps, the first (compiling) one apart."""

  compile_s: float | None = None  # the first step's, compilation included
  steady: list[float] = dataclasses.field(default_factory=list)  # every later step's

  def add(self, dt: float) -> None:
    if self.compile_s is None:
      self.compile_s = dt
    else:
      self.steady.append(dt)


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  times: StepTimes
  stopped_early: str  # why the loop ended before the run's last step ("": it did not)


def _train_step(s: Setup, state: TrainState) -> tuple[TrainState, dict, float]:
  """(state, host metrics, wall time of the step, the batch's placement excluded) on the next batch."""
  raw = next(s.it)
  batch = _global(raw, s.batch_sharding)
  if s.distill and s.distill.reader:
    extra = s.distill.reader.batch(int(state.step), np.asarray(raw["inputs"]))
    batch.update({k: jax.make_array_from_process_local_data(s.batch_sharding, v) for k, v in extra.items()})
  t0 = time.perf_counter()
  state, m = s.train_step(state, batch)
  m = jax.device_get(m)
  return state, m, time.perf_counter() - t0


def _finite(*xs) -> bool:
  return all(math.isfinite(float(x)) for x in xs)


def _check_finite(s: Setup, rep: Reporter, step: int, m: dict) -> None:
  """Raises `TrainingDiverged` on a NaN/inf loss or gradient norm, once pending checkpoint writes ended."""
  if _finite(m["loss"], m["grad_norm"]):
    return
  s.ck.wait()
  last = s.ck.latest_step()
  rep.abort()
  raise TrainingDiverged(
      f"step {step}: loss {float(m['loss'])}, gradient norm {float(m['grad_norm'])}: training diverged and "
      f"was stopped; nothing from this step was saved. Last good checkpoint: "
      + (f"step {last} in {s.ck.directory} (continue from it with --resume, e.g. with a lower "
         f"optim.lr)" if last is not None else "none (no checkpoint had been written yet)"))


def _due(every: int, step: int, total: int) -> bool:
  """Whether a periodic evaluation / checkpoint falls on `step` (the last step gets its own in `finish`)."""
  return bool(every) and step % every == 0 and step != total


def _past_time_limit(s: Setup, step: int, total: int) -> bool:
  limit = s.exp.run.time_limit_s
  return bool(limit) and time.perf_counter() - s.t_start > limit and step != total


def train_loop(s: Setup, state: TrainState, budget: TimeBudget, rep: Reporter) -> LoopResult:
  """Steps up to the run's length (refitted by the time budget) or the time limit: each step checked for
  divergence and recorded; at their periods, evaluations (then a budget refit) and checkpoints."""
  r = s.exp.run
  times, stopped_early = StepTimes(), ""
  step, total, val = int(state.step), int(state.total_steps), None
  while step < total:
    step += 1
    state, m, dt = _train_step(s, state)
    times.add(dt)
    _check_finite(s, rep, step, m)
    state, total = budget.fit_after_step(state, step, times.steady, total)
    log_now = step % r.log_every == 0 or step == total
    rep.train(step, m, dt, log_now)
    if _due(r.eval_every, step, total):
      val = evaluate(s.eval_step, state, data.eval_batches(s.corpus, s.exp.data, r.eval_batches), s.batch_sharding)
      rep.val(step, val)
      state, total = budget.fit_after_eval(state, step, total)
    if log_now:
      rep.line(step, m, val, times.steady[-r.log_every:] or [dt])
    if _due(r.ckpt_every, step, total):
      _save(s, state)
    if _past_time_limit(s, step, total):
      stopped_early = f"time limit {r.time_limit_s:.0f}s reached at step {step}"
      break
  rep.end_loop(stopped_early)
  return LoopResult(state, times, stopped_early)


# --------------------------------------------------------------------------------------------------
# Finish


def _sample(s: Setup, state: TrainState) -> str:
  """`run.sample_tokens` tokens after `run.sample_prompt`, drawn from the run's random stream."""
  r = s.exp.run
  model = s.parts.merge(state.params, state.frozen, state.bias)
  return generate_text(model, s.corpus.tokenizer, [r.sample_prompt], chat=False, max_new_tokens=r.sample_tokens,
                       sampling=Sampling(r.sample_temperature), seed=jax.random.wrap_key_data(state.rng))[0]


def finish(s: Setup, state: TrainState, start: int) -> tuple[dict, str]:
  """(final validation over the whole split, the closing sample): after the last checkpoint (unless the
  run took no step since the one it resumed from), and before the checkpointer closes."""
  if int(state.step) > start or s.ck.latest_step() is None:
    _save(s, state, force=True)
  if s.exp.lora and s.main:
    lora.save_adapters(os.path.join(s.run_dir, "adapter"), state.params, s.exp.lora, s.exp.run.init_from,
                       overwrite=True)
    lora.save_merged(os.path.join(s.run_dir, "merged"), s.parts, state.params, state.frozen, s.cfg, overwrite=True)
  val = evaluate(s.eval_step, state, data.eval_batches(s.corpus, s.exp.data), s.batch_sharding)
  text = _sample(s, state) if s.exp.run.sample_prompt else ""
  s.ck.wait()
  s.ck.close()
  return val, text


def summarize(s: Setup, rep: Reporter, result: LoopResult, val: dict, text: str, phases_s: dict) -> dict:
  """The summary: final losses, throughput over the steady steps, `phases_s` (setup / loop / final)."""
  exp, steady = s.exp, result.times.steady
  train_recs = rep.train_records()
  last = train_recs[-max(1, min(len(train_recs), exp.run.log_every * 5)):]
  mean_step = float(np.mean(steady)) if steady else float("nan")
  return {
      "name": exp.name, "steps": int(result.state.step), "stopped_early": result.stopped_early or None,
      "train_loss": float(np.mean([r["loss"] for r in last])) if last else None,
      "val_loss": val["loss"], "val_perplexity": val["perplexity"], "val_tokens": val["tokens"],
      "unigram_baseline": s.corpus.unigram_baseline,
      "tokens_per_s": rep.tokens_per_step / mean_step if steady else None,
      "mfu": rep.tokens_per_step * rep.flops_tok / mean_step / rep.peak if steady else None,
      "peak_flops": rep.peak, "compile_and_first_step_s": result.times.compile_s,
      **phases_s, "wall_s": time.perf_counter() - s.t_start,
      "params": s.counts.total, "active_params": s.counts.active, "sample_prompt": exp.run.sample_prompt,
      "sample": text, "run_dir": s.run_dir,
      **({"adapter_bytes": lora.adapter_bytes(result.state.params)} if exp.lora else {}),
  }


def write_outputs(s: Setup, rep: Reporter, summary: dict, log) -> None:
  """Process 0: the final metrics record, summary.json, loss.png and the closing log lines."""
  if not rep.writer:
    return
  exp, run_dir = s.exp, s.run_dir
  rep.writer.write(summary["steps"], {"split": "final", **{k: v for k, v in summary.items() if k != "run_dir"}})
  rep.writer.close()
  with open(os.path.join(run_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  baseline = s.corpus.unigram_baseline
  png = plots.loss_curve(metrics.read_jsonl(rep.writer.path), os.path.join(run_dir, "loss.png"),
                         baseline=baseline, title=exp.name)
  if exp.distill:
    distill.plot(metrics.read_jsonl(rep.writer.path), os.path.join(run_dir, "distill.png"), title=exp.name)
  base = f" (unigram baseline {baseline:.3f})" if baseline is not None else ""
  fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731 (steps=0: no train loss yet)
  log(f"[{exp.name}] step {summary['steps']}: train loss {fmt(summary['train_loss'], '.3f')}, validation loss "
      f"{fmt(summary['val_loss'], '.3f')}{base}, perplexity {fmt(summary['val_perplexity'], '.1f')}; "
      + (f"{summary['tokens_per_s']:,.0f} tokens/s, MFU {summary['mfu']:.1%}; " if summary["tokens_per_s"] is not None
         else "")
      + f"{summary['wall_s']:.0f}s in all")
  log(f"[{exp.name}] wrote {run_dir}/ (checkpoints/, metrics.jsonl, tensorboard/, {os.path.basename(png)})")
  if summary["sample"]:
    log(f"[{exp.name}] sample:\n{exp.run.sample_prompt}{summary['sample']}")


# --------------------------------------------------------------------------------------------------


def run(exp: Experiment, resume: bool = False, log=print, devices=None) -> dict:
  """Trains `exp`; returns the summary (also written to summary.json). `devices`: the mesh's devices
  (default: all devices of all processes)."""
  t_start = time.perf_counter()
  s = setup(exp, devices, log, t_start)
  state, resumed_from = restore_or_init(s, resume, log)
  start, resumed = int(state.step), resumed_from is not None
  rep = Reporter(s, start, int(state.total_steps), resumed, log)
  budget = TimeBudget(exp, start, t_start, resumed, s.shardings.total_steps, rep.progress)
  with sharding.use(s.rules, s.mesh, on_drop=s.drops.on_drop):
    t_loop = time.perf_counter()
    result = train_loop(s, state, budget, rep)
    t_final = time.perf_counter()
    val, text = finish(s, result.state, start)
    t_end = time.perf_counter()
  phases_s = {"setup_s": t_loop - t_start, "loop_s": t_final - t_loop, "final_eval_sample_s": t_end - t_final}
  summary = summarize(s, rep, result, val, text, phases_s)
  write_outputs(s, rep, summary, log)
  return summary
