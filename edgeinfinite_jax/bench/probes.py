"""Running a ``Plan``: one worker subprocess per measurement, rows collected per method.

Every (method, context length) runs in a fresh process (``run_job``) so that its
peak memory is its own. Lengths run shortest first; one whose time, extrapolated
from the shorter ones of the same method (``estimate``), exceeds the plan's
``max_seconds`` is skipped, and so is every length after one that failed or
timed out. A decode context whose prefill did not run gets a decode-only job on
a synthetic state. ``machine_description`` says what the numbers were measured on.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time

from tqdm import tqdm

from edgeinfinite_jax.bench import measure
from edgeinfinite_jax.bench.plan import METHODS, REFERENCE, Plan, fmt_len, usable_cores

# By file path, not `-m`: the package's __init__ imports JAX, which the reference must not load.
TORCH_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_worker.py")
WORKER_MODULES = {"engine": "edgeinfinite_jax.bench.workers",
                  "qat": "edgeinfinite_jax.bench.qat_step"}
DECODE_FIELDS = ("method", "decode_ms_median", "decode_ms_min", "decode_ms_p90",
                 "decode_steps", "state_bytes", "paired", "generate")


# ----------------------------------------------------------------------------- one job
def worker_command(job: dict) -> list[str]:
  spec = json.dumps(job)
  if job["kind"] == "torch":
    return [sys.executable, TORCH_WORKER, spec]
  return [sys.executable, "-m", WORKER_MODULES[job["kind"]], spec]


def _worker_env() -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"  # a CPU benchmark, next to torch on the same CPU
  # torch's OpenMP threads spin at barriers by default; with any other load on the
  # cores a spinning thread that lost its core stalls the others (seen here: decode
  # 200 ms instead of 14 ms, prefill 3x slower, 2 threads on 2 busy cores).
  # PASSIVE makes the reference robust to that; an explicit setting is kept.
  env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  env["PYTHONWARNINGS"] = "ignore"
  return env


def run_job(job: dict, timeout: float) -> dict:
  """Runs one worker; its result, with ``wall_s`` (or an ``error``)."""
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(worker_command(job), capture_output=True, text=True,
                          timeout=timeout, env=_worker_env())
  except subprocess.TimeoutExpired:
    return {"error": f"timed out (> {timeout:.0f} s)", "timed_out": True,
            "wall_s": time.perf_counter() - t0}
  wall = time.perf_counter() - t0
  res = measure.read_result(proc.stdout)
  if res is None:
    return {"error": f"worker exited with {proc.returncode} without a result",
            "stderr_tail": proc.stderr[-2000:], "wall_s": wall}
  res["wall_s"] = wall
  if "error" in res:
    res["stderr_tail"] = proc.stderr[-2000:]
  return res


def job_for(plan: Plan, checkpoint: str, method: str, length: int, prefill: bool,
            decode: bool) -> dict:
  job = dict(kind="torch" if method == REFERENCE else "engine", checkpoint=checkpoint,
             scenario=dict(plan.scenario), seed=plan.seed, threads=plan.threads,
             repeats=plan.repeats, decode_warmup=plan.decode_warmup, method=method,
             length=length, prefill=prefill, decode_steps=plan.decode_steps if decode else 0)
  paired = plan.paired_context(method, length) if decode else None
  if paired:
    job["paired_context"] = paired
  if method != REFERENCE and decode and prefill and length == min(plan.decode_lengths):
    job["generate"] = 3  # repeats of the generate-loop vs decode-steps pair
  return job


def estimate(points: list[tuple[int, float]], n: int) -> float | None:
  """Time at length n from the trend of the measured (length, seconds) points.

  The exponent comes from the last two points (clamped to [1, 2.5]: at least
  linear, at most a little worse than quadratic); a single point is scaled
  linearly.
  """
  if not points:
    return None
  (n2, t2) = points[-1]
  p = 1.0
  if len(points) >= 2:
    (n1, t1) = points[-2]
    if t1 > 0 and t2 > 0 and n2 != n1:
      p = min(max(math.log(t2 / t1) / math.log(n2 / n1), 1.0), 2.5)
  return t2 * (n / n2) ** p


# ----------------------------------------------------------------------------- progress
class Progress:
  """A progress bar over the planned jobs (tqdm on stderr), and the run's log lines."""

  def __init__(self, total: int):
    self.bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True)

  def step(self, desc: str):
    self.bar.set_postfix_str(desc)

  def log(self, msg: str):
    self.bar.write(msg, file=sys.stderr)

  def done(self):
    self.bar.update(1)

  def add_job(self):
    """A job that was not planned (a decode whose prefill was skipped or failed)."""
    self.bar.total += 1
    self.bar.refresh()

  def close(self):
    self.bar.close()


# ----------------------------------------------------------------------------- one method
def _prefill_row(plan: Plan, checkpoint: str, method: str, n: int,
                 measured: list[tuple[int, float]], stop_reason: str | None,
                 progress: Progress) -> dict:
  """A skipped row (after a failure, or past the time budget), or the job's result."""
  est = estimate(measured, n)
  if stop_reason is not None:
    progress.log(f"[bench] {method} @ {n}: skipped ({stop_reason})")
    return dict(method=method, length=n, skipped=True, estimate_s=None, reason=stop_reason)
  if est is not None and est > plan.max_seconds:
    progress.log(f"[bench] {method} @ {n}: skipped (est. {est:.0f} s > --max-seconds "
                 f"{plan.max_seconds:.0f})")
    return dict(method=method, length=n, skipped=True, estimate_s=est)
  progress.step(f"{method} @ {fmt_len(n)}")
  res = run_job(job_for(plan, checkpoint, method, n, True, n in plan.decode_lengths),
                plan.timeout_s)
  res.setdefault("method", method)
  res["length"] = n
  if res.get("ttft_s") is not None:
    progress.log(f"[bench] {method} @ {n}: TTFT {res['ttft_s']:.3f} s, Δ peak RSS "
                 f"{res.get('peak_delta_mib', float('nan')):.0f} MiB, state "
                 f"{res.get('state_bytes')} B")
  else:
    progress.log(f"[bench] {method} @ {n}: {res.get('error')}\n{res.get('stderr_tail', '')}")
  return res


def _prefill_rows(plan: Plan, checkpoint: str, method: str, progress: Progress):
  """Every length of the plan, shortest first: (prefill rows, decode rows they gave)."""
  prefill_rows, decode_rows = [], []
  measured: list[tuple[int, float]] = []
  stop_reason = None  # set when a length failed: longer ones are not tried
  for n in plan.lengths:
    res = _prefill_row(plan, checkpoint, method, n, measured, stop_reason, progress)
    prefill_rows.append(res)
    if res.get("ttft_s") is not None:
      measured.append((n, res["ttft_s"]))
    elif not res.get("skipped"):
      stop_reason = f"{fmt_len(n)} timed out" if res.get("timed_out") else f"{fmt_len(n)} failed"
    if n in plan.decode_lengths and res.get("decode_ms_median") is not None:
      decode_rows.append(dict({k: res.get(k) for k in DECODE_FIELDS if k in res},
                              decode_context=n))
    progress.done()
  return prefill_rows, decode_rows


def _decode_only_rows(plan: Plan, checkpoint: str, method: str, have: set[int],
                      progress: Progress) -> list[dict]:
  """Decode rows, from a synthetic state, for the decode contexts not in ``have``."""
  rows = []
  for n in plan.decode_lengths:
    if n in have:
      continue
    if n in plan.lengths:  # not planned: its prefill was skipped or failed
      progress.add_job()
    progress.step(f"{method} decode @ {fmt_len(n)} (synthetic state)")
    res = run_job(job_for(plan, checkpoint, method, n, False, True), plan.timeout_s)
    res.setdefault("method", method)
    res["decode_context"] = n
    if res.get("error"):
      progress.log(f"[bench] {method} decode @ {n}: {res['error']}\n"
                   f"{res.get('stderr_tail', '')}")
    rows.append(res)
    progress.done()
  return rows


def measure_method(plan: Plan, checkpoint: str, method: str, progress: Progress):
  """(prefill rows, decode rows) of one method."""
  prefill_rows, decode_rows = _prefill_rows(plan, checkpoint, method, progress)
  have = {r["decode_context"] for r in decode_rows}
  return prefill_rows, decode_rows + _decode_only_rows(plan, checkpoint, method, have, progress)


def _measure_method_of(plan: Plan, checkpoint: str, progress: Progress, method: str):
  return measure_method(plan, checkpoint, method, progress)


def measure_methods(plan: Plan, checkpoint: str, progress: Progress):
  """(prefill rows, decode rows) of every method, ``plan.jobs`` methods at a time."""
  run = functools.partial(_measure_method_of, plan, checkpoint, progress)
  if plan.jobs > 1:
    with concurrent.futures.ThreadPoolExecutor(plan.jobs) as pool:
      per_method = list(pool.map(run, plan.methods))
  else:
    per_method = [run(m) for m in plan.methods]
  prefill_rows = [r for p, _ in per_method for r in p]
  decode_rows = [r for _, d in per_method for r in d]
  decode_rows.sort(key=lambda r: (METHODS.index(r["method"]), r["decode_context"]))
  return prefill_rows, decode_rows


def measure_qat(plan: Plan, progress: Progress) -> dict:
  """The QAT step-cost row (``qat_step.run_job`` in its own process)."""
  if plan.qat is None:
    return {"skipped": True, "reason": "--no-qat"}
  progress.step("qat step cost")
  res = run_job(dict(kind="qat", model=dict(plan.model), seed=plan.seed, batch=plan.qat.batch,
                     seq_len=plan.qat.seq_len, n=plan.qat.n, warmup=plan.qat.warmup),
                plan.timeout_s)
  progress.done()
  return res


# ----------------------------------------------------------------------------- machine
def _read_first(path: str, prefix: str) -> str | None:
  try:
    with open(path) as f:
      for line in f:
        if line.startswith(prefix):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def _version(dist: str) -> str:
  """An installed distribution's version, without importing it."""
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def _git_revision() -> str:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the package's folder
  try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                         text=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return (rev + (" (with uncommitted changes)" if dirty else "")) if rev else "unknown"
  except Exception:
    return "unknown"


def machine_description(threads: int) -> dict:
  mem_kib = _read_first("/proc/meminfo", "MemTotal")
  return {
      "cpu": _read_first("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
      "cores": f"{usable_cores()} usable ({os.cpu_count()} online); {threads} threads used",
      "memory": (f"{int(mem_kib.split()[0]) / 1024 / 1024:.1f} GiB" if mem_kib else "unknown"),
      "os": f"{platform.system()} {platform.release()}",
      "python": platform.python_version(),
      "jax": _version("jax"), "jaxlib": _version("jaxlib"), "flax": _version("flax"),
      "numpy": _version("numpy"), "torch": _version("torch"),
      "transformers": _version("transformers"),
      "git": _git_revision(),
  }
