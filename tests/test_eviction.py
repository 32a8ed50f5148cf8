"""h2o and snapkv (model/eviction.py): the engine's kept tokens against a per-token numpy
loop of each published rule, teacher forcing against the training path, one compilation
per step function, constant state bytes, and the budget rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgeinfinite_jax import ConfigError, Engine, Scenario, state_nbytes, with_memory
from edgeinfinite_jax.model import transformer as model
from edgeinfinite_jax.model.config import ModelConfig
from edgeinfinite_jax.model.rope import rope_inv_freq
from fast_compile import fast_compiles

VOCAB, L, SINK, WINDOW, KEPT, OBS = 64, 8, 2, 16, 6, 4


@pytest.fixture(scope="module", autouse=True)
def _fast():
  with fast_compiles():  # tiny models, compile-bound (tests/fast_compile.py)
    yield


def _model(attention_type, **kw):
  base = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2)
  params = model.init_params(base, jax.random.key(0))
  # Sharper attention than the 0.02 init gives (near-uniform probabilities would make
  # the scores near-ties): the kept sets then follow the scores, not rounding.
  inner = {k: dict(v) for k, v in params["params"].items()}
  for name, layer in inner.items():
    if name.startswith("layers_"):
      attn = {**layer["attn"]}
      for proj in ("q_proj", "k_proj"):
        attn[proj] = {"kernel": attn[proj]["kernel"] * 8.0}
      layer["attn"] = attn
  kw = {**dict(segment_len=L, n_sink=SINK, n_window=WINDOW, n_kept=KEPT, obs_window=OBS), **kw}
  return with_memory(base, {"params": inner}, rng=jax.random.key(1),
                     attention_type=attention_type, **kw)


def _scenario(**kw):
  return Scenario(**{**dict(segment_len=L, n_sink=SINK, n_window=WINDOW, batch_size=2,
                            max_new_tokens=8, short_threshold=4), **kw})


def _tokens(t, seed=0, batch=2):
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, t)).astype(np.int32)


def _run(engine, tokens, prompt):
  """Prefill ``prompt`` tokens (a padded last segment), decode the rest: (state, logits)."""
  state, logits = engine.prefill(tokens[:, :prompt])
  got = [logits]
  for t in range(prompt, tokens.shape[1]):
    state, logits = engine.decode(state, tokens[:, t])
    got.append(logits)
  return state, np.stack(got, 1)


# -- the naive reference: one token at a time, as the papers state the rules ------------

def _rope(x, pos, inv_freq):
  ang = pos[:, None] * inv_freq[None].astype(np.float64)
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  half = x.shape[-1] // 2
  return x * cos + np.concatenate([-x[:, half:], x[:, :half]], -1) * sin


def _layer0_qk(config, params, tokens):
  """Layer 0's pre-RoPE q [T, H, D] and k [T, K, D] of one row (they depend on nothing
  but the tokens), float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  x = p["embed"]["embedding"][tokens]
  x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + config.rms_norm_eps)
  x = x * p["layers_0"]["attn_norm"]["scale"]
  attn = p["layers_0"]["attn"]
  return (np.einsum("td,dhk->thk", x, attn["q_proj"]["kernel"]),
          np.einsum("td,dhk->thk", x, attn["k_proj"]["kernel"]))


def _pooled(m, votes, candidates):
  """SnapKV's pooling over positions: absent positions are zero padding."""
  row = np.zeros(votes.shape[0] + 2 * (m.pool_kernel // 2))
  r = m.pool_kernel // 2
  row[np.asarray(candidates) + r] = votes[candidates]
  win = [row[p:p + m.pool_kernel] for p in candidates]
  return {p: (w.max() if m.pooling == "max" else w.sum() / m.pool_kernel)
          for p, w in zip(candidates, win)}


def _reference_kept(config, params, tokens):
  """Per KV head, the positions layer 0 keeps after reading ``tokens`` (one row) under
  the published rule, one query at a time: a query sees the sink, the kept tokens and
  its window; h2o adds every probability to its key's score, snapkv's observation
  queries (the last ``obs_window`` of a block) vote; when a block leaves the window,
  the best ``n_kept`` of kept + leaving stay (ties: the earlier position)."""
  m = config.memory
  q, k = _layer0_qk(config, params, tokens)
  t_len, h, d = q.shape
  kh, g, w = k.shape[1], h // k.shape[1], m.window_blocks
  inv = rope_inv_freq(config)
  pos = np.arange(t_len)
  rq, rk = (np.stack([_rope(x[:, j], pos, inv) for j in range(x.shape[1])], 1) for x in (q, k))
  score = np.zeros((t_len, kh))  # accumulated mass (h2o) or this block's votes (snapkv)
  kept = [[] for _ in range(kh)]
  for t in range(t_len):
    b = t // L
    if t % L == 0 and b - w - 1 >= 0:
      leaving = [p for p in range((b - w - 1) * L, (b - w) * L) if p >= m.n_sink]
      for j in range(kh):
        cands = sorted(kept[j] + leaving)
        rank = (_pooled(m, score[:, j], cands) if m.attention_type == "snapkv"
                else {p: score[p, j] for p in cands})
        kept[j] = sorted(sorted(cands, key=lambda p: (-rank[p], p))[:m.n_kept])
    if m.attention_type == "snapkv" and t % L == 0:
      score[:] = 0.0
    window = [p for p in range(max(b - w, 0) * L, t + 1) if p >= m.n_sink]
    for j in range(kh):
      seen = np.array([p for p in range(min(m.n_sink, t + 1))] + kept[j] + window)
      logits = rq[t, j * g:(j + 1) * g] @ rk[seen, j].T / np.sqrt(d)
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      votes = m.attention_type == "h2o" or t % L >= L - m.obs_window
      if votes:
        score[seen, j] += probs.sum(0)
  return [sorted(x) for x in kept]


@pytest.mark.parametrize("attention_type,kw", [
    ("h2o", {}), ("snapkv", {}), ("snapkv", dict(pooling="max", pool_kernel=3))])
def test_kept_tokens_equal_a_per_token_loop_of_the_published_rule(attention_type, kw):
  cfg, params = _model(attention_type, **kw)
  engine = Engine(cfg, params, _scenario())
  tokens = _tokens(75, seed=3)
  state, _ = _run(engine, tokens, 19)  # a padded prefill, then evictions while decoding
  got = np.asarray(state.caches[0].kept.pos)  # [B, n_kept, K]
  for row in range(tokens.shape[0]):
    want = _reference_kept(engine.route_configs["long"], params, tokens[row])
    for j, positions in enumerate(want):
      assert len(positions) == KEPT
      assert got[row, :, j].tolist() == positions, (row, j)
  # The rule chose: not simply the oldest or the newest tokens of every head.
  assert len({tuple(got[r, :, j]) for r in range(2) for j in range(2)}) > 1


@pytest.mark.parametrize("attention_type,rope", [
    ("h2o", "absolute"), ("snapkv", "absolute"), ("h2o", "cache_relative")])
def test_prefill_then_decode_equals_teacher_forcing(attention_type, rope):
  cfg, params = _model(attention_type, rope_positions=rope)
  engine = Engine(cfg, params, _scenario())
  tokens = _tokens(64)
  want = model.forward(engine.route_configs["long"], params, tokens)
  state, got = _run(engine, tokens, 19)
  np.testing.assert_allclose(got, want[:, 18:], atol=1e-4)
  assert (np.asarray(state.caches[1].kept.pos) >= 0).all()  # the store is in use
  # The kept tokens matter: streaming with the same sink and window differs.
  stream = model.forward(cfg.with_memory(attention_type="streaming"), params, tokens)
  assert np.abs(np.asarray(stream) - np.asarray(want))[:, 40:].max() > 1e-2


def test_compile_once_and_state_bytes_constant_whatever_the_length():
  cfg, params = _model("snapkv")
  engine = Engine(cfg, params, _scenario(batch_size=1, n_kept=10))
  sizes = set()
  for t in (5, 3 * L + 1, 7 * L, 20 * L + 3):
    state, logits = engine.prefill(_tokens(t, batch=1))
    for tok in range(3):
      state, logits = engine.decode(state, np.full((1,), tok, np.int32))
    assert np.all(np.isfinite(logits))
    sizes.add(state_nbytes(state))
  # A prompt in two parts (the second fills the rest of a block first) reads as one.
  tokens = _tokens(5 * L, seed=2, batch=1)
  one, want = engine.prefill(tokens)
  two, got = engine.prefill(tokens[:, :L + 3])
  two, got = engine.prefill(tokens[:, L + 3:], state=two)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert all((np.asarray(a.kept.pos) == np.asarray(b.kept.pos)).all()
             for a, b in zip(one.caches, two.caches))
  assert engine.compile_counts() == {"prefill_long": 1, "decode_long": 1}
  c = engine.route_configs["long"]
  kh, d, ring = c.num_kv_heads, c.head_dim, WINDOW + L
  # sink + ring K/V, kept K/V + positions + scores, the window's scores, the length
  per_layer = 4 * (2 * (SINK + ring) * kh * d + 10 * kh * (2 * d + 2) + ring * kh)
  assert sizes == {c.num_layers * per_layer + 4}
  assert c.memory.n_kept == 10  # the Scenario's budget replaced the model's


def test_bad_budgets_are_config_errors_naming_value_and_rule():
  base = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=4, num_kv_heads=2)
  with pytest.raises(ConfigError, match=r"Scenario.n_kept=-1: must be None .* non-negative"):
    _scenario(n_kept=-1)
  for bad in (2.5, True, "4"):
    with pytest.raises(ConfigError, match=r"Scenario.n_kept=.*: must be None"):
      _scenario(n_kept=bad)
  with pytest.raises(ConfigError, match=r"model.memory.n_kept=0: must be >= 1 for h2o"):
    base.with_memory(attention_type="h2o", n_kept=0)
  with pytest.raises(ConfigError, match=r"model.memory.n_kept='4': must be an int"):
    base.with_memory(attention_type="h2o", n_kept="4")
  with pytest.raises(ConfigError, match=r"model.memory.pool_kernel=4: must be an odd int"):
    base.with_memory(attention_type="snapkv", n_kept=4, pool_kernel=4)
  with pytest.raises(ConfigError, match=r"model.memory.pooling='median': must be one of"):
    base.with_memory(attention_type="snapkv", n_kept=4, pooling="median")
  with pytest.raises(ConfigError, match=r"obs_window=32: must be <= model.memory.segment_len=8"):
    base.with_memory(attention_type="snapkv", n_kept=4, segment_len=8, n_window=8)
  params = model.init_params(base, jax.random.key(0))
  h2o = base.with_memory(attention_type="h2o", n_kept=4, segment_len=8, n_window=16)
  with pytest.raises(ConfigError, match=r"Scenario.n_kept=0: must be >= 1 for h2o"):
    Engine(h2o, params, _scenario(n_kept=0))
  # A policy that cannot vote within the Scenario's segments: refused at construction.
  snap = base.with_memory(attention_type="snapkv", n_kept=4, obs_window=16, segment_len=16,
                          n_window=16)
  with pytest.raises(ConfigError,
                     match=r"model.memory.obs_window=16: must be <= Scenario.segment_len=8"):
    Engine(snap, params, _scenario())
