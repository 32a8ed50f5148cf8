"""What the benchmark measures: one frozen ``Plan``, in a full and a quick variant.

``full_plan()`` is the published run (``BENCHMARKS.md``): a model of about 55M
parameters (8 layers, hidden 512, GQA 8/2 heads, intermediate 1408, vocab
32000, float32) at contexts 1k to 64k. ``quick_plan()`` is the smoke run
(``--quick``): a tiny model and short contexts. Either takes keyword changes;
``suite.plan_from_args`` applies the command line's.
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


@dataclasses.dataclass(frozen=True)
class Plan:
  """Every size, length, method and repeat count of one benchmark run.

  ``model``: ``ModelConfig`` fields. ``scenario``: the engine's ``segment_len``,
  ``n_sink`` and ``n_window``. Prefill is timed at ``lengths`` (skipped where
  the trend of the shorter ones exceeds ``max_seconds``), decode at
  ``decode_lengths``. ``repeats``: prefills per length (TTFT is the fastest).
  ``threads``: torch's threads. ``jobs``: measurements run at a time (> 1 only
  for smoke runs). ``qat``: the QAT row, or None to skip it.
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

  def __post_init__(self):
    for name in ("model", "scenario"):  # read-only views: the plan is frozen all the way
      object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
    for name in ("lengths", "decode_lengths", "methods"):
      object.__setattr__(self, name, tuple(getattr(self, name)))

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

  def job_count(self) -> int:
    """Subprocesses planned: a prefill per length, a decode-only job per extra context."""
    per_method = len(self.lengths) + len(set(self.decode_lengths) - set(self.lengths))
    return len(self.methods) * per_method + (0 if self.qat is None else 1)


def full_plan(**changes) -> Plan:
  """The published run: the 55M model at 1k..64k, decode at 1k and 32k."""
  model = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8,
               num_heads=8, num_kv_heads=2, max_position_embeddings=131072,
               rope_theta=10000.0, tie_word_embeddings=False, dtype="float32")
  plan = Plan(model=model, scenario=dict(segment_len=512, n_sink=4, n_window=1024),
              lengths=(1024, 2048, 4096, 8192, 16384, 32768, 65536),
              decode_lengths=(1024, 32768), decode_steps=32, decode_warmup=4, repeats=2,
              qat=QatPlan(batch=2, seq_len=256, n=10))
  return dataclasses.replace(plan, **changes)


def quick_plan(**changes) -> Plan:
  """The smoke run: a tiny model; decode at the shortest and longest of ``lengths``."""
  model = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
               num_heads=4, num_kv_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
               tie_word_embeddings=False, dtype="float32")
  lengths = tuple(changes.pop("lengths", (128, 256)))
  plan = Plan(model=model, scenario=dict(segment_len=32, n_sink=4, n_window=64),
              lengths=lengths, decode_lengths=tuple(sorted({min(lengths), max(lengths)})),
              decode_steps=4, decode_warmup=2, repeats=1,
              qat=QatPlan(batch=2, seq_len=32, n=3), quick=True)
  return dataclasses.replace(plan, **changes)


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def fmt_len(n: int) -> str:
  """A context length as the plan and the report write it: 1k, 32k, 100."""
  return f"{n // 1024}k" if n % 1024 == 0 else str(n)
