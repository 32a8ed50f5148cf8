"""The JAX side of the benchmark: the checkpoint it measures and the engine worker.

``write_checkpoint`` runs in the orchestrator: random weights for the plan's
model, saved with ``save_hf`` so that the engine and the transformers reference
(``torch_worker.py``) load the same weights.

``engine_worker`` runs in a fresh process per measurement,
``python -m edgeinfinite_jax.bench.workers JOB_JSON`` (``probes.worker_command``),
so that its peak memory is its own: it builds an ``Engine`` for one method,
warms up (compiles) on a one-segment prompt, reads the whole prompt inside a
``measure.MemoryWindow``, reads it again (``repeats``), and times decode steps.
The QAT worker is ``qat_step.run_job``, in its own module and process: importing
the training stack (optax, orbax) here would count in the engine's peak RSS.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edgeinfinite_jax.bench import measure, xla_profile
from edgeinfinite_jax.bench.plan import usable_cores
from edgeinfinite_jax.checkpoints import models
from edgeinfinite_jax.checkpoints.hf import load_hf, save_hf
from edgeinfinite_jax.engine.engine import Engine, Scenario, state_nbytes
from edgeinfinite_jax.model.config import ModelConfig
from edgeinfinite_jax.model.gate import with_memory
from edgeinfinite_jax.model.transformer import abstract_params, forward


# ----------------------------------------------------------------------------- checkpoint
def random_params(config: ModelConfig, seed: int):
  """Random weights in numpy for the shapes ``model.abstract_params`` gives.

  Not ``init_params``: that traces and compiles the model's whole init, which
  took 17-28 s here (2 busy CPU cores) for the tiny ``--quick`` model as for the
  55M one, against 0.5 s and 2.5 s for this fill -- seconds added to every
  smoke run and test for values the timings do not depend on. The fill follows
  ``init_params``'s scheme (normal(0.02) kernels and embeddings, unit norm
  scales, zero biases) on exactly its tree (``abstract_params`` is
  ``eval_shape`` of ``init_params``), so the checkpoint is a normal model.
  """
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return np.ones(leaf.shape, np.float32)
    if name == "bias":
      return np.zeros(leaf.shape, np.float32)
    return (0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, abstract_params(config))


def write_checkpoint(source: str, model: dict, scenario: dict, seed: int,
                     path: str) -> tuple[ModelConfig, int]:
  """Checks the scenario, saves the weights the section measures to ``path``:
  random weights of ``model`` (``source="random"``) or a named model of
  ``checkpoints.models`` (its GGUF file, dequantized to float32). Returns
  (config, #params). Both the engine and transformers then load this checkpoint,
  so they run the same float32 weights."""
  Scenario(segment_len=scenario["segment_len"], n_sink=scenario["n_sink"],
           n_window=scenario["n_window"])  # raises on a bad --segment-len/--window/--sink
  if source == "random":
    config = ModelConfig(**model)
    params = random_params(config, seed)
  else:
    config, params, _ = models.load(source, tokenizer=False)
  n_params = int(sum(x.size for x in jax.tree.leaves(params)))
  save_hf(config, params, path)
  return config, n_params


# ----------------------------------------------------------------------------- engine worker
class _CompileLog:
  """XLA compile events of this process (``jax.monitoring``), with their durations."""

  def __init__(self):
    self.events: list[tuple[str, float]] = []
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, name, secs, **kw):
    if name.startswith("/jax/core/compile/"):
      self.events.append((name, secs))

  def backend_compiles_since(self, mark: int) -> int:
    return sum(1 for n, _ in self.events[mark:] if n.endswith("backend_compile_duration"))


def _engine(job: dict) -> tuple[Engine, int]:
  """The engine for ``job["method"]`` (long route, sized for the context), and the vocab."""
  sc, L = job["scenario"], job["scenario"]["segment_len"]
  config, params = load_hf(job["checkpoint"])
  if job["method"] == "full":
    config = config.with_memory(attention_type="full")
  else:
    config, params = with_memory(config, params, rng=jax.random.key(1),
                                 attention_type=job["method"], segment_len=L,
                                 n_sink=sc["n_sink"], n_window=sc["n_window"])
  n_decode = max(job["decode_warmup"] + job["decode_steps"], job.get("generate_tokens", 0))
  capacity = -(-(job["length"] + n_decode + 1) // L) * L
  return Engine(config, params, Scenario(
      segment_len=L, n_sink=sc["n_sink"], n_window=sc["n_window"], batch_size=1,
      max_new_tokens=max(n_decode, 1), short_threshold=0,
      max_context=capacity)), config.vocab_size


def _warm_up(engine: Engine, warm, log: _CompileLog) -> dict:
  """One segment of prefill and one decode step: compiles both step functions."""
  log.events.clear()  # loading and with_memory's gate init compiled small things
  t0 = time.perf_counter()
  state, logits = engine.prefill(warm)
  state, logits = engine.decode(state, warm[:, 0])
  jax.block_until_ready(logits)
  return dict(warmup_s=time.perf_counter() - t0, compile_s=sum(s for _, s in log.events),
              compile_count_warmup=engine.compile_count())


def _read_again(engine: Engine, tokens) -> float:
  return measure.timed(lambda: jax.block_until_ready(engine.prefill(tokens)[1]))


def _prefill(engine: Engine, tokens, repeats: int, repeat_below_s: float | None = None):
  """The first read, memory-measured, then the repeats: (row fields, state, memory window).

  Not ``eval.passkey.cost_curve``, though both time a steady-state prefill: that
  one reads several lengths in one process and keeps only the best time and the
  state's size, while a row here needs the first read's memory window (one
  length per process), every read's time (``ttft_runs_s``) and the state itself,
  which the decode steps continue from.
  """
  with measure.MemoryWindow() as mem:
    t0 = time.perf_counter()
    state, logits = engine.prefill(tokens)
    jax.block_until_ready(logits)
    first = time.perf_counter() - t0
  out = mem.result()
  out["finite"] = bool(np.all(np.isfinite(np.asarray(logits))))
  out.update(measure.best_of(first, functools.partial(_read_again, engine, tokens), repeats,
                             repeat_below_s))
  return out, state, mem


def _timed_decode(engine: Engine, state, token):
  t0 = time.perf_counter()
  state, logits = engine.decode(state, token)
  jax.block_until_ready(logits)
  return state, time.perf_counter() - t0


def _decode(engine: Engine, state, toks, warmup: int):
  """Single-token steps from ``state``: (statistics after ``warmup``, the state after)."""
  times = []
  for i in range(len(toks)):
    state, t = _timed_decode(engine, state, toks[i:i + 1])
    times.append(t)
  return measure.decode_stats(times[warmup:]), state


def _paired_decode(engine: Engine, state, other, toks, warmup: int, short: int) -> dict:
  """The same compiled step on a state of ``short`` tokens and on this one, alternating,
  so that the machine's load changes hit both alike: the median ratio of the pairs."""
  pairs = []
  for i in range(len(toks)):
    state, t_long = _timed_decode(engine, state, toks[i:i + 1])
    other, t_short = _timed_decode(engine, other, toks[i:i + 1])
    pairs.append((t_long, t_short))
  pairs = pairs[warmup:]
  return dict(context=short, ratio=statistics.median(a / b for a, b in pairs),
              long_ms=1e3 * statistics.median(a for a, _ in pairs),
              short_ms=1e3 * statistics.median(b for _, b in pairs))


def _generate_vs_steps(engine: Engine, prompt, n: int, repeats: int) -> dict:
  """``generate(prompt, n)`` (one compiled loop, one host sync) against the same work
  through the step-by-step API: ``prefill`` and ``n - 1`` ``decode`` calls, each fed
  the greedy token of the last (checked on the host, as ``decode`` does). Both are
  compiled first, then run alternately ``repeats`` times: the median of each and of
  the pairs' ratios."""
  def looped():
    t0 = time.perf_counter()
    engine.generate(prompt, n)
    return time.perf_counter() - t0

  def stepped():
    t0 = time.perf_counter()
    state, logits = engine.prefill(prompt)
    for _ in range(n - 1):
      state, logits = engine.decode(state, jnp.argmax(logits, -1).astype(jnp.int32))
    np.asarray(jnp.argmax(logits, -1))
    return time.perf_counter() - t0

  looped(), stepped()  # compiles the loop (the steps are compiled already)
  pairs = [(looped(), stepped()) for _ in range(repeats)]
  return dict(tokens=n, context=prompt.shape[1],
              generate_s=statistics.median(a for a, _ in pairs),
              steps_s=statistics.median(b for _, b in pairs),
              ratio=statistics.median(a / b for a, b in pairs), repeats=repeats)


def prefill_flops(engine: Engine, length: int) -> float:
  """FLOPs of a ``length``-token prefill on the long route, as XLA counts them: the
  compiled prefill step's ``cost_analysis`` times the segments read. Valid for a step
  without a data-dependent loop (streaming, edgeinfinite); XLA counts a loop body once."""
  L = engine.scenario.segment_len
  state = engine.init_state("long")
  args = (engine.params, state, jax.ShapeDtypeStruct((1, L), jnp.int32), jnp.int32(L))
  cost = engine.step_functions("long")["prefill"].lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) * -(-length // L)


def engine_worker(job: dict) -> dict:
  """One engine measurement (``job`` as ``probes.job_for`` builds it)."""
  log = _CompileLog()
  length, warmup, short = job["length"], job["decode_warmup"], job.get("paired_context")
  engine, vocab = _engine(job)
  rng = np.random.default_rng(job["seed"])
  out: dict[str, Any] = dict(method=job["method"], length=length)
  out.update(_warm_up(engine, rng.integers(0, vocab, (1, min(job["scenario"]["segment_len"],
                                                              length)), dtype=np.int32), log))
  n_events = len(log.events)
  mem = None
  if job["prefill"]:
    prefill, state, mem = _prefill(engine, rng.integers(0, vocab, (1, length), dtype=np.int32),
                                   job["repeats"], job.get("repeat_below_s"))
    out.update(prefill)
  else:  # synthetic state holding `length` tokens: decode cost does not depend on values
    state = engine.init_state("long").replace(length=jnp.asarray(length, jnp.int32))
    out["synthetic_state"] = True
  out["state_bytes"] = state_nbytes(state)
  if job["decode_steps"]:
    toks = rng.integers(0, vocab, (warmup + job["decode_steps"],), dtype=np.int32)
    stats, state = _decode(engine, state, toks, warmup)
    out.update(stats, decode_context=length)
    if short:  # the decode target's paired measurement
      other, _ = engine.prefill(rng.integers(0, vocab, (1, short), dtype=np.int32))
      out["paired"] = _paired_decode(engine, state, other, toks, warmup, short)
    if job.get("generate") and job["prefill"]:  # the generate target, at this context
      out["generate"] = _generate_vs_steps(
          engine, rng.integers(0, vocab, (1, length), dtype=np.int32),
          job.get("generate_tokens") or engine.scenario.max_new_tokens, job["generate"])
  if job.get("count_flops"):
    out["prefill_flops"] = prefill_flops(engine, length)
  out["recompiles_after_warmup"] = log.backend_compiles_since(n_events)
  out["compile_count"] = engine.compile_count()
  out["peak_rss_mib"] = measure.process_peak_mib(mem)
  return out


# ----------------------------------------------------------------------------- forward
def _forward_run(job: dict):
  """A blocking call of the training-path ``forward`` on ``job["length"]`` random tokens."""
  config, params = load_hf(job["checkpoint"])
  params = jax.device_put(params)
  tokens = np.random.default_rng(job["seed"]).integers(
      0, config.vocab_size, (1, job["length"]), dtype=np.int32)
  return lambda: jax.block_until_ready(forward(config, params, tokens))


def forward_worker(job: dict) -> dict:
  """The training-path ``forward`` (full float32 logits, ``[1, length, vocab]``): compiled
  on the prompt's shape, then read ``repeats`` times, the first inside a memory window."""
  run = _forward_run(job)
  out = dict(method="forward", length=job["length"], warmup_s=measure.timed(run))
  out.update(measure.timed_reads(run, job["repeats"], job.get("repeat_below_s")))
  return out


# ----------------------------------------------------------------------------- peak
def peak_worker(job: dict) -> dict:
  """The CPU's achievable float32 matmul rate in this run: the fastest of ``repeats``
  ``jnp.dot`` of two ``n x n`` matrices (all cores), in FLOP/s."""
  n = job["n"]
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
  dot = jax.jit(jnp.dot)
  run = lambda: jax.block_until_ready(dot(a, a))
  run()
  best = min(measure.timed(run) for _ in range(job["repeats"]))
  return dict(method="peak", n=n, seconds=best, flops_per_s=2 * n ** 3 / best)


# ----------------------------------------------------------------------------- profile
def profile_worker(job: dict) -> dict:
  """Where the time goes, per XLA fusion (``xla_profile.fusion_profile``), in the forward
  (``what="forward"``) or an engine method's prefill of ``length`` tokens. XLA writes
  the optimized HLO of what this process compiles to a scratch folder (``XLA_FLAGS``
  before the CPU backend starts), which names the traced instructions."""
  what, length = job["what"], job["length"]
  with tempfile.TemporaryDirectory(prefix="edgeinfinite_hlo_") as dump:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + xla_profile.hlo_dump_flags(dump)).strip()
    if what == "forward":
      run = _forward_run(job)
    else:
      engine, vocab = _engine(dict(job, method=what, decode_warmup=0, decode_steps=0))
      tokens = np.random.default_rng(job["seed"]).integers(0, vocab, (1, length),
                                                           dtype=np.int32)
      run = lambda: jax.block_until_ready(engine.prefill(tokens)[1])
    run(), run()  # compiles (the dump), then one untimed steady-state call
    return dict(method="profile", what=what, length=length,
                **xla_profile.fusion_profile(run, dump, usable_cores()))


if __name__ == "__main__":
  sys.exit(measure.serve(sys.argv[1], {"engine": engine_worker, "forward": forward_worker,
                                       "peak": peak_worker, "profile": profile_worker}))
