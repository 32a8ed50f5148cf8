"""Long-context benchmark (issue #3): time to first token, peak memory, decode latency.

    python -m edgeinfinite_jax.bench                 # the full run, writes BENCHMARKS.md
    python -m edgeinfinite_jax.bench --quick         # tiny model, short lengths (smoke test)

One model config (about 55M parameters: 8 layers, hidden 512, GQA 8/2 heads,
intermediate 1408, vocab 32000, float32, random weights) is run through

* our ``Engine`` with ``full`` (ring cache sized to the context), ``streaming``
  (sink + window) and ``edgeinfinite`` (sink + window + memory), always on the
  long route (``short_threshold=0``), and
* the same weights as a Hugging Face ``transformers`` PyTorch model (written by
  ``save_hf`` and loaded with ``attn_implementation="sdpa"``), as the external
  full-attention reference: ``model(input_ids, use_cache=True,
  logits_to_keep=1)``, which is what ``generate`` does for its prefill.

Every (method, context length) measurement runs in a fresh subprocess so that
its peak memory is its own: the process warms up (compiles) on a one-segment
prompt, resets its RSS high-water mark (``/proc/self/clear_refs``), reads the
whole prompt, and reports the peak RSS during the prefill minus the RSS just
before it, next to the process's absolute peak (``VmHWM``); it then reads the
prompt again (``--repeats``, 2 in all), and the time to first token is the
fastest read (other load on a shared machine only ever adds time). Lengths whose
time, extrapolated from the shorter ones of the same method, exceeds
``--max-seconds`` are skipped and reported as such. Decode latency is the median
over ``--decode-steps`` single-token steps after warm-up, at the contexts of
``--decode-lengths``; where that context's prefill was skipped, decoding runs
from a synthetic state holding that many tokens (the cost of a decode step does
not depend on the values in the cache), and the table says so. The decode
target is paired: in the edgeinfinite job at the longest context, the same
compiled step alternates between that state and one holding the shortest
context, and the target is the median of the per-pair time ratios (separate
jobs run minutes apart, under whatever else the machine is doing then).

A last row times one QAT training step against a full-precision one on the
same model config (``edgeinfinite_jax.bench.qat_step.qat_step_cost``; target <= 1.5x;
``--no-qat`` skips it).

The timings are wall-clock on whatever else the machine is doing: the report
records the load average before and after the run. ``--jobs N`` runs methods
side by side, for smoke runs only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

ENGINE_METHODS = ("full", "streaming", "edgeinfinite")
REFERENCE = "transformers"
METHODS = ENGINE_METHODS + (REFERENCE,)
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
DEFAULT_DECODE_LENGTHS = (1024, 32768)
QUICK_LENGTHS = (128, 256)

# About 55M parameters (22.5M in the blocks, 2 x 16.4M embedding and LM head).
MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8,
             num_heads=8, num_kv_heads=2, max_position_embeddings=131072, rope_theta=10000.0,
             tie_word_embeddings=False, dtype="float32")
QUICK_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
                   tie_word_embeddings=False, dtype="float32")
SCENARIO = dict(segment_len=512, n_sink=4, n_window=1024)
QUICK_SCENARIO = dict(segment_len=32, n_sink=4, n_window=64)

RESULT_MARK = "@@EDGEINFINITE_BENCH@@ "
MIB = 1024 * 1024

TARGETS = (
    "edgeinfinite TTFT grows linearly: TTFT(32k) / TTFT(4k) <= 9",
    "streaming / edgeinfinite state bytes identical at every length",
    "edgeinfinite TTFT at 32k >= 5x faster than the transformers reference",
    "edgeinfinite decode latency at 32k <= 1.2x that at 1k",
)


# ============================================================================ worker side


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


class _MemoryWindow:
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


def _process_peak_mib(window: "_MemoryWindow | None") -> float:
  """The whole process's peak RSS so far (VmHWM, plus what was seen before a reset)."""
  now = _proc_status_kib("VmHWM") or 0
  before = window.hwm_before_kib if window is not None else 0
  return max(now, before) / 1024


def _best_of(first_s: float, again, repeats: int) -> dict:
  """Time to first token as the fastest of ``repeats`` prefills (the first one also
  measured the memory): other load on a shared machine only ever adds time."""
  runs = [first_s] + [again() for _ in range(repeats - 1)]
  return dict(ttft_s=min(runs), ttft_runs_s=runs)


def _decode_stats(times: list[float]) -> dict:
  ms = sorted(t * 1e3 for t in times)
  return dict(decode_ms_median=statistics.median(ms), decode_ms_min=ms[0],
              decode_ms_p90=ms[min(len(ms) - 1, int(math.ceil(0.9 * len(ms))) - 1)],
              decode_steps=len(ms))


def _engine_worker(job: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from edgeinfinite_jax.engine.engine import Engine, Scenario, state_nbytes
  from edgeinfinite_jax.checkpoints.hf import load_hf
  from edgeinfinite_jax.model.gate import with_memory

  compile_events = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, secs, **kw: compile_events.append((name, secs))
      if name.startswith("/jax/core/compile/") else None)

  method, length = job["method"], job["length"]
  sc = job["scenario"]
  L = sc["segment_len"]
  config, params = load_hf(job["checkpoint"])
  if method == "full":
    config = config.with_memory(attention_type="full")
  else:
    config, params = with_memory(config, params, rng=jax.random.key(1), attention_type=method,
                                 segment_len=L, n_sink=sc["n_sink"], n_window=sc["n_window"])
  n_decode = job["decode_warmup"] + job["decode_steps"]
  capacity = -(-(length + n_decode + 1) // L) * L
  scenario = Scenario(segment_len=L, n_sink=sc["n_sink"], n_window=sc["n_window"],
                      batch_size=1, max_new_tokens=max(n_decode, 1), short_threshold=0,
                      max_context=capacity)
  engine = Engine(config, params, scenario)
  rng = np.random.default_rng(job["seed"])
  vocab = config.vocab_size
  out: dict[str, Any] = dict(method=method, length=length)

  # Warm-up: one segment of prefill and one decode step compile both step functions.
  compile_events.clear()  # loading and with_memory's gate init compiled small things
  warm = rng.integers(0, vocab, (1, min(L, length)), dtype=np.int32)
  t0 = time.perf_counter()
  state, logits = engine.prefill(warm)
  state, logits = engine.decode(state, warm[:, 0])
  jax.block_until_ready(logits)
  out["warmup_s"] = time.perf_counter() - t0
  out["compile_s"] = sum(s for n, s in compile_events)
  out["compile_count_warmup"] = engine.compile_count()
  del state, logits
  n_events = len(compile_events)

  mem = None
  if job["prefill"]:
    tokens = rng.integers(0, vocab, (1, length), dtype=np.int32)
    with _MemoryWindow() as mem:
      t0 = time.perf_counter()
      state, logits = engine.prefill(tokens)
      jax.block_until_ready(logits)
      first = time.perf_counter() - t0
    out.update(mem.result())
    out["finite"] = bool(np.all(np.isfinite(np.asarray(logits))))

    def again():
      t0 = time.perf_counter()
      jax.block_until_ready(engine.prefill(tokens)[1])
      return time.perf_counter() - t0
    out.update(_best_of(first, again, job["repeats"]))
  else:  # synthetic state holding `length` tokens: decode cost does not depend on values
    state = engine.init_state("long")
    state = state.replace(length=jnp.asarray(length, jnp.int32))
    out["synthetic_state"] = True
  out["state_bytes"] = state_nbytes(state)

  def timed_decode(state, token):
    t0 = time.perf_counter()
    state, logits = engine.decode(state, token)
    jax.block_until_ready(logits)
    return state, time.perf_counter() - t0

  if job["decode_steps"]:
    toks = rng.integers(0, vocab, (n_decode,), dtype=np.int32)
    times = []
    for i in range(n_decode):
      state, t = timed_decode(state, toks[i:i + 1])
      times.append(t)
    out.update(_decode_stats(times[job["decode_warmup"]:]))
    out["decode_context"] = length
  short = job.get("paired_context")
  if job["decode_steps"] and short:
    # The same compiled step on a state of `short` tokens and on this one, alternating,
    # so that the machine's load changes hit both alike: the ratio of each pair.
    other, _ = engine.prefill(rng.integers(0, vocab, (1, short), dtype=np.int32))
    pairs = []
    for i in range(n_decode):
      state, t_long = timed_decode(state, toks[i:i + 1])
      other, t_short = timed_decode(other, toks[i:i + 1])
      pairs.append((t_long, t_short))
    pairs = pairs[job["decode_warmup"]:]
    out["paired"] = dict(context=short, ratio=statistics.median(a / b for a, b in pairs),
                         long_ms=1e3 * statistics.median(a for a, _ in pairs),
                         short_ms=1e3 * statistics.median(b for _, b in pairs))
  out["recompiles_after_warmup"] = sum(1 for n, _ in compile_events[n_events:]
                                       if n.endswith("backend_compile_duration"))
  out["compile_count"] = engine.compile_count()
  out["peak_rss_mib"] = _process_peak_mib(mem)
  return out


def _cache_nbytes(cache) -> int:
  total = 0
  layers = getattr(cache, "layers", None)
  if layers is not None:
    for layer in layers:
      for name in ("keys", "values"):
        t = getattr(layer, name, None)
        if t is not None and hasattr(t, "nbytes"):
          total += t.nbytes
    return total
  for name in ("key_cache", "value_cache"):
    total += sum(t.nbytes for t in getattr(cache, name, []) if hasattr(t, "nbytes"))
  return total


def _torch_worker(job: dict) -> dict:
  import inspect

  import numpy as np
  import torch
  import transformers

  torch.set_num_threads(job["threads"])
  major = int(transformers.__version__.split(".")[0])
  dtype_kw = "dtype" if major >= 5 else "torch_dtype"
  model = transformers.AutoModelForCausalLM.from_pretrained(
      job["checkpoint"], attn_implementation="sdpa", **{dtype_kw: torch.float32}).eval()
  fwd = inspect.signature(model.forward).parameters
  keep = ({"logits_to_keep": 1} if "logits_to_keep" in fwd else
          {"num_logits_to_keep": 1} if "num_logits_to_keep" in fwd else {})
  length = job["length"]
  L = job["scenario"]["segment_len"]
  rng = np.random.default_rng(job["seed"])
  vocab = model.config.vocab_size
  out: dict[str, Any] = dict(method=REFERENCE, length=length, compile_s=None,
                             logits_to_keep=bool(keep), threads=torch.get_num_threads())

  with torch.inference_mode():
    warm = torch.from_numpy(rng.integers(0, vocab, (1, min(L, length)), dtype=np.int64))
    t0 = time.perf_counter()
    o = model(warm, use_cache=True, **keep)
    o = model(warm[:, :1], past_key_values=o.past_key_values, use_cache=True)
    out["warmup_s"] = time.perf_counter() - t0
    del o

    mem = None
    if job["prefill"]:
      tokens = torch.from_numpy(rng.integers(0, vocab, (1, length), dtype=np.int64))
      with _MemoryWindow() as mem:
        t0 = time.perf_counter()
        o = model(tokens, use_cache=True, **keep)
        logits = o.logits[:, -1]
        first = time.perf_counter() - t0
      out.update(mem.result())
      out["finite"] = bool(torch.isfinite(logits).all())
      cache = o.past_key_values
      del o

      def again():
        t0 = time.perf_counter()
        float(model(tokens, use_cache=True, **keep).logits[:, -1].sum())
        return time.perf_counter() - t0
      out.update(_best_of(first, again, job["repeats"]))
    else:  # synthetic KV cache of `length` tokens
      cfg = model.config
      kv = cfg.num_key_value_heads
      hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
      try:
        cache = transformers.DynamicCache(config=cfg)
      except TypeError:
        cache = transformers.DynamicCache()
      for i in range(cfg.num_hidden_layers):
        cache.update(torch.randn(1, kv, length, hd), torch.randn(1, kv, length, hd), i)
      out["synthetic_state"] = True
    out["state_bytes"] = _cache_nbytes(cache)

    if job["decode_steps"]:
      n_decode = job["decode_warmup"] + job["decode_steps"]
      toks = torch.from_numpy(rng.integers(0, vocab, (n_decode, 1, 1), dtype=np.int64))
      times = []
      for i in range(n_decode):
        t0 = time.perf_counter()
        o = model(toks[i], past_key_values=cache, use_cache=True)
        cache = o.past_key_values
        _ = o.logits[:, -1].float().sum().item()
        times.append(time.perf_counter() - t0)
      out.update(_decode_stats(times[job["decode_warmup"]:]))
      out["decode_context"] = length
  out["peak_rss_mib"] = _process_peak_mib(mem)
  return out


def _qat_worker(job: dict) -> dict:
  """``edgeinfinite_jax.bench.qat_step.qat_step_cost`` on the benchmark's model.

  The batch is small (``job["batch"]`` rows of ``job["seq_len"]`` tokens) so that
  the two compiled training steps fit the run's time budget on a CPU.
  """
  from edgeinfinite_jax import configs
  from edgeinfinite_jax.bench import qat_step
  config = configs.base_config()
  config.model.update(job["model"])
  config.data.batch_size = job["batch"]
  config.data.seq_len = job["seq_len"]
  config.seed = job.get("seed", 0)
  return {"method": "qat", "raw": qat_step.qat_step_cost(config, n=job["n"], warmup=job["warmup"])}


def _worker_main(spec: str) -> int:
  job = json.loads(spec)
  kind = job.get("kind", "engine")
  try:
    fn = {"engine": _engine_worker, "torch": _torch_worker, "qat": _qat_worker}[kind]
    result = fn(job)
  except Exception as e:  # reported to the orchestrator, which keeps going
    traceback.print_exc()
    result = {"error": f"{type(e).__name__}: {e}"}
  sys.stdout.write("\n" + RESULT_MARK + json.dumps(result) + "\n")
  sys.stdout.flush()
  return 0


# ============================================================================ orchestrator


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
  import importlib.metadata
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def _git_revision() -> str:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:
    affinity = os.cpu_count()
  return {
      "cpu": _read_first("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
      "cores": f"{affinity} usable ({os.cpu_count()} online); {threads} threads used",
      "memory": (f"{int(mem_kib.split()[0]) / 1024 / 1024:.1f} GiB" if mem_kib else "unknown"),
      "os": f"{platform.system()} {platform.release()}",
      "python": platform.python_version(),
      "jax": _version("jax"), "jaxlib": _version("jaxlib"), "flax": _version("flax"),
      "numpy": _version("numpy"), "torch": _version("torch"),
      "transformers": _version("transformers"),
      "git": _git_revision(),
  }


def _estimate(points: list[tuple[int, float]], n: int) -> float | None:
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


def _run_job(job: dict, timeout: float) -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"  # a CPU benchmark, next to torch on the same CPU
  # torch's OpenMP threads spin at barriers by default; with any other load on the
  # cores a spinning thread that lost its core stalls the others (seen here: decode
  # 200 ms instead of 14 ms, prefill 3x slower, 2 threads on 2 busy cores).
  # PASSIVE makes the reference robust to that; an explicit setting is kept.
  env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  env["PYTHONWARNINGS"] = "ignore"
  # Run this file as a script, not `-m edgeinfinite_jax.bench`: the package's __init__
  # imports JAX and Flax, which the transformers worker does not need.
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out (> {timeout:.0f} s)", "timed_out": True,
            "wall_s": time.perf_counter() - t0}
  wall = time.perf_counter() - t0
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_MARK):
      res = json.loads(line[len(RESULT_MARK):])
      res["wall_s"] = wall
      if "error" in res:
        res["stderr_tail"] = proc.stderr[-2000:]
      return res
  return {"error": f"worker exited with {proc.returncode} without a result",
          "stderr_tail": proc.stderr[-2000:], "wall_s": wall}


def _fmt_s(x):
  if x is None:
    return "—"
  return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _fmt_len(n: int) -> str:
  return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _fmt_bytes(n):
  if n is None:
    return "—"
  return f"{n:,} ({n / MIB:.1f} MiB)"


def _ttft_cell(r: dict) -> str:
  if r.get("skipped"):
    if r.get("estimate_s") is None:
      return f"skipped ({r.get('reason', 'not run')})"
    return f"skipped (est. {r['estimate_s']:.0f} s)"
  if r.get("error"):
    return "timed out" if r.get("timed_out") else "error"
  return _fmt_s(r.get("ttft_s"))


def evaluate_targets(results: dict, lengths, decode_lengths) -> list[dict]:
  """The issue's four targets, each with what was measured and pass / fail / n/a."""
  rows = results["prefill"]
  get = lambda m, n: next((r for r in rows if r["method"] == m and r["length"] == n), None)
  ok = lambda r: r is not None and r.get("ttft_s") is not None
  out = []
  a, b = get("edgeinfinite", 4096), get("edgeinfinite", 32768)
  if ok(a) and ok(b):
    ratio = b["ttft_s"] / a["ttft_s"]
    out.append(dict(target=TARGETS[0], measured=f"{ratio:.2f} ({_fmt_s(b['ttft_s'])} s / "
                    f"{_fmt_s(a['ttft_s'])} s)", status="pass" if ratio <= 9 else "FAIL"))
  else:
    out.append(dict(target=TARGETS[0], measured="needs 4k and 32k edgeinfinite rows",
                    status="not measured"))
  parts, status = [], "not measured"
  for m in ("streaming", "edgeinfinite"):
    sizes = {r["state_bytes"] for r in rows if r["method"] == m and r.get("state_bytes")}
    sizes |= {r["state_bytes"] for r in results["decode"]
              if r["method"] == m and r.get("state_bytes")}
    if sizes:
      parts.append(f"{m}: " + ", ".join(f"{s:,}" for s in sorted(sizes)) + " B")
      status = ("FAIL" if len(sizes) > 1 or status == "FAIL" else "pass")
  out.append(dict(target=TARGETS[1], measured="; ".join(parts) or "—", status=status))
  ref = get(REFERENCE, 32768)
  if ok(b) and ok(ref):
    speed = ref["ttft_s"] / b["ttft_s"]
    out.append(dict(target=TARGETS[2], measured=f"{speed:.2f}x ({_fmt_s(ref['ttft_s'])} s vs "
                    f"{_fmt_s(b['ttft_s'])} s)", status="pass" if speed >= 5 else "FAIL"))
  elif ok(b) and ref is not None and ref.get("estimate_s") is not None:
    speed = ref["estimate_s"] / b["ttft_s"]
    out.append(dict(target=TARGETS[2], measured=f"~{speed:.1f}x against the reference's "
                    f"extrapolated {ref['estimate_s']:.0f} s (not measured)",
                    status="not measured"))
  else:
    out.append(dict(target=TARGETS[2], measured="needs 32k edgeinfinite and transformers rows",
                    status="not measured"))
  dec = {r["decode_context"]: r for r in results["decode"]
         if r["method"] == "edgeinfinite" and r.get("decode_ms_median") is not None}
  short, long_ = min(decode_lengths), max(decode_lengths)
  paired = dec.get(long_, {}).get("paired")
  tgt = TARGETS[3]
  if (short, long_) != (1024, 32768):
    tgt += f" (here {_fmt_len(long_)} vs {_fmt_len(short)})"
  if paired and paired["context"] == short:
    ratio = paired["ratio"]
    out.append(dict(target=tgt, measured=f"{ratio:.2f} (median of paired steps, alternating "
                    f"in one process: {paired['long_ms']:.2f} ms / {paired['short_ms']:.2f} ms)",
                    status="pass" if ratio <= 1.2 else "FAIL"))
  elif short in dec and long_ in dec and short != long_:
    ratio = dec[long_]["decode_ms_median"] / dec[short]["decode_ms_median"]
    out.append(dict(target=tgt, measured=f"{ratio:.2f} ({dec[long_]['decode_ms_median']:.2f} ms"
                    f" / {dec[short]['decode_ms_median']:.2f} ms, separate runs)",
                    status="pass" if ratio <= 1.2 else "FAIL"))
  else:
    out.append(dict(target=TARGETS[3], measured="needs two decode contexts",
                    status="not measured"))
  return out


def _plot(results: dict, methods, path: str) -> str | None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
  except Exception as e:  # matplotlib is a dependency, but a plot is not worth a crash
    print(f"[bench] no plot: {e}", file=sys.stderr)
    return None
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
  colors = dict(full="tab:red", streaming="tab:blue", edgeinfinite="tab:green",
                transformers="tab:gray")
  for m in methods:
    rows = sorted((r for r in results["prefill"] if r["method"] == m), key=lambda r: r["length"])
    meas = [(r["length"], r["ttft_s"]) for r in rows if r.get("ttft_s") is not None]
    est = [(r["length"], r["estimate_s"]) for r in rows
           if r.get("skipped") and r.get("estimate_s") is not None]
    c = colors.get(m)
    if meas:
      axes[0].plot(*zip(*meas), "o-", color=c, label=m)
    if est:
      start = meas[-1:] if meas else []
      axes[0].plot(*zip(*(start + est)), "o--", color=c, mfc="none",
                   label=f"{m} (skipped, est.)")
    mem = [(r["length"], r["peak_delta_mib"]) for r in rows if r.get("peak_delta_mib") is not None]
    if mem:
      axes[1].plot(*zip(*mem), "o-", color=c, label=f"{m}: peak RSS - RSS before prefill")
    st = [(r["length"], r["state_bytes"] / MIB) for r in rows if r.get("state_bytes")]
    if st:
      axes[1].plot(*zip(*st), "x:", color=c, label=f"{m}: state / KV cache")
  ticks = sorted({r["length"] for r in results["prefill"]})
  for ax, title, ylabel in ((axes[0], "time to first token", "seconds"),
                            (axes[1], "memory during prefill (solid) and state (dotted)", "MiB")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ticks, [_fmt_len(n) for n in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=7)
  # One legend entry per method: the line style says which quantity.
  handles = [h for h in axes[1].get_lines() if ": peak RSS" in h.get_label()]
  axes[1].legend(handles, [h.get_label().split(":")[0] for h in handles], fontsize=7)
  dec = [r for r in results["decode"] if r.get("decode_ms_median") is not None]
  ctxs = sorted({r["decode_context"] for r in dec})
  width = 0.8 / max(len(ctxs), 1)
  for j, ctx in enumerate(ctxs):
    vals = [next((r["decode_ms_median"] for r in dec
                  if r["method"] == m and r["decode_context"] == ctx), 0.0) for m in methods]
    bars = axes[2].bar([i + j * width for i in range(len(methods))], vals, width,
                       label=f"context {_fmt_len(ctx)}")
    axes[2].bar_label(bars, [f"{v:.0f}" if v else "" for v in vals], fontsize=7)
  axes[2].set_xticks([i + width * (len(ctxs) - 1) / 2 for i in range(len(methods))])
  axes[2].set_xticklabels(methods)
  axes[2].set_yscale("log")
  axes[2].set_ylabel("ms / token (median)")
  axes[2].set_title("decode latency")
  axes[2].legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def render_markdown(results: dict) -> str:
  meta, machine = results["meta"], results["machine"]
  lines = ["# Benchmarks", "",
           "Long-context prefill and decode on CPU, float32, batch 1 (issue #3). "
           "Generated by `edgeinfinite_jax/bench.py`; do not edit by hand.", ""]
  if meta.get("quick"):
    lines += ["**Smoke run (`--quick`): a tiny model and short contexts; the numbers say "
              "nothing about performance.**", ""]
  if meta.get("jobs", 1) > 1:
    lines += [f"**{meta['jobs']} measurements ran at a time (`--jobs`): they shared the CPU, "
              "so these timings are not comparable.**", ""]
  lines += ["Command:", "", "```", meta["command"], "```", "",
            "## Machine", "", "| | |", "|---|---|"]
  for k, v in machine.items():
    lines.append(f"| {k} | {v} |")
  lines += [f"| date | {meta['date']} |",
            f"| load average (1, 5, 15 min) at start | {meta['load_start']} |",
            f"| load average at end | {meta['load_end']} |",
            f"| wall time of the run | {meta['wall_s']:.0f} s |", "",
            "## Model and scenario", "",
            f"- Model: {meta['model_desc']}; {meta['n_params']:,} parameters, random weights "
            "(timing does not depend on them), float32.",
            f"- Engine scenario: segment_len={meta['scenario']['segment_len']}, "
            f"n_sink={meta['scenario']['n_sink']}, n_window={meta['scenario']['n_window']}, "
            "batch 1, short_threshold=0 (every prompt takes the long route, i.e. the method "
            "under test); `full` gets a ring cache of exactly the context (rounded up to a "
            "segment, plus the decode steps).",
            f"- Reference: the same weights as a `transformers` `LlamaForCausalLM` "
            "(`save_hf` + `from_pretrained`, `attn_implementation=\"sdpa\"`), "
            "`model(input_ids, use_cache=True, logits_to_keep=1)` under "
            f"`torch.inference_mode()`, `torch.set_num_threads({meta['threads']})`, "
            f"`OMP_WAIT_POLICY={meta.get('omp_wait_policy', 'PASSIVE')}` (with the default "
            "spinning policy, any other load on the cores makes torch's threads stall each "
            "other). Decoding feeds one token at a time with the returned `past_key_values`.",
            f"- A length is skipped when its time, extrapolated from the shorter lengths of the "
            f"same method, exceeds --max-seconds={meta['max_seconds']:.0f} s.", "",
            "## Targets", "", "| target | measured | status |", "|---|---|---|"]
  for t in results["targets"]:
    lines.append(f"| {t['target']} | {t['measured']} | {t['status']} |")
  lines += ["", "## Time to first token and memory", ""]
  if meta.get("plot"):
    lines += [f"![TTFT and memory]({meta['plot']})", ""]
  lines += ["TTFT: wall time of the whole prefill, from the token array to the last token's "
            "logits on the host side, after a warm-up that compiled the step functions; the "
            f"fastest of {meta.get('repeats', 1)} prefill(s) of the same prompt (the first "
            "also measures the memory), for every method alike. "
            "Compile: XLA tracing + compilation time of the warm-up (prefill-segment and decode "
            "functions). Δ peak RSS: the process's peak resident memory during the prefill minus "
            "its RSS just before it (the working memory of the prefill; weights and runtime "
            "excluded). Peak RSS: the whole process's peak (weights, runtime, compiler "
            "included). State: `state_nbytes` of the engine state after the prefill; for "
            "transformers, the bytes of its KV cache.", "",
            "| method | context | TTFT (s) | ms / prompt token | compile (s) | Δ peak RSS (MiB) "
            "| peak RSS (MiB) | state bytes | compilations |",
            "|---|---|---|---|---|---|---|---|---|"]
  for r in results["prefill"]:
    ttft = r.get("ttft_s")
    per_tok = f"{ttft / r['length'] * 1e3:.3f}" if ttft is not None else "—"
    lines.append("| " + " | ".join([
        r["method"], str(r["length"]), _ttft_cell(r), per_tok, _fmt_s(r.get("compile_s")),
        f"{r['peak_delta_mib']:.0f}" if r.get("peak_delta_mib") is not None else "—",
        f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") is not None else "—",
        _fmt_bytes(r.get("state_bytes")),
        str(r["compile_count"]) if r.get("compile_count") is not None else "—"]) + " |")
  lines += ["", "## Decode latency", "",
            f"Median over {meta['decode_steps']} single-token decode steps after "
            f"{meta['decode_warmup']} warm-up steps, starting from a state holding the context. "
            "`synthetic`: that context's prefill was skipped, so decoding started from a state "
            "of that length filled with placeholder values (a step's cost does not depend on "
            "them). The decode target is the median ratio of paired steps: the edgeinfinite "
            "job at the longest context alternates the same compiled step between its state "
            "and one holding the shortest context.", "",
            "| method | context | median (ms / token) | min (ms) | p90 (ms) | state |",
            "|---|---|---|---|---|---|"]
  for r in results["decode"]:
    if r.get("decode_ms_median") is None:
      cell = r.get("error", "not measured")
      lines.append(f"| {r['method']} | {r['decode_context']} | {cell} | — | — | — |")
      continue
    lines.append(f"| {r['method']} | {r['decode_context']} | {r['decode_ms_median']:.2f} | "
                 f"{r['decode_ms_min']:.2f} | {r['decode_ms_p90']:.2f} | "
                 f"{'synthetic' if r.get('synthetic_state') else 'after prefill'} |")
  lines += ["", "## QAT step cost", ""]
  q = results.get("qat")
  if not q or q.get("skipped"):
    lines.append(f"Skipped: {q.get('reason') if q else 'not run'}.")
  elif q.get("error"):
    lines.append(f"`edgeinfinite_jax.bench.qat_step.qat_step_cost` failed: {q['error']}.")
  else:
    raw = q["raw"]
    lines += ["`edgeinfinite_jax.bench.qat_step.qat_step_cost(config)` on the same model config: one "
              "training step (donated state, as `train.run` compiles it), full precision vs "
              "QAT (student forward and backward plus the frozen teacher's forward), "
              "alternating for n rounds after a compiling warm-up; `ratio` is the median of "
              "the per-round QAT / full-precision ratios. Target: at most 1.5.", "",
              "| quantity | value |", "|---|---|"]
    for k, v in raw.items():
      lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    ratio = raw["ratio"]
    lines.append(f"| QAT / full-precision step time | {ratio:.2f} "
                   f"({'pass' if ratio <= 1.5 else 'FAIL'}: target <= 1.5) |")
  errors = [r for r in results["prefill"] + results["decode"] if r.get("error")]
  if errors:
    lines += ["", "## Errors", ""]
    for r in errors:
      lines.append(f"- {r['method']} @ {r.get('length', r.get('decode_context'))}: {r['error']}")
  lines += ["", f"Raw results: [{meta['results_json']}]({meta['results_json']}).", ""]
  return "\n".join(lines)


def random_params(config, seed: int):
  """Random weights in numpy for the shapes ``model.abstract_params`` gives.

  Like ``init_params`` (normal(0.02) kernels, unit norm scales, zero biases)
  but without tracing and compiling the model's init, which takes seconds on a
  small CPU; timings do not depend on the values.
  """
  import jax
  import numpy as np

  from edgeinfinite_jax.model.transformer import abstract_params
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return np.ones(leaf.shape, np.float32)
    if name == "bias":
      return np.zeros(leaf.shape, np.float32)
    return (0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, abstract_params(config))


def _parse_lengths(s: str) -> list[int]:
  out = []
  for part in s.split(","):
    part = part.strip().lower()
    if not part:
      continue
    mult = 1024 if part.endswith("k") else 1
    n = int(part[:-1] if part.endswith("k") else part) * mult
    if n <= 0:
      raise argparse.ArgumentTypeError(f"length {part!r} must be positive")
    out.append(n)
  return sorted(set(out))


def _parse_methods(s: str) -> list[str]:
  out = [m.strip() for m in s.split(",") if m.strip()]
  bad = [m for m in out if m not in METHODS]
  if bad:
    raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
  return [m for m in METHODS if m in out]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m edgeinfinite_jax.bench",
      description="TTFT, peak memory and decode latency of full / streaming / edgeinfinite "
                  "against a transformers reference; writes BENCHMARKS.md and a plot.")
  p.add_argument("--lengths", type=_parse_lengths, default=None,
                 help="comma-separated context lengths, e.g. 1k,4k,32768 "
                      f"(default {','.join(_fmt_len(n) for n in DEFAULT_LENGTHS)}; "
                      f"--quick: {','.join(map(str, QUICK_LENGTHS))})")
  p.add_argument("--methods", type=_parse_methods, default=list(METHODS),
                 help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
  p.add_argument("--decode-lengths", type=_parse_lengths, default=None,
                 help="contexts for the decode latency (default 1k,32k; --quick: the smallest "
                      "and largest of --lengths)")
  p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (32)")
  p.add_argument("--decode-warmup", type=int, default=None, help="untimed decode steps (4)")
  p.add_argument("--out", default="BENCHMARKS.md",
                 help="markdown report; the plot and raw JSON go to benchmarks/ beside it")
  p.add_argument("--quick", action="store_true",
                 help="tiny model and short lengths: a smoke run of a few seconds per job")
  p.add_argument("--max-seconds", type=float, default=180.0,
                 help="skip a measurement whose extrapolated time exceeds this (default 180)")
  p.add_argument("--segment-len", type=int, default=None)
  p.add_argument("--window", type=int, default=None, help="n_window in tokens")
  p.add_argument("--sink", type=int, default=None, help="n_sink")
  p.add_argument("--threads", type=int, default=None,
                 help="torch threads (default: the usable cores; JAX uses them all)")
  p.add_argument("--repeats", type=int, default=None,
                 help="prefills per length; TTFT is the fastest (2; --quick: 1)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--jobs", type=int, default=1,
                 help="measurements run at a time (one per method); >1 only for smoke runs: "
                      "concurrent runs share the CPU, so their timings mean nothing")
  p.add_argument("--no-qat", action="store_true", help="skip the optional QAT step-cost row")
  p.add_argument("--no-plot", action="store_true")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  return p


def _progress(total: int):
  try:
    from tqdm import tqdm
    return tqdm(total=total, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True)
  except Exception:  # tqdm is a dependency; keep going without a bar if it is broken
    return None


def run(args, argv: list[str]) -> dict:
  """Plans, runs every measurement in a subprocess, writes the report; returns the results."""
  t_start = time.perf_counter()
  load_start = os.getloadavg()
  quick = args.quick
  model_kw = dict(QUICK_MODEL if quick else MODEL)
  sc = dict(QUICK_SCENARIO if quick else SCENARIO)
  for key, val in (("segment_len", args.segment_len), ("n_window", args.window),
                   ("n_sink", args.sink)):
    if val is not None:
      sc[key] = val
  lengths = args.lengths or list(QUICK_LENGTHS if quick else DEFAULT_LENGTHS)
  decode_lengths = args.decode_lengths or (
      sorted({min(lengths), max(lengths)}) if quick else list(DEFAULT_DECODE_LENGTHS))
  decode_steps = args.decode_steps if args.decode_steps is not None else (4 if quick else 32)
  decode_warmup = args.decode_warmup if args.decode_warmup is not None else (2 if quick else 4)
  repeats = args.repeats if args.repeats is not None else (1 if quick else 2)
  if repeats < 1:
    raise SystemExit(f"--repeats={repeats}: must be >= 1")
  try:
    threads = args.threads or len(os.sched_getaffinity(0))
  except AttributeError:
    threads = args.threads or os.cpu_count() or 1
  methods = args.methods
  if args.jobs < 1:
    raise SystemExit("--jobs must be >= 1")
  out_path = os.path.abspath(args.out)
  out_dir = os.path.dirname(out_path)
  aux_dir = os.path.join(out_dir, "benchmarks")
  plot_path = os.path.join(aux_dir, "ttft_memory.png")
  json_path = os.path.join(aux_dir, "results.json")

  import jax  # noqa: F401  (only to build the shared checkpoint)

  from edgeinfinite_jax.model.config import ModelConfig
  from edgeinfinite_jax.checkpoints.hf import save_hf
  from edgeinfinite_jax.engine.engine import Scenario
  config = ModelConfig(**model_kw)
  Scenario(segment_len=sc["segment_len"], n_sink=sc["n_sink"], n_window=sc["n_window"])
  tmp = tempfile.TemporaryDirectory(prefix="edgeinfinite_bench_")
  ckpt = os.path.join(tmp.name, "model")
  params = random_params(config, args.seed)
  n_params = int(sum(x.size for x in jax.tree.leaves(params)))
  save_hf(config, params, ckpt)
  del params

  base_job = dict(checkpoint=ckpt, scenario=sc, seed=args.seed, threads=threads,
                  repeats=repeats, decode_warmup=decode_warmup)
  timeout = 4 * args.max_seconds + 120
  n_jobs = len(methods) * (len(lengths) + len(set(decode_lengths) - set(lengths)))
  bar = _progress(n_jobs + (0 if args.no_qat else 1))

  def job_for(method, length, prefill, decode):
    kind = "torch" if method == REFERENCE else "engine"
    job = dict(base_job, kind=kind, method=method, length=length, prefill=prefill,
               decode_steps=decode_steps if decode else 0)
    if method == "edgeinfinite" and decode and length == max(decode_lengths) > min(
        decode_lengths):  # the decode target's paired measurement
      job["paired_context"] = min(decode_lengths)
    return job

  def step(desc):
    if bar is not None:
      bar.set_postfix_str(desc)

  def log(msg):
    if bar is not None:
      bar.write(msg, file=sys.stderr)
    else:
      print(msg, file=sys.stderr)

  def done():
    if bar is not None:
      bar.update(1)

  def run_method(method):
    prefill_rows, decode_rows = [], []
    measured: list[tuple[int, float]] = []
    stop_reason = None  # set when a length failed: longer ones are not tried
    for n in lengths:
      decode_here = n in decode_lengths
      est = _estimate(measured, n)
      if stop_reason is not None:
        prefill_rows.append(dict(method=method, length=n, skipped=True, estimate_s=None,
                                 reason=stop_reason))
        log(f"[bench] {method} @ {n}: skipped ({stop_reason})")
        done()
        continue
      if est is not None and est > args.max_seconds:
        prefill_rows.append(dict(method=method, length=n, skipped=True, estimate_s=est))
        log(f"[bench] {method} @ {n}: skipped (est. {est:.0f} s > --max-seconds "
            f"{args.max_seconds:.0f})")
        done()
        continue
      step(f"{method} @ {_fmt_len(n)}")
      res = _run_job(job_for(method, n, True, decode_here), timeout)
      res.setdefault("method", method)
      res["length"] = n
      prefill_rows.append(res)
      if res.get("ttft_s") is not None:
        measured.append((n, res["ttft_s"]))
        log(f"[bench] {method} @ {n}: TTFT {res['ttft_s']:.3f} s, Δ peak RSS "
            f"{res.get('peak_delta_mib', float('nan')):.0f} MiB, state "
            f"{res.get('state_bytes')} B")
      else:
        log(f"[bench] {method} @ {n}: {res.get('error')}\n{res.get('stderr_tail', '')}")
        stop_reason = (f"{_fmt_len(n)} timed out" if res.get("timed_out") else
                       f"{_fmt_len(n)} failed")
      if decode_here and res.get("decode_ms_median") is not None:
        decode_rows.append(dict({k: res.get(k) for k in (
            "method", "decode_ms_median", "decode_ms_min", "decode_ms_p90", "decode_steps",
            "state_bytes", "paired") if k in res}, decode_context=n))
      done()
    for n in decode_lengths:
      if any(r["method"] == method and r["decode_context"] == n for r in decode_rows):
        continue
      if n in lengths and bar is not None:  # not planned: its prefill was skipped or failed
        bar.total += 1
        bar.refresh()
      step(f"{method} decode @ {_fmt_len(n)} (synthetic state)")
      res = _run_job(job_for(method, n, False, True), timeout)
      res.setdefault("method", method)
      res["decode_context"] = n
      if res.get("error"):
        log(f"[bench] {method} decode @ {n}: {res['error']}\n{res.get('stderr_tail', '')}")
      decode_rows.append(res)
      done()
    return prefill_rows, decode_rows

  if args.jobs > 1:
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
      per_method = list(pool.map(run_method, methods))
  else:
    per_method = [run_method(m) for m in methods]
  prefill_rows = [r for p, _ in per_method for r in p]
  decode_rows = [r for _, d in per_method for r in d]

  decode_rows.sort(key=lambda r: (METHODS.index(r["method"]), r["decode_context"]))

  qat_res = None
  if args.no_qat:
    qat_res = {"skipped": True, "reason": "--no-qat"}
  else:
    step("qat step cost")
    qat_res = _run_job(dict(kind="qat", model=model_kw, seed=args.seed, batch=2,
                            seq_len=32 if quick else 256, n=3 if quick else 10, warmup=1),
                       timeout)
    done()
  if bar is not None:
    bar.close()

  prog_args = list(argv)
  results = dict(
      meta=dict(command="python -m edgeinfinite_jax.bench" +
                (" " + shlex.join(prog_args) if prog_args else ""),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                load_start=", ".join(f"{x:.2f}" for x in load_start),
                load_end=", ".join(f"{x:.2f}" for x in os.getloadavg()),
                wall_s=time.perf_counter() - t_start, quick=quick, model=model_kw,
                model_desc=(f"{config.num_layers} layers, hidden {config.hidden_size}, "
                            f"{config.num_heads} heads / {config.num_kv_heads} KV heads "
                            f"(head_dim {config.head_dim}), intermediate "
                            f"{config.intermediate_size}, vocab {config.vocab_size}"),
                n_params=n_params, scenario=sc, lengths=lengths, methods=methods,
                decode_lengths=decode_lengths, decode_steps=decode_steps,
                decode_warmup=decode_warmup, repeats=repeats, threads=threads,
                max_seconds=args.max_seconds,
                jobs=args.jobs, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                results_json=os.path.relpath(json_path, out_dir)),
      machine=machine_description(threads),
      prefill=prefill_rows, decode=decode_rows, qat=qat_res)
  results["targets"] = evaluate_targets(results, lengths, decode_lengths)
  os.makedirs(aux_dir, exist_ok=True)
  if not args.no_plot and _plot(results, methods, plot_path):
    results["meta"]["plot"] = os.path.relpath(plot_path, out_dir)
  with open(json_path, "w") as f:
    json.dump(results, f, indent=2, default=str)
  with open(out_path, "w") as f:
    f.write(render_markdown(results))
  tmp.cleanup()
  print(f"[bench] wrote {out_path} ({results['meta']['wall_s']:.0f} s)", file=sys.stderr)
  for t in results["targets"]:
    print(f"[bench] {t['status']:>12}: {t['target']} -- {t['measured']}", file=sys.stderr)
  return results


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  if args.worker is not None:
    return _worker_main(args.worker)
  run(args, argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
