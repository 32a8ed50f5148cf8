"""Child processes that die with their launcher (the sweep's runs).

Each child gets its own process group, so stopping it stops whatever it started,
and on Linux asks the kernel for SIGKILL when the launcher dies (even by SIGKILL),
so a killed sweep leaves no orphan training its workdir.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence


# The first thing a run executes on Linux (``-I -S``: a bare interpreter, no site
# imports): ask the kernel for SIGKILL when the launcher dies (prctl
# PR_SET_PDEATHSIG = 1; it survives exec), give up if the launcher is already
# gone, then exec the run's own command in place (same PID, same environment).
# Doing this in the child before exec, rather than in a ``preexec_fn``, keeps
# the fork safe: the launcher has threads (its pool, JAX's), and Python code run
# between fork and exec in a threaded process can deadlock.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:\n"
    "  raise OSError(ctypes.get_errno(), 'prctl(PR_SET_PDEATHSIG) failed')\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "  sys.exit('sweep: the launcher died before this run started')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")


def _child_argv(argv: Sequence[str]) -> list[str]:
  """``argv`` as the launcher executes it: on Linux behind ``_DIE_WITH_PARENT``,
  so the run dies with the launcher, even one killed with SIGKILL (no handler of
  the launcher's can run then; only the kernel can end the run)."""
  if not sys.platform.startswith("linux"):
    return list(argv)
  return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


class Launcher:
  """Runs subprocesses, remembering them so an interrupt can stop them.

  Each run gets its own process group (``start_new_session``), so stopping it
  stops whatever it started too, and dies with the launcher (``_child_argv``).
  """

  def __init__(self, env):
    self.env, self.procs, self.lock, self.stopping = env, set(), threading.Lock(), False

  def run(self, argv: Sequence[str], command: str, log_path: str) -> tuple[int, float]:
    """Runs ``argv`` (shown as ``command``) to completion, appending its output to
    ``log_path``; returns (exit code, seconds). ``-SIGTERM`` when stopped before start."""
    start = time.perf_counter()
    with open(log_path, "a") as log:
      log.write(f"### {datetime.datetime.now().isoformat(timespec='seconds')} {command}\n")
      log.flush()
      with self.lock:
        if self.stopping:
          return -signal.SIGTERM, 0.0
        proc = subprocess.Popen(_child_argv(argv), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env, start_new_session=True)
        self.procs.add(proc)
      try:
        rc = proc.wait()
      finally:
        with self.lock:
          self.procs.discard(proc)
    return rc, time.perf_counter() - start

  def stop(self):
    with self.lock:
      self.stopping = True
      procs = list(self.procs)
    for p in procs:
      _signal_group(p, signal.SIGTERM)
    for p in procs:
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        _signal_group(p, signal.SIGKILL)
        p.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  """``sig`` to the run's process group (the run and anything it started)."""
  try:
    os.killpg(proc.pid, sig)
  except ProcessLookupError:  # already gone, with its group
    pass
