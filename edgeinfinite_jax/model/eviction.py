"""Token eviction for ``h2o`` and ``snapkv``: which tokens stay once they leave the window.

An evicting cache is ``streaming``'s sink + block window plus a fixed store of
``n_kept`` tokens per KV head (``Kept``). A block leaves the window exactly when
``edgeinfinite`` would compress it into its memory (``kv_cache`` module doc): its
``L`` tokens then compete with the kept ones, and the best ``n_kept`` by the
policy's score stay (``select``), per batch row and KV head. Sink tokens never
compete (they stay raw); nor does anything still in the window. Query heads of a
GQA group vote for their KV head: their probabilities are summed.

Scores are attention probabilities, float32, summed over queries (``chunk_mass``):

* ``h2o`` (H2O, arXiv 2306.14048; FMInference/H2O): every query adds its
  probabilities to every key it sees, from the key's first query on, so a score
  is the key's accumulated attention mass. The published cache evicts one token
  per step, greedily; here a block leaves at once, and taking the top ``n_kept``
  of kept + leaving equals evicting the lowest one at a time (scores do not
  change in between).
* ``snapkv`` (SnapKV, arXiv 2404.14469; FasterDecoding/SnapKV ``snapkv_utils``):
  the observation window, the last ``obs_window`` queries before the selection,
  votes; the votes are 1-D pooled over positions (``pool``: ``avg`` or ``max``,
  kernel ``pool_kernel``, zero padding, the average divided by the kernel as
  torch's ``avg_pool1d`` does) and the top ``n_kept`` stay. Published, this runs
  once, over the whole prompt at the end of a full-attention prefill. Here it runs
  segment by segment, so that prefill stays bounded: the votes are those of the
  last ``obs_window`` queries of the block before each eviction (positions
  ``p % L >= L - obs_window``), restarted at every block start, and pooling sees
  the competing tokens (kept + leaving) at their true positions, as SnapKV pools
  the prompt's prefix without its observation window. Prefill segments and decode
  tokens add the same queries' votes, so decode keeps evicting with the same rule
  and the state stays constant (the published decode lets the cache grow).

Ties go to the token listed first (``lax.top_k``): the kept ones, in position
order, then the leaving block in position order, i.e. the earlier position. The
store keeps its tokens in position order with empty slots (position -1) first
(``select`` sorts what it keeps), which makes both rules hold and gives
``cache_relative`` RoPE its order (``attention.segment_attention``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from edgeinfinite_jax.model.config import MemoryConfig


class Kept(NamedTuple):
  """Per-layer eviction state; every shape fixed by the scenario."""
  k: jax.Array           # [B, n_kept, K, D] as the ring stores them (pre-RoPE)
  v: jax.Array
  pos: jax.Array         # [B, n_kept, K] int32 original positions, ascending; -1 = empty
  score: jax.Array       # [B, n_kept, K] float32: the policy's running score
  ring_score: jax.Array  # [B, ring_len, K] float32: the same for the window's tokens


def empty(batch: int, n_kept: int, ring_len: int, kv_heads: int, head_dim: int,
          dtype) -> Kept:
  # Distinct arrays, not one zeros twice: the engine donates every leaf of its state.
  z = lambda: jnp.zeros((batch, n_kept, kv_heads, head_dim), dtype)
  return Kept(z(), z(), jnp.full((batch, n_kept, kv_heads), -1, jnp.int32),
              jnp.zeros((batch, n_kept, kv_heads), jnp.float32),
              jnp.zeros((batch, ring_len, kv_heads), jnp.float32))


def chunk_mass(m: MemoryConfig, probs, q_pos, n_valid) -> jax.Array:
  """[B, S, K] float32: what one chunk adds to the score of each key it saw.

  ``probs`` [B, K, G, T, S] are the chunk's attention probabilities (softmax over
  every key it sees), ``q_pos`` [T] its positions; rows at or past ``n_valid`` are
  padding and vote for nothing. ``snapkv`` counts only its observation queries.
  """
  voting = jnp.arange(q_pos.shape[0]) < n_valid
  if m.attention_type == "snapkv":
    voting &= jnp.mod(q_pos, m.segment_len) >= m.segment_len - m.obs_window
  return jnp.einsum("bkgts,t->bsk", probs.astype(jnp.float32), voting.astype(jnp.float32))


def restart(m: MemoryConfig, kept: Kept, block_start) -> Kept:
  """``snapkv`` at a block start: the next eviction's votes begin from zero."""
  if m.attention_type != "snapkv":
    return kept
  clear = lambda x: jnp.where(block_start, jnp.zeros_like(x), x)
  return kept._replace(score=clear(kept.score), ring_score=clear(kept.ring_score))


def add_mass(kept: Kept, mass, n_sink: int, ring_score=None) -> Kept:
  """``kept`` with a chunk's ``mass`` [B, S + n_kept + R, K] (keys ordered sink, kept,
  window as ``attention.segment_attention`` sees them) added to its scores; the sink's
  share is dropped (sink tokens never compete). ``ring_score``: the window's scores
  before the addition, when not ``kept.ring_score``."""
  n = kept.pos.shape[1]
  ring_score = kept.ring_score if ring_score is None else ring_score
  return kept._replace(score=kept.score + mass[:, n_sink:n_sink + n],
                       ring_score=ring_score + mass[:, n_sink + n:])


def pool(m: MemoryConfig, score, pos, valid) -> jax.Array:
  """``score`` [B, N, K] 1-D pooled over positions: entry i takes the max (or the sum
  / kernel) of the valid entries j with |pos_j - pos_i| <= kernel // 2. Absent
  positions count as zero, as SnapKV's padding does (scores are >= 0, so a zero
  never wins a max that the entry itself takes part in)."""
  near = jnp.abs(pos[:, :, None, :] - pos[:, None, :, :]) <= m.pool_kernel // 2
  terms = jnp.where(near & valid[:, None, :, :], score[:, None, :, :], 0.0)  # [B, i, j, K]
  if m.pooling == "max":
    return terms.max(axis=2)
  return terms.sum(axis=2) / m.pool_kernel


def select(m: MemoryConfig, kept: Kept, cand_k, cand_v, cand_pos, cand_valid,
           cand_score) -> Kept:
  """The store after a block leaves the window: the best ``n_kept`` of the kept
  tokens and the leaving ones (``cand_k/v`` [B, L, K, D], ``cand_pos`` [L],
  ``cand_valid`` [L]: False for sink tokens, ``cand_score`` [B, L, K]) per batch row
  and KV head, in position order (module doc). ``ring_score`` is left as it is."""
  b, n, kh = kept.pos.shape
  L = cand_pos.shape[0]
  pos = jnp.concatenate([kept.pos, jnp.broadcast_to(cand_pos[None, :, None], (b, L, kh))], 1)
  valid = jnp.concatenate([kept.pos >= 0, jnp.broadcast_to(cand_valid[None, :, None],
                                                           (b, L, kh))], 1)
  score = jnp.concatenate([kept.score, cand_score], 1)
  rank = pool(m, score, pos, valid) if m.attention_type == "snapkv" else score
  rank = jnp.where(valid, rank, -jnp.inf)
  _, idx = jax.lax.top_k(jnp.swapaxes(rank, 1, 2), n)  # [B, K, n]; ties: lower index
  idx = jnp.swapaxes(jnp.sort(idx, axis=-1), 1, 2)  # [B, n, K], position order
  take = lambda x: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 3)), 1)
  both = lambda a, c: take(jnp.concatenate([a, c.astype(a.dtype)], 1))
  return kept._replace(k=both(kept.k, cand_k), v=both(kept.v, cand_v),
                       pos=jnp.where(take(valid), take(pos), -1), score=take(score))
