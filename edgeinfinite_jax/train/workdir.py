"""A training workdir's contract: one writer, a record of its run, verified checkpoints.

``train.run`` relies on three things here:

* **One writer.** ``Lock`` holds ``fcntl.flock`` on ``<workdir>/.lock`` with the
  holder's PID written into it; a second writer fails at once naming that PID.
  The kernel drops the lock when the holder dies, so a killed run never leaves
  a stale lock behind (the file and its old PID may stay; they mean nothing
  unless the lock is held).
* **A record of the run.** ``config.json`` (the whole config) and
  ``model_config.json`` (the model actually trained: with ``init.hf_path`` or a
  trainer's model hook that is not ``config.model``) record what the
  checkpoints and ``metrics.jsonl`` were made with. ``run_diff`` lists the keys
  of a new config that would make a resume mix two runs; ``move_aside`` moves an
  old run to ``previous/<timestamp>/`` (``train.fresh``), never deleting it.
* **Verified checkpoints.** ``write_manifest`` records the size and sha256 of
  every file of a committed checkpoint step (written atomically: tmp, fsync,
  rename); ``verify`` recomputes them before a restore, so a checkpoint whose
  bytes changed, lost a file or was cut short is skipped (``quarantine`` moves it
  to ``corrupt-<step>`` beside the good ones) rather than restored.

Nothing here imports JAX: the sweep launcher uses ``Lock`` too.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import socket
import threading
from typing import Any, Iterable, Mapping

LOCK = ".lock"
CONFIG = "config.json"
MODEL_CONFIG = "model_config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
PREVIOUS = "previous"
MANIFEST = "sha256_manifest.json"
# What train.run writes, and so what ``move_aside`` moves (other jobs' files, a
# sweep's log.txt / DONE, the lock and earlier ``previous/`` runs stay).
RUN_FILES = (CHECKPOINTS, METRICS, CONFIG, MODEL_CONFIG)

# The config sections that define what a run computes: the model, its data, its
# optimizer and schedule, the seed, the initial weights and the step count. Within
# them these keys only say how the run is watched, so they may change on a resume.
RUN_SECTIONS = ("seed", "model", "data", "optim", "train", "init")
NOT_RUN_KEYS = ("train.log_every", "train.eval_every", "train.eval_batches",
                "train.progress", "train.fresh")
STEPS_KEY = "train.steps"


class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked (busy, or holding a different run)."""


class CheckpointError(RuntimeError):
  """No checkpoint of the workdir can be restored."""


# ----------------------------------------------------------------------------- lock


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError:
    text = ""
  return text or "unknown"


class Lock:
  """``fcntl.flock`` on ``<directory>/.lock``, exclusive and non-blocking.

  ``what`` names the holder in the file and in the error a second process
  gets (``"trainer"``, ``"sweep launcher"``). The lock belongs to the open file,
  which is not inherited by child processes (Python opens files
  close-on-exec), so a child never keeps its parent's lock alive.
  """

  def __init__(self, directory: str, what: str = "trainer"):
    self.directory, self.what = directory, what
    self.path = os.path.join(directory, LOCK)
    self.fd: int | None = None

  def acquire(self) -> "Lock":
    os.makedirs(self.directory, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirError(
          f"{self.directory} is in use: {self.path} is locked by PID {_holder(self.path)}; "
          f"one writer per directory: wait for that process to finish (or stop it), or use "
          "another directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} ({self.what} on {socket.gethostname()})\n".encode())
    os.fsync(fd)
    self.fd = fd
    return self

  def release(self) -> None:
    if self.fd is not None:
      os.close(self.fd)  # drops the flock; the file stays for the next holder
      self.fd = None

  def __enter__(self) -> "Lock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ----------------------------------------------------------------------------- record


def write_atomic(path: str, text: str) -> None:
  """``path`` holds either its old content or ``text``, never a torn mix.

  The temporary name carries the process and thread, so concurrent writers
  (the sweep's threads, several hosts on a shared disk) never share one.
  """
  tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(os.path.dirname(path) or ".")


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _load_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, json.JSONDecodeError) as e:
    raise WorkdirError(f"{path}: unreadable run record ({e}); move it away (or pass "
                       "train.fresh=True) to start this workdir over") from None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and tuples are leaves; an empty
  mapping holds no value, so it adds no key)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _normal(obj) -> Any:
  """JSON round trip: tuples and lists compare equal, as they are once written."""
  return json.loads(json.dumps(obj, sort_keys=True, default=str))


def run_keys(config_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The dotted keys of a config dict that define its run (``RUN_SECTIONS`` less
  ``NOT_RUN_KEYS``)."""
  flat = flatten(_normal({k: config_dict[k] for k in RUN_SECTIONS if k in config_dict}))
  return {k: v for k, v in flat.items() if k not in NOT_RUN_KEYS}


_MISSING = object()


def _same(a, b, default) -> bool:
  """Equal, or one side lacks the key and the other holds its default: a key
  added to the schema after the record was written, whose default keeps the old
  behaviour (a key the schema dropped is no longer read, so it never counts)."""
  return a == b or b is _MISSING or (a is _MISSING and b == default)


def run_diff(old_config: Mapping[str, Any], new_config: Mapping[str, Any],
             old_model: Mapping[str, Any] | None = None,
             new_model: Mapping[str, Any] | None = None,
             last_step: int | None = None,
             defaults: Mapping[str, Any] | None = None,
             model_defaults: Mapping[str, Any] | None = None) -> list[str]:
  """``["dotted.key: old -> new", ...]``: what makes ``new`` a different run.

  ``train.steps`` counts only when it is below ``last_step`` (the newest
  checkpoint's step; with none, any change counts): a higher value extends
  the run and resumes it (the schedule is then computed for the new total).
  The models actually trained (``model_config.json``) are compared only when
  no ``model.*`` key differs, so one change is not reported twice.
  ``defaults`` / ``model_defaults`` (a config dict, a model dict) let a record
  written before a key existed match a config holding that key's default.
  """
  old, new = run_keys(old_config), run_keys(new_config)
  default = run_keys(defaults or {})
  missing = _MISSING
  lines = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, missing), new.get(key, missing)
    if _same(a, b, default.get(key, missing)):
      continue
    if (key == STEPS_KEY and last_step is not None and isinstance(b, int)
        and b >= last_step):
      continue
    show = lambda v: "(absent)" if v is missing else repr(v)
    note = (f" (below the last checkpoint's step {last_step})"
            if key == STEPS_KEY and last_step is not None else "")
    lines.append(f"{key}: {show(a)} -> {show(b)}{note}")
  if old_model is not None and new_model is not None and not any(
      l.startswith("model.") for l in lines):
    o, n = flatten(_normal(old_model)), flatten(_normal(new_model))
    d = flatten(_normal(model_defaults or {}))
    for key in sorted(set(o) | set(n)):
      if not _same(o.get(key, missing), n.get(key, missing), d.get(key, missing)):
        lines.append(f"trained model {key}: {o.get(key, '(absent)')!r} -> "
                     f"{n.get(key, '(absent)')!r}")
  return lines


def checkpoint_steps(directory: str) -> list[int]:
  """The committed orbax step directories (integer names), newest first."""
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return []
  return sorted((int(n) for n in names
                 if n.isdigit() and os.path.isdir(os.path.join(directory, n))), reverse=True)


def has_run(workdir: str) -> bool:
  """Whether ``workdir`` holds results worth protecting: checkpoints or metrics."""
  metrics = os.path.join(workdir, METRICS)
  return bool(checkpoint_steps(os.path.join(workdir, CHECKPOINTS))) or (
      os.path.isfile(metrics) and os.path.getsize(metrics) > 0)


def check_run(workdir: str, config_dict: Mapping[str, Any],
              model_dict: Mapping[str, Any] | None = None,
              defaults: Mapping[str, Any] | None = None,
              model_defaults: Mapping[str, Any] | None = None) -> None:
  """Raises WorkdirError if ``workdir`` holds a run that ``config_dict`` would change
  (``run_diff``; ``defaults`` / ``model_defaults`` as there).

  A workdir without checkpoints or metrics, or without a recorded config
  (made before records existed), passes.
  """
  if not has_run(workdir):
    return
  old = _load_json(os.path.join(workdir, CONFIG))
  if old is None:
    return
  old_model = _load_json(os.path.join(workdir, MODEL_CONFIG))
  steps = checkpoint_steps(os.path.join(workdir, CHECKPOINTS))
  diff = run_diff(old, config_dict, old_model, model_dict, steps[0] if steps else None,
                  defaults, model_defaults)
  if diff:
    raise WorkdirError(
        f"workdir {workdir} holds a run made with a different config "
        f"({os.path.join(workdir, CONFIG)}); resuming it with this one would mix two runs "
        f"in its checkpoints and metrics.jsonl. Differing keys (recorded -> now):\n  "
        + "\n  ".join(diff)
        + f"\nRerun with the recorded values, use another workdir, or pass "
          f"--config.train.fresh=True (train.run(..., fresh=True)) to move the old run to "
          f"{os.path.join(workdir, PREVIOUS, '<timestamp>')}/ and start over.")


def write_record(workdir: str, config_json: str, model_dict: Mapping[str, Any]) -> None:
  """Writes ``config.json`` (``config_json``, as given) and ``model_config.json``."""
  write_atomic(os.path.join(workdir, CONFIG), config_json)
  write_atomic(os.path.join(workdir, MODEL_CONFIG),
               json.dumps(_normal(model_dict), indent=2, sort_keys=True))


def move_aside(workdir: str) -> str | None:
  """Moves the run's files (``RUN_FILES``) to ``previous/<timestamp>/``; returns
  that directory, or None when there was nothing to move."""
  present = [n for n in RUN_FILES if os.path.exists(os.path.join(workdir, n))]
  if not present:
    return None
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  dest, i = os.path.join(workdir, PREVIOUS, stamp), 0
  while os.path.exists(dest):
    i += 1
    dest = os.path.join(workdir, PREVIOUS, f"{stamp}-{i}")
  os.makedirs(dest)
  for name in present:
    os.replace(os.path.join(workdir, name), os.path.join(dest, name))
  _fsync_dir(workdir)
  return dest


# ----------------------------------------------------------------------------- checkpoints


def _files(step_dir: str) -> Iterable[str]:
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    for name in sorted(files):
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != MANIFEST and not rel.startswith(MANIFEST + ".tmp"):
        yield rel


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def write_manifest(step_dir: str) -> str:
  """Records size and sha256 of every file of a *committed* step directory in
  ``<step_dir>/sha256_manifest.json`` (atomically); returns its path."""
  files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                 "sha256": sha256_file(os.path.join(step_dir, rel))}
           for rel in _files(step_dir)}
  path = os.path.join(step_dir, MANIFEST)
  write_atomic(path, json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True))
  return path


def has_manifest(step_dir: str) -> bool:
  return os.path.isfile(os.path.join(step_dir, MANIFEST))


def verify(step_dir: str) -> str | None:
  """None if every file in the step's manifest is there with its size and
  sha256; else a one-line reason. A step without a manifest (saved before
  manifests existed, or killed between orbax's commit and the manifest) is
  not checked here: its restore decides."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      files = json.load(f)["files"]
    items = [(rel, int(m["size"]), str(m["sha256"])) for rel, m in files.items()]
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return f"its checksum manifest {MANIFEST} is unreadable ({type(e).__name__}: {e})"
  if not items:
    return f"its checksum manifest {MANIFEST} lists no files"
  for rel, size, digest in items:
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      return f"{rel} is missing"
    actual = os.path.getsize(full)
    if actual != size:
      cut = " (cut short)" if actual < size else ""
      return f"{rel} has {actual} bytes, {size} when saved{cut}"
    if sha256_file(full) != digest:
      return f"{rel} changed since it was saved (sha256 mismatch, same size {size})"
  return None


def quarantine(checkpoint_dir: str, step: int) -> str:
  """Moves step ``step`` to ``<checkpoint_dir>/corrupt-<step>`` (``-1``, ``-2``,
  ... if taken), out of orbax's sight; returns the new path. Never deletes."""
  dest, i = os.path.join(checkpoint_dir, f"corrupt-{step}"), 0
  while os.path.exists(dest):
    i += 1
    dest = os.path.join(checkpoint_dir, f"corrupt-{step}-{i}")
  os.replace(os.path.join(checkpoint_dir, str(step)), dest)
  _fsync_dir(checkpoint_dir)
  return dest


def one_line(e: BaseException, limit: int = 300) -> str:
  """An exception as one short line (TensorStore / orbax messages span pages)."""
  text = " ".join(str(e).split())
  if len(text) > limit:
    text = text[:limit - 3] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__
