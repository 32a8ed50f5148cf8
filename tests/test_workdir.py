"""workdir.py on its own: the lock between processes, the run record's rules, the
checksum manifest, moving runs and checkpoints aside. No JAX; the trainer's use of
all this is tested in test_train.py."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from edgeinfinite_jax.train import workdir as wd


# Another process holding a workdir's lock: workdir.py loaded by path (the package
# imports JAX, seconds this test does not need).
HOLDER = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("wd", sys.argv[1])
    wd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wd)
    wd.Lock(sys.argv[2], "test holder").acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_lock_names_the_holder_and_dies_with_it(tmp_path):
  directory = str(tmp_path / "w")
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, wd.__file__, directory],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(wd.WorkdirError,
                       match=rf"{directory} is in use: .*locked by PID {holder.pid} "
                             r"\(test holder on [^)]+\); one writer per directory"):
      wd.Lock(directory).acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # the kernel dropped the lock with its holder: no stale lock, whatever the file says
  with wd.Lock(directory, "trainer") as lock:
    assert open(lock.path).read().startswith(f"{os.getpid()} (trainer on ")
    with pytest.raises(wd.WorkdirError, match=f"locked by PID {os.getpid()} "):
      wd.Lock(directory).acquire()  # a second open file, even in this process
  wd.Lock(directory).acquire().release()


def _config(**changes):
  c = {"job": "train", "seed": 0,
       "model": {"hidden_size": 32, "memory": {"attention_type": "full"}},
       "data": {"seq_len": 64, "tasks": "passkey"},
       "optim": {"lr": 0.003, "groups": None},
       "train": {"steps": 40, "log_every": 5, "eval_every": 0, "eval_batches": 1,
                 "progress": False, "fresh": False},
       "checkpoint": {"every": 10, "keep": 2, "enabled": True},
       "mesh": {"data": -1}, "distributed": {"initialize": False},
       "init": {"hf_path": ""}, "demo": {"sft_steps": 5}, "quant_job": {"method": "fp"},
       "quant": {"preset": ""}}
  for dotted, value in changes.items():
    *parents, leaf = dotted.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_run_diff_counts_what_changes_the_run():
  old = _config()
  # how a run is watched, saved, laid out or used by other jobs: no change
  assert wd.run_diff(old, _config(**{
      "train.log_every": 1, "train.eval_every": 10, "train.eval_batches": 3,
      "train.progress": True, "train.fresh": True, "checkpoint.every": 5,
      "checkpoint.enabled": False, "mesh.data": 2, "distributed.initialize": True,
      "job": "demo", "demo.sft_steps": 9, "quant_job.method": "qat", "quant.preset": "w8a8"}),
      last_step=40) == []
  # what it computes: every key, dotted, recorded -> now
  assert wd.run_diff(old, _config(**{"model.memory.attention_type": "edgeinfinite",
                                     "seed": 1, "init.hf_path": "/x"}), last_step=40) == [
      "init.hf_path: '' -> '/x'", "model.memory.attention_type: 'full' -> 'edgeinfinite'",
      "seed: 0 -> 1"]
  # a tuple and the list it is written as are the same value
  groups = _config(**{"optim.groups": [("gate", 1.0)]})
  assert wd.run_diff(json.loads(json.dumps(groups)), groups) == []
  # train.steps: more extends the run; fewer than the last checkpoint's step does not
  assert wd.run_diff(old, _config(**{"train.steps": 80}), last_step=40) == []
  assert wd.run_diff(old, _config(**{"train.steps": 30}), last_step=20) == []
  assert wd.run_diff(old, _config(**{"train.steps": 30}), last_step=40) == [
      "train.steps: 40 -> 30 (below the last checkpoint's step 40)"]
  assert wd.run_diff(old, _config(**{"train.steps": 50})) == ["train.steps: 40 -> 50"]
  # a record from before a key existed: the key's default is no change, another value is
  older = _config()
  del older["init"]["hf_path"]
  assert wd.run_diff(older, old, defaults=_config()) == []
  assert wd.run_diff(older, _config(**{"init.hf_path": "/x"}), defaults=_config()) == [
      "init.hf_path: (absent) -> '/x'"]
  assert wd.run_diff(old, older) == []  # a key the schema dropped is no longer read
  assert wd.run_diff({"model": {}}, {"model": {}}, {}, {"rope": None},
                     model_defaults={"rope": None}) == []
  # the model actually trained, when the config's model section is the same
  assert wd.run_diff(old, old, {"quant": {"bits": 8}}, {"quant": {"bits": 4}}) == [
      "trained model quant.bits: 8 -> 4"]
  assert wd.run_diff(old, _config(**{"model.hidden_size": 64}), {"hidden_size": 32},
                     {"hidden_size": 64}) == ["model.hidden_size: 32 -> 64"]


def _run_dir(tmp_path, config=None, metrics=True, steps=(10, 20)):
  d = tmp_path / "run"
  d.mkdir(parents=True)
  for s in steps:
    (d / "checkpoints" / str(s)).mkdir(parents=True)
  if metrics:
    (d / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
  if config is not None:
    (d / "config.json").write_text(json.dumps(config))
  return str(d)


def test_check_run_refuses_only_a_recorded_run_it_would_change(tmp_path):
  workdir = _run_dir(tmp_path, _config())
  wd.check_run(workdir, _config(**{"train.steps": 20}))  # 20 = last step: an allowed value
  with pytest.raises(wd.WorkdirError, match=r"(?s)different config.*"
                     r"train.steps: 40 -> 10 \(below the last checkpoint's step 20\)"
                     r".*--config.train.fresh=True"):
    wd.check_run(workdir, _config(**{"train.steps": 10}))
  # nothing to protect, or no record to compare with: a run may start
  wd.check_run(_run_dir(tmp_path / "a", _config(), metrics=False, steps=()),
               _config(**{"seed": 3}))
  wd.check_run(_run_dir(tmp_path / "b", None), _config(**{"seed": 3}))
  bad = _run_dir(tmp_path / "c", None)
  with open(os.path.join(bad, "config.json"), "w") as f:
    f.write('{"seed": ')
  with pytest.raises(wd.WorkdirError, match="config.json: unreadable run record"):
    wd.check_run(bad, _config())


def test_move_aside_keeps_everything_but_the_run_in_place(tmp_path):
  workdir = _run_dir(tmp_path, _config())
  for name in ("log.txt", "DONE", ".lock"):
    open(os.path.join(workdir, name), "w").close()
  first = wd.move_aside(workdir)
  assert os.path.dirname(first) == os.path.join(workdir, "previous")
  assert sorted(os.listdir(first)) == ["checkpoints", "config.json", "metrics.jsonl"]
  assert sorted(os.listdir(workdir)) == [".lock", "DONE", "log.txt", "previous"]
  assert wd.move_aside(workdir) is None  # nothing left to move
  open(os.path.join(workdir, "metrics.jsonl"), "w").write("x\n")
  second = wd.move_aside(workdir)
  assert second != first and len(os.listdir(os.path.join(workdir, "previous"))) == 2


def _step_dir(tmp_path):
  d = tmp_path / "ckpt" / "7"
  (d / "default" / "d").mkdir(parents=True)
  (d / "default" / "_METADATA").write_text("{}")
  (d / "default" / "d" / "data").write_bytes(bytes(range(256)) * 64)
  (d / "_CHECKPOINT_METADATA").write_text("{}")
  return str(d)


def test_manifest_catches_changed_missing_and_cut_files(tmp_path):
  step_dir = _step_dir(tmp_path)
  assert wd.verify(step_dir) is None and not wd.has_manifest(step_dir)  # unverified: restore decides
  path = wd.write_manifest(step_dir)
  files = json.load(open(path))["files"]
  assert sorted(files) == ["_CHECKPOINT_METADATA", "default/_METADATA", "default/d/data"]
  assert not [f for f in os.listdir(step_dir) if ".tmp" in f]
  assert wd.verify(step_dir) is None

  data = os.path.join(step_dir, "default", "d", "data")
  original = open(data, "rb").read()
  with open(data, "r+b") as f:  # one byte in the middle, same size
    f.seek(len(original) // 2)
    f.write(bytes([original[len(original) // 2] ^ 1]))
  assert "default/d/data changed since it was saved (sha256 mismatch" in wd.verify(step_dir)
  os.truncate(data, 100)
  assert wd.verify(step_dir) == (f"default/d/data has 100 bytes, {len(original)} when saved "
                                 "(cut short)")
  open(data, "wb").write(original)
  assert wd.verify(step_dir) is None
  os.remove(os.path.join(step_dir, "default", "_METADATA"))
  assert wd.verify(step_dir) == "default/_METADATA is missing"
  open(path, "w").close()
  assert "checksum manifest sha256_manifest.json is unreadable" in wd.verify(step_dir)


def test_quarantine_moves_never_deletes(tmp_path):
  step_dir = _step_dir(tmp_path)
  directory = os.path.dirname(step_dir)
  first = wd.quarantine(directory, 7)
  assert first == os.path.join(directory, "corrupt-7") and os.listdir(first)
  os.makedirs(os.path.join(directory, "7"))
  assert wd.quarantine(directory, 7) == os.path.join(directory, "corrupt-7-1")
  assert wd.checkpoint_steps(directory) == []


def test_one_line_keeps_errors_short():
  e = ValueError("DATA_LOSS: Error opening\n  'zarr' driver:" + " x" * 400)
  line = wd.one_line(e)
  assert line.startswith("ValueError: DATA_LOSS: Error opening 'zarr' driver:")
  assert "\n" not in line and len(line) <= 320 and line.endswith("...")
