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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

import sharding
from llama4_jax import config as config_lib
from llama4_jax.apps.generate import Sampling, generate_text
from llama4_jax.io.checkpointer import Checkpointer
from llama4_jax.io.load import load, resolve
from llama4_jax.model import llama4
from llama4_jax.model.counting import count_params
from llama4_jax.model.text import enable_selection_bias
from llama4_jax.train import checkpoints, data, metrics, optim, plots
from llama4_jax.train import step as step_lib
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


def _fresh_params(exp: Experiment, cfg, rules, mesh, freeze: bool) -> tuple[dict, dict, dict]:
  """(params, frozen, bias) pure dicts, placed by the rules: random init, or loaded from `run.init_from`
  (every device reads its own slice; floating leaves cast to the policy's parameter dtype)."""
  shardings = sharding.param_shardings(llama4.abstract(cfg, exp.policy), rules, mesh, warn=False)
  if exp.run.init_from:
    if resolve(exp.run.init_from).info.get("fp8"):
      raise ValueError(f"run.init_from={exp.run.init_from}: holds FP8 expert weights (converted with --keep-fp8, "
                       f"for inference); convert the release without --keep-fp8 to fine-tune it")
    model = load(exp.run.init_from, policy=exp.policy, shardings=shardings, text_only=cfg.vision is None).model
  else:
    model = llama4.init(cfg, exp.policy, seed=exp.run.seed, shardings=shardings)
  if exp.moe.bias_balancing:
    enable_selection_bias(model)
  _, params, frozen, bias = ModelParts.split(model, freeze)
  return params, frozen, bias


def _global(batch: dict, batch_sharding) -> dict:
  """This process's rows -> global arrays split over the data axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(batch[k]))
          for k in step_lib.BATCH_KEYS}


def evaluate(eval_fn, state: TrainState, batches, batch_sharding) -> dict:
  ce, n = 0.0, 0.0
  for b in batches:
    out = jax.device_get(eval_fn(state, _global(b, batch_sharding)))
    ce, n = ce + float(out["ce_sum"]), n + float(out["tokens"])
  loss = ce / max(n, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n}


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


def _finite(*xs) -> bool:
  return all(math.isfinite(float(x)) for x in xs)


def run(exp: Experiment, resume: bool = False, log=print, devices=None) -> dict:
  """Trains `exp`; returns the summary (also written to summary.json). `devices`: the mesh's devices
  (default: all devices of all processes)."""
  t_start = time.perf_counter()
  if exp.policy.expert_fp8:
    raise ValueError("policy.expert_fp8: FP8-stored expert weights are for inference; train with policy.fp8='train'")
  run_dir = os.path.abspath(os.path.join(exp.run.out_dir, exp.name))
  mesh = sharding.make_mesh(exp.mesh, devices)  # first: multi-host runs initialise jax.distributed here
  main = jax.process_index() == 0
  os.makedirs(run_dir, exist_ok=True)
  drops = DropMonitor()
  rules = sharding.preset(exp.rules)
  cfg, cfg_source = model_config(exp)

  corpus = data.load_corpus(exp.data, run_dir)
  vocab = corpus.tokenizer.vocab_size
  if vocab > cfg.text.vocab_size:
    raise ValueError(f"the tokenizer has {vocab} tokens but the model only {cfg.text.vocab_size} embeddings "
                     f"(set model.text.vocab_size >= {vocab})")
  n_train = sum(len(e["tokens"]) for e in corpus.train)
  n_val = sum(len(e["tokens"]) for e in corpus.val)
  pc = count_params(cfg, exp.policy)
  if main:
    with open(os.path.join(run_dir, "experiment.json"), "w") as f:
      json.dump(to_dict(exp), f, indent=2)
    log(f"[{exp.name}] {corpus.description}; tokenizer {vocab} tokens; {n_train:,} train / {n_val:,} validation "
        f"tokens" + (f"; unigram baseline {corpus.unigram_baseline:.3f} nats/token"
                     if corpus.unigram_baseline is not None else ""))
    log(f"[{exp.name}] model ({cfg_source}): {pc.total / 1e6:.2f}M parameters, {pc.active / 1e6:.2f}M active; "
        f"mesh {dict(mesh.shape)} rules {rules.name}; policy {exp.policy.param_dtype}/{exp.policy.dtype} "
        f"remat {exp.policy.remat}")

  freeze = exp.run.freeze_vision and cfg.vision is not None
  D = exp.data
  # Setup happens outside the sharding context (nnx.eval_shape there would place logical names on the
  # mesh); the jitted steps are traced inside it, at their first call.
  abstract_model = llama4.abstract(cfg, exp.policy)
  if exp.moe.bias_balancing:
    enable_selection_bias(abstract_model)
  parts, *_ = ModelParts.split(abstract_model, freeze)
  tx = optim.make(exp.optim, parts.params)
  shardings = step_lib.state_shardings(parts, tx, rules, mesh)
  batch_sh = sharding.batch_sharding(rules, mesh, (D.batch_size, D.seq_len))

  def new_state(params, frozen, bias):
    key = jax.random.key_data(jax.random.key(exp.run.seed))
    return TrainState(step=jnp.zeros((), jnp.int32), total_steps=jnp.asarray(exp.run.steps, jnp.int32),
                      params=params, frozen=frozen, bias=bias,
                      opt_state=tx.init(params), rng=key)

  make_state = jax.jit(new_state, out_shardings=shardings)
  ck = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=exp.run.keep)
  it = data.train_iterator(corpus, D)
  resumed_from = ck.latest_step() if resume else None
  if resumed_from is not None:
    abstract = jax.eval_shape(new_state, nnx.to_pure_dict(parts.params), nnx.to_pure_dict(parts.frozen),
                              nnx.to_pure_dict(parts.bias))
    state, data_state, _ = checkpoints.restore(ck, parts, shardings, abstract, resumed_from)
    it.set_state(data_state)
    if not exp.run.time_budget_s and int(state.total_steps) != exp.run.steps:  # e.g. --set run.steps=... to extend
      if main:
        log(f"[{exp.name}] run length {int(state.total_steps)} -> {exp.run.steps} steps (run.steps)")
      state = dataclasses.replace(state, total_steps=jax.device_put(jnp.asarray(exp.run.steps, jnp.int32),
                                                                    shardings.total_steps))
    if main:
      log(f"[{exp.name}] resumed from step {resumed_from} of {int(state.total_steps)} ({ck.directory})")
  else:
    if resume and main:
      log(f"[{exp.name}] --resume: no checkpoint in {ck.directory}, starting from scratch")
    if ck.latest_step() is not None and not resume:
      raise FileExistsError(f"{ck.directory} already holds checkpoints (steps {ck.all_steps()}): pass --resume "
                            "to continue that run, or choose another name / out_dir")
    state = make_state(*_fresh_params(exp, cfg, rules, mesh, freeze))
    if main and exp.run.init_from:
      log(f"[{exp.name}] parameters from {exp.run.init_from}" + (" (vision tower frozen)" if freeze else ""))
  start = int(state.step)

  step_fn = step_lib.make_train_step(parts, tx, exp.optim, exp.moe, cfg.text.num_experts_per_tok, exp.optim.grad_accum)
  train_fn = step_lib.jit_train_step(step_fn, shardings, batch_sh)
  eval_fn = step_lib.jit_eval_step(step_lib.make_eval_step(parts, cfg.text.num_experts_per_tok), shardings,
                                   batch_sh)
  writer = metrics.MetricWriter(run_dir, purge_after=start if resumed_from is not None else None) if main else None
  flops_tok = metrics.flops_per_token(cfg, D.seq_len, pc.active)
  peak, peak_src = metrics.peak_flops(exp.run.peak_flops, list(mesh.devices.flat))
  tokens_per_step = D.batch_size * D.seq_len
  if main:
    log(f"[{exp.name}] {flops_tok / 1e6:.1f} MFLOP/token; peak {peak / 1e12:.2f} TFLOP/s ({peak_src}); "
        f"{int(state.total_steps)} steps of {tokens_per_step:,} tokens")
  total = int(state.total_steps)
  progress = metrics.Progress(total, start) if main else None

  def meta() -> dict:
    return {"config": config_lib.to_hf(cfg), "experiment": to_dict(exp)}

  def save(force=False):
    checkpoints.save(ck, state, it.get_state(), meta(), force=force)

  with sharding.use(rules, mesh, on_drop=drops.on_drop):
    val = None
    step_times: list[float] = []
    compile_s = None
    stopped_early = ""
    t_loop = time.perf_counter()
    t_probe = step_probe = None  # when and at which step the time budget was first fitted

    def set_total(n: int) -> int:
      nonlocal state
      if jax.process_count() > 1:  # every host must run the same number of steps: process 0's clock decides
        n = int(multihost_utils.broadcast_one_to_all(np.int32(n)))
      state = dataclasses.replace(state, total_steps=jax.device_put(jnp.asarray(n, jnp.int32),
                                                                    shardings.total_steps))
      if progress:
        progress.total = n
      return n

    step = start
    while step < total:
      step += 1
      batch = _global(next(it), batch_sh)
      t0 = time.perf_counter()
      state, m = train_fn(state, batch)
      m = jax.device_get(m)
      dt = time.perf_counter() - t0
      if compile_s is None:
        compile_s = dt
      else:
        step_times.append(dt)
      if not _finite(m["loss"], m["grad_norm"]):
        ck.wait()
        last = ck.latest_step()
        if progress:
          progress.close()
        if writer:
          writer.close()
        raise TrainingDiverged(
            f"step {step}: loss {float(m['loss'])}, gradient norm {float(m['grad_norm'])}: training diverged and "
            f"was stopped; nothing from this step was saved. Last good checkpoint: "
            + (f"step {last} in {ck.directory} (continue from it with --resume, e.g. with a lower "
               f"optim.lr)" if last is not None else "none (no checkpoint had been written yet)"))
      if exp.run.time_budget_s and step == start + 1 + BUDGET_PROBE_STEPS and resumed_from is None:
        t_probe, step_probe = time.perf_counter(), step
        total = set_total(budgeted_steps(exp, step, probe_step_s(exp, float(np.mean(step_times))),
                                         t_probe - t_start))
        if progress:
          progress.message(f"[{exp.name}] time budget {exp.run.time_budget_s:.0f}s: {np.mean(step_times):.2f}s per "
                           f"step measured -> {total} steps in all (at most run.steps={exp.run.steps}); refitted "
                           f"at each evaluation")
      tok_s = tokens_per_step / dt
      rec = {"split": "train", "loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
             "balance": m["balance"], "z_loss": m["z_loss"], "tokens": m["tokens"], "step_s": dt,
             "tokens_per_s": tok_s, "mfu": tok_s * flops_tok / peak, "load": m["load"],
             "dropped": drops.take()}
      log_now = step % exp.run.log_every == 0 or step == total
      if writer:
        writer.write(step, rec, tb_prefix="train" if log_now else None)
        if log_now and np.size(m["load"]):
          E = m["load"].shape[-1]
          writer.scalars(step, {f"experts/max_load_layer{i}": E * row.max() for i, row in enumerate(m["load"])})
          writer.scalars(step, {f"experts/min_load_layer{i}": E * row.min() for i, row in enumerate(m["load"])})
      if exp.run.eval_every and step % exp.run.eval_every == 0 and step != total:
        val = evaluate(eval_fn, state, data.eval_batches(corpus, D, exp.run.eval_batches), batch_sh)
        if writer:
          writer.write(step, {"split": "val", **val}, tb_prefix="val")
        if t_probe is not None and step > step_probe:  # the measured wall time per step, evaluations included
          now = time.perf_counter()
          total = set_total(budgeted_steps(exp, step, (now - t_probe) / (step - step_probe), now - t_start))
      if progress and log_now:
        recent = step_times[-exp.run.log_every:] or [dt]
        rate = tokens_per_step / float(np.mean(recent))
        text = (f"loss {float(m['loss']):.3f}" + (f" val {val['loss']:.3f}" if val else "")
                + f" | {rate / 1e3:.1f}k tok/s MFU {rate * flops_tok / peak:.0%} | lr {float(m['lr']):.1e}"
                + f" gnorm {float(m['grad_norm']):.2f}" + (f" bal {float(m['balance']):.2f}" if np.size(m["load"]) else ""))
        progress.update(step, text)
      if exp.run.ckpt_every and step % exp.run.ckpt_every == 0 and step != total:
        save()
      if exp.run.time_limit_s and time.perf_counter() - t_start > exp.run.time_limit_s and step != total:
        stopped_early = f"time limit {exp.run.time_limit_s:.0f}s reached at step {step}"
        break
    if progress:
      progress.close()
      if stopped_early:
        progress.message(f"[{exp.name}] {stopped_early}")

    t_final = time.perf_counter()
    final_step = int(state.step)
    if final_step > start or ck.latest_step() is None:
      save(force=True)
    val = evaluate(eval_fn, state, data.eval_batches(corpus, D), batch_sh)
    text = ""
    if exp.run.sample_prompt:
      model = parts.merge(state.params, state.frozen, state.bias)
      text = generate_text(model, corpus.tokenizer, [exp.run.sample_prompt], chat=False,
                           max_new_tokens=exp.run.sample_tokens, sampling=Sampling(exp.run.sample_temperature),
                           seed=jax.random.wrap_key_data(state.rng))[0]
    ck.wait()
    ck.close()
    t_end = time.perf_counter()

  train_recs = [r for r in metrics.read_jsonl(writer.path) if r.get("split") == "train"] if writer else []
  last = train_recs[-max(1, min(len(train_recs), exp.run.log_every * 5)):]
  mean_step = float(np.mean(step_times)) if step_times else float("nan")
  summary = {
      "name": exp.name, "steps": final_step, "stopped_early": stopped_early or None,
      "train_loss": float(np.mean([r["loss"] for r in last])) if last else None,
      "val_loss": val["loss"], "val_perplexity": val["perplexity"], "val_tokens": val["tokens"],
      "unigram_baseline": corpus.unigram_baseline,
      "tokens_per_s": tokens_per_step / mean_step if step_times else None,
      "mfu": tokens_per_step * flops_tok / mean_step / peak if step_times else None,
      "peak_flops": peak, "compile_and_first_step_s": compile_s,
      "setup_s": t_loop - t_start, "loop_s": t_final - t_loop, "final_eval_sample_s": t_end - t_final,
      "wall_s": time.perf_counter() - t_start,
      "params": pc.total, "active_params": pc.active, "sample_prompt": exp.run.sample_prompt, "sample": text,
      "run_dir": run_dir,
  }
  if writer:
    writer.write(final_step, {"split": "final", **{k: v for k, v in summary.items() if k != "run_dir"}})
    writer.close()
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    png = plots.loss_curve(metrics.read_jsonl(writer.path), os.path.join(run_dir, "loss.png"),
                           baseline=corpus.unigram_baseline, title=exp.name)
    base = f" (unigram baseline {corpus.unigram_baseline:.3f})" if corpus.unigram_baseline is not None else ""
    log(f"[{exp.name}] step {final_step}: train loss {summary['train_loss']:.3f}, validation loss {val['loss']:.3f}"
        f"{base}, perplexity {val['perplexity']:.1f}; "
        + (f"{summary['tokens_per_s']:,.0f} tokens/s, MFU {summary['mfu']:.1%}; " if step_times else "")
        + f"{summary['wall_s']:.0f}s in all")
    log(f"[{exp.name}] wrote {run_dir}/ (checkpoints/, metrics.jsonl, tensorboard/, {os.path.basename(png)})")
    if text:
      log(f"[{exp.name}] sample:\n{exp.run.sample_prompt}{text}")
  return summary
