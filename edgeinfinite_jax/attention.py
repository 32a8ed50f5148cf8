"""The attention family: full, streaming (sink + window) and edgeinfinite (+ memory).

One definition of what each query sees, shared by the training path and the
engine so that the two agree to float tolerance:

* Tokens are grouped into blocks of ``L = segment_len``. A query at position t
  in block b = t // L sees, as raw keys, the sink tokens (positions < n_sink)
  and the tokens of blocks b-w .. b up to itself (w = n_window // L).
* ``edgeinfinite`` additionally reads a compressive memory that holds every
  block older than the window, b' < b-w, minus the sink tokens (they stay raw).
  The gate blends the memory read with the local softmax attention.
* ``streaming`` is the same without memory; ``full`` sees everything.

The training path (``sequence_attention``) scans over segments and slices the
visible keys out of the whole sequence. The engine path (``cached_attention``)
keeps sink keys, a ring buffer of w+1 blocks and the memory in a per-layer
cache; block b and the block it evicts (b-w-1) share a ring slot, so a block is
compressed into memory exactly when the slot is reused. ``full`` in the engine
is the same ring, sized so that it never wraps.

Keys are cached before RoPE so that ``cache_relative`` positions can be
re-assigned as the window moves.

Quantization: every function takes an optional ``qx`` (``quant.apply.LayerQuant``).
Without it the code is the float code, unchanged. With it, Q and K are quantized
after RoPE, V at use, the probabilities after the softmax (``quantized_dot_attention``),
the memory M after each write, and the functions return ``(out, captured)`` where
``captured`` holds the pre-quantization activations and the quantized Q̂, K̂ and
pre-mask logits (for calibration and the EdgeQAT losses) when ``qx`` captures.
K/V reach these functions already quantized on write (kv_cache), in both paths.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from edgeinfinite_jax import gate as gate_lib
from edgeinfinite_jax import memory as memory_lib
from edgeinfinite_jax.config import ModelConfig

NEG_INF = -1e30  # finite: a fully masked row must not produce NaN


class LayerCache(NamedTuple):
  """Per-layer engine state. Keys are pre-RoPE; shapes fixed by the scenario."""
  sink_k: jax.Array  # [B, n_sink, K, D]
  sink_v: jax.Array
  ring_k: jax.Array  # [B, (w+1)*L, K, D]; slot j holds the newest block ≡ j mod (w+1)
  ring_v: jax.Array
  memory: memory_lib.Memory  # M [B, K, D, D], z [B, K, D]; zeros unless edgeinfinite


class Chunk(NamedTuple):
  """Where the tokens of one engine call sit: traced, so nothing recompiles."""
  start: jax.Array    # int32 scalar: absolute position of the chunk's first token
  n_valid: jax.Array  # int32 scalar: tokens of the chunk that are real (rest is padding)


def dot_attention(q, k, v, mask):
  """Softmax attention with GQA grouping.

  q [B, T, H, D], k/v [B, S, K, D], mask [B or 1, T, S] bool -> [B, T, H, D].
  Logits and softmax in float32 whatever the compute dtype.
  """
  logits = jnp.where(mask[:, None, None], grouped_logits(q, k), NEG_INF)
  return grouped_mix(jax.nn.softmax(logits, axis=-1), v)


# One [G*T, S] matmul per KV head: XLA:CPU runs this layout 2-3x faster than a
# batched btkgd,bskd contraction (measured by the benchmark's profiling).
def grouped_logits(q, k):
  """q [B, T, H, D], k [B, S, K, D] -> float32 QKᵀ/√D as [B, K, G, T, S] (G = H/K)."""
  b, t, h, d = q.shape
  kh, g = k.shape[2], h // k.shape[2]
  qr = q.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, d)
  logits = jnp.einsum("bkrd,bskd->bkrs", qr, k, preferred_element_type=jnp.float32)
  return logits.reshape(b, kh, g, t, -1) / jnp.sqrt(jnp.float32(d))


def grouped_mix(probs, v):
  """probs [B, K, G, T, S], v [B, S, K, D] -> float32 [B, T, K·G, D]."""
  b, kh, g, t, s = probs.shape
  d = v.shape[-1]
  probs = probs.astype(v.dtype).reshape(b, kh, g * t, s)
  out = jnp.einsum("bkrs,bskd->bkrd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, d)


def quantized_dot_attention(q, k, v, mask, qx, q_pos=None, k_pos=None):
  """``dot_attention`` with quantized Q, K (after RoPE), V and probabilities.

  q_pos [T] / k_pos [S]: absolute positions of the rows (token-adaptive masks).
  Integer mode (and fake_quant_dots='exact') runs QK^T and PV as integer dots
  (``quant.apply`` module doc).
  Returns (out [B, T, H, D] float32, captured dict).
  """
  from edgeinfinite_jax.quant import apply as qapply  # the quant package imports this one
  b, t, h, d = q.shape
  kh = k.shape[2]
  inv_sqrt_d = 1.0 / jnp.sqrt(jnp.float32(d))
  qx.record("q", q)
  qx.record("k", k)
  if qx.code_dots and site_on(qx, "q"):
    q_i, sq, zq = qx.qint("q", q)
    k_codes = qx.qint("k", k)
    logits = qapply.code_dot("btkgd,bskd->bkgts", (q_i.reshape(b, t, kh, h // kh, d), sq, zq),
                             k_codes) * inv_sqrt_d
    q_hat, k_hat = (qapply.dequantize(*a, q.dtype) for a in ((q_i, sq, zq), k_codes))
  else:
    q_hat, k_hat = qx.act("q", q, q_pos), qx.act("k", k, k_pos)
    logits = grouped_logits(q_hat, k_hat)
  qx.record("q_hat", q_hat)
  qx.record("k_hat", k_hat)
  qx.record("logits", logits)  # pre-mask, pre-softmax (L_D, token importance)
  logits = jnp.where(mask[:, None, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  qx.record("attn_probs", probs)
  qx.record("v", v)
  if qx.code_dots and site_on(qx, "q"):
    out = qapply.code_dot("bkgts,bskd->btkgd", qx.qint("attn_probs", probs),
                          qx.qint("v", v)).reshape(b, t, h, d)
  else:
    out = grouped_mix(qx.act("attn_probs", probs), qx.act("v", v, k_pos))
  return out, qx.cap or {}


def site_on(qx, site) -> bool:
  from edgeinfinite_jax.quant import apply as qapply
  return qapply.site_spec(qx.quant, site) is not None


def _rope(x, pos, inv_freq):
  from edgeinfinite_jax.model import apply_rope  # model imports this module
  return apply_rope(x, pos, inv_freq)


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


def segment_attention(config, q, q_pos, k, v, k_pos, k_valid, memory, inv_freq, gate_params,
                      qx=None):
  """One segment's output: local softmax attention blended with the memory read.

  q [B, T, H, D] and k/v [B, S, K, D] are pre-RoPE; q_pos [T], k_pos [S] absolute
  positions; k_valid [S] (or [B, S]) marks keys that may be seen at all; the
  causal rule is applied here. Returns float32 [B, T, H, D] (with ``qx``: and the
  captured dict).
  """
  m = config.memory
  block = q_pos[0] // m.segment_len
  rq = _rope(q, local_positions(config, q_pos, block)[None], inv_freq)
  rk = _rope(k, local_positions(config, k_pos, block)[None], inv_freq)
  mask = (k_pos[None, :] <= q_pos[:, None]) & k_valid[..., None, :]
  if mask.ndim == 2:
    mask = mask[None]
  if qx is None:
    local, captured = dot_attention(rq, rk, v, mask), None
  else:
    local, captured = quantized_dot_attention(rq, rk, v, mask, qx, q_pos, k_pos)
  if m.uses_memory:
    mem_q = rq if m.mem_uses_rope else q
    read = memory_lib.retrieve(memory, mem_q, m.eps)
    local = gate_lib.blend(config, gate_params, read, local, memory_lib.has_content(memory))
  return local if qx is None else (local, captured)


def _memory_keys(config, k, pos, inv_freq):
  """Keys as the memory sees them (pre-RoPE by default)."""
  if not config.memory.mem_uses_rope:
    return k
  return _rope(k, pos[None], inv_freq)


def sequence_attention(config: ModelConfig, q, k, v, positions, inv_freq, gate_params,
                       qx=None):
  """Training path over a whole sequence that starts at position 0."""
  m = config.memory
  if not m.segmented:
    mask = positions[:, None, :] <= positions[:, :, None]
    rq, rk = _rope(q, positions, inv_freq), _rope(k, positions, inv_freq)
    if qx is None:
      return dot_attention(rq, rk, v, mask)
    return quantized_dot_attention(rq, rk, v, mask, qx)
  return _segment_scan(config, q, k, v, inv_freq, gate_params, qx)


def _segment_scan(config, q, k, v, inv_freq, gate_params, qx=None):
  m = config.memory
  b, t, h, d = q.shape
  L, w, S = m.segment_len, m.window_blocks, m.n_sink
  nseg = -(-t // L)
  pad_back = nseg * L - t
  front = (w + 1) * L  # room for the window and the evicted block before position 0
  pad = lambda x: jnp.pad(x, ((0, 0), (front, pad_back), (0, 0), (0, 0)))
  kp, vp = pad(k), pad(v)
  q_seg = jnp.pad(q, ((0, 0), (0, pad_back), (0, 0), (0, 0)))
  q_seg = q_seg.reshape(b, nseg, L, h, d).swapaxes(0, 1)
  sink_pos = jnp.arange(S, dtype=jnp.int32)
  sink_k, sink_v = k[:, :S], v[:, :S]
  if sink_k.shape[1] < S:  # input shorter than the sink: pad, the causal rule hides it
    sink_k, sink_v = (jnp.pad(x, ((0, 0), (0, S - x.shape[1]), (0, 0), (0, 0)))
                      for x in (sink_k, sink_v))
  memory = memory_lib.empty(b, k.shape[2], d, d)

  def body(memory, xs):
    blk, q_b = xs
    if m.uses_memory:
      evict = blk - w - 1
      e_pos = evict * L + jnp.arange(L, dtype=jnp.int32)
      e_k = jax.lax.dynamic_slice_in_dim(kp, (evict + w + 1) * L, L, axis=1)
      e_v = jax.lax.dynamic_slice_in_dim(vp, (evict + w + 1) * L, L, axis=1)
      memory = memory_lib.update(memory, _memory_keys(config, e_k, e_pos, inv_freq), e_v,
                                 (e_pos >= S) & (evict >= 0), m.update_rule, m.eps)
      if qx is not None:
        memory = qx.memory(memory)
      if m.truncate_every:
        cut = (blk % m.truncate_every) == 0
        memory = jax.tree.map(lambda x: jnp.where(cut, jax.lax.stop_gradient(x), x), memory)
    win_start = (blk - w) * L
    win_pos = win_start + jnp.arange((w + 1) * L, dtype=jnp.int32)
    win_k = jax.lax.dynamic_slice_in_dim(kp, win_start + front, (w + 1) * L, axis=1)
    win_v = jax.lax.dynamic_slice_in_dim(vp, win_start + front, (w + 1) * L, axis=1)
    keys = jnp.concatenate([sink_k, win_k], axis=1)
    vals = jnp.concatenate([sink_v, win_v], axis=1)
    k_pos = jnp.concatenate([sink_pos, win_pos])
    # A sink token still inside the window is seen once, through the window.
    k_valid = jnp.concatenate([sink_pos < jnp.maximum(win_start, 0), win_pos >= 0])
    q_pos = blk * L + jnp.arange(L, dtype=jnp.int32)
    if qx is None:
      return memory, segment_attention(config, q_b, q_pos, keys, vals, k_pos, k_valid, memory,
                                       inv_freq, gate_params)
    # A fresh capture dict per segment: the scan stacks it (tracers must not leak out).
    return memory, segment_attention(config, q_b, q_pos, keys, vals, k_pos, k_valid, memory,
                                     inv_freq, gate_params, qx.fresh_capture())

  if m.remat:
    body = jax.checkpoint(body)
  _, out = jax.lax.scan(body, memory, (jnp.arange(nseg, dtype=jnp.int32), q_seg))
  if qx is not None:
    out, captured = out
  out = out.swapaxes(0, 1).reshape(b, nseg * L, h, d)[:, :t]
  return out if qx is None else (out, captured)


# ----------------------------------------------------------------------------- engine


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
                     gate_params, qx=None):
  """Engine path: one chunk (a segment, or a single decode token) of one layer.

  The chunk must lie inside one block (prefill chunks are aligned blocks; decode
  chunks are one token). Returns (output float32 [B, C, H, D], new cache). With
  ``qx``, k/v are already quantized on write (integer values when the cache holds
  integers; ``qx.kv_read`` turns entries back into floats).
  """
  read = (lambda which, x: x) if qx is None else (lambda which, x: qx.kv_read(which, x, q.dtype))
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
      mem = memory_lib.update(mem, _memory_keys(config, e_k, e_pos, inv_freq), e_v,
                              e_pos >= S, m.update_rule, m.eps)
      return mem if qx is None else qx.memory(mem)

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
  out = segment_attention(config, q, q_pos, keys, vals, k_pos, k_valid, memory, inv_freq,
                          gate_params, qx)
  if qx is not None:
    out = out[0]
  return out, LayerCache(sink_k, sink_v, ring_k, ring_v, memory)
