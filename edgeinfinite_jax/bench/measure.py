"""What a worker process measures about itself, and how it hands the result back.

Standard library only: the JAX engine worker (``workers.py``), the QAT worker
(``qat_step.py``) and the transformers reference worker (``torch_worker.py``)
share it, and the last one runs by file path without the package (whose
``__init__`` imports JAX and Flax) so that its memory is the reference's own.

A worker prints one line ``RESULT_MARK + json`` at the end of its stdout; the
orchestrator (``probes.run_job``) reads the last such line with ``read_result``.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import sys
import time
import traceback
from typing import Callable, Mapping

RESULT_MARK = "@@EDGEINFINITE_BENCH@@ "


def _proc_status_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  """Resets VmHWM (Linux >= 4.0); False where that is not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


class MemoryWindow:
  """Peak RSS over a code region, relative to the RSS when it started.

  Uses the kernel's high-water mark VmHWM, reset on entry through
  ``/proc/self/clear_refs``. ``ru_maxrss`` is only a fallback: in a child
  started by fork + exec it also counts the parent's RSS at fork time.
  """

  def __enter__(self):
    self.hwm_before_kib = _proc_status_kib("VmHWM") or 0
    self.hwm_reset = _reset_peak_rss()
    self.before_kib = _proc_status_kib("VmRSS") or 0
    return self

  def __exit__(self, *exc):
    hwm = _proc_status_kib("VmHWM") if self.hwm_reset else None
    self.peak_kib = hwm if hwm is not None else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss
    return False

  def result(self) -> dict:
    return dict(rss_before_mib=self.before_kib / 1024,
                peak_delta_mib=max(self.peak_kib - self.before_kib, 0) / 1024,
                peak_method="VmHWM after clear_refs" if self.hwm_reset else "ru_maxrss")


def process_peak_mib(window: MemoryWindow | None) -> float:
  """The whole process's peak RSS so far (VmHWM, plus what was seen before a reset)."""
  now = _proc_status_kib("VmHWM") or 0
  before = window.hwm_before_kib if window is not None else 0
  return max(now, before) / 1024


def timed(fn: Callable[[], object]) -> float:
  """Wall seconds of one call of ``fn`` (which must block until its result is ready)."""
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def best_of(first_s: float, again: Callable[[], float], repeats: int,
            repeat_below_s: float | None = None) -> dict:
  """Time to first token as the fastest of ``repeats`` prefills (the first one also
  measured the memory): other load on a shared machine only ever adds time. A read
  longer than ``repeat_below_s`` is not repeated (minutes per read; the report
  lists every read, so a single one shows as such)."""
  runs = [first_s]
  while len(runs) < repeats and (repeat_below_s is None or runs[-1] <= repeat_below_s):
    runs.append(again())
  return dict(ttft_s=min(runs), ttft_runs_s=runs)


def timed_reads(run: Callable[[], object], repeats: int,
                repeat_below_s: float | None = None) -> dict:
  """Reads of an already-warm ``run``: the first inside a ``MemoryWindow``, then
  ``best_of`` the repeats; the window's fields, the reads and the process peak."""
  with MemoryWindow() as mem:
    first = timed(run)
  out = mem.result()
  out.update(best_of(first, lambda: timed(run), repeats, repeat_below_s))
  out["peak_rss_mib"] = process_peak_mib(mem)
  return out


def decode_stats(times: list[float]) -> dict:
  """Median, min and p90 (milliseconds) of the timed decode steps."""
  ms = sorted(t * 1e3 for t in times)
  return dict(decode_ms_median=statistics.median(ms), decode_ms_min=ms[0],
              decode_ms_p90=ms[min(len(ms) - 1, int(math.ceil(0.9 * len(ms))) - 1)],
              decode_steps=len(ms))


def serve(spec: str, workers: Mapping[str, Callable[[dict], dict]]) -> int:
  """Runs the job ``spec`` (JSON) with ``workers[job["kind"]]``; prints its result line.

  An exception becomes an ``error`` result (with the traceback on stderr): the
  orchestrator reports it and goes on with the other measurements.
  """
  job = json.loads(spec)
  try:
    result = workers[job.get("kind", "engine")](job)
  except Exception as e:  # reported to the orchestrator, which keeps going
    traceback.print_exc()
    result = {"error": f"{type(e).__name__}: {e}"}
  sys.stdout.write("\n" + RESULT_MARK + json.dumps(result) + "\n")
  sys.stdout.flush()
  return 0


def read_result(stdout: str) -> dict | None:
  """The result a worker printed (its last result line), or None."""
  for line in reversed(stdout.splitlines()):
    if line.startswith(RESULT_MARK):
      return json.loads(line[len(RESULT_MARK):])
  return None
