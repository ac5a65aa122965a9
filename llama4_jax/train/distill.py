"""Logit distillation: a frozen teacher's softened distribution as a soft target beside the data.

Objective of a batch (sums over the trained tokens, divided by their number n, as the plain CE):
  loss = [alpha * T^2 * sum KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * sum CE(s, data)] / n + router terms
with s / t the student / teacher logits, T `DistillConfig.temperature`, and alpha(step) from `alpha` (the
schedules are listed on `DistillConfig`). The KL is masked like the CE (padding, SFT loss masks).

Two sources of teacher logits:
  online     the teacher (any directory `llama4_jax.load` reads, any size or number of experts, same
             tokenizer) runs in the same jitted step: its parameters are a frozen argument of the step
             (sharded by the same rules as the student's, optionally in bfloat16 and / or with its
             experts and MLPs as int8 / int4, `teacher_quant`), its output under `stop_gradient`, its logits
             made chunk by chunk beside the student's.
  top-k      `precompute_topk` runs the teacher once over the run's batches (the train iterator is
             deterministic in the data config and seed) and writes its top-k logits, their ids and the
             teacher's per-token CE to `topk_dir` next to the data; `TopkReader` streams them batch by batch
             and checks that each stored batch is the one being trained on. The teacher's distribution is
             renormalised over its top k (k = vocabulary: the online loss exactly).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sharding
from llama4_jax import config as config_lib
from llama4_jax.data.tokenizers import Tokenizer, load_tokenizer
from llama4_jax.io import quantize as quantize_io
from llama4_jax.io.load import load, resolve
from llama4_jax.model import llama4, quant
from llama4_jax.model.text import enable_selection_bias
from llama4_jax.train import data
from llama4_jax.train.config import DistillConfig, Experiment
from llama4_jax.train.losses import chunked_distill_sums
from llama4_jax.train.state import ModelParts
from llama4_jax.train.step import Terms, router_terms

SCHEDULES = ("constant", "linear", "cosine", "adaptive")
TOPK_KEYS = ("teacher_idx", "teacher_logits", "teacher_nll")
_PROBE = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"


def validate(cfg: DistillConfig) -> None:
  """Rejects settings that cannot work, naming the field and value."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"distill.schedule={cfg.schedule!r}: expected one of {', '.join(SCHEDULES)}")
  if not cfg.temperature > 0:
    raise ValueError(f"distill.temperature={cfg.temperature}: must be > 0")
  for name in ("alpha", "alpha_end"):
    if not 0.0 <= getattr(cfg, name) <= 1.0:
      raise ValueError(f"distill.{name}={getattr(cfg, name)}: must lie in [0, 1]")
  if not cfg.teacher and not cfg.topk_dir:
    raise ValueError("distill: set distill.teacher (a checkpoint directory) or distill.topk_dir (precomputed logits)")
  if cfg.teacher_quant not in ("", *quant.SCHEMES):
    raise ValueError(f"distill.teacher_quant={cfg.teacher_quant!r}: expected '' or one of {', '.join(quant.SCHEMES)}")


def alpha(cfg: DistillConfig, step: jax.Array, total_steps: jax.Array, ce_student: jax.Array,
          ce_teacher: jax.Array, vocab: int) -> jax.Array:
  """The soft-target weight of step `step` (0-based) of `total_steps`. "adaptive" uses the batch's mean
  token CEs: alpha_end + (alpha - alpha_end) * clip((ce_s - ce_t) / (ln V - ce_t), 0, 1), ln V being the
  CE of a uniform guess (where a fresh student starts). No gradient flows through alpha."""
  a0, a1 = cfg.alpha, cfg.alpha_end
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / jnp.maximum(jnp.asarray(total_steps, jnp.float32) - 1, 1),
                      0.0, 1.0)
  if cfg.schedule == "constant":
    a = jnp.asarray(a0, jnp.float32)
  elif cfg.schedule == "linear":
    a = a0 + (a1 - a0) * progress
  elif cfg.schedule == "cosine":
    a = a1 + (a0 - a1) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  else:
    gap = (ce_student - ce_teacher) / jnp.maximum(math.log(vocab) - ce_teacher, 1e-3)
    a = a1 + (a0 - a1) * jnp.clip(gap, 0.0, 1.0)
  return jax.lax.stop_gradient(a)


# --------------------------------------------------------------------------------------------------
# The teacher


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
  """A loaded, frozen teacher: its variable groups (`ModelParts`) and their values, passed to the train step
  as its extra arguments (`args`) with their shardings."""

  parts: ModelParts
  args: tuple[dict, dict, dict]  # (params, frozen, bias) pure dicts
  cfg: config_lib.Llama4Config
  description: str

  @property
  def shardings(self) -> tuple:
    return jax.tree.map(lambda x: x.sharding, self.args)


def check_tokenizer(path: str, teacher_tok: Tokenizer | None, student_tok: Tokenizer, teacher_vocab: int,
                    student_vocab: int) -> None:
  """Teacher and student must share a vocabulary: the same embedding rows and, when the teacher brings a
  tokenizer, the same tokens. ValueError naming both sizes otherwise."""
  if teacher_vocab != student_vocab:
    raise ValueError(f"distill.teacher={path}: teacher vocabulary {teacher_vocab} != student vocabulary "
                     f"{student_vocab} (model.text.vocab_size); distillation needs the same tokenizer")
  if teacher_tok is None:
    return
  if teacher_tok.vocab_size != student_tok.vocab_size or teacher_tok.encode(_PROBE) != student_tok.encode(_PROBE):
    raise ValueError(f"distill.teacher={path}: the teacher's tokenizer ({teacher_tok.vocab_size} tokens) differs "
                     f"from the student's ({student_tok.vocab_size} tokens); give the student the teacher's "
                     "tokenizer (data.tokenizer=<teacher run>/tokenizer.json)")


def teacher_policy(cfg: DistillConfig, policy: config_lib.Policy) -> config_lib.Policy:
  """The student's policy with the teacher's dtype; the storage fields (int8 / int4, FP8 experts: a QLoRA
  student's base) are the teacher's own (its directory, `teacher_quant`)."""
  policy = dataclasses.replace(policy, quant="none", expert_fp8=False)
  if not cfg.teacher_dtype:
    return policy
  return dataclasses.replace(policy, param_dtype=cfg.teacher_dtype, dtype=cfg.teacher_dtype)


def load_teacher(cfg: DistillConfig, student: config_lib.Llama4Config, policy: config_lib.Policy,
                 tokenizer: Tokenizer, rules, mesh) -> Teacher:
  """The teacher of `cfg.teacher` (text model), checked against the student's vocabulary and tokenizer before
  any weight is read, placed by `rules` on `mesh`."""
  source = resolve(cfg.teacher)
  tcfg = dataclasses.replace(source.config, vision=None)
  tfile = source.tokenizer_file
  check_tokenizer(cfg.teacher, load_tokenizer(tfile) if tfile else None, tokenizer, tcfg.text.vocab_size,
                  student.text.vocab_size)
  tpol = teacher_policy(cfg, policy)
  info = source.info if source.kind == "model" else {}
  stored = (info.get("quant") or {}).get("scheme") or ("fp8" if info.get("fp8") else "")
  if cfg.teacher_quant and stored and stored != cfg.teacher_quant:
    raise ValueError(f"distill.teacher_quant={cfg.teacher_quant!r}: the teacher {cfg.teacher} is stored as "
                     f"{stored!r}; set distill.teacher_quant='' to use it as stored")
  lpol = quantize_io.policy_for(info, dataclasses.replace(tpol, expert_fp8=bool(info.get("fp8"))), cfg.teacher)
  shardings = sharding.param_shardings(llama4.abstract(tcfg, lpol), rules, mesh, warn=False)
  model = load(cfg.teacher, policy=lpol, shardings=shardings, text_only=True).model
  description = source.describe()
  if cfg.teacher_quant and not stored:
    qpol = quantize_io.serving_policy(cfg.teacher_quant, cfg.teacher_quant_group, targets=("experts", "mlp"),
                                      base=tpol)
    model = quantised(model, tcfg, qpol, rules, mesh)
    description += f" (experts and MLPs quantised to {cfg.teacher_quant})"
  parts, params, frozen, bias = ModelParts.split(model)
  return Teacher(parts, (params, frozen, bias), tcfg, description)


def quantised(model: nnx.Module, cfg: config_lib.Llama4Config, qpolicy: config_lib.Policy, rules, mesh) -> nnx.Module:
  """`model` (float) with the weights `qpolicy` names quantised (round to nearest, leaf by leaf on the host),
  placed by `rules` on `mesh`; selection biases carried over."""
  plan = quantize_io.Plan.of(cfg, qpolicy)
  target = llama4.abstract(cfg, qpolicy)
  _, _, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    enable_selection_bias(target)
  graphdef, qabs, _ = nnx.split(target, nnx.Param, ...)
  shardings = dict(nnx.to_flat_state(sharding.param_shardings(qabs, rules, mesh, warn=False)))
  flat = dict(nnx.to_flat_state(qabs))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    for p, v in plan.items(path, np.asarray(jax.device_get(var.get_value()))):
      flat[p] = flat[p].replace(jax.device_put(jnp.asarray(v, flat[p].dtype), shardings[p].get_value()))
  return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())), rest)


# --------------------------------------------------------------------------------------------------
# The objective


def make_terms_fn(parts: ModelParts, top_k: int, cfg: DistillConfig, vocab: int,
                  teacher_parts: ModelParts | None) -> Callable:
  """The `step.make_train_step` terms function of distillation: (params, frozen, bias, batch, step,
  total_steps, *teacher args) -> `Terms` with extra sums "loss_sum" (the objective beyond the CE), "kl",
  "ce", "teacher_ce" and "alpha" (token-weighted). `teacher_parts` None: the batch brings top-k logits."""
  T = cfg.temperature

  def terms(params, frozen, bias, mb, step, total_steps, *teacher_args):
    model = parts.merge(params, frozen, bias)
    kw = dict(position_ids=mb["positions"], segment_ids=mb["segment_ids"], logits=False)
    out = model.forward(mb["inputs"], **kw)
    mask = mb["loss_mask"]
    if teacher_parts is not None:
      tm = teacher_parts.merge(*teacher_args)
      hidden_t = jax.lax.stop_gradient(tm.forward(mb["inputs"], **kw).hidden)

      def teacher_fn(h):
        return jax.lax.stop_gradient(tm.text.logits(h)), None

      teacher_in = (hidden_t,)
    else:
      def teacher_fn(logits, idx):
        return logits, idx

      teacher_in = (mb["teacher_logits"], mb["teacher_idx"])
    sums = chunked_distill_sums(model.text.logits, out.hidden, teacher_fn, teacher_in, mb["targets"], mask,
                                model.policy.logits_chunk, T)
    tokens = sums["tokens"]
    ce_t = sums["teacher_ce"] if teacher_parts is not None else jnp.sum(
        mb["teacher_nll"].astype(jnp.float32) * mask.astype(jnp.float32))
    n = jnp.maximum(tokens, 1.0)
    a = alpha(cfg, step, total_steps, jax.lax.stop_gradient(sums["ce"]) / n, ce_t / n, vocab)
    extra = {"loss_sum": a * (T * T * sums["kl"] - sums["ce"]), "kl": sums["kl"], "ce": sums["ce"],
             "teacher_ce": ce_t, "alpha": a * tokens}
    return Terms(sums["ce"], tokens, *router_terms(parts, top_k, out.router_logits, bias, mb["segment_ids"]),
                 extra=extra)

  return terms


# --------------------------------------------------------------------------------------------------
# Precomputed top-k logits


def _topk_fn(teacher: Teacher, k: int) -> Callable:
  def run(args, batch):
    model = teacher.parts.merge(*args)
    out = model.forward(batch["inputs"], position_ids=batch["positions"], segment_ids=batch["segment_ids"])
    logits = out.logits.astype(jnp.float32)
    vals, idx = jax.lax.top_k(logits, k)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0]
    return vals, idx, lse - tgt

  return jax.jit(run)


def precompute_topk(exp: Experiment, steps: int, out_dir: str, log=print, dtype: str = "float16") -> str:
  """Runs the teacher of `exp.distill` over the first `steps` train batches of `exp` (the same iterator the
  run will read) and writes to `out_dir`: inputs.npy [N, B, T] (to check alignment), teacher_idx.npy
  [N, B, T, k] (uint16 when the vocabulary fits), teacher_logits.npy [N, B, T, k] (`dtype`), teacher_nll.npy
  [N, B, T] float32 and topk.json. Single process. Returns `out_dir`."""
  if jax.process_count() > 1:
    raise ValueError("precompute_topk runs on one process")
  cfg = exp.distill
  if os.path.exists(os.path.join(out_dir, "topk.json")):
    raise FileExistsError(f"{out_dir} already holds precomputed logits (topk.json); remove it or choose another")
  mesh = sharding.make_mesh(exp.mesh, None)
  rules = sharding.preset(exp.rules)
  corpus = data.load_corpus(exp.data, None)
  teacher = load_teacher(cfg, exp.model, exp.policy, corpus.tokenizer, rules, mesh)
  V, k = teacher.cfg.text.vocab_size, min(cfg.topk, teacher.cfg.text.vocab_size)
  B, T = exp.data.batch_size, exp.data.seq_len
  os.makedirs(out_dir, exist_ok=True)
  idx_dtype = np.uint16 if V <= np.iinfo(np.uint16).max else np.int32
  arrays = {name: np.lib.format.open_memmap(os.path.join(out_dir, f"{name}.npy"), mode="w+", dtype=dt, shape=shape)
            for name, dt, shape in (("inputs", np.int32, (steps, B, T)), ("teacher_idx", idx_dtype, (steps, B, T, k)),
                                    ("teacher_logits", np.dtype(dtype), (steps, B, T, k)),
                                    ("teacher_nll", np.float32, (steps, B, T)))}
  fn = _topk_fn(teacher, k)
  it = data.train_iterator(corpus, exp.data)
  for i in range(steps):
    batch = next(it)
    vals, idx, nll = jax.device_get(fn(teacher.args, {key: jnp.asarray(v) for key, v in batch.items()}))
    arrays["inputs"][i], arrays["teacher_idx"][i] = batch["inputs"], idx
    arrays["teacher_logits"][i], arrays["teacher_nll"][i] = vals, nll
  for a in arrays.values():
    a.flush()
  meta = {"teacher": teacher.description, "k": k, "vocab": V, "steps": steps, "batch_size": B, "seq_len": T,
          "seed": exp.data.seed, "logits_dtype": dtype}
  with open(os.path.join(out_dir, "topk.json"), "w") as f:
    json.dump(meta, f, indent=2)
  log(f"[{exp.name}] wrote top-{k} teacher logits of {steps} batches to {out_dir}")
  return out_dir


class TopkReader:
  """The precomputed logits of `topk_dir`, batch by batch: `batch(step, inputs)` gives the batch keys
  `TOPK_KEYS` of train step `step` (0-based) after checking the stored inputs are `inputs`."""

  def __init__(self, topk_dir: str, exp: Experiment, vocab: int):
    path = os.path.join(topk_dir, "topk.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"distill.topk_dir={topk_dir}: no topk.json (write it with distill.precompute_topk)")
    with open(path) as f:
      self.meta = json.load(f)
    want = {"vocab": vocab, "batch_size": exp.data.batch_size, "seq_len": exp.data.seq_len}
    for key, value in want.items():
      if self.meta[key] != value:
        raise ValueError(f"distill.topk_dir={topk_dir}: stored {key} {self.meta[key]} != this run's {value}")
    self.dir = topk_dir
    self.arrays = {n: np.load(os.path.join(topk_dir, f"{n}.npy"), mmap_mode="r") for n in ("inputs", *TOPK_KEYS)}

  def batch(self, step: int, inputs: np.ndarray) -> dict:
    n = self.meta["steps"]
    if step >= n:
      raise ValueError(f"distill.topk_dir={self.dir} holds logits of {n} batches; step {step + 1} needs more "
                       f"(precompute more steps, or set run.steps <= {n})")
    if not np.array_equal(self.arrays["inputs"][step], inputs):
      raise ValueError(f"distill.topk_dir={self.dir}: batch {step} does not match the run's data (another data "
                       "config, seed or tokenizer than the precomputation's)")
    return {"teacher_idx": np.asarray(self.arrays["teacher_idx"][step]).astype(np.int32),
            "teacher_logits": np.asarray(self.arrays["teacher_logits"][step]).astype(np.float32),
            "teacher_nll": np.asarray(self.arrays["teacher_nll"][step])}


# --------------------------------------------------------------------------------------------------
# Wiring into the run


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """What the run adds for distillation: the terms function, the step's extra arguments and batch keys."""

  terms_fn: Callable
  teacher: Teacher | None
  reader: TopkReader | None
  cfg: DistillConfig

  @property
  def aux_args(self) -> tuple:
    return self.teacher.args if self.teacher else ()

  @property
  def aux_shardings(self) -> tuple:
    return self.teacher.shardings if self.teacher else ()

  @property
  def batch_keys(self) -> tuple[str, ...]:
    return TOPK_KEYS if self.reader else ()

  def describe(self) -> str:
    c = self.cfg
    src = self.teacher.description if self.teacher else f"top-{self.reader.meta['k']} logits in {self.reader.dir}"
    return (f"distilling from {src}: T={c.temperature}, alpha {c.schedule} {c.alpha}"
            + (f" -> {c.alpha_end}" if c.schedule != "constant" else ""))


def plan(exp: Experiment, cfg_model: config_lib.Llama4Config, parts: ModelParts, tokenizer: Tokenizer, rules,
         mesh) -> Plan:
  """The teacher (online) or the top-k reader, and the terms function of `exp.distill`."""
  cfg = exp.distill
  validate(cfg)
  vocab = cfg_model.text.vocab_size
  top_k = cfg_model.text.num_experts_per_tok
  if cfg.topk_dir:
    return Plan(make_terms_fn(parts, top_k, cfg, vocab, None), None, TopkReader(cfg.topk_dir, exp, vocab), cfg)
  teacher = load_teacher(cfg, cfg_model, exp.policy, tokenizer, rules, mesh)
  return Plan(make_terms_fn(parts, top_k, cfg, vocab, teacher.parts), teacher, None, cfg)


def plot(records: list[dict], path: str, title: str = "") -> str:
  """The distillation curves of a run's metrics records: student CE, teacher CE and KL (left axis), alpha
  (right axis), against the step. Returns `path`."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train = [r for r in records if r.get("split") == "train" and "kl" in r]
  val = [(r["step"], r["loss"]) for r in records if r.get("split") == "val" and "loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
  steps = [r["step"] for r in train]
  for key, color in (("ce", "tab:blue"), ("teacher_ce", "tab:gray"), ("kl", "tab:green")):
    ax.plot(steps, [r[key] for r in train], color=color, lw=1.4, label=f"{key} (train)")
  if val:
    ax.plot(*zip(*val), "o-", color="tab:orange", ms=4, lw=1.4, label="student CE (validation)")
  ax.set_xlabel("step")
  ax.set_ylabel("nats / token")
  ax.grid(alpha=0.3)
  right = ax.twinx()
  right.plot(steps, [r["alpha"] for r in train], color="tab:red", ls="--", lw=1.2, label="alpha")
  right.set_ylim(0, 1)
  right.set_ylabel("alpha (soft-target weight)")
  lines = ax.get_legend_handles_labels()
  extra = right.get_legend_handles_labels()
  ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
