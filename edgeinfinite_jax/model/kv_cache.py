"""The engine's per-layer cache: sink keys, a ring buffer of window blocks, the memory.

The ``Scenario`` (engine/engine.py) fixes every shape here; ``cached_attention``
runs one chunk (an aligned prefill segment or a single decode token) of one
layer against it and returns the updated cache. Block b and the block it evicts
(b-w-1) share a ring slot, so a block is compressed into the memory exactly when
its slot is reused; ``full`` in the engine is the same ring sized never to wrap.
What each query sees is defined once, in ``attention.segment_attention``; this
file only decides where keys live. ``h2o`` and ``snapkv`` add a store of kept
tokens (``eviction.Kept``): at the same moment, the block leaving the window
competes with them for the store's slots instead of entering a memory.

Keys are cached before RoPE so that ``cache_relative`` positions can be
re-assigned as the window moves, and the memory compresses pre-RoPE keys. The one
exception is ``full`` attention in float (``attention.float_path``): its positions are
absolute and never change, so keys are cached after RoPE (rotated once, on write)
and ``attention.blockwise_attention`` reads only the filled part of the cache.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from edgeinfinite_jax.model import attention
from edgeinfinite_jax.model import eviction
from edgeinfinite_jax.model import memory as memory_lib
from edgeinfinite_jax.model.config import ModelConfig
from edgeinfinite_jax.model.rope import apply_rope


class LayerCache(NamedTuple):
  """Per-layer engine state. Keys are pre-RoPE; shapes fixed by the scenario."""
  sink_k: jax.Array  # [B, n_sink, K, D]
  sink_v: jax.Array
  ring_k: jax.Array  # [B, (w+1)*L, K, D]; slot j holds the newest block ≡ j mod (w+1)
  ring_v: jax.Array
  memory: memory_lib.Memory  # M [B, K, D, D], z [B, K, D]; zeros unless edgeinfinite
  kept: eviction.Kept | None = None  # h2o / snapkv only (None: no leaves, no bytes)


class Chunk(NamedTuple):
  """Where the tokens of one engine call sit: traced, so nothing recompiles.

  Attention itself needs no count of valid tokens. A padded last prefill segment
  is safe without one: the padding comes after the real tokens, so the causal rule
  hides it from every real query; its K/V land in ring (and sink) slots of
  positions the sequence has not reached yet, and each later decode token writes
  its own K/V into its slot before any query at that position or later can see it
  (a query at p sees keys at positions <= p only, and ``ring_positions`` derives
  positions from the block, not from what was written). The memory compresses
  only whole blocks that have left the window, never a padded one. Besides the
  eviction scores (``n_valid``), the engine uses the valid count only outside the
  layers: for the last real token's logits and the state's length
  (``tests/test_engine.py`` checks padded prefills against teacher forcing).
  """
  start: jax.Array  # int32 scalar: absolute position of the chunk's first token
  # Real rows of the chunk (int32 scalar). Only the eviction scores read it: a padding
  # row is hidden from every real query, but its own probabilities would still vote.
  n_valid: jax.Array


def empty_cache(config: ModelConfig, batch: int, n_sink: int, ring_len: int, dtype) -> LayerCache:
  kh, d = config.num_kv_heads, config.head_dim
  z = lambda n: jnp.zeros((batch, n, kh, d), dtype)
  d_mem = d if config.memory.uses_memory else 0  # no memory bytes for full/streaming
  kept = (eviction.empty(batch, config.memory.n_kept, ring_len, kh, d, dtype)
          if config.memory.evicts else None)
  return LayerCache(z(n_sink), z(n_sink), z(ring_len), z(ring_len),
                    memory_lib.empty(batch, kh, d_mem, d_mem), kept)


def ring_positions(config: ModelConfig, block, ring_len):
  """Absolute position held by every ring entry when the newest block is ``block``."""
  L = config.memory.segment_len
  n_slots = ring_len // L
  slot = jnp.arange(n_slots, dtype=jnp.int32)
  held = block - jnp.mod(block - slot, n_slots)
  return (held[:, None] * L + jnp.arange(L, dtype=jnp.int32)[None]).reshape(-1)


def _write_block(ring, x, slot_start, in_block, L):
  """``ring`` with the chunk ``x [B, c, K, D]`` written from offset ``in_block`` of the
  block slot at ``slot_start``, clipped at the block's end.

  A decode token (c = 1) is written in place. A prefill chunk (c = L) starts
  mid-block when a prefill continues a state (``Engine.prefill(tokens, state=)``):
  its first ``L - in_block`` rows belong to this block and the rest are padding
  (the engine feeds only the rest of the block); writing all ``L`` rows would spill
  into the next slot, which still holds the oldest block of the window. So the slot
  is rebuilt with the chunk shifted in and written back whole.
  """
  x = x.astype(ring.dtype)
  c = x.shape[1]
  if c == 1:
    return jax.lax.dynamic_update_slice_in_dim(ring, x, slot_start + in_block, axis=1)
  old = jax.lax.dynamic_slice_in_dim(ring, slot_start, L, axis=1)
  src = jnp.arange(L, dtype=jnp.int32) - in_block
  take = ((src >= 0) & (src < c))[None, :, None, None]
  new = jnp.where(take, _shift_rows(x, in_block, L), old)
  return jax.lax.dynamic_update_slice_in_dim(ring, new, slot_start, axis=1)


def _shift_rows(x, offset, n):
  """n rows whose row j is ``x[:, j - offset]`` (zeros where that is outside x), for a
  traced ``offset`` in [0, n]: one dynamic slice of x's first n rows placed after n zero
  rows. Not a gather with traced indices: NPU delegates keep slices on the accelerator,
  and a gather tends to fall back to the CPU."""
  head = x[:, :n]
  rows = lambda k: jnp.zeros((x.shape[0], k) + x.shape[2:], x.dtype)
  padded = jnp.concatenate([rows(n), head, rows(n - head.shape[1])], axis=1)
  return jax.lax.dynamic_slice_in_dim(padded, n - jnp.clip(offset, 0, n), n, axis=1)


def _write_sink(sink, x, start):
  """Sink slot i takes the chunk's row i - start, when the chunk holds position i.

  With slices, not a gather (see ``_shift_rows``): a decode token can land only in slot
  ``start``, so it is broadcast and selected; a segment's rows are shifted by ``start``.
  """
  S, c = sink.shape[1], x.shape[1]
  slot = jnp.arange(S, dtype=jnp.int32)[None, :, None, None]
  x = x.astype(sink.dtype)
  if c == 1:
    return jnp.where(slot == start, x, sink)
  return jnp.where((slot >= start) & (slot < start + c), _shift_rows(x, start, S), sink)


def cached_attention(config: ModelConfig, cache: LayerCache, chunk: Chunk, q, k, v, inv_freq,
                     gate_params, qx):
  """Engine path: one chunk (a segment, or a single decode token) of one layer.

  A chunk is a single decode token or a prefill segment of ``L`` rows whose valid
  rows end at or before its first block's end (an aligned block; or, continuing a
  state, the rest of the current block); rows past the block's end are padding and
  are not written. Returns (output float32 [B, C, H, D], new cache). With
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
  if not m.segmented and attention.float_path(qx):
    return _full_attention(cache, chunk, q, k, v, inv_freq, slot_start, L, m.key_block)
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

    due = (chunk.start % L == 0) & (evict >= 0)
    if c > 1:
      # A prefill segment compresses on nearly every call: compute it always and select,
      # so the exported prefill graph has no IF (NPU delegates keep selects on the
      # accelerator; a conditional falls back to the CPU). A decode token compresses
      # once per L tokens, so there a cond saves L - 1 updates out of L.
      fresh = compress(memory)
      memory = jax.tree.map(lambda new, old: jnp.where(due, new, old), fresh, memory)
    else:
      memory = jax.lax.cond(due, compress, lambda x: x, memory)
  kept = cache.kept
  if m.evicts:
    kept = _evict(config, cache, chunk, c, slot_start, S)
  ring_k = _write_block(cache.ring_k, k, slot_start, jnp.mod(chunk.start, L), L)
  ring_v = _write_block(cache.ring_v, v, slot_start, jnp.mod(chunk.start, L), L)
  q_pos = chunk.start + jnp.arange(c, dtype=jnp.int32)
  sink_k, sink_v = cache.sink_k, cache.sink_v
  if S:
    sink_k, sink_v = _write_sink(sink_k, k, chunk.start), _write_sink(sink_v, v, chunk.start)
  r_pos = ring_positions(config, block, ring_len)
  win_start = (block - (ring_len // L - 1)) * L
  s_pos = jnp.arange(S, dtype=jnp.int32)
  keys = read("k", jnp.concatenate([sink_k, ring_k], axis=1))
  vals = read("v", jnp.concatenate([sink_v, ring_v], axis=1))
  k_pos = jnp.concatenate([s_pos, r_pos])
  k_valid = jnp.concatenate([s_pos < jnp.maximum(win_start, 0), r_pos >= 0])
  seen = None if kept is None else (read("k", kept.k), read("v", kept.v), kept.pos)
  out, _, probs = attention.segment_attention(config, q, q_pos, keys, vals, k_pos, k_valid,
                                              memory, inv_freq, gate_params, qx, seen)
  if m.evicts:
    # The chunk's rows start with no score (a slot's previous block has left), then
    # everything the chunk saw gets its votes.
    fresh = (r_pos >= chunk.start) & (r_pos < chunk.start + c)
    ring_score = jnp.where(fresh[None, :, None], 0.0, kept.ring_score)
    kept = eviction.add_mass(kept, eviction.chunk_mass(m, probs, q_pos, chunk.n_valid), S,
                             ring_score)
  return out, LayerCache(sink_k, sink_v, ring_k, ring_v, memory, kept)


def _evict(config: ModelConfig, cache: LayerCache, chunk: Chunk, c: int, slot_start,
           S: int) -> eviction.Kept:
  """h2o / snapkv on entering a new block: the block in the slot about to be reused
  competes with the kept tokens (``eviction.select``); snapkv's votes then restart."""
  m, L = config.memory, config.memory.segment_len
  ring_len = cache.ring_k.shape[1]
  evict = chunk.start // L - ring_len // L
  e_pos = evict * L + jnp.arange(L, dtype=jnp.int32)
  cut = lambda x: jax.lax.dynamic_slice_in_dim(x, slot_start, L, axis=1)

  def select(kept):
    return eviction.select(m, kept, cut(cache.ring_k), cut(cache.ring_v), e_pos, e_pos >= S,
                           cut(kept.ring_score))

  block_start = chunk.start % L == 0
  due = block_start & (evict >= 0)
  if c > 1:  # as the memory's update: always computed and selected in a prefill graph
    kept = jax.tree.map(lambda new, old: jnp.where(due, new, old), select(cache.kept),
                        cache.kept)
  else:
    kept = jax.lax.cond(due, select, lambda x: x, cache.kept)
  return eviction.restart(m, kept, block_start)


def _full_attention(cache: LayerCache, chunk: Chunk, q, k, v, inv_freq, slot_start, L,
                    key_block):
  """``full`` attention in float: the cache never wraps (entry i is position i) and
  holds keys after RoPE, so a step rotates only its own chunk and attends over the
  filled entries (``attention.blockwise_attention``); the working memory and the
  work of a step grow with the tokens read, not with the cache's capacity."""
  pos = chunk.start + jnp.arange(q.shape[1], dtype=jnp.int32)
  rk = apply_rope(k, pos[None], inv_freq)
  ring_k = _write_block(cache.ring_k, rk, slot_start, jnp.mod(chunk.start, L), L)
  ring_v = _write_block(cache.ring_v, v, slot_start, jnp.mod(chunk.start, L), L)
  # Padding rows of a last prefill segment are written too; the causal rule hides
  # them, and the next token overwrites its own slot before anyone can see it.
  out = attention.blockwise_attention(apply_rope(q, pos[None], inv_freq), ring_k, ring_v, pos,
                                      chunk.start + q.shape[1], key_block)
  return out, cache._replace(ring_k=ring_k, ring_v=ring_v)
