"""The engine's per-layer cache: sink keys, a ring buffer of window blocks, the memory.

The ``Scenario`` (engine/engine.py) fixes every shape here; ``cached_attention``
runs one chunk (an aligned prefill segment or a single decode token) of one
layer against it and returns the updated cache. Block b and the block it evicts
(b-w-1) share a ring slot, so a block is compressed into the memory exactly when
its slot is reused; ``full`` in the engine is the same ring sized never to wrap.
What each query sees is defined once, in ``attention.segment_attention``; this
file only decides where keys live.

Keys are cached before RoPE so that ``cache_relative`` positions can be
re-assigned as the window moves.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from edgeinfinite_jax.model import attention
from edgeinfinite_jax.model import memory as memory_lib
from edgeinfinite_jax.model.config import ModelConfig


class LayerCache(NamedTuple):
  """Per-layer engine state. Keys are pre-RoPE; shapes fixed by the scenario."""
  sink_k: jax.Array  # [B, n_sink, K, D]
  sink_v: jax.Array
  ring_k: jax.Array  # [B, (w+1)*L, K, D]; slot j holds the newest block ≡ j mod (w+1)
  ring_v: jax.Array
  memory: memory_lib.Memory  # M [B, K, D, D], z [B, K, D]; zeros unless edgeinfinite


class Chunk(NamedTuple):
  """Where the tokens of one engine call sit: traced, so nothing recompiles.

  There is deliberately no count of valid tokens. A padded last prefill segment is
  safe without one: the padding comes after the real tokens, so the causal rule
  hides it from every real query; its K/V land in ring (and sink) slots of
  positions the sequence has not reached yet, and each later decode token writes
  its own K/V into its slot before any query at that position or later can see it
  (a query at p sees keys at positions <= p only, and ``ring_positions`` derives
  positions from the block, not from what was written). The memory compresses
  only whole blocks that have left the window, never a padded one. The engine
  uses its valid count only outside the layers: for the last real token's logits
  and the state's length (``tests/test_engine.py`` checks padded prefills against
  teacher forcing).
  """
  start: jax.Array  # int32 scalar: absolute position of the chunk's first token


def empty_cache(config: ModelConfig, batch: int, n_sink: int, ring_len: int, dtype) -> LayerCache:
  kh, d = config.num_kv_heads, config.head_dim
  z = lambda n: jnp.zeros((batch, n, kh, d), dtype)
  d_mem = d if config.memory.uses_memory else 0  # no memory bytes for full/streaming
  return LayerCache(z(n_sink), z(n_sink), z(ring_len), z(ring_len),
                    memory_lib.empty(batch, kh, d_mem, d_mem))


def ring_positions(config: ModelConfig, block, ring_len):
  """Absolute position held by every ring entry when the newest block is ``block``."""
  L = config.memory.segment_len
  n_slots = ring_len // L
  slot = jnp.arange(n_slots, dtype=jnp.int32)
  held = block - jnp.mod(block - slot, n_slots)
  return (held[:, None] * L + jnp.arange(L, dtype=jnp.int32)[None]).reshape(-1)


def cached_attention(config: ModelConfig, cache: LayerCache, chunk: Chunk, q, k, v, inv_freq,
                     gate_params, qx):
  """Engine path: one chunk (a segment, or a single decode token) of one layer.

  The chunk must lie inside one block (prefill chunks are aligned blocks; decode
  chunks are one token). Returns (output float32 [B, C, H, D], new cache). With
  ``qx``, k/v are already quantized on write (integer values when the cache holds
  integers; ``qx.kv_read`` turns entries back into floats).
  """
  read = lambda which, x: qx.kv_read(which, x, q.dtype)
  m = config.memory
  L, S = m.segment_len, cache.sink_k.shape[1]
  ring_len = cache.ring_k.shape[1]
  c = q.shape[1]
  block = chunk.start // L
  slot_start = jnp.mod(block, ring_len // L) * L
  memory = cache.memory
  if m.uses_memory:
    # Entering a new block reuses the slot of the block that leaves the window.
    evict = block - ring_len // L
    e_pos = evict * L + jnp.arange(L, dtype=jnp.int32)

    def compress(mem):
      e_k = read("k", jax.lax.dynamic_slice_in_dim(cache.ring_k, slot_start, L, axis=1))
      e_v = read("v", jax.lax.dynamic_slice_in_dim(cache.ring_v, slot_start, L, axis=1))
      mem = memory_lib.update(mem, attention.memory_keys(config, e_k, e_pos, inv_freq), e_v,
                              e_pos >= S, m.update_rule, m.eps)
      return qx.memory(mem)

    memory = jax.lax.cond((chunk.start % L == 0) & (evict >= 0), compress, lambda x: x, memory)
  offset = slot_start + jnp.mod(chunk.start, L)
  ring_k = jax.lax.dynamic_update_slice_in_dim(cache.ring_k, k.astype(cache.ring_k.dtype),
                                               offset, axis=1)
  ring_v = jax.lax.dynamic_update_slice_in_dim(cache.ring_v, v.astype(cache.ring_v.dtype),
                                               offset, axis=1)
  q_pos = chunk.start + jnp.arange(c, dtype=jnp.int32)
  sink_k, sink_v = cache.sink_k, cache.sink_v
  if S:
    # Sink slot i takes the chunk token at position i, when the chunk holds it.
    sink_pos = jnp.arange(S, dtype=jnp.int32)
    src = jnp.clip(sink_pos - chunk.start, 0, c - 1)
    take = ((sink_pos >= chunk.start) & (sink_pos < chunk.start + c))[None, :, None, None]
    sink_k = jnp.where(take, k[:, src].astype(sink_k.dtype), sink_k)
    sink_v = jnp.where(take, v[:, src].astype(sink_v.dtype), sink_v)
  r_pos = ring_positions(config, block, ring_len)
  win_start = (block - (ring_len // L - 1)) * L
  s_pos = jnp.arange(S, dtype=jnp.int32)
  keys = read("k", jnp.concatenate([sink_k, ring_k], axis=1))
  vals = read("v", jnp.concatenate([sink_v, ring_v], axis=1))
  k_pos = jnp.concatenate([s_pos, r_pos])
  k_valid = jnp.concatenate([s_pos < jnp.maximum(win_start, 0), r_pos >= 0])
  out, _ = attention.segment_attention(config, q, q_pos, keys, vals, k_pos, k_valid, memory,
                                       inv_freq, gate_params, qx)
  return out, LayerCache(sink_k, sink_v, ring_k, ring_v, memory)
