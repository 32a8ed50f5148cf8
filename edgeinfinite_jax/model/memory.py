"""Compressive linear-attention memory (Infini-attention Eqs. 7-9), float32 always.

One memory per layer and per KV head: M [B, K, d_key, d_value], z [B, K, d_key].
Query heads of a GQA group share their KV head's memory. σ = ELU + 1 keeps every
feature positive, so z > 0 exactly when something has been written.

Retrieval runs before the update that includes the current block (the caller
orders the two). M and z are running sums that grow with length; keeping them in
float32 whatever the compute dtype avoids the bf16 overflow seen in public
reimplementations, and retrieval is a ratio, so it stays bounded.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Memory(NamedTuple):
  M: jax.Array  # [B, K, d_key, d_value] float32
  z: jax.Array  # [B, K, d_key] float32


def empty(batch: int, kv_heads: int, d_key: int, d_value: int) -> Memory:
  return Memory(jnp.zeros((batch, kv_heads, d_key, d_value), jnp.float32),
                jnp.zeros((batch, kv_heads, d_key), jnp.float32))


def sigma(x):
  return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def has_content(memory: Memory) -> jax.Array:
  """[B, K] bool: the memory of this KV head has been written to."""
  return jnp.any(memory.z > 0, axis=-1)


def retrieve(memory: Memory, q, eps: float) -> jax.Array:
  """σ(Q)M / (σ(Q)z + eps) per query row; q [B, T, H, d_key] -> [B, T, H, d_value]."""
  b, t, h, dk = q.shape
  kh = memory.M.shape[1]
  sq = sigma(q).reshape(b, t, kh, h // kh, dk)
  num = jnp.einsum("btkgd,bkde->btkge", sq, memory.M)
  den = jnp.einsum("btkgd,bkd->btkg", sq, memory.z)[..., None] + eps
  return (num / den).reshape(b, t, h, -1)


def update(memory: Memory, k, v, valid, rule: str, eps: float) -> Memory:
  """Writes keys k [B, S, K, d_key] and values v [B, S, K, d_value].

  ``valid`` ([S] or [B, S] bool) masks tokens that must not be written (sink
  tokens, padding, blocks before position 0). ``rule`` is ``linear``
  (M += σ(K)ᵀV) or ``delta`` (M += σ(K)ᵀ(V - σ(K)M/(σ(K)z))), whose retrieval
  term uses the memory before this write; z += Σ σ(K) in both.
  """
  valid = jnp.asarray(valid)
  mask = (valid if valid.ndim == 2 else valid[None]).astype(jnp.float32)[..., None, None]
  sk = sigma(k) * mask
  v = v.astype(jnp.float32)
  if rule == "delta":
    num = jnp.einsum("bskd,bkde->bske", sk, memory.M)
    den = jnp.einsum("bskd,bkd->bsk", sk, memory.z)[..., None] + eps
    v = v - num / den
  elif rule != "linear":
    raise ValueError(f"update rule {rule!r}: must be 'linear' or 'delta'")
  return Memory(memory.M + jnp.einsum("bskd,bske->bkde", sk, v),
                memory.z + jnp.sum(sk, axis=1))
