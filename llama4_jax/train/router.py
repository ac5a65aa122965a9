"""Training signals of the sigmoid top-k router: expert load, load-balancing loss, z-loss, and the
aux-loss-free selection-bias update.

Letters: L MoE layers, N tokens, E experts, k experts per token. Inputs are the model's router logits
[L, N, E] (float32, unbiased) and token weights w [N] (1 on real tokens, 0 on padding).

Why not the Switch loss. Switch Transformer's loss E * sum_e f_e * P_e takes P_e, the mean *softmax*
probability, which sums to 1 over experts. Llama 4's router scores are independent sigmoids: the P_e do
not sum to 1, so the same formula is also lowered by pushing every logit down, which shrinks every
routed expert's input (the score scales the expert input) without balancing anything.

The loss used here. Let
  f_e = (1 / (k N)) sum_n w_n [e in top-k(n)]      fraction of the assignments routed to e (sum_e f_e = 1)
  P_e = (1 / N) sum_n w_n sigmoid(z_ne)             mean sigmoid probability of expert e
  pi_e = P_e / sum_j P_j                           its share of the total router probability
  L_bal = E * sum_e f_e * pi_e                     (averaged over the MoE layers)
Properties:
  * No reward for silencing the router: pi is invariant to a common rescaling of the P_e (which is what
    shifting every logit down does once the sigmoids are small), and
    d L_bal / d P_e = E (f_e - sum_j f_j pi_j) / sum_j P_j is centred (sum_e P_e * grad_e = 0): it
    pushes the probability of over-loaded experts (f_e above the pi-weighted mean) down and of
    under-loaded ones up, never all of them the same way.
  * Known value under balance: with uniform routing (f_e = 1/E) L_bal = sum_e pi_e = 1 whatever the
    probabilities.
  * Minimum in the confident regime: when the router is sharp (the selected sigmoids near 1, the others
    near 0, which is where training goes), pi_e -> f_e and L_bal -> E sum_e f_e^2 >= (sum_e f_e)^2 = 1
    (Cauchy-Schwarz), with equality iff f is uniform; all traffic on one expert gives E. (With soft
    sigmoids it can dip a little below 1, as the Switch loss can: probability spread on experts that
    the tokens do not select.)
  f is a count (no gradient); the gradient flows through pi only, as in the Switch loss.

Router z-loss, sigmoid version: mean over real tokens and experts of z_ne^2. ST-MoE's z-loss,
logsumexp(z_n)^2, bounds the scale of *softmax* logits; under independent sigmoids its gradient
(2 lse * softmax(z)) pushes every logit down whenever lse > 0, i.e. it silences the router like the
unnormalised Switch loss would. Penalising each logit's square keeps the logits near 0 (sigmoids out of
saturation, bf16 logits exact enough for the top-k) without preferring a sign.

Aux-loss-free balancing (DeepSeek-V3): a per-expert bias b_e is added to the logits for the top-k
*selection only* (`llama4_jax.moe.route`); after every step, outside the gradient,
  b_e <- b_e + rate * sign(1/E - f_e)   (then centred: top-k is invariant to a common shift)
so over-loaded experts get selected less and under-loaded ones more, while the scores that scale the
expert inputs stay the unbiased sigmoids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def selection_counts(router_logits: jax.Array, k: int, weights: jax.Array,
                     bias: jax.Array | None = None) -> jax.Array:
  """Weighted number of assignments per expert [L, E] (the selection the model made: top-k of the
  logits plus the selection bias [L, E], if any)."""
  z = jax.lax.stop_gradient(router_logits)
  if bias is not None:
    z = z + bias[:, None, :]
  _, idx = jax.lax.top_k(z, k)  # [L, N, k]
  onehot = jax.nn.one_hot(idx, z.shape[-1], dtype=jnp.float32).sum(axis=2)  # [L, N, E]
  return jnp.einsum("lne,n->le", onehot, weights.astype(jnp.float32))


def load_fraction(counts: jax.Array) -> jax.Array:
  """f [L, E]: each layer's share of assignments per expert (uniform routing: 1/E everywhere)."""
  return counts / jnp.maximum(counts.sum(axis=-1, keepdims=True), 1e-9)


def load_balance_loss(router_logits: jax.Array, counts: jax.Array, weights: jax.Array) -> jax.Array:
  """L_bal of the module docstring, averaged over layers (1.0 under uniform routing)."""
  E = router_logits.shape[-1]
  w = weights.astype(jnp.float32)
  probs = jax.nn.sigmoid(router_logits.astype(jnp.float32))  # [L, N, E]
  P = jnp.einsum("lne,n->le", probs, w) / jnp.maximum(w.sum(), 1.0)
  pi = P / jnp.maximum(P.sum(axis=-1, keepdims=True), 1e-9)
  f = jax.lax.stop_gradient(load_fraction(counts))
  return jnp.mean(E * jnp.sum(f * pi, axis=-1))


def router_z_loss(router_logits: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over layers, real tokens and experts of the squared router logits."""
  w = weights.astype(jnp.float32)
  sq = jnp.mean(jnp.square(router_logits.astype(jnp.float32)), axis=-1)  # [L, N]
  return jnp.mean(jnp.einsum("ln,n->l", sq, w) / jnp.maximum(w.sum(), 1.0))


def update_selection_bias(bias: jax.Array, counts: jax.Array, rate: float) -> jax.Array:
  """One aux-loss-free step on the bias [L, E] from this step's counts [L, E] (centred result)."""
  f = load_fraction(counts)
  b = bias + rate * jnp.sign(1.0 / f.shape[-1] - f)
  return b - b.mean(axis=-1, keepdims=True)
