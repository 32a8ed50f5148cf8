"""What the benchmark measures: one frozen ``Plan`` per section of the report.

The published run (``BENCHMARKS.md``) has two sections (``SECTIONS``):
``smollm2_plan()``, the real model (SmolLM2-135M-Instruct from its GGUF file, in
the demo's EdgeInfinite scenario) at contexts 1k to 32k with the training-path
forward, the matmul peak and profiles; and ``full_plan()``, a model of about 55M
random parameters (8 layers, hidden 512, GQA 8/2 heads, intermediate 1408, vocab
32000, float32) at contexts 1k to 32k with the QAT step cost. ``quick_plan()`` is
the smoke run (``--quick``): a tiny model and short contexts. Each takes keyword
changes; ``suite.plans_from_args`` applies the command line's.
"""

from __future__ import annotations

import dataclasses
import os
from types import MappingProxyType
from typing import Any, Mapping

ENGINE_METHODS = ("full", "streaming", "edgeinfinite")
REFERENCE = "transformers"
METHODS = ENGINE_METHODS + (REFERENCE,)


@dataclasses.dataclass(frozen=True)
class QatPlan:
  """The QAT step-cost row: ``batch`` rows of ``seq_len`` tokens, ``n`` timed rounds."""
  batch: int
  seq_len: int
  n: int
  warmup: int = 1


# Target groups a section evaluates (``report.TARGET_GROUPS`` holds their rules).
LONG_ROUTE, THROUGHPUT, FULL_ROUTE, FULL_MEMORY, FORWARD, DECODE, QAT = (
    "long_route", "throughput", "full_route", "full_memory", "forward", "decode", "qat")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Every size, length, method and repeat count of one benchmark run.

  ``model``: ``ModelConfig`` fields. ``scenario``: the engine's ``segment_len``,
  ``n_sink`` and ``n_window``. Prefill is timed at ``lengths`` (skipped where
  the trend of the shorter ones exceeds ``max_seconds``), decode at
  ``decode_lengths``. ``repeats``: prefills per length (TTFT is the fastest).
  ``threads``: torch's threads. ``jobs``: measurements run at a time (> 1 only
  for smoke runs). ``qat``: the QAT row, or None to skip it.

  ``name``/``title``: the section's key and heading. ``source``: ``"random"``
  (random weights of ``model``) or a named model of ``checkpoints.models``
  (``model`` is then read from its file). ``forward_lengths``: lengths of the
  training-path ``forward`` (full logits) against transformers' forward.
  ``generate_tokens``: tokens of the generate-loop target (0: the decode steps).
  ``peak``: time a large matmul (the CPU's achievable FLOP/s) and count the long
  route's prefill FLOPs. ``profile``: ``(what, length)`` pairs profiled per XLA
  fusion (``xla_profile.py``): ``forward`` or an engine method. ``targets``: the
  target groups evaluated on this section.
  """
  model: Mapping[str, Any]
  scenario: Mapping[str, int]
  lengths: tuple[int, ...]
  decode_lengths: tuple[int, ...]
  methods: tuple[str, ...] = METHODS
  decode_steps: int = 32
  decode_warmup: int = 4
  repeats: int = 2
  max_seconds: float = 180.0
  seed: int = 0
  threads: int = 1
  jobs: int = 1
  qat: QatPlan | None = None
  quick: bool = False
  name: str = "synthetic"
  title: str = "Random-weight model"
  source: str = "random"
  forward_lengths: tuple[int, ...] = ()
  generate_tokens: int = 0
  peak: bool = False
  profile: tuple[tuple[str, int], ...] = ()
  targets: tuple[str, ...] = (LONG_ROUTE, DECODE)

  def __post_init__(self):
    for name in ("model", "scenario"):  # read-only views: the plan is frozen all the way
      object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
    for name in ("lengths", "decode_lengths", "methods", "forward_lengths", "targets"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    object.__setattr__(self, "profile", tuple(tuple(p) for p in self.profile))

  @property
  def repeat_below_s(self) -> float:
    """A prefill or forward read longer than this is not repeated (minutes each)."""
    return self.max_seconds / 4

  @property
  def timeout_s(self) -> float:
    """A worker's wall-clock limit: room for ``repeats`` reads of a length at the limit."""
    return 4 * self.max_seconds + 120

  def paired_context(self, method: str, length: int) -> int | None:
    """The decode target's short context, for the one job that alternates with it."""
    if method == "edgeinfinite" and length == max(self.decode_lengths) > min(
        self.decode_lengths):
      return min(self.decode_lengths)
    return None

  @property
  def generate_n(self) -> int:
    """Tokens of the generate-loop target."""
    return self.generate_tokens or self.decode_warmup + self.decode_steps

  def job_count(self) -> int:
    """Subprocesses planned: a prefill per length, a decode-only job per extra context,
    a forward per length and runtime, the peak, the profiles and the QAT row."""
    per_method = len(self.lengths) + len(set(self.decode_lengths) - set(self.lengths))
    n_forward = len(self.forward_lengths) * (1 + (REFERENCE in self.methods))
    return (len(self.methods) * per_method + n_forward + int(self.peak) + len(self.profile)
            + (0 if self.qat is None else 1))


def full_plan(**changes) -> Plan:
  """The 55M random model at 1k, 4k, 16k and 32k (the lengths its targets read), decode
  at 1k and 32k, the QAT step cost."""
  model = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8,
               num_heads=8, num_kv_heads=2, max_position_embeddings=131072,
               rope_theta=10000.0, tie_word_embeddings=False, dtype="float32")
  plan = Plan(model=model, scenario=dict(segment_len=512, n_sink=4, n_window=1024),
              lengths=(1024, 4096, 16384, 32768),
              decode_lengths=(1024, 32768), decode_steps=32, decode_warmup=4, repeats=2,
              qat=QatPlan(batch=2, seq_len=256, n=10), name="synthetic",
              title="55M random-weight model",
              targets=(LONG_ROUTE, FULL_ROUTE, FULL_MEMORY, DECODE, QAT))
  return dataclasses.replace(plan, **changes)


def smollm2_plan(**changes) -> Plan:
  """SmolLM2-135M-Instruct (the GGUF file of ``checkpoints.models``) at 1k..32k; decode
  at 1k, 16k and 32k; forward at 1k and 4k; 64 generated tokens; the matmul peak;
  fusion profiles of the forward and of the full route's prefill.

  Segments of 512 tokens (window 512, sink 4), not the demo's 128: a step's matmuls
  have as many rows as its chunk and every step reads all 540 MB of float32 weights.
  In a trial run with the demo's 128 (``--segment-len 128 --window 128``), the full
  route took 5.57 s at 1k against transformers' 2.92 s, streaming 1.99 s."""
  plan = Plan(model={}, scenario=dict(segment_len=512, n_sink=4, n_window=512),
              lengths=(1024, 4096, 8192, 16384, 32768), decode_lengths=(1024, 16384, 32768),
              decode_steps=32, decode_warmup=4, repeats=2, max_seconds=600.0,
              name="smollm2", title="SmolLM2-135M-Instruct", source="smollm2",
              forward_lengths=(1024, 4096), generate_tokens=64, peak=True,
              profile=(("forward", 1024), ("full", 4096)),
              targets=(LONG_ROUTE, THROUGHPUT, FULL_ROUTE, FORWARD, DECODE))
  return dataclasses.replace(plan, **changes)


SECTIONS = {"smollm2": smollm2_plan, "synthetic": full_plan}


def quick_plan(**changes) -> Plan:
  """The smoke run: a tiny model; decode at the shortest and longest of ``lengths``."""
  model = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
               num_heads=4, num_kv_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
               tie_word_embeddings=False, dtype="float32")
  lengths = tuple(changes.pop("lengths", (128, 256)))
  plan = Plan(model=model, scenario=dict(segment_len=32, n_sink=4, n_window=64),
              lengths=lengths, decode_lengths=tuple(sorted({min(lengths), max(lengths)})),
              decode_steps=4, decode_warmup=2, repeats=1,
              qat=QatPlan(batch=2, seq_len=32, n=3), quick=True, name="quick",
              title="Tiny random-weight model (smoke run)", forward_lengths=lengths[:1],
              peak=True, profile=(("forward", lengths[0]),),
              targets=(LONG_ROUTE, THROUGHPUT, FULL_ROUTE, FULL_MEMORY, FORWARD, DECODE, QAT))
  return dataclasses.replace(plan, **changes)


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def fmt_len(n: int) -> str:
  """A context length as the plan and the report write it: 1k, 32k, 100."""
  return f"{n // 1024}k" if n % 1024 == 0 else str(n)
