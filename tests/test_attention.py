"""The attention family and the memory against naive per-token references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgeinfinite_jax.model import attention, memory, transformer as model
from edgeinfinite_jax.model.config import ModelConfig
from edgeinfinite_jax.model import gate as gate_lib
from edgeinfinite_jax.model.gate import with_memory
from edgeinfinite_jax.model import rope as rope_lib
from edgeinfinite_jax.quant.layer_quant import LayerQuant

EPS = 1e-6


def _sigma(x):
  return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0)))


def naive_update(M, z, k, v, valid, rule):
  """Per token, per batch row and KV head; the delta term uses the memory before the block."""
  M, z = M.copy(), z.copy()
  M0, z0 = M.copy(), z.copy()
  b, s, kh, _ = k.shape
  for i in range(b):
    for t in range(s):
      if not valid[t]:
        continue
      for h in range(kh):
        sk = _sigma(k[i, t, h])
        val = v[i, t, h]
        if rule == "delta":
          val = val - (sk @ M0[i, h]) / (sk @ z0[i, h] + EPS)
        M[i, h] += np.outer(sk, val)
        z[i, h] += sk
  return M, z


def naive_retrieve(M, z, q, groups):
  b, t, h, _ = q.shape
  out = np.zeros((b, t, h, M.shape[-1]))
  for i in range(b):
    for j in range(t):
      for head in range(h):
        sq = _sigma(q[i, j, head])
        kv = head // groups
        out[i, j, head] = (sq @ M[i, kv]) / (sq @ z[i, kv] + EPS)
  return out


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_memory_update_and_read_match_per_token_loop(rule):
  rng = np.random.RandomState(0)
  b, s, kh, h, d = 2, 6, 2, 4, 5
  mem = memory.empty(b, kh, d, d)
  Mn, zn = np.zeros((b, kh, d, d)), np.zeros((b, kh, d))
  for _ in range(3):  # several writes: the delta term must see the earlier ones
    k, v = rng.randn(b, s, kh, d), rng.randn(b, s, kh, d)
    valid = rng.rand(s) > 0.3
    mem = memory.update(mem, jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                        jnp.asarray(valid), rule, EPS)
    Mn, zn = naive_update(Mn, zn, k, v, valid, rule)
  np.testing.assert_allclose(mem.M, Mn, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mem.z, zn, rtol=1e-5, atol=1e-5)
  q = rng.randn(b, 3, h, d)
  np.testing.assert_allclose(memory.retrieve(mem, jnp.asarray(q, jnp.float32), EPS),
                             naive_retrieve(Mn, zn, q, h // kh), rtol=1e-4, atol=1e-5)


def test_empty_memory_contributes_nothing():
  mem = memory.empty(1, 2, 4, 4)
  assert not bool(memory.has_content(mem).any())
  read = memory.retrieve(mem, jnp.ones((1, 3, 4, 4)), EPS)
  assert np.all(np.isfinite(read)) and float(jnp.abs(read).max()) == 0.0


def naive_segmented(cfg, q, k, v, inv_freq, gate_bias):
  """Per query: visible raw keys by the block rule, memory of every older block."""
  m = cfg.memory
  L, w, S = m.segment_len, m.window_blocks, m.n_sink
  b, t, h, d = q.shape
  kh = k.shape[2]
  groups = h // kh
  rope = lambda x, p: np.asarray(rope_lib.apply_rope(jnp.asarray(x)[None], jnp.asarray(p)[None],
                                                  inv_freq))[0]
  out = np.zeros((b, t, h, d))
  for i in range(b):
    for pos in range(t):
      blk = pos // L
      ws = max(blk - w, 0) * L
      keys = [p for p in range(t) if p <= pos and (p >= ws or p < S)]
      if m.rope_positions == "cache_relative":
        off = max(ws - S, 0)
        rel = lambda p: p if p < S else p - off
      else:
        rel = lambda p: p
      qr = rope(q[i, pos][None], [rel(pos)])[0]
      kr = rope(k[i, keys], [rel(p) for p in keys])
      for head in range(h):
        kv = head // groups
        logits = kr[:, kv] @ qr[head] / np.sqrt(d)
        p_ = np.exp(logits - logits.max())
        p_ /= p_.sum()
        local = p_ @ v[i, keys, kv]
        if not m.uses_memory:
          out[i, pos, head] = local
          continue
        stored = [p for p in range(min(max(blk - w, 0) * L, t)) if p >= S]
        if not stored:
          out[i, pos, head] = local
          continue
        Mn, zn = np.zeros((1, kh, d, d)), np.zeros((1, kh, d))
        mk = k if not m.mem_uses_rope else np.stack([rope(k[i], range(t))])
        mk_i = mk[0] if m.mem_uses_rope else k[i]
        for blk_w in range(0, max(blk - w, 0)):  # one write per evicted block
          idx = list(range(blk_w * L, min((blk_w + 1) * L, t)))
          valid = np.array([p >= S for p in idx])
          Mn, zn = naive_update(Mn, zn, mk_i[idx][None], v[i, idx][None], valid, m.update_rule)
        qm = qr if m.mem_uses_rope else q[i, pos]
        sq = _sigma(qm[head])
        read = (sq @ Mn[0, kv]) / (sq @ zn[0, kv] + EPS)
        g = 1 / (1 + np.exp(-gate_bias))
        out[i, pos, head] = g * read + (1 - g) * local
  return out


@pytest.mark.parametrize("typ,rule,positions,mem_rope", [
    ("streaming", "linear", "absolute", False),
    ("edgeinfinite", "linear", "absolute", False),
    ("edgeinfinite", "delta", "cache_relative", False),
    ("edgeinfinite", "delta", "absolute", True),
])
def test_segmented_layer_matches_naive_definition(typ, rule, positions, mem_rope):
  cfg = ModelConfig(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8).with_memory(
      attention_type=typ, segment_len=4, n_sink=2, n_window=4, update_rule=rule,
      rope_positions=positions, mem_uses_rope=mem_rope, gate_init_bias=0.3)
  rng = np.random.RandomState(1)
  t = 22  # 6 segments, the last partial: several evictions
  q, k, v = (rng.randn(1, t, n, 8).astype(np.float32) for n in (4, 2, 2))
  gate_params = {"bias": jnp.full((4,), 0.3)}
  inv_freq = rope_lib.rope_inv_freq(cfg)
  pos = jnp.arange(t)[None]
  # The float model's LayerQuant (every quantizer the identity): the code path the
  # model runs, checked against the naive per-token definition.
  got, _ = attention.sequence_attention(cfg, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                        pos, inv_freq,
                                        gate_params if cfg.memory.uses_memory else None,
                                        LayerQuant(None))
  want = naive_segmented(cfg, q, k, v, inv_freq, 0.3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _tiny(**kw):
  return ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, **kw)


def test_edgeinfinite_with_local_gate_and_long_window_equals_full():
  base = _tiny()
  params = model.init_params(base, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 50)
  cfg, mparams = with_memory(base, params, rng=jax.random.key(2), segment_len=8, n_sink=2,
                             n_window=40, gate_init_bias=2.0, force_gate="local")
  np.testing.assert_allclose(model.forward(cfg, mparams, tokens),
                             model.forward(base, params, tokens), atol=1e-5)


@pytest.mark.slow
def test_memory_changes_outputs_only_beyond_the_window():
  base = _tiny()
  params = model.init_params(base, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (1, 48), 0, 50)
  kw = dict(segment_len=8, n_sink=2, n_window=8, gate_init_bias=0.0)
  cfg, p = with_memory(base, params, rng=jax.random.key(2), **kw)
  off = cfg.with_memory(force_gate="local")
  a, b = model.forward(cfg, p, tokens), model.forward(off, p, tokens)
  # Memory first holds something at block 2 (block 0 leaves a 1-block window).
  np.testing.assert_allclose(a[:, :16], b[:, :16], atol=1e-6)
  assert float(jnp.abs(a[:, 16:] - b[:, 16:]).max()) > 1e-4


@pytest.mark.parametrize("form", ["per_head_scalar", "per_head_vector", "mlp"])
def test_gate_starts_nearly_off_and_is_a_tiny_share(form):
  base = _tiny()
  params = model.init_params(base, jax.random.key(0))
  cfg, p = with_memory(base, params, rng=jax.random.key(3), gate=form, gate_init_bias=-6.0)
  gate = [x for path, x in jax.tree_util.tree_leaves_with_path(p)
          if "memory_gate" in jax.tree_util.keystr(path)]
  assert gate, "with_memory added no gate parameters"
  n_gate = sum(x.size for x in gate)
  n_all = sum(x.size for x in jax.tree.leaves(p))
  assert n_gate / n_all < 0.1
  # Nearly off: every head's memory share is sigmoid(-6) ~ 0.25% at init, whatever the
  # branches hold (the mlp form's output layer starts at zero, so it is its bias too).
  rng = np.random.default_rng(0)
  read, local = (jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32) for _ in range(2))
  for i in range(cfg.num_layers):
    share = jax.nn.sigmoid(gate_lib.logits(cfg, p["params"][f"layers_{i}"]["attn"]
                                           ["memory_gate"], read, local))
    np.testing.assert_allclose(share, jax.nn.sigmoid(-6.0), rtol=1e-6)
  # The backbone is shared, not re-initialised.
  np.testing.assert_array_equal(p["params"]["embed"]["embedding"],
                                params["params"]["embed"]["embedding"])


@pytest.mark.slow
def test_gradients_reach_the_gate_through_the_memory():
  base = _tiny()
  params = model.init_params(base, jax.random.key(0))
  cfg, p = with_memory(base, params, rng=jax.random.key(2), segment_len=4, n_sink=1,
                       n_window=4, truncate_every=0)
  tokens = jax.random.randint(jax.random.key(1), (1, 24), 0, 50)

  def loss(p):
    return jnp.mean(model.Transformer(cfg).apply(p, tokens) ** 2)

  grads = jax.grad(loss)(p)
  g = grads["params"]["layers_0"]["attn"]["memory_gate"]["bias"]
  assert float(jnp.abs(g).max()) > 0


# ----------------------------------------------------------------------------- blockwise


@pytest.mark.parametrize("block", [0, 16, 24, 40, 1024])
def test_blockwise_attention_equals_one_softmax_over_all_keys(block):
  """The running softmax over key blocks (dividing, not dividing, larger than the
  sequence, 0 = no loop) against ``dot_attention`` with the causal mask, in values
  and gradients; the visited-prefix form (a traced key count, the engine's) too."""
  rng = np.random.default_rng(block)
  b, t, h, kh, d = 2, 72, 4, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kh, kh))
  pos = jnp.arange(t, dtype=jnp.int32)
  qx = LayerQuant(None)
  dense = lambda q, k, v: attention.dot_attention(q, k, v, (pos[None, :] <= pos[:, None])[None],
                                                  qx)[0]
  blockwise = lambda q, k, v: attention.blockwise_attention(q, k, v, pos, t, block)
  causal = lambda q, k, v: attention.causal_blockwise_attention(q, k, v, block)
  for fn in (blockwise, causal):  # all key blocks; query blocks skipping future key blocks
    np.testing.assert_allclose(fn(q, k, v), dense(q, k, v), atol=2e-6)
    for got, want in zip(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), (0, 1, 2))(q, k, v),
                         jax.grad(lambda *a: jnp.sum(dense(*a) ** 2), (0, 1, 2))(q, k, v)):
      np.testing.assert_allclose(got, want, atol=2e-5)
  # The last 8 queries against a cache of 72 keys filled up to them (traced count).
  tail = jax.jit(lambda n: attention.blockwise_attention(q[:, -8:], k, v, pos[-8:], n, block))
  np.testing.assert_allclose(tail(jnp.int32(t)), dense(q, k, v)[:, -8:], atol=2e-6)


def test_full_attention_forward_working_memory_is_linear_in_the_length():
  """The float training path of a full-attention model never holds the [T, T] scores:
  XLA's own buffer accounting of the compiled forward, blockwise vs one softmax."""
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=4, num_kv_heads=2)
  params = model.init_params(cfg, jax.random.key(0))
  tokens = jax.ShapeDtypeStruct((1, 2048), jnp.int32)

  def temp_bytes(key_block):
    c = cfg.with_memory(key_block=key_block)
    fn = jax.jit(lambda p, x: model.Transformer(c).apply(p, x))
    return fn.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes

  scores = 4 * 2048 * 2048 * 4  # one float32 [heads, T, T] score tensor
  dense, blockwise = temp_bytes(0), temp_bytes(128)
  assert dense >= scores, dense
  assert blockwise < scores / 4, (blockwise, dense)
