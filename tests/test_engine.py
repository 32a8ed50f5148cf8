"""The fixed-shape engine: teacher forcing, compile counts, padding, routes, export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgeinfinite_jax import ConfigError, Engine, Scenario, state_nbytes, with_memory
from edgeinfinite_jax.model import transformer as model
from edgeinfinite_jax.model.config import ModelConfig
from export_check import assert_exported_matches_engine
from fast_compile import fast_compiles

VOCAB = 64
L = 8


@pytest.fixture(scope="module", autouse=True)
def _fast():
  """The module under XLA's cheap compiles (tests/fast_compile.py): tiny models, many
  engines, each compiled for moments of work. (The million-token run, where running
  dominates, is tests/test_engine_long.py.)"""
  with fast_compiles():
    yield


def _base():
  return ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2)


def _model(attention_type, **kw):
  base = _base()
  params = model.init_params(base, jax.random.key(0))
  if attention_type == "full":
    return base, params
  kw.setdefault("gate_init_bias", 0.0)  # memory half on: its read must show up
  return with_memory(base, params, rng=jax.random.key(1), attention_type=attention_type,
                     gate="mlp", **kw)


def _scenario(**kw):
  return Scenario(**{**dict(segment_len=L, n_sink=2, n_window=16, batch_size=2,
                            max_new_tokens=48, short_threshold=4, max_context=128), **kw})


def _tokens(t, seed=0, batch=2):
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, t)).astype(np.int32)


@pytest.mark.parametrize("attention_type", ["full", "streaming", "edgeinfinite"])
def test_prefill_then_decode_equals_teacher_forcing(attention_type):
  cfg, params = _model(attention_type)
  engine = Engine(cfg, params, _scenario())
  tokens = _tokens(64)  # prompt 19 = 2 segments + 3; decode crosses 5 more boundaries
  want = model.forward(engine.route_configs["long"], params, tokens)
  prompt = 19
  state, logits = engine.prefill(tokens[:, :prompt])
  got = [logits]
  for t in range(prompt, tokens.shape[1]):
    state, logits = engine.decode(state, tokens[:, t])
    got.append(logits)
  np.testing.assert_allclose(np.stack(got, 1), want[:, prompt - 1:], atol=1e-4)


def test_compile_once_per_step_function_and_route_whatever_the_length():
  cfg, params = _model("edgeinfinite")
  engine = Engine(cfg, params, _scenario(batch_size=1))
  for t in (1, 7, L, L + 1, 10 * L, 100 * L):
    state, logits = engine.prefill(_tokens(t, batch=1))
    state, logits = engine.decode(state, np.zeros((1,), np.int32))
    assert np.all(np.isfinite(logits))
  # 1, 7 and L are short prompts (threshold 4 only admits 1); the rest are long.
  assert engine.compile_counts() == {"prefill_short": 1, "decode_short": 1,
                                     "prefill_long": 1, "decode_long": 1}


@pytest.mark.slow
def test_with_params_swaps_weights_without_recompiling():
  cfg, params = _model("edgeinfinite")
  other = jax.tree.map(lambda x: x * 1.1, params)
  engine = Engine(cfg, params, _scenario(batch_size=1))
  tokens = _tokens(3 * L, batch=1)
  engine.prefill(tokens)
  swapped = engine.with_params(other)
  _, got = swapped.prefill(tokens)
  assert engine.compile_counts()["prefill_long"] == 1  # shared compiled steps
  _, want = Engine(cfg, other, _scenario(batch_size=1)).prefill(tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  smaller = jax.tree.map(lambda x: x[..., :1], other)
  # A wrong shape is named by the model's own tree check (check_param_tree) ...
  with pytest.raises(ValueError, match=r"params: .* has shape \(.*\); this config needs"):
    engine.with_params(smaller)
  # ... a wrong dtype by with_params, against what the engine compiled for.
  with pytest.raises(ValueError, match=r"with_params: .* is \(.*\) float16; the engine "):
    engine.with_params(jax.tree.map(lambda x: x.astype(jnp.float16), other))


def test_padding_of_the_final_segment_changes_nothing():
  cfg, params = _model("edgeinfinite")
  engine = Engine(cfg, params, _scenario())
  tokens = _tokens(30)  # last segment holds 6 real tokens and 2 of padding
  outs = []
  for fill in (0, VOCAB - 1):
    state = engine.init_state("long")
    for s in range(0, 30, L):
      chunk = np.full((2, L), fill, np.int32)
      n = min(L, 30 - s)
      chunk[:, :n] = tokens[:, s:s + n]
      state, logits = engine._prefill["long"](params, state, chunk, jnp.int32(n))
    seq = [logits]
    for t in _tokens(12, seed=5).T:  # decoding overwrites the padded slots
      state, logits = engine.decode(state, t)
      seq.append(logits)
    outs.append(np.stack(seq))
  np.testing.assert_array_equal(outs[0], outs[1])


def test_short_route_is_the_base_model():
  base = _base()
  params = model.init_params(base, jax.random.key(0))
  cfg, mparams = with_memory(base, params, rng=jax.random.key(1), gate_init_bias=5.0)
  engine = Engine(cfg, mparams, _scenario(short_threshold=12))
  tokens = _tokens(20)
  want = model.forward(base, params, tokens)
  state, logits = engine.prefill(tokens[:, :12])
  assert state.route == "short"
  got = [logits]
  for t in range(12, 20):
    state, logits = engine.decode(state, tokens[:, t])
    got.append(logits)
  np.testing.assert_allclose(np.stack(got, 1), want[:, 11:], atol=1e-5)


@pytest.mark.slow
def test_generate_greedy_matches_argmax_of_the_forward_pass():
  cfg, params = _model("edgeinfinite")
  engine = Engine(cfg, params, _scenario())
  prompt = _tokens(21)
  out = engine.generate(prompt, 6)
  seq = prompt
  for _ in range(6):
    nxt = np.argmax(model.forward(engine.route_configs["long"], params, seq)[:, -1], -1)
    seq = np.concatenate([seq, nxt[:, None].astype(np.int32)], 1)
  np.testing.assert_array_equal(out, seq[:, 21:])
  a = engine.generate(prompt, 6, temperature=1.0, rng=jax.random.key(7))
  b = engine.generate(prompt, 6, temperature=1.0, rng=jax.random.key(7))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (2, 6) and a.min() >= 0 and a.max() < VOCAB


def test_state_size_does_not_depend_on_length():
  cfg, params = _model("edgeinfinite")
  engine = Engine(cfg, params, _scenario(batch_size=1))
  sizes = {state_nbytes(engine.prefill(_tokens(t, batch=1))[0]) for t in (9, 40, 333)}
  assert len(sizes) == 1


@pytest.mark.slow
def test_exported_step_functions_reproduce_the_engine_in_a_fresh_process(tmp_path):
  cfg, params = _model("edgeinfinite")
  engine = Engine(cfg, params, _scenario())
  manifest = engine.export(str(tmp_path), routes=("long",))
  assert set(manifest["functions"]) == {"prefill_long", "decode_long"}
  assert_exported_matches_engine(tmp_path, engine, _tokens(19))
  loaded = json.loads((tmp_path / "manifest.json").read_text())
  assert loaded["scenario"]["segment_len"] == L


@pytest.mark.slow
def test_export_manifest_records_each_route_with_its_own_model_config(tmp_path):
  """Routes run different models (short: the base model with full attention, long:
  the memory model); each gets its own config and cache layout in the manifest."""
  cfg, params = _model("edgeinfinite")
  engine = Engine(cfg, params, _scenario())
  engine.export(str(tmp_path))  # both routes; abstract shapes only, no step runs
  routes = json.loads((tmp_path / "manifest.json").read_text())["routes"]
  assert routes["short"]["model_config"]["memory"]["attention_type"] == "full"
  assert routes["long"]["model_config"]["memory"]["attention_type"] == "edgeinfinite"
  for route in ("short", "long"):
    assert routes[route]["model_config"] == engine.route_configs[route].to_dict()
    assert routes[route]["ring_len"] == engine.ring_len[route]
    assert routes[route]["n_sink"] == engine.n_sink[route]


def test_bad_inputs_are_rejected_before_any_work():
  cfg, params = _model("full")
  engine = Engine(cfg, params, _scenario())
  with pytest.raises(ValueError, match="batch 3"):
    engine.prefill(_tokens(5, batch=3))
  with pytest.raises(ValueError, match="ids must lie in"):
    engine.prefill(np.full((2, 5), VOCAB, np.int32))
  with pytest.raises(ValueError, match="rank 2"):
    engine.prefill(np.zeros((5,), np.int32))
  with pytest.raises(ValueError, match=r"shape \[2, 0\] is empty"):
    engine.prefill(np.zeros((2, 0), np.int32))
  with pytest.raises(ValueError, match=r"decode token: ids must lie in \[0, 64\), got \[-1, 3\]"):
    engine.decode(engine.init_state("short"), np.array([-1, 3]))
  with pytest.raises(ValueError, match="capacity 128"):
    engine.prefill(_tokens(200))
  with pytest.raises(ConfigError, match="n_window=10"):
    Scenario(segment_len=8, n_window=10)
  with pytest.raises(ConfigError, match="preset 'chat'"):
    Scenario.preset("chat")
  assert engine.compile_count() == 0
  assert Scenario.preset("qa").n_window > Scenario.preset("summarization").n_window


@pytest.mark.slow
def test_one_state_branches_two_ways_without_donation():
  """decode donates its state (class doc); donate=False and copy_state keep one prefilled
  state usable twice (branching, beam search), equal to two independent runs, and
  compile nothing more."""
  cfg, params = _model("edgeinfinite")
  engine = Engine(cfg, params, _scenario())
  prompt, nxt = _tokens(19), _tokens(4, seed=9)
  a, b = nxt[:, 0], nxt[:, 1]
  state, _ = engine.prefill(prompt)
  kept_a, logits_a = engine.decode(state, a, donate=False)  # state stays valid
  copy = engine.copy_state(state)
  kept_b, logits_b = engine.decode(state, b)  # donated: consumed
  with pytest.raises(ValueError, match="donated to an earlier decode call"):
    engine.decode(state, a)
  _, logits_b2 = engine.decode(copy, b, donate=False)
  kept_a, logits_a = engine.decode(kept_a, nxt[:, 2])  # the branches go on separately
  kept_b, logits_b = engine.decode(kept_b, nxt[:, 3])
  assert engine.compile_counts() == {"prefill_long": 1, "decode_long": 1}

  for first, second, got in ((a, nxt[:, 2], logits_a), (b, nxt[:, 3], logits_b)):
    fresh = Engine(cfg, params, _scenario())
    s, _ = fresh.prefill(prompt)
    s, _ = fresh.decode(s, first)
    _, want = fresh.decode(s, second)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  fresh = Engine(cfg, params, _scenario())
  _, want_b = fresh.decode(fresh.prefill(prompt)[0], b)
  np.testing.assert_array_equal(np.asarray(logits_b2), np.asarray(want_b))


@pytest.mark.slow
def test_a_state_from_another_engine_is_refused_by_name():
  cfg, params = _model("edgeinfinite")
  engine = Engine(cfg, params, _scenario())
  one_row, _ = Engine(cfg, params, _scenario(batch_size=1)).prefill(_tokens(19, batch=1))
  with pytest.raises(ValueError, match=r"decode state: batch 1 != Scenario.batch_size=2"):
    engine.decode(one_row, np.zeros((2,), np.int32))
  wide, _ = Engine(cfg, params, _scenario(n_window=32)).prefill(_tokens(19))
  with pytest.raises(ValueError, match=r"ring_k is float32\[2, 40, 2, 8\]; this engine's "
                                       r"long route holds float32\[2, 24, 2, 8\]"):
    engine.decode(wide, np.zeros((2,), np.int32))
  with pytest.raises(ValueError, match="expected an EngineState"):
    engine.copy_state({"caches": []})
  assert engine.compile_count() == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature=nan: must be a finite number >= 0"),
    (dict(temperature=-0.5), "temperature=-0.5: must be a finite number >= 0"),
    (dict(temperature="1"), "temperature='1'"),
    (dict(top_k=-5), "top_k=-5: must be an int >= 0"),
    (dict(top_k=2.5), "top_k=2.5"),
    (dict(top_k=True), "top_k=True"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5: must be an int"),
    (dict(top_p=0.0, rng=jax.random.key(0)), r"top_p=0.0: must be a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5: must be a number in \(0, 1\]"),
    # It used to draw with key(0) on every call: the same "random" answer each time.
    (dict(temperature=1.0), "temperature=1.0: sampling needs an explicit rng"),
])
def test_generate_refuses_invalid_sampling_parameters(kwargs, message):
  """They used to fall back to greedy decoding without a word."""
  cfg, params = _model("full")
  engine = Engine(cfg, params, _scenario())
  with pytest.raises(ValueError, match=message):
    engine.generate(_tokens(5), **{"max_new_tokens": 2, **kwargs})
  if "max_new_tokens" not in kwargs:  # the step-by-step sampler keeps the same rules
    with pytest.raises(ValueError, match=message):
      engine.sample(np.zeros((2, cfg.vocab_size), np.float32), **kwargs)
  assert engine.compile_count() == 0


def test_sample_cuts_to_top_k_then_top_p_like_a_numpy_reference():
  """Draws only from the nucleus of the top-k survivors (transformers' order), whose
  token set a numpy loop over the sorted probabilities gives; compiles once."""
  cfg, params = _model("full")
  engine = Engine(cfg, params, _scenario())
  logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05] + [1e-9] * (cfg.vocab_size - 5)] * 2,
                           np.float32))

  def allowed(top_k, top_p):
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    order = np.argsort(-p, kind="stable")[:top_k or None]
    p_k = p[order] / p[order].sum()
    keep, mass = [], 0.0
    for tok, q in zip(order, p_k):
      if mass >= top_p:
        break
      keep.append(int(tok))
      mass += q
    return set(keep)

  for top_k, top_p in ((0, 0.6), (3, 0.9), (2, 1.0), (0, 0.01)):
    seen = set()
    for i in range(60):
      seen |= set(np.asarray(engine.sample(logits, temperature=1.0, top_k=top_k, top_p=top_p,
                                           rng=jax.random.key(i))).tolist())
    assert seen == allowed(top_k, top_p), (top_k, top_p)
  assert engine.compile_counts() == {"sample": 1}


def test_scenario_sizes_must_be_ints_not_bools():
  with pytest.raises(ConfigError, match=r"Scenario.batch_size=True: must be a positive integer"):
    Scenario(batch_size=True)
  with pytest.raises(ConfigError, match=r"Scenario.n_sink=False: must be a non-negative"):
    Scenario(n_sink=False)
  with pytest.raises(ConfigError, match=r"Scenario.segment_len='16'"):
    Scenario(segment_len="16")


# ------------------------------------------------------------ continuing prefill, generate


@pytest.mark.parametrize("attention_type", [pytest.param("full", marks=pytest.mark.slow),
                                            pytest.param("streaming", marks=pytest.mark.slow),
                                            "edgeinfinite"])
def test_continued_prefill_equals_one_prefill_of_the_concatenation(attention_type):
  """A prompt read in parts (a chat turn, a streamed document), split inside blocks and
  on a block boundary, gives the state and logits of one prefill of the whole; the
  parts reuse the compiled prefill step (the first fills the rest of the block)."""
  cfg, params = _model(attention_type)
  engine = Engine(cfg, params, _scenario())
  tokens = _tokens(75)  # L = 8: the window (16) wraps, blocks enter the memory
  whole, want = engine.prefill(tokens)
  state, logits = engine.prefill(tokens[:, :13])  # long route (> short_threshold)
  for a, b in ((13, 16), (16, 19), (19, 20), (20, 53), (53, 75)):  # mid, aligned, 1, ...
    state, logits = engine.prefill(tokens[:, a:b], state=state)
  assert int(state.length) == 75 and state.route == whole.route == "long"
  np.testing.assert_allclose(logits, want, atol=2e-5)
  for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(whole)):
    np.testing.assert_allclose(got, ref, atol=2e-5)
  assert engine.compile_counts() == {"prefill_long": 1}
  # and decoding from it continues the same sequence
  nxt = _tokens(1, seed=9)[:, 0]
  np.testing.assert_allclose(engine.decode(state, nxt)[1], engine.decode(whole, nxt)[1],
                             atol=2e-5)


@pytest.mark.parametrize("c", [1, 2, 3, 5, L])
def test_sink_slot_i_holds_position_i_whatever_the_chunk_start(c):
  """The sink is written with slices (a decode token: broadcast and select; a segment: one
  dynamic slice), never a gather; slot i must take the chunk row at position i, for a
  chunk starting anywhere before, inside or past the sink, and keep its old value else."""
  from edgeinfinite_jax.model.kv_cache import _write_sink
  S = 4
  old = np.random.RandomState(0).randn(2, S, 3, 5).astype(np.float32)
  x = np.random.RandomState(1).randn(2, c, 3, 5).astype(np.float32)
  write = jax.jit(lambda *a: _write_sink(*a))  # its own cache: one compile per shape
  for start in range(S + 3):
    want = old.copy()
    for i in range(S):
      if start <= i < start + c:
        want[:, i] = x[:, i - start]
    np.testing.assert_array_equal(write(old, x, jnp.int32(start)), want, err_msg=f"{start=}")
  assert write._cache_size() == 1  # the start is traced


def test_continued_prefill_checks_the_state_and_the_capacity():
  cfg, params = _model("full")
  engine = Engine(cfg, params, _scenario())
  state, _ = engine.prefill(_tokens(3))  # short route: holds short_threshold + max_new
  with pytest.raises(ValueError, match=r"prompt of 3 \+ 60 = 63 tokens exceeds the short "
                                       r"route's cache capacity 56"):
    engine.prefill(_tokens(60), state=state)
  engine.decode(state, _tokens(1)[:, 0])  # donated: consumed
  with pytest.raises(ValueError, match="prefill state: this state was donated"):
    engine.prefill(_tokens(2), state=state)


@pytest.mark.parametrize("attention_type", [pytest.param("full", marks=pytest.mark.slow),
                                            "edgeinfinite"])
def test_generate_loop_on_device_equals_a_host_loop_of_decode_steps(attention_type):
  """The compiled loop gives the tokens a host loop of decode + sample gives, greedy and
  sampled (same fold_in(rng, i) per token), and compiles once per route whatever the
  prompt length, the number of new tokens or the sampling settings."""
  cfg, params = _model(attention_type)
  engine = Engine(cfg, params, _scenario())
  prompt = _tokens(21)

  def host_loop(n, temperature, top_k, rng):
    state, logits = engine.prefill(prompt)
    out = []
    for i in range(n):
      tok = engine.sample(logits, temperature=temperature, top_k=top_k,
                          rng=jax.random.fold_in(rng, i))
      out.append(np.asarray(tok))
      if i + 1 < n:
        state, logits = engine.decode(state, tok)
    return np.stack(out, 1)

  for n, temperature, top_k in ((7, 0.0, 0), (12, 1.0, 0), (5, 0.8, 3)):
    rng = jax.random.key(n)
    got = engine.generate(prompt, n, temperature=temperature, top_k=top_k, rng=rng)
    np.testing.assert_array_equal(got, host_loop(n, temperature, top_k, rng))
  engine.generate(_tokens(40), 3)
  assert engine.compile_counts()["generate_long"] == 1


def test_generate_stops_each_row_at_eos():
  cfg, params = _model("edgeinfinite")
  engine = Engine(cfg, params, _scenario())
  free = engine.generate(_tokens(21), 10)
  eos = int(free[0, 3])  # row 0 emits it at step 3 (or earlier)
  out = engine.generate(_tokens(21), 10, eos_id=eos)
  for row, ref in zip(out, free):
    hit = np.flatnonzero(ref == eos)
    stop = hit[0] if hit.size else 10
    np.testing.assert_array_equal(row[:stop + 1], ref[:stop + 1])  # the same until eos
    assert (row[stop:] == eos).all()  # then eos repeats
  with pytest.raises(ValueError, match=r"eos_id=64: must be None or a token id in \[0, 64\)"):
    engine.generate(_tokens(21), 3, eos_id=VOCAB)


@pytest.mark.parametrize("key_block", [16, 24])
def test_full_route_visits_key_blocks_and_equals_one_softmax(key_block):
  """``full`` attention in float caches keys after RoPE and attends block by block over
  the filled part of its cache (``MemoryConfig.key_block``: 16 divides the capacity
  of 128, 24 does not). Prefill in parts and decode across block boundaries equal
  teacher forcing with one softmax over all keys, the state equals that of an engine
  with key_block=0, and each step function compiles once however full the cache."""
  base, params = _model("full")
  cfg = base.with_memory(key_block=key_block)
  engine = Engine(cfg, params, _scenario())
  dense = Engine(cfg.with_memory(key_block=0), params, _scenario())
  tokens = _tokens(100)
  want = model.forward(cfg.with_memory(key_block=0), params, tokens)
  state, logits = engine.prefill(tokens[:, :21])
  state, logits = engine.prefill(tokens[:, 21:45], state=state)
  got = [logits]
  for t in range(45, tokens.shape[1]):
    state, logits = engine.decode(state, tokens[:, t])
    got.append(logits)
  np.testing.assert_allclose(np.stack(got, 1), want[:, 44:], atol=1e-4)
  ref, _ = dense.prefill(tokens)  # its padded last segment also wrote rows 100-103
  for a, b in zip(state.caches, ref.caches):
    for x, y in ((a.ring_k, b.ring_k), (a.ring_v, b.ring_v)):
      np.testing.assert_allclose(x[:, :100], y[:, :100], atol=1e-5)
  assert engine.compile_counts() == {"prefill_long": 1, "decode_long": 1}
