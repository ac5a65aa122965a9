"""The train and eval steps: loss, micro-batched gradients, AdamW update, selection-bias update.

A batch is the data pipeline's dict of [B, T] arrays (inputs, targets, segment_ids, positions,
loss_mask). Packed rows go to the model with `segment_ids` and `positions`, so attention never crosses
documents and RoPE positions restart in each one.

Objective of one step (B rows split into A micro-batches of B/A rows, m = micro-batch):
  loss = sum_m CE_sum(m) / n_tokens  +  (1/A) sum_m (aux_coef * L_bal(m) + z_coef * L_z(m))
with n_tokens the number of trained tokens of the whole batch, so the result does not depend on A.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llama4_jax.train import router
from llama4_jax.train.config import MoEConfig, OptimConfig
from llama4_jax.train.losses import chunked_cross_entropy_sum
from llama4_jax.train.optim import learning_rate
from llama4_jax.train.state import ModelParts, TrainState, stack_bias, unstack_bias

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class Terms:
  """Sums and means of one forward pass."""

  ce_sum: jax.Array  # summed token cross-entropy
  tokens: jax.Array  # trained tokens (sum of the loss mask)
  balance: jax.Array  # L_bal (1.0 = balanced; 0 without MoE layers)
  z: jax.Array  # router z-loss
  counts: jax.Array  # [L_moe, E] weighted expert assignments ([0, 0] without MoE layers)
  extra: dict = dataclasses.field(default_factory=dict)  # sums of an objective beyond the CE (distillation):
  #   "loss_sum" is added to ce_sum in the loss; every other entry is logged as a per-token mean


jax.tree_util.register_dataclass(Terms, data_fields=[f.name for f in dataclasses.fields(Terms)], meta_fields=[])


def forward_terms(parts: ModelParts, top_k: int, params: dict, frozen: dict, bias: dict, batch: dict) -> Terms:
  """Runs the model on a packed batch and returns the loss terms."""
  model = parts.merge(params, frozen, bias)
  out = model.forward(batch["inputs"], position_ids=batch["positions"], segment_ids=batch["segment_ids"],
                      logits=False)
  ce_sum, tokens = chunked_cross_entropy_sum(model.text.logits, out.hidden, batch["targets"], batch["loss_mask"],
                                             model.policy.logits_chunk)
  return Terms(ce_sum, tokens, *router_terms(parts, top_k, out.router_logits, bias, batch["segment_ids"]))


def router_terms(parts: ModelParts, top_k: int, rl: jax.Array | None, bias: dict,
                 segment_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(L_bal, z-loss, counts [L_moe, E]) of the router logits of a forward (zeros without MoE layers)."""
  if rl is None:
    zero = jnp.zeros((), jnp.float32)
    return zero, zero, jnp.zeros((0, 0), jnp.float32)
  weights = (segment_ids > 0).reshape(-1).astype(jnp.float32)
  counts = router.selection_counts(rl, top_k, weights, stack_bias(parts, bias))
  return router.load_balance_loss(rl, counts, weights), router.router_z_loss(rl, weights), counts


def _micro_batches(batch: dict, n: int) -> dict:
  """[B, T] -> [n, B/n, T], micro-batch i = rows i, i+n, i+2n...: every data shard keeps its own rows."""
  def split(x):
    B = x.shape[0]
    if B % n:
      raise ValueError(f"grad_accum={n} does not divide the batch of {B} rows")
    return x.reshape(B // n, n, *x.shape[1:]).swapaxes(0, 1)
  return {k: split(v) for k, v in batch.items()}


def make_train_step(parts: ModelParts, tx: optax.GradientTransformation, optim: OptimConfig, moe: MoEConfig,
                    top_k: int, grad_accum: int = 1,
                    terms_fn: Callable | None = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """(state, batch, *aux) -> (state, metrics). `tx` gives the update direction (`optim.make`), applied with
  -learning_rate(step, state.total_steps). Metrics: loss (mean token CE), balance, z_loss, grad_norm, lr,
  tokens, load [L_moe, E] (fraction of assignments per expert), and the per-token means of `Terms.extra`.
  `terms_fn(params, frozen, bias, micro_batch, step, total_steps, *aux) -> Terms` replaces the plain forward
  (distillation: `aux` = the teacher's parameters). Not jitted (see `jit_train_step`)."""
  if terms_fn is None:
    def terms_fn(params, frozen, bias, mb, *_):
      return forward_terms(parts, top_k, params, frozen, bias, mb)

  def step(state: TrainState, batch: dict, *aux) -> tuple[TrainState, dict]:
    n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

    def objective(params, mb):
      t = terms_fn(params, state.frozen, state.bias, mb, state.step, state.total_steps, *aux)
      loss = ((t.ce_sum + t.extra.get("loss_sum", 0.0)) / n_tokens
              + (moe.aux_loss_coef * t.balance + moe.z_loss_coef * t.z) / grad_accum)
      return loss, t

    grad_fn = jax.grad(objective, has_aux=True)
    if grad_accum == 1:
      grads, t = grad_fn(state.params, dict(batch))
    else:
      micro = _micro_batches(batch, grad_accum)
      shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

      def body(acc, mb):
        g, t = grad_fn(state.params, mb)
        return jax.tree.map(jnp.add, acc, (g, t)), None

      (grads, t), _ = jax.lax.scan(body, zeros, micro)
      t = dataclasses.replace(t, balance=t.balance / grad_accum, z=t.z / grad_accum)

    grad_norm = optax.tree.norm(grads)
    lr = learning_rate(optim, state.step, state.total_steps)
    direction, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: (p.astype(jnp.float32) - lr * u.astype(jnp.float32)).astype(p.dtype),
                          state.params, direction)
    bias = state.bias
    if moe.bias_balancing and t.counts.size:
      bias = unstack_bias(parts, router.update_selection_bias(stack_bias(parts, bias), t.counts, moe.bias_rate))
    metrics = {
        "loss": t.ce_sum / n_tokens,
        "balance": t.balance,
        "z_loss": t.z,
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens": t.tokens,
        "load": router.load_fraction(t.counts),
        **{k: v / n_tokens for k, v in t.extra.items() if k != "loss_sum"},
    }
    if "loss_sum" in t.extra:
      metrics["objective"] = (t.ce_sum + t.extra["loss_sum"]) / n_tokens
    new = dataclasses.replace(state, step=state.step + 1, params=params, bias=bias, opt_state=opt_state)
    return new, metrics

  return step


def make_eval_step(parts: ModelParts, top_k: int) -> Callable[[TrainState, dict], dict]:
  """(state, batch) -> {"ce_sum", "tokens"} (sums: add them over batches, then divide)."""

  def step(state: TrainState, batch: dict) -> dict:
    t = forward_terms(parts, top_k, state.params, state.frozen, state.bias, batch)
    return {"ce_sum": t.ce_sum, "tokens": t.tokens}

  return step


def state_shardings(parts: ModelParts, tx: optax.GradientTransformation, rules, mesh) -> TrainState:
  """NamedShardings of every leaf of the train state: parameters by the rules, optimizer moments like
  their parameters, everything else replicated."""
  params, frozen, bias = parts.shardings(rules, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract_params = jax.tree.map(lambda v: v, nnx.to_pure_dict(parts.params))
  opt_shapes = jax.eval_shape(tx.init, abstract_params)
  opt = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, params, transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  return TrainState(step=replicated, total_steps=replicated, params=params, frozen=frozen, bias=bias,
                    opt_state=opt, rng=replicated)


def jit_train_step(step_fn, shardings: TrainState, batch_sharding, batch_keys: tuple[str, ...] = BATCH_KEYS,
                   aux_shardings: tuple = ()) -> Callable:
  """The sharded, jitted step: the state keeps its shardings (and is donated), batches are split over the
  data axes, metrics are replicated. `batch_keys`: the batch's arrays (extra ones, e.g. precomputed teacher
  logits, split like the tokens); `aux_shardings`: of the step's extra arguments (a teacher's parameters)."""
  batch_sh = {k: batch_sharding for k in batch_keys}
  return jax.jit(step_fn, in_shardings=(shardings, batch_sh, *aux_shardings), out_shardings=(shardings, None),
                 donate_argnums=0)


def jit_eval_step(step_fn, shardings: TrainState, batch_sharding) -> Callable:
  batch_sh = {k: batch_sharding for k in BATCH_KEYS}
  return jax.jit(step_fn, in_shardings=(shardings, batch_sh))
