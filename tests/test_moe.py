"""The sorted (block-grouped) expert path's hand-written backward against automatic differentiation of the
dense all-experts oracle: gradients of the tokens, the scores and every expert weight, under balanced,
empty-expert and single-expert routing, blocks of several sizes, top-1 and top-2."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama4_jax import config as C
from llama4_jax.model import moe

N, D, I = 40, 16, 24
F32 = C.Policy(matmul_precision="highest")


def _inputs(E: int, k: int, routing: str, seed: int = 0):
  r = np.random.RandomState(seed)
  x = jnp.asarray(r.randn(N, D), jnp.float32)
  if routing == "balanced":
    idx = np.stack([r.permutation(E)[:k] for _ in range(N)])
  elif routing == "empty":  # experts 0 and E-1 get nothing; expert 1 is the first choice of half the tokens
    middle = np.arange(1, E - 1)
    idx = np.stack([r.permutation(middle)[:k] for _ in range(N)])
    idx[: N // 2] = [np.concatenate([[1], r.permutation(middle[1:])[:k - 1]]) for _ in range(N // 2)]
  else:  # "one": every token's first choice is expert 2
    idx = np.stack([np.concatenate([[2], r.permutation([e for e in range(E) if e != 2])[:k - 1]])
                    for _ in range(N)])
  scores = jnp.asarray(r.uniform(0.2, 1.0, (N, k)), jnp.float32)
  gate_up = jnp.asarray(r.randn(E, D, 2, I) / np.sqrt(D), jnp.float32)
  down = jnp.asarray(r.randn(E, I, D) / np.sqrt(I), jnp.float32)
  return x, jnp.asarray(idx, jnp.int32), scores, gate_up, down


def _grads(impl, policy, x, idx, scores, gate_up, down, w):
  def loss(x, scores, gate_up, down):
    return jnp.sum(moe.EXPERT_IMPLS[impl](x, idx, scores, gate_up, down, policy) * w)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, scores, gate_up, down)


@pytest.mark.parametrize("E,k,routing,block", [(4, 1, "balanced", 8), (6, 2, "empty", 8), (6, 2, "one", 8),
                                               (8, 1, "balanced", 128), (5, 2, "one", 16)])
def test_sorted_gradients_equal_dense(E, k, routing, block):
  args = _inputs(E, k, routing)
  w = jnp.asarray(np.random.RandomState(1).randn(N, D), jnp.float32)
  policy = dataclasses.replace(F32, moe_block=block)
  (y_s, g_s), (y_d, g_d) = (_grads(impl, policy, *args, w) for impl in ("sorted", "dense"))
  np.testing.assert_allclose(float(y_s), float(y_d), rtol=1e-5)
  for name, a, b in zip(("x", "scores", "gate_up", "down"), g_s, g_d):
    scale = float(np.abs(np.asarray(b)).max())
    assert scale > 0, name
    err = float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale
    assert err < 1e-5, f"d{name}: relative error {err:.2e}"
  if routing == "empty":  # experts without tokens get exactly zero gradient
    for g in g_s[2:]:
      assert not np.asarray(g)[0].any() and not np.asarray(g)[E - 1].any()


def test_sorted_gradients_with_fp8_training_recipe():
  """fp8="train" goes through the FP8 einsum's own gradient (e5m2 output gradients) per block: close to the
  float32 gradients at FP8 precision, not equal."""
  args = _inputs(4, 1, "balanced")
  w = jnp.asarray(np.random.RandomState(1).randn(N, D), jnp.float32)
  policy = dataclasses.replace(F32, moe_block=8)
  _, g32 = _grads("sorted", policy, *args, w)
  _, g8 = _grads("sorted", dataclasses.replace(policy, fp8="train"), *args, w)
  for name, a, b in zip(("x", "scores", "gate_up", "down"), g8, g32):
    rel = float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
    assert 1e-6 < rel < 0.2, f"d{name}: {rel:.2e}"
