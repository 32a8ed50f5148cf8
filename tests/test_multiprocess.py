"""A real multi-process run: two JAX processes on 127.0.0.1, two CPU devices each.

Multi-host training (``sharding.maybe_initialize_distributed``, the
``--config.distributed.*`` flags) runs here for real: ``jax.distributed`` with
a coordinator on a free localhost port and gloo CPU collectives (set by
``maybe_initialize_distributed``), against one process with four devices. The
two-process run must give the same losses (to 1e-6 under the cheap compiles
used here; bit-identical with full optimisation, as the README shows), each process must load only its
half of every batch, process 0 alone must write metrics and checkpoint
records, and a run stopped after a checkpoint must resume as two processes
again. Every process is a subprocess (the device count is fixed at backend
start); XLA's cheap compiles and a shared persistent compilation cache keep it
within about a minute and a half on a 2-core CPU.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fast_compile import fast_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, STOP = 10, 5, 7
TIMEOUT = 240  # per phase; a hung collective fails the test instead of the session

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent("""
    import json, sys
    root, workdir, process_id, port, stop = sys.argv[1:6]
    sys.path.insert(0, root + "/tests")
    import jax
    from edgeinfinite_jax.data import corpus as data_lib
    from edgeinfinite_jax import configs
    from edgeinfinite_jax.train import sharding, trainer as train
    from fast_compile import fast_compiles
    config = configs.load_module(root + "/experiments/configs/pretrain_tiny.py").get_config(
        "tiny")
    config.train.update(steps=%(steps)d, log_every=1, eval_every=0, eval_batches=0,
                        progress=False)
    config.checkpoint.update(every=%(every)d, keep=2)
    if int(process_id) >= 0:
      config.distributed.update(initialize=True, coordinator_address="127.0.0.1:" + port,
                                num_processes=2, process_id=int(process_id))
    assert sharding.maybe_initialize_distributed(config) == (int(process_id) >= 0)
    with fast_compiles():
      out = train.run(config, workdir, stop_after=int(stop) or None)
    rows = sharding.host_slice(config.data.batch_size)
    split = data_lib.load(config.data)
    local = data_lib.batch_at(split.train, 0, config.data.batch_size, config.seed, rows)
    print("RESULT" + json.dumps({
        "losses": out["losses"], "process": jax.process_index(),
        "processes": jax.process_count(), "devices": jax.device_count(),
        "local_devices": jax.local_device_count(), "rows": [rows.start, rows.stop],
        "local_batch_rows": int(local["tokens"].shape[0]),
        "collectives": jax.config.jax_cpu_collectives_implementation}), flush=True)
""") % {"steps": STEPS, "every": EVERY}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, cache: str) -> dict:
  # XLA's cheap compiles (fast_env), in every process alike: the runs compared here
  # are all subprocesses of this one mode.
  env = fast_env(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("JAX_CPU_COLLECTIVES_IMPLEMENTATION", None)  # the code path must set it
  return env


def _start(workdir, process_id, port, stop, devices, cache, log):
  return subprocess.Popen(
      [sys.executable, "-c", CHILD, ROOT, workdir, str(process_id), str(port), str(stop)],
      env=_env(devices, cache), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _results(procs, logs) -> list[dict]:
  out = []
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    text = open(log.name).read()
    assert p.returncode == 0, f"{log.name}:\n{text[-4000:]}"
    out.append(json.loads([l for l in text.splitlines() if l.startswith("RESULT")][-1][6:]))
  return out


def _two_processes(tmp_path, tag, workdir, stop, cache):
  port = _free_port()
  logs = [open(tmp_path / f"{tag}_{i}.log", "w") for i in range(2)]
  procs = [_start(workdir, i, port, stop, 2, cache, logs[i]) for i in range(2)]
  return _results(procs, logs)


def _logged_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l)["step"] for l in f]


def _checkpoints(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_two_processes_match_one_and_resume(tmp_path):
  cache = str(tmp_path / "jax_cache")
  workdir = str(tmp_path / "two")
  # The reference (one process, four devices) runs beside the first phase.
  ref_log = open(tmp_path / "ref.log", "w")
  ref = _start(str(tmp_path / "one"), -1, 0, 0, 4, cache, ref_log)

  # 1. Two processes, stopped (as if preempted) after step 7; the checkpoint is at 5.
  first = _two_processes(tmp_path, "first", workdir, STOP, cache)
  [reference] = _results([ref], [ref_log])
  assert reference["devices"] == 4 and reference["processes"] == 1
  assert len(reference["losses"]) == STEPS
  for i, r in enumerate(first):
    assert (r["process"], r["processes"], r["devices"], r["local_devices"]) == (i, 2, 4, 2)
    assert r["collectives"] == "gloo"
    assert r["rows"] == [4 * i, 4 * i + 4] and r["local_batch_rows"] == 4  # its half only
    assert r["losses"] == first[0]["losses"] and len(r["losses"]) == STOP
  # XLA's cheap compiles round a few ops differently in one process than in two
  # (~1e-7); with full optimisation both give bit-identical losses (README).
  np.testing.assert_allclose(first[0]["losses"], reference["losses"][:STOP], rtol=1e-6, atol=0)
  assert _checkpoints(workdir) == [EVERY]
  assert os.path.isfile(os.path.join(workdir, "checkpoints", str(EVERY), "sha256_manifest.json"))
  assert _logged_steps(workdir) == list(range(1, STOP + 1))  # one writer: each step once
  assert json.load(open(os.path.join(workdir, "config.json")))["distributed"]["num_processes"] == 2

  # 2. The same two-process command again resumes from step 5 and finishes.
  second = _two_processes(tmp_path, "second", workdir, 0, cache)
  assert second[0]["losses"] == second[1]["losses"] and len(second[0]["losses"]) == STEPS - EVERY
  # steps 6-7 ran in both phases: the resume is exact
  assert second[0]["losses"][:STOP - EVERY] == first[0]["losses"][EVERY:]
  np.testing.assert_allclose(second[0]["losses"], reference["losses"][EVERY:], rtol=1e-6, atol=0)
  assert _checkpoints(workdir) == [EVERY, STEPS]
  assert _logged_steps(workdir) == list(range(1, STEPS + 1))
  print(f"step {STEPS} loss: one process {reference['losses'][-1]!r}, "
        f"two processes {second[0]['losses'][-1]!r}")
