"""Rotary position embeddings in the interleaved (complex, GPT-J) pair layout, text and vision.

Pair i of a head is (x[2i], x[2i+1]); it is rotated by angle pos * inv_freq[i]. Angles are computed in
float32 as `float(pos) * inv_freq` exactly as transformers does, and the rotation in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llama4_jax.config import RopeScaling, TextConfig, VisionConfig


def base_inv_freq(dim: int, theta: float) -> np.ndarray:
  """theta^(-2i/dim) for i < dim/2, float32 like the reference."""
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def llama3_scale(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
  """llama3 band scaling: keep high frequencies, divide low ones by `factor`, blend in between.

  The band masks are computed first so that an empty middle band (Scout: low == high == 1) never
  evaluates the 0/0 blend.
  """
  inv = inv_freq.astype(np.float32)
  wavelen = np.float32(2 * np.pi) / inv
  low_wl = np.float32(s.original_max_position_embeddings / s.low_freq_factor)
  high_wl = np.float32(s.original_max_position_embeddings / s.high_freq_factor)
  out = np.where(wavelen > low_wl, inv / np.float32(s.factor), inv)
  middle = (wavelen >= high_wl) & (wavelen <= low_wl)
  if middle.any():
    span = np.float32(s.high_freq_factor - s.low_freq_factor)
    smooth = (np.float32(s.original_max_position_embeddings) / wavelen[middle] - np.float32(s.low_freq_factor)) / span
    out[middle] = (1 - smooth) * inv[middle] / np.float32(s.factor) + smooth * inv[middle]
  return out.astype(np.float32)


def text_inv_freq(cfg: TextConfig) -> np.ndarray:
  inv = base_inv_freq(cfg.head_dim, cfg.rope_theta)
  return inv if cfg.rope_scaling is None else llama3_scale(inv, cfg.rope_scaling)


def angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """cos, sin of float(pos) * inv_freq: [..., d/2] float32."""
  phi = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  return jnp.cos(phi), jnp.sin(phi)


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates pairs (x[2i], x[2i+1]) of x [B, T, N, d] by angles cos/sin [B, T, d/2]; float32 inside."""
  x32 = x.astype(jnp.float32)
  xe, xo = x32[..., 0::2], x32[..., 1::2]
  c, s = cos[..., None, :], sin[..., None, :]
  out = jnp.stack([xe * c - xo * s, xe * s + xo * c], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def vision_angles(cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
  """2-D vision RoPE table for one tile: cos, sin [grid^2 + 1, head_dim/2].

  Pairs 0..F/2-1 rotate by the 1-based column, pairs F/2..F-1 by the 1-based row, with
  frequencies theta^(-j/(F/2)) where F = head_dim/2; the CLS token (last row) gets angle 0.
  """
  n = cfg.grid
  half = cfg.head_dim // 2  # F complex pairs
  quarter = half // 2
  freqs = (np.float32(1.0) / (np.float32(cfg.rope_theta) **
                              (np.arange(0, half, 2)[:quarter].astype(np.float32) / np.float32(half))))
  idx = np.arange(n * n)
  col = (idx % n + 1).astype(np.float32)
  row = (idx // n + 1).astype(np.float32)
  phi = np.concatenate([col[:, None] * freqs[None], row[:, None] * freqs[None]], axis=-1)
  phi = np.concatenate([phi, np.zeros((1, half), np.float32)], axis=0).astype(np.float32)
  return np.cos(phi), np.sin(phi)
