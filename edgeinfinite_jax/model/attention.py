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
visible keys out of the whole sequence. The engine path (``kv_cache.cached_attention``)
keeps the same keys in a fixed-size cache and calls ``segment_attention`` too.
``full`` attention in float runs as ``blockwise_attention`` (a running softmax over
key blocks) in both paths.

Quantization: every function takes the layer's ``qx`` (``quant.layer_quant.LayerQuant``);
for a float model its quantizers are identities, so there is one code path. Q and
K are quantized after RoPE, V at use, the probabilities after the softmax
(``dot_attention``), the memory M after each write. Every function returns
``(out, captured)``: ``captured`` holds the pre-quantization activations and the
quantized Q̂, K̂ and pre-mask logits (for calibration and the EdgeQAT losses) when
``qx`` captures, else it is empty. K/V reach these functions already quantized on
write (kv_cache), in both paths.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from edgeinfinite_jax.model import eviction
from edgeinfinite_jax.model import gate as gate_lib
from edgeinfinite_jax.model import memory as memory_lib
from edgeinfinite_jax.model.config import ConfigError, ModelConfig
from edgeinfinite_jax.model.rope import apply_rope, local_positions
from edgeinfinite_jax.quant import intsim, losses
from edgeinfinite_jax.quant import layer_quant as qapply

NEG_INF = -1e30  # finite: a fully masked row must not produce NaN



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


def causal_blockwise_attention(q, k, v, block: int):
  """``blockwise_attention`` of a sequence against itself from position 0 (query i and
  key i at position i, the training path), skipping the key blocks wholly in the
  queries' future: queries go in blocks of ``block`` too, and query block j visits key
  blocks 0..j only, so the work is the causal half of T x T (plus the diagonal
  blocks) instead of all of it, and a step's scores are [block, block] per row group.
  Same values as one ``blockwise_attention`` over all keys: a skipped block was fully
  masked, adding exp(-inf) = 0. Query blocks are a Python loop (static trip counts,
  reverse-differentiable): ``T / block`` of them."""
  t = q.shape[1]
  if block <= 0 or t <= block:
    return blockwise_attention(q, k, v, jnp.arange(t, dtype=jnp.int32), t, block)
  outs = []
  for lo in range(0, t, block):
    hi = min(lo + block, t)
    outs.append(blockwise_attention(q[:, lo:hi], k[:, :hi], v[:, :hi],
                                    jnp.arange(lo, hi, dtype=jnp.int32), hi, block))
  return jnp.concatenate(outs, axis=1)


def blockwise_attention(q, k, v, q_pos, n_keys, block: int):
  """Causal softmax attention with a running softmax over key blocks (flash style).

  q [B, T, H, D] and k/v [B, S, K, D] are after RoPE; key i sits at position i (a
  sequence from position 0, or the full route's cache, which never wraps); q_pos
  [T] are the queries' positions. Only the first ``n_keys`` keys are visited:
  ``ceil(n_keys / block)`` blocks, an int (a ``scan``: reverse-differentiable, the
  training path) or a traced value (a ``while_loop``: an engine step visits only the
  filled part of its cache, and nothing recompiles as it fills). Keys past a query's
  position are masked. Working memory is O(T x block), never O(T x S). ``block`` 0
  (or >= S): one softmax over all S keys, no loop (``MemoryConfig.key_block``).
  Float only: no quantizer sees the probabilities (they are never all in one place).
  Returns float32 [B, T, H, D].
  """
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = h // kh
  block = s if block <= 0 else min(block, s)
  # grouped_logits' layout: rows r = (group, query) of one [G*T, block] matmul per KV head
  qr = q.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, d)
  r_pos = jnp.tile(q_pos, g)
  inv_sqrt_d = 1.0 / jnp.sqrt(jnp.float32(d))

  def block_logits(lo, fresh):
    """Masked logits [B, K, G*T, block] of keys lo .. lo+block-1 (those >= ``fresh``)."""
    kb = jax.lax.dynamic_slice_in_dim(k, lo, block, axis=1)
    k_pos = lo + jnp.arange(block, dtype=jnp.int32)
    mask = (k_pos[None, :] <= r_pos[:, None]) & (k_pos >= fresh)[None, :]
    logits = jnp.einsum("bkrd,bskd->bkrs", qr, kb,
                        preferred_element_type=jnp.float32) * inv_sqrt_d
    return jnp.where(mask, logits, NEG_INF)

  def mix(p, lo):
    vb = jax.lax.dynamic_slice_in_dim(v, lo, block, axis=1)
    return jnp.einsum("bkrs,bskd->bkrd", p.astype(vb.dtype), vb,
                      preferred_element_type=jnp.float32)

  def finish(out):  # [B, K, G*T, D] -> [B, T, H, D]
    return out.reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)

  if block == s:  # one block: a plain softmax, no loop
    probs = jax.nn.softmax(block_logits(0, 0), axis=-1)
    return finish(mix(probs, 0))

  def body(i, carry):
    m, l, acc = carry
    # The last block may start early to stay inside the cache; its keys that an
    # earlier block already covered are masked (k_pos >= i * block).
    lo = jnp.minimum(i * block, s - block)
    logits = block_logits(lo, i * block)
    m_new = jnp.maximum(m, logits.max(axis=-1))
    p = jnp.exp(logits - m_new[..., None])
    corr = jnp.exp(m - m_new)
    return m_new, l * corr + p.sum(axis=-1), acc * corr[..., None] + mix(p, lo)

  carry = (jnp.full((b, kh, g * t), NEG_INF, jnp.float32),
           jnp.zeros((b, kh, g * t), jnp.float32), jnp.zeros((b, kh, g * t, d), jnp.float32))
  n_blocks = -(-n_keys // block)
  if isinstance(n_blocks, int):  # training path: a scan, recomputed on the backward pass
    body = jax.checkpoint(body)
  _, l, acc = jax.lax.fori_loop(0, n_blocks, body, carry)
  return finish(acc / l[..., None])  # every query sees at least itself: l >= 1


def float_path(qx) -> bool:
  """True when no quantizer or capture touches attention: ``blockwise_attention``
  may replace ``dot_attention`` (whose probabilities quantizers and captures see)."""
  return not qx.active and qx.cap is None


def dot_attention(q, k, v, mask, qx, q_pos=None, k_pos=None):
  """Softmax attention with GQA grouping, through the layer's quantizers.

  q [B, T, H, D], k/v [B, S, K, D], mask [B or 1, T, S] bool, or [B, K, T, S] when
  which keys may be seen differs per KV head (an evicting cache's kept tokens).
  Logits and softmax in float32 whatever the compute dtype. Q, K (after RoPE), V
  and the probabilities pass ``qx``'s quantizers: identities for a float model.

  q_pos [T] / k_pos [S]: absolute positions of the rows (token-adaptive masks).
  Integer mode (and fake_quant_dots='exact') runs QK^T and PV as integer dots
  (``quant.apply`` module doc).
  Returns (out [B, T, H, D] float32, captured dict).
  """
  out, captured, _ = _dot_attention(q, k, v, mask, qx, q_pos, k_pos)
  return out, captured


def _dot_attention(q, k, v, mask, qx, q_pos, k_pos):
  """``dot_attention`` that also returns the float32 probabilities [B, K, G, T, S]
  (before their quantizer: what an eviction policy scores keys by)."""
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
    q_hat, k_hat = (intsim.to_real(*a, q.dtype) for a in ((q_i, sq, zq), k_codes))
  else:
    q_hat, k_hat = qx.act("q", q, q_pos), qx.act("k", k, k_pos)
    logits = grouped_logits(q_hat, k_hat)
  qx.record("q_hat", q_hat)
  qx.record("k_hat", k_hat)
  qx.record("logits", logits)  # pre-mask, pre-softmax (L_D, token importance)
  logits = jnp.where(mask[:, None, None] if mask.ndim == 3 else mask[:, :, None], logits,
                     NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  qx.record("attn_probs", probs)
  qx.record("v", v)
  if qx.code_dots and site_on(qx, "q"):
    out = qapply.code_dot("bkgts,bskd->btkgd", qx.qint("attn_probs", probs),
                          qx.qint("v", v)).reshape(b, t, h, d)
  else:
    out = grouped_mix(qx.act("attn_probs", probs), qx.act("v", v, k_pos))
  return out, qx.cap or {}, probs


def site_on(qx, site) -> bool:
  return qapply.site_spec(qx.quant, site) is not None


def segment_attention(config, q, q_pos, k, v, k_pos, k_valid, memory, inv_freq, gate_params,
                      qx, kept=None):
  """One segment's output: local softmax attention blended with the memory read.

  q [B, T, H, D] and k/v [B, S, K, D] are pre-RoPE; q_pos [T], k_pos [S] absolute
  positions; k_valid [S] (or [B, S]) marks keys that may be seen at all; the
  causal rule is applied here. ``kept``: an evicting cache's kept tokens (h2o,
  snapkv), ``(k, v, pos)`` with k/v [B, n, K, D] pre-RoPE and pos [B, n, K] (-1: an
  empty slot; all older than any query), seen between the first ``n_sink`` keys (the
  sink) and the rest. Returns (float32 [B, T, H, D], captured dict, probabilities
  [B, K, G, T, S (+ n)] over the keys in that order).

  RoPE of the kept tokens: ``absolute`` rotates each at its own original position
  (so positions differ per KV head); ``cache_relative`` places them after the sink
  in slot order (the store is in position order, ``eviction`` module doc) and shifts
  the window and the queries by ``n`` (fixed, so no position moves as the store
  fills), as H2O's positional rolling numbers a cache.
  """
  m = config.memory
  block = q_pos[0] // m.segment_len
  lq, lk = local_positions(config, q_pos, block), local_positions(config, k_pos, block)
  if kept is not None and m.rope_positions == "cache_relative":
    n = kept[0].shape[1]
    lq, lk = lq + jnp.where(q_pos < m.n_sink, 0, n), lk + jnp.where(k_pos < m.n_sink, 0, n)
  rq = apply_rope(q, lq[None], inv_freq)
  rk = apply_rope(k, lk[None], inv_freq)
  mask = (k_pos[None, :] <= q_pos[:, None]) & k_valid[..., None, :]
  if mask.ndim == 2:
    mask = mask[None]
  if kept is not None:
    rk, v, mask = _with_kept(config, kept, rk, v, mask, inv_freq)
    k_pos = None  # per-head positions; token-adaptive bits are refused with eviction
  local, captured, probs = _dot_attention(rq, rk, v, mask, qx, q_pos, k_pos)
  if m.uses_memory:
    mem_q = rq if m.mem_uses_rope else q
    read = memory_lib.retrieve(memory, mem_q, m.eps)
    local = gate_lib.blend(config, gate_params, read, local, memory_lib.has_content(memory))
  return local, captured, probs


def _with_kept(config, kept, rk, v, mask, inv_freq):
  """RoPE'd keys, values and mask [B, K, T, S + n] with the kept tokens inserted after
  the sink (``segment_attention``)."""
  k_kept, v_kept, pos = kept
  S, (b, n, kh) = config.memory.n_sink, pos.shape
  if config.memory.rope_positions == "cache_relative":
    pos = jnp.broadcast_to(S + jnp.arange(n, dtype=jnp.int32)[None, :, None], pos.shape)
  # apply_rope rotates x[..., T, N, D] by positions[..., T]: here T = the KV heads.
  rk_kept = apply_rope(k_kept[..., None, :], pos, inv_freq)[..., 0, :].astype(rk.dtype)
  insert = lambda a, x: jnp.concatenate([a[:, :S], x.astype(a.dtype), a[:, S:]], axis=1)
  t = mask.shape[1]
  seen = jnp.broadcast_to(jnp.swapaxes(kept[2] >= 0, 1, 2)[:, :, None, :], (b, kh, t, n))
  per_head = jnp.broadcast_to(mask[:, None], (b, kh) + mask.shape[1:])
  mask = jnp.concatenate([per_head[..., :S], seen, per_head[..., S:]], axis=-1)
  return insert(rk, rk_kept), insert(v, v_kept), mask


def memory_keys(config, k, pos, inv_freq):
  """Keys as the memory sees them (pre-RoPE by default)."""
  if not config.memory.mem_uses_rope:
    return k
  return apply_rope(k, pos[None], inv_freq)


def sequence_attention(config: ModelConfig, q, k, v, positions, inv_freq, gate_params, qx):
  """Training path over a whole sequence that starts at position 0 -> (out, captured)."""
  m = config.memory
  if not m.segmented:
    rq, rk = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if float_path(qx):  # the sequence starts at 0: key i is at position i
      return causal_blockwise_attention(rq, rk, v, m.key_block), {}
    mask = positions[:, None, :] <= positions[:, :, None]
    return dot_attention(rq, rk, v, mask, qx)
  if m.evicts and qapply.adaptive(qx.quant):
    raise ConfigError(f"model.memory.attention_type={m.attention_type!r}: token-adaptive bits "
                      "(quant.edgeqat.adaptive_fraction > 0) need one position per key, and "
                      "kept tokens sit at a different position in each KV head")
  return _segment_scan(config, q, k, v, inv_freq, gate_params, qx)


def _segment_scan(config, q, k, v, inv_freq, gate_params, qx):
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
  # An evicting type carries its kept tokens; ring_score holds the window's scores in
  # position order (the window of the previous segment, blocks blk-1-w .. blk-1).
  kept = (eviction.empty(b, m.n_kept, (w + 1) * L, k.shape[2], d, k.dtype) if m.evicts
          else None)

  def body(carry, xs):
    memory, kept = carry
    blk, q_b = xs
    if m.uses_memory:
      evict = blk - w - 1
      e_pos = evict * L + jnp.arange(L, dtype=jnp.int32)
      e_k = jax.lax.dynamic_slice_in_dim(kp, (evict + w + 1) * L, L, axis=1)
      e_v = jax.lax.dynamic_slice_in_dim(vp, (evict + w + 1) * L, L, axis=1)
      memory = memory_lib.update(memory, memory_keys(config, e_k, e_pos, inv_freq), e_v,
                                 (e_pos >= S) & (evict >= 0), m.update_rule, m.eps)
      memory = qx.memory(memory)
      if m.truncate_every:
        cut = (blk % m.truncate_every) == 0
        memory = jax.tree.map(lambda x: jnp.where(cut, jax.lax.stop_gradient(x), x), memory)
    if m.evicts:  # block blk-1-w leaves the window (the first L rows of ring_score)
      evict = blk - w - 1
      e_pos = evict * L + jnp.arange(L, dtype=jnp.int32)
      e_k = jax.lax.dynamic_slice_in_dim(kp, blk * L, L, axis=1)
      e_v = jax.lax.dynamic_slice_in_dim(vp, blk * L, L, axis=1)
      kept = eviction.select(m, kept, e_k, e_v, e_pos, (e_pos >= S) & (evict >= 0),
                             kept.ring_score[:, :L])
      shifted = jnp.pad(kept.ring_score[:, L:], ((0, 0), (0, L), (0, 0)))
      kept = eviction.restart(m, kept._replace(ring_score=shifted), True)
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
    # A fresh capture dict per segment: the scan stacks it (tracers must not leak out).
    out, captured, probs = segment_attention(
        config, q_b, q_pos, keys, vals, k_pos, k_valid, memory, inv_freq, gate_params,
        qx.fresh_capture(), None if kept is None else kept[:3])
    if m.evicts:  # padding rows of the last segment vote too; nothing is evicted after it
      kept = eviction.add_mass(kept, eviction.chunk_mass(m, probs, q_pos, L), S)
    return (memory, kept), (out, captured)

  if m.remat:
    body = jax.checkpoint(body)
  _, out = jax.lax.scan(body, (memory, kept), (jnp.arange(nseg, dtype=jnp.int32), q_seg))
  out, captured = out
  return out.swapaxes(0, 1).reshape(b, nseg * L, h, d)[:, :t], captured



def adaptive_mask(c, qx, q, k, positions, inv_freq):
  """This layer's low-bit tokens: the least important fraction by Q̂K̂ᵀ/√d against token 0.

  Q̂ is RoPE'd at each query's own local position (``attention.local_positions``)
  and quantized with the previous layer's mask, K̂_0 (RoPE at position 0 is the
  identity) likewise: the logits the attention itself computes for key 0.
  """
  m = c.memory
  quiet = qx._replace(cap=None)
  block = positions // m.segment_len
  rq = apply_rope(q, local_positions(c, positions, block), inv_freq)
  q_hat = quiet.act("q", rq)
  k0 = quiet.act("k", k[:, :1], jnp.zeros((1,), jnp.int32))[:, 0]
  b, t, h, d = q_hat.shape
  kh = k0.shape[1]
  col = jnp.einsum("btkgd,bkd->bkgt", q_hat.reshape(b, t, kh, h // kh, d), k0,
                   preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
  e = qx.quant.edgeqat
  return losses.adaptive_bits_mask(losses.token_importance(col, key_index=None),
                                   e.adaptive_fraction, e.adaptive_per_sequence)
