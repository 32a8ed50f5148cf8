"""Running a ``Plan``: one worker subprocess per measurement, rows collected per method.

Every (method, context length) runs in a fresh process (``run_job``) so that its
peak memory is its own. Lengths run shortest first, and at each length every
method runs before the next length starts (interleaved: a slow spell of the
machine hits the methods it is compared across alike, not one method's whole
curve). A length whose time, extrapolated from the shorter ones of the same
method (``estimate``), exceeds the plan's ``max_seconds`` is skipped, and so is
every length after one that failed or timed out. A decode context whose prefill
did not run gets a decode-only job on a synthetic state. ``measure_forward``,
``measure_peak`` and ``measure_profiles`` run the forward, matmul-peak and
profile jobs. ``machine_description`` says what the numbers were measured on.
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
                  "forward": "edgeinfinite_jax.bench.workers",
                  "peak": "edgeinfinite_jax.bench.workers",
                  "profile": "edgeinfinite_jax.bench.workers",
                  "qat": "edgeinfinite_jax.bench.qat_step"}
DECODE_FIELDS = ("method", "decode_ms_median", "decode_ms_min", "decode_ms_p90",
                 "decode_steps", "state_bytes", "paired", "generate")


# ----------------------------------------------------------------------------- one job
def worker_command(job: dict) -> list[str]:
  spec = json.dumps(job)
  if job["kind"].startswith("torch"):
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
             repeats=plan.repeats, repeat_below_s=plan.repeat_below_s,
             decode_warmup=plan.decode_warmup, method=method,
             length=length, prefill=prefill, decode_steps=plan.decode_steps if decode else 0)
  paired = plan.paired_context(method, length) if decode else None
  if paired:
    job["paired_context"] = paired
  if method != REFERENCE and decode and prefill and length == min(plan.decode_lengths):
    job["generate"] = 3  # repeats of the generate-loop vs decode-steps pair
    job["generate_tokens"] = plan.generate_n
  if plan.peak and method == "edgeinfinite" and prefill and length == max(plan.lengths):
    job["count_flops"] = True  # the long route's achieved FLOP/s, against the peak
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


class _MethodCurve:
  """One method's lengths so far: what was measured, and why longer ones stop."""

  def __init__(self):
    self.measured: list[tuple[int, float]] = []
    self.stop_reason: str | None = None  # set when a length failed: longer ones are not tried

  def add(self, n: int, res: dict):
    if res.get("ttft_s") is not None:
      self.measured.append((n, res["ttft_s"]))
    elif not res.get("skipped"):
      self.stop_reason = f"{fmt_len(n)} timed out" if res.get("timed_out") else (
          f"{fmt_len(n)} failed")


def _decode_only_row(plan: Plan, checkpoint: str, method: str, n: int,
                     progress: Progress) -> dict:
  """A decode row from a synthetic state holding ``n`` tokens."""
  progress.step(f"{method} decode @ {fmt_len(n)} (synthetic state)")
  res = run_job(job_for(plan, checkpoint, method, n, False, True), plan.timeout_s)
  res.setdefault("method", method)
  res["decode_context"] = n
  if res.get("error"):
    progress.log(f"[bench] {method} decode @ {n}: {res['error']}\n{res.get('stderr_tail', '')}")
  progress.done()
  return res


def _at_length(plan: Plan, checkpoint: str, progress: Progress, curves: dict, n: int,
               method: str) -> tuple[dict | None, dict | None]:
  """(prefill row or None, decode row or None) of one method at length ``n``."""
  if n in plan.lengths:
    curve = curves[method]
    res = _prefill_row(plan, checkpoint, method, n, curve.measured, curve.stop_reason,
                       progress)
    curve.add(n, res)
    progress.done()
    if n not in plan.decode_lengths:
      return res, None
    if res.get("decode_ms_median") is not None:
      return res, dict({k: res.get(k) for k in DECODE_FIELDS if k in res}, decode_context=n)
    progress.add_job()  # not planned: its prefill was skipped or failed
    return res, _decode_only_row(plan, checkpoint, method, n, progress)
  return None, _decode_only_row(plan, checkpoint, method, n, progress)


def measure_methods(plan: Plan, checkpoint: str, progress: Progress):
  """(prefill rows, decode rows) of every method, interleaved: every method at a length
  before the next length (``plan.jobs`` methods at a time)."""
  curves = {m: _MethodCurve() for m in plan.methods}
  prefill_rows, decode_rows = [], []
  with concurrent.futures.ThreadPoolExecutor(plan.jobs) as pool:
    for n in sorted(set(plan.lengths) | set(plan.decode_lengths)):
      run = functools.partial(_at_length, plan, checkpoint, progress, curves, n)
      for pre, dec in pool.map(run, plan.methods):
        prefill_rows += [pre] if pre is not None else []
        decode_rows += [dec] if dec is not None else []
  order = lambda r: METHODS.index(r["method"])
  prefill_rows.sort(key=lambda r: (order(r), r["length"]))
  decode_rows.sort(key=lambda r: (order(r), r["decode_context"]))
  return prefill_rows, decode_rows


def measure_forward(plan: Plan, checkpoint: str, progress: Progress) -> list[dict]:
  """The training-path forward and transformers' forward, alternating, per length."""
  rows = []
  kinds = [("forward", "forward")] + ([("torch_forward", REFERENCE)]
                                      if REFERENCE in plan.methods else [])
  for n in plan.forward_lengths:
    for kind, method in kinds:
      progress.step(f"{method} forward @ {fmt_len(n)}")
      res = run_job(dict(kind=kind, checkpoint=checkpoint, seed=plan.seed, length=n,
                         repeats=plan.repeats, repeat_below_s=plan.repeat_below_s,
                         threads=plan.threads), plan.timeout_s)
      res.update(method=method, length=n)
      if res.get("error"):
        progress.log(f"[bench] {method} forward @ {n}: {res['error']}\n"
                     f"{res.get('stderr_tail', '')}")
      rows.append(res)
      progress.done()
  return rows


def measure_peak(plan: Plan, progress: Progress) -> dict | None:
  """The float32 matmul rate this run's CPU achieves (``workers.peak_worker``)."""
  if not plan.peak:
    return None
  progress.step("matmul peak")
  n = 512 if plan.quick else 2048
  res = run_job(dict(kind="peak", n=n, repeats=10), plan.timeout_s)
  progress.done()
  return res


def measure_profiles(plan: Plan, checkpoint: str, progress: Progress) -> list[dict]:
  """Per-fusion profiles (``workers.profile_worker``) of ``plan.profile``."""
  rows = []
  for what, n in plan.profile:
    progress.step(f"profile {what} @ {fmt_len(n)}")
    res = run_job(dict(kind="profile", what=what, length=n, checkpoint=checkpoint,
                       scenario=dict(plan.scenario), seed=plan.seed), plan.timeout_s)
    res.update(what=what, length=n)
    if res.get("error"):
      progress.log(f"[bench] profile {what} @ {n}: {res['error']}\n{res.get('stderr_tail', '')}")
    rows.append(res)
    progress.done()
  return rows


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
      "llama-cpp-python": _version("llama-cpp-python"),
      "git": _git_revision(),
  }
