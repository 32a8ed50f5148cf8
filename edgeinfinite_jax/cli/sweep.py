"""Local sweep launcher: expand a config's ``sweep()``, run each point, aggregate.

  python -m edgeinfinite_jax.cli.sweep --config=experiments/configs/NAME.py[:ARG] \\
      --workdir=DIR [--parallel N] [--dry-run] [--only K[,K...]] [--config.KEY=VALUE ...]

Each point that ``sweep(add, arg)`` adds becomes one run in ``DIR/<run_name>``,
launched as the command a user would type (printed before it starts)::

  python -m edgeinfinite_jax.cli.main --config=NAME.py:ARG --config.KEY=VALUE ... \\
      --workdir=DIR/<run_name>

``run_name`` is a filesystem-safe slug of the point's overrides
(``model.memory.gate=mlp,optim.lr=0.01``), shortened with a hash when too long.
Extra ``--config.KEY=VALUE`` flags apply to every run (e.g. fewer steps); they
may not name a swept key.

* **Validation first.** Every point is resolved (``get_config(arg)`` + the
  overrides, each value parsed from its command-line text as ``main`` will parse
  it) and checked with ``configs.validate`` before any run starts; all bad
  points are reported together.
* **Resumable.** A run that exits with status 0 gets a ``DONE`` file (JSON:
  command, point, final metrics, duration), written atomically; reruns skip
  runs that have it. An unfinished run (killed, failed) has none and is run
  again; the job itself resumes from its latest checkpoint. Failed runs are
  reported (``FAILED`` file with the exit status; the log is ``log.txt``) and
  the sweep exits with status 1.
* **Results.** ``DIR/results.csv`` and ``DIR/results.md``: one row per point,
  the swept keys as columns (each run's value, the default where its point does
  not set the key), then ``status`` and the config's ``metrics()``
  (every numeric final metric when the config has none). A run's final
  metrics are the last value of each key in its ``metrics.jsonl`` plus the
  numbers in the ``*metrics.json`` files the job writes there (``metrics.json``,
  ``quant_metrics.json``; nested keys joined with ``.``).
* **Parallel.** ``--parallel N`` runs N at once (each in its own process;
  with N > 1 ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is set for the runs
  unless the environment sets it, so that GPU runs can share a device).
* **One launcher, no orphans.** The launcher holds ``DIR/.lock`` while it runs
  (a second launcher on ``DIR`` stops, naming the first one's PID; each run's
  trainer locks its own directory the same way). Runs start in their own
  process group with a parent-death signal (Linux ``PR_SET_PDEATHSIG``): a
  launcher killed even with SIGKILL takes its runs with it, so a rerun never
  finds an orphaned trainer still writing to a run directory. An interrupt
  (Ctrl-C, SIGTERM) stops each run's whole process group.

The launcher process itself only validates, on the CPU backend: it never
holds the accelerator that the runs need. Python API: ``plan`` (validate and
name the runs), ``execute`` (run the pending ones), ``aggregate`` (write the
tables). The value codec is ``configs/overrides.py``, the child processes
``cli/launcher.py``. (Over 400 lines on purpose: plan, state files, execution and
aggregation of one sweep share its Run/Sweep records and read best in one place.)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import datetime
import glob
import hashlib
import inspect
import io
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
from typing import Any, Mapping, Sequence


from edgeinfinite_jax import configs
from edgeinfinite_jax.cli import errors
from edgeinfinite_jax.cli import launcher as launcher_lib
from edgeinfinite_jax.configs import overrides as overrides_lib
from edgeinfinite_jax.jobs import registry
from edgeinfinite_jax.train import workdir as workdir_lib
from edgeinfinite_jax.model.config import ConfigError
from tqdm.auto import tqdm
import jax

DONE = "DONE"
FAILED = "FAILED"
LOG = "log.txt"
STATE = "sweep.json"
MAX_NAME = 80


class SweepError(ValueError):
  """The sweep cannot start: bad config, bad point, bad flag. The message says which."""


# ----------------------------------------------------------------------------- names


def run_name(point: Mapping[str, Any], max_len: int = MAX_NAME) -> str:
  """``model.memory.gate=mlp,optim.lr=0.01``: safe as a directory name.

  Characters other than letters, digits and ``._,=+-`` become ``_``; a name
  longer than ``max_len`` keeps a readable prefix and ends in a hash of the
  whole point. An empty point is ``base``.
  """
  text = ",".join(f"{k}={overrides_lib.cli_value(v, k)}" for k, v in point.items())
  slug = re.sub(r"[^A-Za-z0-9._,=+-]", "_", text) or "base"
  if slug[0] in ".-":
    slug = "_" + slug
  if len(slug) > max_len:
    slug = slug[:max_len - 9].rstrip(",") + "-" + _hash(text)
  return slug


def _hash(text: str) -> str:
  return hashlib.sha1(text.encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass
class Run:
  index: int
  name: str
  point: dict[str, Any]      # the sweep point, as sweep() added it
  argv: list[str]            # what is executed (argv[0] = this interpreter)
  workdir: str
  values: dict[str, Any] = dataclasses.field(default_factory=dict)  # every swept key's
  # value in this run's resolved config (keys the point leaves alone: the default)

  @property
  def command(self) -> str:
    """The command line as a user types it (``python -m ...``), shell-quoted."""
    return shlex.join(["python", *self.argv[1:]])

  @property
  def done(self) -> bool:
    return os.path.isfile(os.path.join(self.workdir, DONE))

  @property
  def status(self) -> str:
    if self.done:
      return "done"
    if os.path.isfile(os.path.join(self.workdir, FAILED)):
      return "failed"
    return "incomplete" if os.path.isdir(self.workdir) else "pending"


@dataclasses.dataclass
class Sweep:
  config: str                   # FILE[:ARG] as given
  workdir: str
  runs: list[Run]               # every point, in sweep() order
  selected: list[Run]           # the ones this invocation handles (--only)
  swept_keys: list[str]         # union of the points' keys, first-seen order
  metric_names: list[str]       # the config's metrics(); [] = every numeric metric
  overrides: dict[str, str]     # --config.KEY=VALUE applied to every run


def _split_spec(spec: str) -> tuple[str, str | None]:
  path, sep, arg = spec.partition(":")
  return path, (arg if sep else None)


def _metric_names(module, arg) -> list[str]:
  fn = getattr(module, "metrics", None)
  if fn is None:
    return []
  names = fn(arg) if inspect.signature(fn).parameters else fn()
  return [str(n) for n in names]


def _validation_devices(config) -> int:
  """Devices assumed while validating: the product of the mesh's explicit sizes.

  The launcher never touches the accelerator, so rules that depend on the real
  device count (batch divisibility over a -1 mesh axis) are rechecked by each
  run.
  """
  sizes = [v for v in dict(config.get("mesh", {})).values()
           if isinstance(v, int) and not isinstance(v, bool) and v > 0]
  return max(1, math.prod(sizes))


def _load(config: str):
  """(base config, sweep points, metric names) of ``FILE[:ARG]``; SweepError if any fails."""
  path, arg = _split_spec(config)
  if not os.path.isfile(path):
    raise SweepError(f"--config={config}: no such file {path!r}")
  try:
    module = configs.load_module(path)
  except Exception as e:  # a syntax error etc. in the config file
    raise SweepError(f"--config={config}: cannot import {path}: {type(e).__name__}: {e}") from e
  if not hasattr(module, "sweep"):
    raise SweepError(f"--config={config}: {path} defines no sweep(add, arg=None); a sweep "
                     "needs one (it calls add({'dotted.key': value}) once per run)")
  try:
    points = configs.sweep_points(module, arg)
    base = module.get_config(arg)
    metric_names = _metric_names(module, arg)
  except ConfigError as e:
    raise SweepError(f"--config={config}: {e}") from None
  except Exception as e:
    raise SweepError(f"--config={config}: {type(e).__name__}: {e}") from e
  if not points:
    raise SweepError(f"--config={config}: sweep() added no points")
  return base, points, metric_names


def _runs(config: str, base, common: dict, points: list, check_paths: bool):
  """One ``Run`` per point (its command line; values of the swept keys as resolved) and
  the swept keys; SweepError listing every invalid or repeated point."""
  errors, runs, seen, swept, resolved_configs = [], [], {}, [], []
  for i, point in enumerate(points):
    label = f"sweep point {i} {point}"
    try:
      texts = {k: overrides_lib.cli_value(v, k) for k, v in point.items()}
      resolved = overrides_lib.resolve(overrides_lib.resolve(base, common), texts)
      registry.validate(resolved, n_devices=_validation_devices(resolved),
                          check_paths=check_paths)
    except (ConfigError, SweepError, ValueError, TypeError) as e:
      errors.append(f"{label}: {e}")
      continue
    key = tuple(sorted(texts.items()))
    if key in seen:
      errors.append(f"{label}: same overrides as sweep point {seen[key]}")
      continue
    seen[key] = i
    swept += [k for k in point if k not in swept]
    argv = [sys.executable, "-m", "edgeinfinite_jax.cli.main", f"--config={config}",
            *[f"--config.{k}={v}" for k, v in common.items()],
            *[f"--config.{k}={v}" for k, v in texts.items()]]
    runs.append(Run(i, run_name(point), dict(point), argv, ""))
    resolved_configs.append(resolved)
  if errors:
    raise SweepError(f"{len(errors)} of {len(points)} sweep point(s) of {config} are invalid; "
                     "nothing was run:\n  " + "\n  ".join(errors))
  for r, resolved in zip(runs, resolved_configs):
    r.values = {k: overrides_lib.value_at(resolved, k) for k in swept}
  return runs, swept


def plan(config: str, workdir: str, overrides: Sequence[str] | Mapping[str, Any] = (),
         only: str | Sequence | None = None, check_paths: bool = True) -> Sweep:
  """Loads ``FILE[:ARG]``, expands its sweep and validates every point.

  ``overrides``: ``["--config.KEY=VALUE", ...]`` or ``{KEY: value}``, applied
  to every run. ``only``: indices or run names (comma-separated string or a
  sequence). Raises SweepError listing every bad point; nothing is run or
  written.
  """
  base, points, metric_names = _load(config)
  common = _parse_overrides(overrides)
  for key in common:
    swept_by = [str(i) for i, p in enumerate(points) if key in p]
    if swept_by:
      raise SweepError(f"--config.{key}={common[key]}: {key} is swept (by point(s) "
                       f"{','.join(swept_by)}); a common override may not name a swept key")
  try:
    overrides_lib.resolve(base, common)
  except ConfigError as e:
    raise SweepError(f"--config.KEY=VALUE flags: {e}") from None
  runs, swept = _runs(config, base, common, points, check_paths)
  names = [r.name for r in runs]
  for r in runs:  # distinct points whose slugs collide (after sanitising / cutting)
    if names.count(r.name) > 1:
      r.name = f"{r.name[:MAX_NAME - 9]}-{_hash(repr(sorted(r.point.items())))}"
  for r in runs:
    r.workdir = os.path.join(workdir, r.name)
    r.argv.append(f"--workdir={r.workdir}")
  return Sweep(config, workdir, runs, _select(runs, only), swept, metric_names, common)


def _parse_overrides(overrides) -> dict[str, str]:
  if isinstance(overrides, Mapping):
    return {k: overrides_lib.cli_value(v, k) for k, v in overrides.items()}
  out = {}
  for flag in overrides:
    m = re.fullmatch(r"--config\.([A-Za-z0-9_.]+)=(.*)", flag, re.S)
    if not m:
      raise SweepError(f"unrecognized argument {flag!r}: extra flags must be "
                       "--config.KEY=VALUE (applied to every run)")
    out[m.group(1)] = m.group(2)
  return out


def _select(runs: list[Run], only) -> list[Run]:
  if only is None or only == "":
    return list(runs)
  items = [s.strip() for s in only.split(",")] if isinstance(only, str) else list(only)
  by_name = {r.name: r for r in runs}
  chosen = []
  for item in items:
    if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
      k = int(item)
      if not 0 <= k < len(runs):
        raise SweepError(f"--only={item}: no run {k}; valid: 0..{len(runs) - 1}")
      run = runs[k]
    elif item in by_name:
      run = by_name[item]
    else:
      raise SweepError(f"--only={item!r}: neither a run index (0..{len(runs) - 1}) nor a run "
                       f"name ({', '.join(by_name)})")
    if run not in chosen:
      chosen.append(run)
  return chosen


# ----------------------------------------------------------------------------- state files


def _check_state(sweep: Sweep) -> None:
  """A workdir holds one sweep: same config and common overrides on every rerun."""
  path = os.path.join(sweep.workdir, STATE)
  if not os.path.isfile(path):
    return
  with open(path) as f:
    old = json.load(f)
  mine = {"config": sweep.config, "overrides": sweep.overrides}
  if {k: old.get(k) for k in mine} != mine:
    raise SweepError(f"--workdir={sweep.workdir} holds a sweep of --config={old.get('config')} "
                     f"with overrides {old.get('overrides')}; this is --config={sweep.config} "
                     f"with {sweep.overrides}. Use another --workdir (or delete {path})")


def _save_state(sweep: Sweep) -> None:
  os.makedirs(sweep.workdir, exist_ok=True)
  workdir_lib.write_atomic(os.path.join(sweep.workdir, STATE), json.dumps({
      "config": sweep.config, "overrides": sweep.overrides,
      "runs": [{"index": r.index, "name": r.name, "point": r.point, "command": r.command}
               for r in sweep.runs]}, indent=2, default=str))


def _numeric(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def final_metrics(run_dir: str) -> dict[str, float]:
  """A run's final numbers: the last value of each numeric key in ``metrics.jsonl``,
  then those of every ``*metrics.json`` in the run directory (``metrics.json``,
  ``quant_metrics.json``, ...; nested keys and list indices joined with ``.``)."""
  out: dict[str, float] = {}
  path = os.path.join(run_dir, "metrics.jsonl")
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # the torn last line of a killed run
          continue
        if isinstance(record, dict):
          out.update((k, v) for k, v in record.items() if _numeric(v))
  for path in sorted(glob.glob(os.path.join(glob.escape(run_dir), "*metrics.json"))):
    try:
      with open(path) as f:
        data = json.load(f)
    except (OSError, json.JSONDecodeError):
      continue
    if isinstance(data, dict):
      out.update(_flatten_numbers(data))
  return out


def _flatten_numbers(d, prefix: str = "") -> dict[str, float]:
  out = {}
  items = d.items() if isinstance(d, Mapping) else enumerate(d)
  for k, v in items:
    if isinstance(v, (Mapping, list)):
      out.update(_flatten_numbers(v, f"{prefix}{k}."))
    elif _numeric(v):
      out[f"{prefix}{k}"] = v
  return out


# ----------------------------------------------------------------------------- execute


def _tail(path: str, n: int = 15) -> str:
  try:
    with open(path, errors="replace") as f:
      lines = f.read().replace("\r", "\n").splitlines()
  except OSError:
    return ""
  lines = [l for l in lines if l.strip()]
  return "\n".join("    | " + l for l in lines[-n:])


def _clear_failed(run: Run) -> None:
  os.makedirs(run.workdir, exist_ok=True)
  try:
    os.remove(os.path.join(run.workdir, FAILED))  # a rerun's outcome is its own
  except FileNotFoundError:
    pass


def execute(sweep: Sweep, parallel: int = 1, progress: bool = True, out=None) -> dict:
  """Runs the selected runs that are not done; returns ``{"ran", "skipped", "failed"}``.

  Writes ``DONE`` (success) or ``FAILED`` (exit status) into each run
  directory, then the results tables (``aggregate``). Holds ``<workdir>/.lock``
  throughout: SweepError, naming the holder's PID, if another launcher has it.
  """
  if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
    raise SweepError(f"--parallel={parallel!r}: must be a positive integer")
  out = out or sys.stdout
  try:
    lock = workdir_lib.Lock(sweep.workdir, "sweep launcher").acquire()
  except workdir_lib.WorkdirError as e:
    raise SweepError(f"--workdir={sweep.workdir}: {e}") from None
  try:
    return _execute(sweep, parallel, progress, out)
  finally:
    lock.release()


@contextlib.contextmanager
def _sigterm_interrupts():
  """SIGTERM raises KeyboardInterrupt in the main thread, so a killed launcher stops its
  runs (``Launcher.stop``) instead of leaving them orphaned."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def on_term(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
  previous = signal.signal(signal.SIGTERM, on_term)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _execute(sweep: Sweep, parallel: int, progress: bool, out) -> dict:
  _check_state(sweep)
  _save_state(sweep)
  todo = [r for r in sweep.selected if not r.done]
  skipped = [r for r in sweep.selected if r.done]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if parallel > 1:
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  launcher = launcher_lib.Launcher(env)
  bar = tqdm(total=len(sweep.selected), initial=len(skipped), desc="sweep", unit="run",
             disable=not progress, dynamic_ncols=True, file=sys.stderr)
  say = bar.write if progress else (lambda s: print(s, file=out, flush=True))
  for r in skipped:
    say(f"[skip {r.index}] {r.name}: done ({os.path.join(r.workdir, DONE)})")
  failed, ran = [], []

  def one(run: Run):
    say(f"[run {run.index}] {run.command}")
    _clear_failed(run)
    rc, seconds = launcher.run(run.argv, run.command, os.path.join(run.workdir, LOG))
    if rc == 0:
      metrics = final_metrics(run.workdir)
      workdir_lib.write_atomic(os.path.join(run.workdir, DONE), json.dumps({
          "command": run.command, "point": run.point, "seconds": round(seconds, 2),
          "finished": datetime.datetime.now().isoformat(timespec="seconds"),
          "metrics": metrics}, indent=2, default=str))
      say(f"[done {run.index}] {run.name} in {seconds:.1f}s")
      ran.append(run)
    else:
      if not launcher.stopping:
        workdir_lib.write_atomic(os.path.join(run.workdir, FAILED),
                      json.dumps({"command": run.command, "returncode": rc}) + "\n")
      say(f"[FAILED {run.index}] {run.name}: exit status {rc}; log "
          f"{os.path.join(run.workdir, LOG)}\n{_tail(os.path.join(run.workdir, LOG))}")
      failed.append(run)
    bar.update(1)

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=parallel)
  try:
    with _sigterm_interrupts():
      futures = [pool.submit(one, r) for r in todo]
      for f in concurrent.futures.as_completed(futures):
        f.result()
  except BaseException:
    launcher.stop()
    pool.shutdown(wait=True, cancel_futures=True)
    raise
  finally:
    pool.shutdown(wait=True)
    bar.close()
  aggregate(sweep, out=out)
  if failed:
    print(f"{len(failed)} run(s) failed: {', '.join(r.name for r in failed)}; rerun the same "
          "command to retry them (finished runs are skipped)", file=out, flush=True)
  return {"ran": [r.name for r in ran], "skipped": [r.name for r in skipped],
          "failed": [r.name for r in failed]}


# ----------------------------------------------------------------------------- aggregate


def _cell(v) -> str:
  if v is None or v == "":
    return ""
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def aggregate(sweep: Sweep, out=None) -> list[dict[str, Any]]:
  """Writes ``results.csv`` and ``results.md`` over every run; returns the rows."""
  finals = {r.name: final_metrics(r.workdir) for r in sweep.runs}
  names = sweep.metric_names or sorted({k for m in finals.values() for k in m})
  rows = []
  for r in sweep.runs:
    row = {"run": r.name}
    row.update({k: r.values.get(k, r.point.get(k, "")) for k in sweep.swept_keys})
    row["status"] = r.status
    row.update({m: finals[r.name].get(m, "") for m in names})
    rows.append(row)
  columns = ["run", *sweep.swept_keys, "status", *names]
  os.makedirs(sweep.workdir, exist_ok=True)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
  writer.writeheader()
  writer.writerows({k: (overrides_lib.cli_value(v) if k in sweep.swept_keys and v != "" else v)
                    for k, v in row.items()} for row in rows)
  workdir_lib.write_atomic(os.path.join(sweep.workdir, "results.csv"), buf.getvalue())
  md = markdown_table(rows, [c for c in columns if c != "run"])
  workdir_lib.write_atomic(os.path.join(sweep.workdir, "results.md"),
                f"# Sweep `{sweep.config}`\n\n{md}\n")
  if out is not None:
    print(f"\n{md}\nresults: {os.path.join(sweep.workdir, 'results.csv')} and results.md",
          file=out, flush=True)
  return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_cell(row.get(c, "")).replace("|", "\\|") for c in columns)
                 + " |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m edgeinfinite_jax.cli.sweep",
      description="Run every point of an experiment file's sweep() and aggregate the "
                  "results. Extra --config.KEY=VALUE flags apply to every run.")
  p.add_argument("--config", required=True, help="experiments/configs/NAME.py[:ARG]")
  p.add_argument("--workdir", required=True, help="sweep directory; one subdirectory per run")
  p.add_argument("--parallel", default="1", help="runs at once (default 1)")
  p.add_argument("--dry-run", action="store_true",
                 help="validate and print the commands; run nothing")
  p.add_argument("--only", default=None,
                 help="comma-separated run indices or names to handle (default: all)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  try:
    parallel = int(args.parallel)
  except ValueError:
    parallel = 0
  if parallel < 1:
    parser.error(f"--parallel={args.parallel}: must be a positive integer")
  # Validation only traces shapes: keep this process off the accelerator the
  # runs need (a TPU can be held by one process only).
  jax.config.update("jax_platforms", "cpu")
  try:
    sweep = plan(args.config, args.workdir, extra, args.only)
    _check_state(sweep)
    if args.dry_run:
      for r in sweep.selected:
        print(f"# [{r.index}] {r.status}: {r.name}")
        print(r.command)
      return 0
    result = execute(sweep, parallel, progress=not args.no_progress)
  except SweepError as e:
    print(f"sweep: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("sweep: interrupted; rerun the same command to continue", file=sys.stderr)
    return 130
  return 1 if result["failed"] else 0


def cli(argv: Sequence[str] | None = None) -> None:
  """The console script ``edgeinfinite-sweep``: user errors as one line (``errors.run``)."""
  sys.exit(errors.run(main, "sweep", argv))


if __name__ == "__main__":
  cli()
