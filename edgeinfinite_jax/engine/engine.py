"""Fixed-shape inference engine: compile once per scenario, whatever the prompt.

Contract (after gemma's sampler):

* A ``Scenario`` fixes every shape: segment length, sink and window sizes,
  batch, the maximum number of new tokens, the short-route threshold and the
  capacity of full-attention caches. Changing any Scenario field recompiles;
  nothing else does.
* Each route (``short``, ``long``) has exactly one jitted prefill-segment
  function, one jitted decode function and one jitted generate loop (every new
  token inside one ``while_loop``, no host round trip per token). A prompt is fed
  segment by segment; the last partial segment is padded and masked; a prompt
  appended to an existing state first fills the rest of the current block.
  Positions, lengths, the number of new tokens and the sampling settings are
  traced values.
* Prompts of at most ``short_threshold`` tokens take the short route: the
  unmodified base model (full attention, no memory) over an ordinary KV cache.
  Longer prompts take the long route with the model's attention type.
* The state is one pytree (``EngineState``) whose size does not depend on how
  many tokens were read (``state_nbytes``), except for ``full`` attention, whose
  cache has the fixed capacity ``max_context``.

Quantized models (``quant=`` or a ``model.QuantModelConfig``) run in the config's
numerics mode, ``float``, ``fake_quant`` or ``integer``, with the same step
functions and the same compile-once guarantee (the mode is part of the static
config; scales are traced parameters). K/V are quantized on write into the
cache. In ``integer`` mode the cache holds the integer values (int8 for 8-bit
K/V), float kernels are frozen to PTQ ``QuantizedTensor`` int8 weights once at
construction, and the exported step functions take those integers: what an NPU
toolchain would be handed. Token-adaptive bits rank a whole sequence and are not
available here (``forward`` applies them).

(Over 400 lines on purpose: Scenario, EngineState and Engine are one contract, documented here once; export lives in export.py.)
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from edgeinfinite_jax.model.config import (ConfigError, ModelConfig, check_cache_layout,
                                           check_eviction)
from edgeinfinite_jax.model.transformer import Transformer, check_param_tree, check_tokens, compute_dtype
from edgeinfinite_jax.model.config import quant_of, quantized
from edgeinfinite_jax.quant import layer_quant as qapply
from edgeinfinite_jax.quant import ptq
from edgeinfinite_jax.engine import export as export_lib
from edgeinfinite_jax.engine import placement
from edgeinfinite_jax.engine.state import EngineState, state_nbytes
from edgeinfinite_jax.model import kv_cache as cache_lib

# Named scenarios (``Scenario.preset(name)``), per EdgeInfinite-Instruct's use cases.
SCENARIOS = {
    # Long document in, a long answer out: modest window, more new tokens.
    "summarization": dict(segment_len=128, n_sink=4, n_window=256, max_new_tokens=256,
                          short_threshold=512),
    # The question sits at the end of the prompt: a larger window keeps it (and
    # the text just before it) as raw KV; answers are short.
    "qa": dict(segment_len=128, n_sink=4, n_window=1024, max_new_tokens=64,
               short_threshold=512),
}


@dataclasses.dataclass(frozen=True)
class Scenario:
  """Every compile-time size of the engine. See the module docstring."""
  segment_len: int = 64
  n_sink: int = 4
  n_window: int = 128
  batch_size: int = 1
  max_new_tokens: int = 64
  short_threshold: int = 256
  max_context: int = 8192  # capacity of a full-attention cache on the long route
  # h2o / snapkv: kept tokens per KV head and layer on the long route (the eviction
  # budget); None keeps the model's ``memory.n_kept``. Other attention types ignore it.
  n_kept: int | None = None

  def __post_init__(self):
    # bool is an int subclass, but True is no size: refused like any other non-int.
    for key in ("segment_len", "batch_size", "max_new_tokens", "max_context"):
      v = getattr(self, key)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"Scenario.{key}={v!r}: must be a positive integer (int)")
    for key in ("n_sink", "n_window", "short_threshold"):
      v = getattr(self, key)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(f"Scenario.{key}={v!r}: must be a non-negative integer (int)")
    if self.n_kept is not None and (not isinstance(self.n_kept, int)
                                    or isinstance(self.n_kept, bool) or self.n_kept < 0):
      raise ConfigError(f"Scenario.n_kept={self.n_kept!r}: must be None (the model's "
                        "memory.n_kept) or a non-negative integer (int)")
    check_cache_layout(self.segment_len, self.n_sink, self.n_window, "Scenario")

  @classmethod
  def preset(cls, name: str, **overrides) -> "Scenario":
    if name not in SCENARIOS:
      raise ConfigError(f"Scenario preset {name!r}: must be one of {sorted(SCENARIOS)}")
    return cls(**{**SCENARIOS[name], **overrides})

  def capacity(self, n: int) -> int:
    """n tokens rounded up to whole segments."""
    return -(-n // self.segment_len) * self.segment_len

  def routes(self, config: ModelConfig) -> dict[str, "Route"]:
    """The cache layout of each route for ``config``: the one place it is decided.

    The Scenario's segment, sink and window *replace* the sizes in
    ``config.memory`` (those are the training-time settings; a model trained with
    one window can be served with another). The attention type, gate and update
    rule stay the model's. ``short``: the base model with full attention over a
    ring that holds ``short_threshold + max_new_tokens`` and never wraps. ``long``:
    sink + a ring of ``n_window + segment_len`` (the window and the block being
    written; the memory takes what leaves it), or for ``full`` attention a ring of
    ``max_context`` that never wraps. ``h2o`` / ``snapkv`` add ``n_kept`` kept tokens
    per KV head (``Scenario.n_kept``, else the model's), checked here against the
    Scenario's segment length.
    """
    base = dict(segment_len=self.segment_len, n_sink=0)
    short = Route(config.with_memory(attention_type="full", n_window=0, **base), n_sink=0,
                  ring_len=self.capacity(self.short_threshold + self.max_new_tokens))
    if config.memory.segmented:
      sizes = dict(segment_len=self.segment_len, n_sink=self.n_sink, n_window=self.n_window)
      if config.memory.evicts:
        mine = self.n_kept is not None
        sizes["n_kept"] = self.n_kept if mine else config.memory.n_kept
        check_eviction(config.memory, sizes["n_kept"], self.segment_len,
                       "Scenario.n_kept" if mine else "model.memory.n_kept",
                       "Scenario.segment_len")
      long = Route(config.with_memory(**sizes),
                   n_sink=self.n_sink, ring_len=self.n_window + self.segment_len)
    else:
      long = Route(config.with_memory(n_window=0, **base), n_sink=0,
                   ring_len=self.capacity(self.max_context))
    return {"short": short, "long": long}


def check_sampling(temperature, top_k, top_p, rng) -> None:
  """``generate``'s and ``sample``'s rules for the sampling settings (ValueError naming
  the value): the sampler would otherwise fall back to greedy, or repeat one draw,
  without a word."""
  number = lambda x: (isinstance(x, (int, float, np.integer, np.floating))
                      and not isinstance(x, bool) and math.isfinite(x))
  if not number(temperature) or temperature < 0:
    raise ValueError(f"temperature={temperature!r}: must be a finite number >= 0 (0 = greedy)")
  if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
    raise ValueError(f"top_k={top_k!r}: must be an int >= 0 (0 = no top-k cut)")
  if not number(top_p) or not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p!r}: must be a number in (0, 1] (1 = no nucleus cut)")
  if temperature > 0 and rng is None:
    raise ValueError(f"temperature={temperature}: sampling needs an explicit rng "
                     "(jax.random.key(seed)); temperature=0 decodes greedily")


class Route(NamedTuple):
  """One route's model config and cache layout (``Scenario.routes``)."""
  config: ModelConfig  # the model as this route runs it (the Scenario's sizes)
  n_sink: int          # raw sink slots per layer
  ring_len: int        # ring slots per layer (a multiple of segment_len)


class Engine:
  """Prefill / decode / generate for one (model, params, scenario).

  ``params`` is ``{"params": ...}``. The jitted step functions are built here
  once; ``compile_count()`` reports how often they have been traced (each trace
  is one XLA compilation). ``quant``: a QuantConfig to run with (see module doc);
  its rules, the scales in ``params`` and the integer accumulator depths of the
  scenario are checked here, before anything compiles.

  What compiles when: three jitted functions per route (``prefill`` of one segment,
  ``decode`` of one token, the ``generate`` loop), each traced on its first call and
  never again for this engine (lengths, positions, ``max_new_tokens``, sampling
  settings and ``eos_id`` are traced; ``compile_counts()``).
  ``with_params`` shares them. Another Scenario, model config or quant config is
  another Engine, with its own compilations.

  State (``EngineState``), per route, fixed by ``Scenario.routes``: one
  ``LayerCache`` per layer with ``sink_k/v [B, n_sink, K, D]`` and ``ring_k/v
  [B, ring_len, K, D]`` in the compute dtype (the integer K/V dtype in integer
  mode), the memory ``M [B, K, D, D]`` and ``z [B, K, D]`` in float32 (zero-sized
  unless edgeinfinite), for h2o / snapkv the kept tokens (``eviction.Kept``: k/v
  ``[B, n_kept, K, D]`` like the ring, positions int32 and scores float32 ``[B,
  n_kept, K]``, the window's scores float32 ``[B, ring_len, K]``; ``None`` otherwise),
  and ``length``, an int32 scalar. B = ``Scenario.batch_size``,
  K = kv heads, D = head dim. Cached keys are pre-RoPE, except on ``full``-attention
  routes in float, which cache them after RoPE (``kv_cache`` module doc).

  Call contract:

  * ``prefill(tokens)``: integer ``[batch, time]``, ``batch == Scenario.batch_size``,
    ``time >= 1``, ids in ``[0, vocab_size)`` (``model.check_tokens``, the rule
    ``forward`` applies). Returns a new ``EngineState`` and float32 logits
    ``[batch, vocab]`` of the last token.
  * ``prefill(tokens, state=state)``: appends to a state of this engine (consumed,
    as by ``decode``), on its route; equals one prefill of the concatenation.
  * ``decode(state, token)``: integer ``[batch]``; the state must come from this
    engine (same batch, route and cache shapes) and not be consumed. Returns a new
    state and ``[batch, vocab]`` logits.
  * ``generate(tokens, n, ...)``: int32 ``[batch, n]`` on the host, synchronised
    once per call.
  * Donation: ``decode`` donates ``state`` to the step function, which writes the
    new state into its buffers (no copy of the caches per token). Afterwards the
    state passed in is consumed: every array in it is deleted, and passing it again
    raises a ValueError that says so. Keep using the returned state. To decode one
    state more than once (branching, beam search), pass ``donate=False`` (decodes a
    copy; the original stays valid) or take ``copy_state(state)`` first; neither
    compiles anything more. Nothing else is donated: tokens, params and logits
    stay the caller's, and ``prefill`` without ``state=`` builds its own state.
  """

  def __init__(self, config: ModelConfig, params, scenario: Scenario, quant=None):
    if quant is not None:
      config = quantized(config, quant)
    q = quant_of(config)
    if qapply.active(q):
      if q.edgeqat.adaptive_fraction > 0:
        raise ConfigError(f"quant.edgeqat.adaptive_fraction={q.edgeqat.adaptive_fraction}: "
                          "token-adaptive bits rank the tokens of a whole sequence, which a "
                          "chunked prefill / token-by-token decode cannot reproduce; set 0 "
                          "for the engine (model.forward applies them)")
    self._config = config
    self.scenario, self.params = scenario, self._prepare(params)
    routes = scenario.routes(config)
    self.route_configs = {r: x.config for r, x in routes.items()}
    self.ring_len = {r: x.ring_len for r, x in routes.items()}
    self.n_sink = {r: x.n_sink for r, x in routes.items()}
    for route, cfg in self.route_configs.items():
      qapply.check_attention_depth(cfg, self.n_sink[route] + self.ring_len[route]
                                   + (cfg.memory.n_kept if cfg.memory.evicts else 0))
    self._traces = collections.Counter()
    self._state_avals = {}  # route -> [(path, ShapeDtypeStruct)] of init_state(route)
    self._prefill = {r: self._jit(f"prefill_{r}", self._step(r)) for r in self.route_configs}
    self._decode = {r: self._jit(f"decode_{r}", self._step(r)) for r in self.route_configs}
    self._score = {r: self._jit(f"score_{r}", self._score_step(r)) for r in self.route_configs}
    self._generate = {r: self._jit(f"generate_{r}", self._generate_loop(r), donate=False)
                      for r in self.route_configs}
    self._sample = self._jit("sample", self._sample_fn, donate=False)

  def _prepare(self, params):
    """Checks the static scales; integer mode quantizes the weights once, here."""
    check_param_tree(self._config, params)
    q = quant_of(self._config)
    if qapply.active(q):
      qapply.check_params(self._config, params)
      if q.mode == "integer":  # int8 weights once, not re-quantized in every step
        params = ptq.quantize_params(params, q)
    return params

  def with_params(self, params) -> "Engine":
    """This engine with other weights of the same shapes (e.g. a fine-tuned or a
    quantized-then-dequantized copy). The compiled step functions and their
    trace counters are shared: nothing recompiles."""
    params = self._prepare(params)
    want, got = (jax.tree_util.tree_flatten_with_path(jax.eval_shape(lambda p=p: p))[0]
                 for p in (self.params, params))
    if [k for k, _ in want] != [k for k, _ in got]:
      raise ValueError("with_params: the parameter tree differs from the engine's "
                       f"({len(got)} leaves vs {len(want)}); build a new Engine")
    for (path, a), (_, b) in zip(want, got):
      if (a.shape, a.dtype) != (b.shape, b.dtype):
        raise ValueError(f"with_params: {jax.tree_util.keystr(path)} is {b.shape} {b.dtype}; "
                         f"the engine compiled for {a.shape} {a.dtype}")
    new = copy.copy(self)
    new.params = params
    return new

  # -- step functions ---------------------------------------------------------

  def _step(self, route, config=None, every_position=False):
    """The step of ``route``: ``(params, state, tokens [B, c], n_valid) -> (state, logits)``
    for a prefill segment (c = segment_len) or a decode token (c = 1). ``config``: the
    route's config with other implementation settings (``step_functions(loops=False)``).
    ``every_position``: logits ``[B, c, vocab]`` of every position (``score``), not
    only of the last valid one."""
    config = config or self.route_configs[route]

    def step(params, state: EngineState, tokens, n_valid):
      chunk = cache_lib.Chunk(state.length, n_valid)
      positions = state.length + jnp.arange(tokens.shape[1], dtype=jnp.int32)
      model = Transformer(config)
      hidden, caches = model.apply(params, tokens, positions[None], state.caches, chunk,
                                   return_hidden=True)
      new_state = EngineState(caches, state.length + n_valid, state.route)
      if every_position:
        return new_state, model.apply(params, hidden, method=Transformer.logits)
      last = jax.lax.dynamic_index_in_dim(hidden, n_valid - 1, axis=1, keepdims=True)
      logits = model.apply(params, last, method=Transformer.logits)[:, 0]
      return new_state, logits

    return step

  def _score_step(self, route):
    """``(params, state, tokens [B, c], n_valid, targets [B, c]) -> (state, nll [B, c])``:
    one prefill segment and, at every position, -log p(target) in float32 (the
    log-softmax runs here, so only [B, c] leaves the device, not [B, c, vocab])."""
    step = self._step(route, every_position=True)

    def score_step(params, state: EngineState, tokens, n_valid, targets):
      state, logits = step(params, state, tokens, n_valid)
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      return state, -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    return score_step

  def _jit(self, name, fn, donate=True):
    """``fn`` jitted, counting its traces; ``donate``: the state (argument 1) is donated
    (a step returns the new state in its buffers; the generate loop returns tokens
    only, so nothing of it could reuse them)."""
    def counted(*args):
      self._traces[name] += 1  # runs only while tracing
      return fn(*args)
    return jax.jit(counted, donate_argnums=(1,) if donate else ())

  def _generate_loop(self, route):
    """``(params, state, logits, n, rng, temperature, top_k, top_p, eos_id) -> tokens
    [B, max_new_tokens]``: the whole decode loop in one compiled ``while_loop``.

    Token i is sampled from the logits with ``fold_in(rng, i)`` (as a host loop of
    ``decode`` calls would), then fed back, except the last. ``n`` is traced (at most
    ``Scenario.max_new_tokens``, the buffer's static size); the loop ends after ``n``
    tokens or once every row has produced ``eos_id`` (-1: never), and a finished
    row's later tokens are ``eos_id``.
    """
    step, sample = self._step(route), self._sample_fn
    size = self.scenario.max_new_tokens

    def loop(params, state, logits, n, rng, temperature, top_k, top_p, eos_id):
      batch = logits.shape[0]
      out = jnp.full((batch, size), jnp.maximum(eos_id, 0), jnp.int32)
      tok = sample(logits, jax.random.fold_in(rng, 0), temperature, top_k, top_p)
      out = out.at[:, 0].set(tok)

      # Each iteration feeds the previous token and samples the next, so the step runs
      # unconditionally: a lax.cond around it (to skip feeding the last token) makes
      # XLA copy the whole state into the conditional on every token.
      def body(carry):
        i, state, tok, out, done = carry
        state, logits = step(params, state, tok[:, None], jnp.int32(1))
        tok = sample(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)
        tok = jnp.where(done, eos_id, tok)
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
        return i + 1, state, tok, out, done | (tok == eos_id)

      carry = (jnp.int32(1), state, tok, out, tok == eos_id)
      _, _, _, out, _ = jax.lax.while_loop(
          lambda c: (c[0] < n) & ~jnp.all(c[4]), body, carry)
      return out

    return loop

  def init_state(self, route: str) -> EngineState:
    config = self.route_configs[route]
    dt = compute_dtype(config)
    q = quant_of(config)
    if qapply.active(q) and q.mode == "integer" and q.kv_cache is not None:
      dt = q.kv_cache.int_dtype  # the cache holds the integer K/V values
    caches = [cache_lib.empty_cache(config, self.scenario.batch_size, self.n_sink[route],
                                    self.ring_len[route], dt)
              for _ in range(config.num_layers)]
    return EngineState(caches, jnp.zeros((), jnp.int32), route)

  def _sample_fn(self, logits, rng, temperature, top_k, top_p):
    """One token per row from ``logits [B, V]``: greedy at temperature 0, else a draw
    from softmax(logits / temperature) cut to the ``top_k`` most likely tokens (0 = no
    cut), then to the smallest set whose probability reaches ``top_p`` (1 = no cut;
    the most likely token always stays), in transformers' order (top-k, then top-p)."""
    # Greedy skips the vocabulary sort and the draw (a cond on the traced temperature:
    # both would otherwise run on every token and be thrown away).
    def sampled(logits):
      scaled = logits / jnp.maximum(temperature, 1e-6)
      ranked = -jnp.sort(-scaled, axis=-1)
      vocab = logits.shape[-1]
      kth = ranked[:, jnp.clip(top_k - 1, 0, vocab - 1)]
      keep_k = (top_k <= 0) | (ranked >= kth[:, None])
      # Nucleus over the top-k survivors: a ranked token stays while the mass before it
      # is below top_p; the cut is the smallest logit that stays.
      probs = jax.nn.softmax(jnp.where(keep_k, ranked, -jnp.inf), axis=-1)
      keep = keep_k & ((top_p >= 1) | ((jnp.cumsum(probs, axis=-1) - probs) < top_p))
      cut = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1)
      scaled = jnp.where(scaled < cut[:, None], -jnp.inf, scaled)
      return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sampled,
                        lambda lg: jnp.argmax(lg, axis=-1).astype(jnp.int32), logits)

  # -- public API -------------------------------------------------------------

  def route_for(self, prompt_len: int) -> str:
    return placement.route_for(prompt_len, self.scenario.short_threshold)

  def _check_tokens(self, tokens, ndim, what):
    tokens = check_tokens(tokens, self.route_configs["short"].vocab_size, what, ndim)
    if tokens.shape[0] != self.scenario.batch_size:
      raise ValueError(f"{what}: batch {tokens.shape[0]} != Scenario.batch_size="
                       f"{self.scenario.batch_size}")
    return tokens

  def _check_state(self, state, what):
    """A live state of this engine's shapes; a mismatch would fail deep inside the
    step function (dynamic_update_slice), a consumed one with 'Buffer deleted'."""
    if not isinstance(state, EngineState) or state.route not in self.route_configs:
      raise ValueError(f"{what}: expected an EngineState made by this engine's prefill or "
                       f"init_state, got {type(state).__name__}"
                       + (f" with route {state.route!r}" if isinstance(state, EngineState)
                          else ""))
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    if any(isinstance(x, jax.Array) and x.is_deleted() for _, x in leaves):
      raise ValueError(f"{what}: this state was donated to an earlier decode call and is "
                       "consumed; decode the state that call returned, or branch with "
                       "decode(state, token, donate=False) / copy_state(state)")
    batch = state.caches[0].ring_k.shape[0] if state.caches else None
    if batch != self.scenario.batch_size:
      raise ValueError(f"{what}: batch {batch} != Scenario.batch_size="
                       f"{self.scenario.batch_size} (a state from another engine?)")
    route = state.route
    if route not in self._state_avals:
      self._state_avals[route] = jax.tree_util.tree_flatten_with_path(
          jax.eval_shape(lambda: self.init_state(route)))[0]
    want = self._state_avals[route]
    if [p for p, _ in leaves] != [p for p, _ in want]:
      raise ValueError(f"{what}: its tree ({len(leaves)} arrays) is not this engine's "
                       f"{route} state ({len(want)}); a state from another model?")
    for (path, x), (_, a) in zip(leaves, want):
      if (tuple(jnp.shape(x)), jnp.result_type(x)) != (a.shape, a.dtype):
        raise ValueError(f"{what}: {jax.tree_util.keystr(path)} is "
                         f"{jnp.result_type(x)}{list(jnp.shape(x))}; this engine's {route} "
                         f"route holds {a.dtype}{list(a.shape)} (a state from an engine "
                         "with another Scenario or model?)")

  def capacity(self, route: str) -> int | None:
    """Most tokens a route can hold (None: unbounded, memory absorbs the rest)."""
    if route == "long" and self.route_configs["long"].memory.segmented:
      return None
    return self.ring_len[route]

  def state_bytes(self, route: str = "long") -> int:
    """Bytes of a route's state (``state_nbytes`` of ``init_state``), from shapes only:
    nothing is allocated. What methods are compared at ("equal state bytes")."""
    return state_nbytes(jax.eval_shape(lambda: self.init_state(route)))

  def prefill(self, tokens, state: EngineState | None = None):
    """Reads a prompt [batch, time] (time >= 1); returns (state, last-token logits).

    ``state=None`` starts fresh, on the route of the prompt's length. ``state=`` an
    earlier state of this engine appends the tokens to it (a chat turn, a document
    that arrives in parts), on that state's route, with the same compiled step: the
    first chunk fills the rest of the current block (padded to a segment, its
    length traced), the others are aligned segments, so nothing recompiles. The
    result equals one prefill of the concatenation (tested). A continued state is
    donated like ``decode``'s: keep using the returned one.
    """
    return self._read(*self._placement(tokens, state), state)

  def _placement(self, tokens, state, decoded: int | None = None):
    """(checked tokens, route, start position) of a prompt read into ``state`` (None:
    a fresh one), with room left for ``decoded`` more tokens (``generate``'s check);
    ValueError before any work when the route's cache cannot hold them."""
    tokens = self._check_tokens(tokens, 2, "prefill tokens")
    t = tokens.shape[1]
    if state is None:
      route, start = self.route_for(t), 0
    else:
      self._check_state(state, "prefill state")
      route, start = state.route, int(state.length)
    placement.check_capacity(route, start, t, self.capacity(route), decoded)
    return tokens, route, start

  def _read(self, tokens, route, start, state):
    """Feeds checked ``tokens`` from position ``start`` segment by segment."""
    state = self.init_state(route) if state is None else state
    logits = None
    for chunk, n in placement.chunks(tokens, start, self.scenario.segment_len):
      state, logits = self._prefill[route](self.params, state, chunk, jnp.int32(n))
    return state, logits

  def decode(self, state: EngineState, token, *, donate: bool = True):
    """Reads one token per row [batch]; returns (state, logits [batch, vocab]).

    ``donate=True`` consumes ``state`` (its buffers become the new state's, see the
    class doc); ``donate=False`` leaves it valid, at the cost of one copy of it.
    """
    token = self._check_tokens(token, 1, "decode token")
    self._check_state(state, "decode state")
    placement.check_decode_room(state.route, int(state.length), self.capacity(state.route))
    if not donate:
      state = jax.tree.map(jnp.copy, state)  # the copy is donated; the caller's stays live
    return self._decode[state.route](self.params, state, token[:, None], jnp.int32(1))

  def copy_state(self, state: EngineState) -> EngineState:
    """A copy of ``state`` in new buffers: decoding (and so donating) one of the two
    leaves the other valid. Copies arrays only; compiles no step function."""
    self._check_state(state, "copy_state")
    return jax.tree.map(jnp.copy, state)

  def score(self, tokens) -> np.ndarray:
    """Teacher-forced negative log-likelihood of a text [batch, time] (time >= 2):
    float32 ``[batch, time - 1]``, entry t = -log p(tokens[:, t + 1] | tokens[:, :t + 1]).

    The text is read as ``prefill`` reads it (the route of its length, segment by
    segment, the last segment padded), through one more jitted step per route that
    returns every position's log-likelihood of the segment (``_score_step``): one
    compilation per route whatever the length, and what the model sees at position
    t is exactly what ``prefill``/``decode`` would have given it there (tested against
    ``model.forward``). The same tokens, checks and capacity limits as ``prefill``.
    """
    tokens, route, _ = self._placement(tokens, None)
    if tokens.shape[1] < 2:
      raise ValueError(f"score tokens: time={tokens.shape[1]}; must be >= 2 (a next token "
                       "to score)")
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]  # the last position has no target; dropped below
    state, out, seg = self.init_state(route), [], self.scenario.segment_len
    for (chunk, n), (target, _) in zip(placement.chunks(tokens, 0, seg),
                                       placement.chunks(targets, 0, seg)):
      state, nll = self._score[route](self.params, state, chunk, jnp.int32(n), target)
      out.append(nll[:, :n])
    return np.asarray(jnp.concatenate(out, axis=1))[:, :-1]

  def generate(self, tokens, max_new_tokens=None, *, temperature=0.0, top_k=0, top_p=1.0,
               rng=None, eos_id=None, state: EngineState | None = None):
    """Greedy (temperature 0) or sampled continuation, int32 [batch, max_new_tokens].

    The prompt is read by ``prefill(tokens, state=state)``; the new tokens are then
    produced by one compiled loop (``_generate_loop``): no host round trip per token,
    one compilation per route whatever the prompt length, ``max_new_tokens``,
    sampling settings or ``eos_id`` (all traced). Sampling (``check_sampling``):
    ``temperature`` >= 0 (0 = greedy), ``top_k`` >= 0 (0 = the whole vocabulary),
    ``top_p`` in (0, 1] (1 = no nucleus cut) and, when temperature > 0, an explicit
    ``rng`` (a silent default key would give every call the same "random" text);
    ``eos_id``: a token id that ends a row (its later tokens repeat it) or None.
    Anything else raises ValueError naming it, before any work. ``decode`` and
    ``sample`` stay for step-by-step use.
    """
    n = placement.new_tokens(max_new_tokens, self.scenario.max_new_tokens)
    check_sampling(temperature, top_k, top_p, rng)
    placement.check_eos_id(eos_id, self.route_configs["short"].vocab_size)
    tokens, route, start = self._placement(tokens, state, decoded=n - 1)
    rng = jax.random.key(0) if rng is None else rng  # unused when greedy
    state, logits = self._read(tokens, route, start, state)
    out = self._generate[route](self.params, state, logits, jnp.int32(n), rng,
                                jnp.float32(temperature), jnp.int32(top_k),
                                jnp.float32(top_p), jnp.int32(-1 if eos_id is None else eos_id))
    return np.asarray(out)[:, :n]

  def sample(self, logits, *, temperature=0.0, top_k=0, top_p=1.0, rng=None):
    """The next token of each row of ``logits [batch, vocab]`` (from ``prefill`` or
    ``decode``), int32 [batch], by ``generate``'s sampler and rules: a host loop of
    ``decode`` and ``sample`` draws what ``generate`` draws with ``fold_in(rng, i)``
    for token i. One compilation, whatever the settings (they are traced)."""
    check_sampling(temperature, top_k, top_p, rng)
    rng = jax.random.key(0) if rng is None else rng  # unused when greedy
    return self._sample(logits, rng, jnp.float32(temperature), jnp.int32(top_k),
                        jnp.float32(top_p))

  def compile_count(self) -> int:
    """XLA compilations of the step functions so far (all routes)."""
    return sum(self._traces.values())

  def compile_counts(self) -> dict[str, int]:
    return dict(self._traces)

  # -- export -----------------------------------------------------------------

  def export(self, directory: str, routes=("short", "long"), formats=("stablehlo",),
             progress: bool = True) -> dict:
    """Writes every step function of ``routes`` in ``formats`` (``stablehlo`` for JAX,
    ``tflite`` for LiteRT, ``onnx`` for ONNX Runtime) plus ``manifest.json``; see
    ``engine/export.py``. ``edgeinfinite_jax.deploy.load`` runs the tflite/onnx files
    without JAX; ``export.load_exported`` reloads a StableHLO one in JAX."""
    return export_lib.export(self, directory, routes, formats, progress)

  def step_functions(self, route: str, loops: bool = True) -> dict:
    """``{"prefill": fn, "decode": fn}``: the jitted steps of ``route``, each
    ``(params, state, tokens [batch, chunk], n_valid) -> (state, logits)``.

    ``loops=False``: the same steps (same state, same results to float32 rounding)
    without a loop whose trip count is traced, the form edge runtimes convert: full
    attention takes one softmax over its whole cache (``MemoryConfig.key_block=0``)
    instead of visiting the filled key blocks. Not jitted; ``export`` traces them."""
    if loops:
      return {"prefill": self._prefill[route], "decode": self._decode[route]}
    step = self._step(route, self.route_configs[route].with_memory(key_block=0))
    return {"prefill": step, "decode": step}

