"""Rotary position embeddings (Hugging Face ``rotate_half`` layout) and the positions they use.

``rope_inv_freq`` applies the checkpoint's scaling (linear, Llama-3) once, on the
host; ``apply_rope`` rotates activations; ``local_positions`` is the one place
that decides which position a query or key of a segmented model is rotated by
(``absolute`` or ``cache_relative``, see ``MemoryConfig.rope_positions``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from edgeinfinite_jax.model.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies, float32, with linear or Llama-3 scaling applied."""
  d = config.head_dim
  inv = (1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d)))
  inv = inv.astype(np.float32)
  r = config.rope_scaling
  if r.rope_type == "linear":
    inv = inv / r.factor
  elif r.rope_type == "llama3":
    old = r.original_max_position_embeddings
    low_wavelen, high_wavelen = old / r.low_freq_factor, old / r.high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / r.factor, inv)
    smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def apply_rope(x, positions, inv_freq):
  """Rotates ``x[..., T, N, D]`` by ``positions[..., T]`` (HF rotate_half layout)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def local_positions(config: ModelConfig, pos, block):
  """RoPE positions for the local branch of queries in ``block``.

  ``absolute`` keeps token indices. ``cache_relative`` renumbers the visible
  cache [sink; window; segment] from 0, so positions stay below
  n_sink + n_window + segment_len however long the input is.
  """
  m = config.memory
  if m.rope_positions == "absolute" or not m.segmented:
    return pos
  window_start = jnp.maximum(block - m.window_blocks, 0) * m.segment_len
  offset = jnp.maximum(window_start - m.n_sink, 0)
  return jnp.where(pos < m.n_sink, pos, pos - offset)
