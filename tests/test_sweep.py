"""The sweep launcher: validation before launch, runs, resume after a kill, aggregation.

The end-to-end test trains a 1-layer model for 2 steps per point through the real
command line (``python -m edgeinfinite_jax.cli.sweep``), so it covers exactly what a
user runs.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from edgeinfinite_jax.cli import sweep
from edgeinfinite_jax.configs import overrides
from edgeinfinite_jax.train import workdir as workdir_lib
from fast_compile import fast_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = '''
from edgeinfinite_jax import configs


def get_config(arg=None):
  c = configs.base_config()
  c.model.update(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                 num_kv_heads=1, max_position_embeddings=64)
  c.data.update(seq_len=32, batch_size=4, max_bytes=60_000)
  c.train.update(steps=2, log_every=1, eval_every=0, eval_batches=1, progress=False)
  c.optim.update(warmup_steps=1)
  c.checkpoint.update(every=2, keep=1)
  return c


def sweep(add, arg=None):
  {body}


def metrics():
  return ["loss", "eval_loss"]
'''


def _config(tmp_path, body, name="cfg.py"):
  path = tmp_path / name
  path.write_text(TINY.format(body=textwrap.indent(textwrap.dedent(body), "  ").strip()))
  return str(path)


# The sweeps here train a tiny model for a few steps per run, in fresh processes that
# compile everything again: XLA's cheap compiles (fast_env) roughly halve that.
def _cli(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "edgeinfinite_jax.cli.sweep", *args, "--no-progress"],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=fast_env())


# ----------------------------------------------------------------------------- units


def test_run_name_is_readable_safe_and_bounded():
  assert sweep.run_name({"model.memory.gate": "mlp", "optim.lr": 0.01}) == \
      "model.memory.gate=mlp,optim.lr=0.01"
  assert sweep.run_name({}) == "base"
  assert sweep.run_name({"optim.trainable": "gate+attention", "a.b": "x/y z"}) == \
      "optim.trainable=gate+attention,a.b=x_y_z"
  long = {f"model.memory.key_{i}": i for i in range(20)}
  name = sweep.run_name(long)
  assert len(name) <= sweep.MAX_NAME and name.startswith("model.memory.key_0=0,")
  assert name != sweep.run_name({**long, "model.memory.key_19": 99})  # the hash differs


def test_cli_values_round_trip():
  for current, value in [(1, 7), (0.5, 1e-3), (0.5, 2), (True, False), ("a", "gate+attention"),
                         ((8, 4), (4, 2))]:
    parsed = overrides.parse_cli_value(overrides.cli_value(value), current, "k")
    assert parsed == value and type(parsed) is type(current)
  with pytest.raises(ValueError, match="must be an int"):
    overrides.parse_cli_value("1.5", 3, "train.steps")
  with pytest.raises(ValueError, match="value in get_config\\(\\) is None"):
    overrides.parse_cli_value("x", None, "optim.groups")


def test_final_metrics_last_values_and_metrics_json(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
      '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0, "tag": "x"}\n'
      '{"step": 2, "eval_loss": 2.5}\n{"step": 3, "lo')  # torn last line (killed run)
  (tmp_path / "metrics.json").write_text(json.dumps({"passkey": {"edgeinfinite": 0.9},
                                                     "ok": True, "ttft_ms": 12}))
  (tmp_path / "quant_metrics.json").write_text(json.dumps({"eval_ppl": 20.5, "method": "qat",
                                                           "qat_losses": [3.0, 2.5]}))
  assert sweep.final_metrics(str(tmp_path)) == {
      "step": 2, "loss": 2.0, "eval_loss": 2.5, "passkey.edgeinfinite": 0.9, "ttft_ms": 12,
      "eval_ppl": 20.5, "qat_losses.0": 3.0, "qat_losses.1": 2.5}


# ----------------------------------------------------------------------------- errors


@pytest.mark.slow
def test_bad_points_rejected_before_any_run(tmp_path):
  cfg = _config(tmp_path, """
      add({"optim.lr": 1e-3})
      add({"optim.nope": 1})
      add({"model.memory.gate": "nope"})
      add({"train.steps": 1.5})
      add({"optim.lr": 1e-3})
  """)
  work = tmp_path / "work"
  with pytest.raises(sweep.SweepError) as e:
    sweep.plan(cfg, str(work))
  msg = str(e.value)
  assert "4 of 5 sweep point(s)" in msg and "nothing was run" in msg
  assert "'optim.nope': no such config key" in msg
  assert "model.memory.gate='nope'" in msg and "train.steps='1.5': must be an int" in msg
  assert "same overrides as sweep point 0" in msg
  r = _cli(f"--config={cfg}", f"--workdir={work}")
  assert r.returncode == 2 and "optim.nope" in r.stderr and not work.exists()


@pytest.mark.slow
def test_usage_errors(tmp_path):
  cfg = _config(tmp_path, 'add({"optim.lr": 1e-3})')
  plain = tmp_path / "plain.py"
  plain.write_text("from edgeinfinite_jax import configs\n"
                   "def get_config(arg=None):\n  return configs.base_config()\n")
  with pytest.raises(sweep.SweepError, match="defines no sweep"):
    sweep.plan(str(plain), str(tmp_path / "w"))
  with pytest.raises(sweep.SweepError, match="optim.lr is swept"):
    sweep.plan(cfg, str(tmp_path / "w"), ["--config.optim.lr=0.1"])
  with pytest.raises(sweep.SweepError, match="--only=5: no run 5"):
    sweep.plan(cfg, str(tmp_path / "w"), only="5")
  with pytest.raises(sweep.SweepError, match="must be --config.KEY=VALUE"):
    sweep.plan(cfg, str(tmp_path / "w"), ["--bogus"])
  with pytest.raises(sweep.SweepError, match="--parallel=0"):
    sweep.execute(sweep.plan(cfg, str(tmp_path / "w")), parallel=0)
  r = _cli(f"--config={cfg}", f"--workdir={tmp_path / 'w'}", "--parallel=0")
  assert r.returncode == 2 and "--parallel=0: must be a positive integer" in r.stderr


@pytest.mark.slow
def test_dry_run_prints_commands(tmp_path):
  cfg = _config(tmp_path, """
      for lr in (1e-3, 3e-3):
        add({"optim.lr": lr, "optim.trainable": "all"})
  """)
  work = tmp_path / "work"
  r = _cli(f"--config={cfg}", f"--workdir={work}", "--dry-run", "--config.train.steps=1")
  assert r.returncode == 0, r.stderr
  cmds = [l for l in r.stdout.splitlines() if l.startswith("python -m")]
  assert cmds == [
      f"python -m edgeinfinite_jax.cli.main --config={cfg} --config.train.steps=1 "
      f"--config.optim.lr={lr} --config.optim.trainable=all "
      f"--workdir={work}/optim.lr={lr},optim.trainable=all" for lr in ("0.001", "0.003")]
  assert not work.exists()


def test_failed_run_is_reported_not_done(tmp_path):
  work = str(tmp_path / "work")
  ok = ("import json, sys; d = sys.argv[1]; "
        "open(d + '/metrics.jsonl', 'w').write(json.dumps({'loss': 1.5}) + '\\n')")
  runs = [sweep.Run(0, "good", {"x": 1}, [sys.executable, "-c", ok, f"{work}/good"],
                    f"{work}/good"),
          sweep.Run(1, "bad", {"x": 2}, [sys.executable, "-c", "raise SystemExit(3)"],
                    f"{work}/bad")]
  s = sweep.Sweep("fake.py", work, runs, runs, ["x"], [], {})
  result = sweep.execute(s, progress=False, out=open(os.devnull, "w"))
  assert result == {"ran": ["good"], "skipped": [], "failed": ["bad"]}
  assert os.path.exists(f"{work}/good/DONE") and not os.path.exists(f"{work}/bad/DONE")
  assert json.load(open(f"{work}/bad/FAILED"))["returncode"] == 3
  rows = list(csv.DictReader(open(f"{work}/results.csv")))
  assert [(r["x"], r["status"], r["loss"]) for r in rows] == [("1", "done", "1.5"),
                                                               ("2", "failed", "")]
  assert sweep.execute(s, progress=False, out=open(os.devnull, "w"))["skipped"] == ["good"]


def test_parallel_runs_at_once(tmp_path, monkeypatch):
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  work = str(tmp_path)
  code = ("import os, sys, time; time.sleep(1.5); "
          "open(sys.argv[1], 'w').write(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'])")
  runs = [sweep.Run(i, f"r{i}", {"x": i}, [sys.executable, "-c", code, f"{work}/r{i}/env"],
                    f"{work}/r{i}") for i in range(3)]
  start = time.perf_counter()
  s = sweep.Sweep("fake.py", work, runs, runs, ["x"], [], {})
  assert sorted(sweep.execute(s, parallel=3, progress=False, out=open(os.devnull, "w"))["ran"]) \
      == ["r0", "r1", "r2"]
  assert time.perf_counter() - start < 4.0  # not 3 x 1.5 s one after the other
  assert open(f"{work}/r0/env").read() == "false"  # runs can share a GPU


# ----------------------------------------------------------------------------- one launcher, no orphans

# A launcher process running one fake run (``CHILD``) through sweep.execute.
LAUNCHER = textwrap.dedent("""
    import sys
    from edgeinfinite_jax.cli import sweep
    work, child = sys.argv[1], sys.argv[2]
    run = sweep.Run(0, "r", {"x": 1}, [sys.executable, "-c", child, work + "/r"], work + "/r")
    sweep.execute(sweep.Sweep("fake.py", work, [run], [run], ["x"], [], {}), progress=False)
""")
# A run that locks its directory as a trainer does, says its PID, and runs on.
CHILD = ("import fcntl, os, sys, time; d = sys.argv[1]; f = open(d + '/.lock', 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); "
         "open(d + '/child.pid', 'w').write(str(os.getpid())); time.sleep(120)")
# The rerun's run: exits 0 only if no orphan holds the directory's lock.
RERUN = ("import fcntl, sys; f = open(sys.argv[1] + '/.lock', 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)")


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, unreaped
  except FileNotFoundError:
    return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkilled_launcher_takes_its_run_along(tmp_path):
  work = str(tmp_path / "work")
  pid_file = os.path.join(work, "r", "child.pid")
  launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, work, CHILD], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  child = None
  try:
    deadline = time.time() + 60
    while not (os.path.exists(pid_file) and open(pid_file).read()):
      assert launcher.poll() is None and time.time() < deadline, "the run never started"
      time.sleep(0.05)
    child = int(open(pid_file).read())
    launcher.send_signal(signal.SIGKILL)  # no handler runs: only the kernel can help
    launcher.wait()
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
      time.sleep(0.05)
    assert not _alive(child), f"run {child} outlived its SIGKILLed launcher"
  finally:
    if launcher.poll() is None:
      launcher.kill()
    if child and _alive(child):
      os.kill(child, signal.SIGKILL)
  # A rerun finds the run directory free (no orphan holds its lock) and the run redone.
  run = sweep.Run(0, "r", {"x": 1}, [sys.executable, "-c", RERUN, f"{work}/r"], f"{work}/r")
  s = sweep.Sweep("fake.py", work, [run], [run], ["x"], [], {})
  assert sweep.execute(s, progress=False, out=open(os.devnull, "w"))["ran"] == ["r"]


def test_second_launcher_on_a_sweep_dir_is_refused(tmp_path):
  work = str(tmp_path / "work")
  run = sweep.Run(0, "r", {"x": 1}, [sys.executable, "-c", "pass"], f"{work}/r")
  s = sweep.Sweep("fake.py", work, [run], [run], ["x"], [], {})
  with workdir_lib.Lock(work, "sweep launcher"):
    with pytest.raises(sweep.SweepError, match=rf"--workdir={work}: .*locked by PID "
                                               rf"{os.getpid()} \(sweep launcher on "):
      sweep.execute(s, progress=False, out=open(os.devnull, "w"))
  assert not os.path.exists(f"{work}/r")  # nothing was launched
  assert sweep.execute(s, progress=False, out=open(os.devnull, "w"))["ran"] == ["r"]


# ----------------------------------------------------------------------------- end to end


def _mtime(path):
  return os.stat(path).st_mtime_ns


@pytest.mark.slow
def test_sweep_runs_resumes_after_kill_and_aggregates(tmp_path):
  cfg = _config(tmp_path, """
      for lr in (1e-3, 1e-2):
        add({"optim.lr": lr})
  """)
  work = tmp_path / "work"
  names = [f"optim.lr={lr}" for lr in ("0.001", "0.01")]
  runs = [work / n for n in names]

  # 1. Start the sweep, kill it (and its run) once run 1 is under way.
  with open(tmp_path / "first.log", "w") as log:
    proc = subprocess.Popen([sys.executable, "-m", "edgeinfinite_jax.cli.sweep", f"--config={cfg}",
                             f"--workdir={work}", "--no-progress"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env=fast_env())
    try:
      deadline = time.time() + 80
      while not (runs[1] / "config.json").exists():
        assert proc.poll() is None, (tmp_path / "first.log").read_text()
        assert time.time() < deadline, "run 1 never started"
        time.sleep(0.05)
    finally:
      os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the run it launched
      proc.wait()
  assert (runs[0] / "DONE").exists() and not (runs[1] / "DONE").exists()
  done0 = _mtime(runs[0] / "DONE")

  # 2. Rerun: run 0 is skipped, the killed run 1 is redone.
  r = _cli(f"--config={cfg}", f"--workdir={work}")
  assert r.returncode == 0, r.stdout + r.stderr
  assert f"[skip 0] {names[0]}" in r.stdout
  assert "[run 0]" not in r.stdout and "[run 1] python -m edgeinfinite_jax.cli.main" in r.stdout
  assert _mtime(runs[0] / "DONE") == done0
  assert (runs[1] / "log.txt").read_text().count("### ") == 2  # started twice
  info = json.loads((runs[1] / "DONE").read_text())
  assert info["point"] == {"optim.lr": 0.01} and "--config.optim.lr=0.01" in info["command"]
  assert info["metrics"]["step"] == 2

  # 3. The tables: swept keys as columns, then status and the config's metrics().
  with open(work / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["run", "optim.lr", "status", "loss", "eval_loss"]
  assert [r["optim.lr"] for r in rows] == ["0.001", "0.01"]
  assert all(r["status"] == "done" and float(r["loss"]) > 0 and float(r["eval_loss"]) > 0
             for r in rows)
  md = (work / "results.md").read_text()
  assert "| optim.lr | status | loss | eval_loss |" in md and md.count("| done |") == 2

  # 4. Everything finished: a rerun launches nothing and only re-aggregates.
  stamps = [_mtime(d / "DONE") for d in runs]
  r = _cli(f"--config={cfg}", f"--workdir={work}")
  assert r.returncode == 0 and "[run" not in r.stdout and r.stdout.count("[skip") == 2
  assert [_mtime(d / "DONE") for d in runs] == stamps

  # 5. The workdir belongs to this sweep.
  r = _cli(f"--config={cfg}", f"--workdir={work}", "--config.train.steps=3")
  assert r.returncode == 2 and "holds a sweep of" in r.stderr
