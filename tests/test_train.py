"""The trainer on a tiny model: loss falls, determinism, exact resume, metrics, errors,
and the workdir contract (a changed config stops, ``fresh`` moves the old run aside,
a corrupted checkpoint is skipped for the one before it, one trainer per workdir).

One uninterrupted run and one "killed" run (stopped after step 25 with the last
checkpoint at 20) resumed by a fresh ``run`` call share a module fixture; the
workdir tests work on copies of the uninterrupted run's workdir.
"""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from edgeinfinite_jax.checkpoints import hf as convert
from edgeinfinite_jax import configs
from edgeinfinite_jax.train import optim, trainer as train
from edgeinfinite_jax.model import transformer as model_lib
from edgeinfinite_jax.train import workdir as workdir_lib
from edgeinfinite_jax.model.config import ConfigError, ModelConfig
from fast_compile import fast_compiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40


def tiny_config(**overrides):
  module = configs.load_module(os.path.join(ROOT, "experiments/configs/pretrain_tiny.py"))
  config = module.get_config("tiny")
  config.data.update(max_bytes=200_000, seq_len=64, batch_size=8)
  config.train.update(steps=STEPS, log_every=5, eval_every=0, eval_batches=1, progress=False)
  config.checkpoint.update(every=10, keep=2)
  return configs.apply_overrides(config, overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  with fast_compiles():
    full_dir = str(tmp_path_factory.mktemp("full"))
    killed_dir = str(tmp_path_factory.mktemp("killed"))
    full = train.run(tiny_config(), full_dir)
    killed = train.run(tiny_config(), killed_dir, stop_after=25)
    resumed = train.run(tiny_config(), killed_dir)
  return {"full": full, "killed": killed, "resumed": resumed,
          "full_dir": full_dir, "killed_dir": killed_dir}


@pytest.mark.slow
def test_loss_falls(runs):
  losses = runs["full"]["losses"]
  assert len(losses) == STEPS
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
  assert np.isfinite(runs["full"]["eval_loss"]) and runs["full"]["eval_ppl"] > 1


@pytest.mark.slow
def test_the_step_compiles_once_per_run(runs):
  """Fixed shapes: 40 steps (log, eval and checkpoint steps among them) trace the step
  function once; a resumed run traces it once more, in its own process state."""
  assert runs["full"]["step_compiles"] == 1
  assert runs["killed"]["step_compiles"] == 1 and runs["resumed"]["step_compiles"] == 1


@pytest.mark.slow
def test_same_seed_same_losses(runs):
  # the killed run is a second run of the same config from scratch
  assert runs["killed"]["losses"] == runs["full"]["losses"][:25]


@pytest.mark.slow
def test_resume_reaches_the_same_final_loss(runs):
  resumed = runs["resumed"]
  assert len(resumed["losses"]) == STEPS - 20  # restarted from the checkpoint at step 20
  assert resumed["losses"] == runs["full"]["losses"][20:]
  assert resumed["final_step"] == STEPS
  assert resumed["eval_loss"] == runs["full"]["eval_loss"]
  # metrics.jsonl as if never killed: steps 21-25, logged before the kill, appear once
  logged = [json.loads(l) for l in open(os.path.join(runs["killed_dir"], "metrics.jsonl"))]
  assert [l["step"] for l in logged if "loss" in l] == list(range(5, STEPS + 1, 5))
  full_state, resumed_state = runs["full"]["state"], resumed["state"]
  for a, b in zip(jax.tree.leaves(full_state), jax.tree.leaves(resumed_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_metrics_config_and_checkpoints_written(runs):
  workdir = runs["full_dir"]
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_lines = [l for l in lines if "loss" in l]
  assert [l["step"] for l in train_lines] == list(range(5, STEPS + 1, 5))
  assert {"loss", "grad_norm", "lr", "tokens_per_s"} <= set(train_lines[0])
  assert train_lines[-1]["loss"] == runs["full"]["losses"][-1]
  assert any("eval_loss" in l for l in lines)
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["train"]["steps"] == STEPS and saved["model"]["hidden_size"] == 32
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                 if d.isdigit())
  assert steps == [30, 40]  # keep=2 of every=10
  for step in steps:  # each with a checksum manifest that verifies
    step_dir = os.path.join(workdir, "checkpoints", str(step))
    manifest = json.load(open(os.path.join(step_dir, workdir_lib.MANIFEST)))
    assert any(f.endswith("_METADATA") for f in manifest["files"])
    assert workdir_lib.verify(step_dir) is None
  model = json.load(open(os.path.join(workdir, "model_config.json")))
  assert ModelConfig.from_dict(model) == configs.model_config(tiny_config())


@pytest.mark.parametrize("overrides, message", [
    ({"data.seq_len": 0}, "data.seq_len=0: must be a positive integer"),
    ({"optim.lr": -1.0}, "optim.lr=-1.0: must be > 0"),
    ({"model.num_kv_heads": 3}, "model.num_kv_heads=3: must divide num_heads=4"),
    ({"optim.trainable": "gate"}, "optim.trainable=.gate.: selects 0 trainable"),
])
def test_invalid_config_raises_before_compiling(tmp_path, overrides, message):
  workdir = str(tmp_path / "w")
  with pytest.raises(ConfigError, match=message):
    train.run(tiny_config(**overrides), workdir)
  # raised before the run wrote anything (and so before any compilation)
  assert not os.path.exists(workdir)


def test_loss_mask_selects_targets():
  logits = jax.random.normal(jax.random.key(0), (1, 4, 7))
  tokens = np.array([[1, 2, 3, 4]])
  total, count = train.cross_entropy(logits, tokens, np.array([[0, 0, 1, 1]]))
  logp = jax.nn.log_softmax(logits, -1)
  expect = -(logp[0, 1, 3] + logp[0, 2, 4])
  assert float(count) == 2 and float(total) == pytest.approx(float(expect), rel=1e-6)


@pytest.mark.slow
def test_non_finite_loss_raises_naming_the_step(tmp_path):
  config = tiny_config(**{"optim.lr": 1e30, "optim.warmup_steps": 0, "train.steps": 3,
                          "train.log_every": 3, "checkpoint.enabled": False})
  with fast_compiles(), pytest.raises(FloatingPointError,
                                      match=r"non-finite training value at step [23]"):
    train.run(config, str(tmp_path))


@pytest.mark.slow
def test_gate_finetune_from_hf_checkpoint(tmp_path):
  """init.hf_path + memory + "gate" preset: backbone loaded and frozen, gate trained."""
  base = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=2048)
  hf_params = model_lib.init_params(base, jax.random.key(5))
  convert.save_hf(base, hf_params, str(tmp_path / "hf"))
  config = tiny_config(**{
      "init.hf_path": str(tmp_path / "hf"), "optim.trainable": "gate",
      "optim.warmup_steps": 0, "model.memory.attention_type": "edgeinfinite",
      "model.memory.segment_len": 16, "model.memory.n_window": 16, "model.memory.n_sink": 2,
      "train.steps": 2, "train.log_every": 1, "checkpoint.enabled": False})
  with fast_compiles():
    out = train.run(config, str(tmp_path / "w"))
  new = dict(optim.flat_paths_and_leaves(out["state"].params))
  old = dict(optim.flat_paths_and_leaves(hf_params))
  gate = {p for p in new if "/memory_gate/" in p}
  assert len(gate) == 2 and set(new) == set(old) | gate
  for path, leaf in old.items():
    np.testing.assert_array_equal(np.asarray(new[path]), np.asarray(leaf), err_msg=path)
  for path in gate:  # started at gate_init_bias and moved
    assert not np.allclose(np.asarray(new[path]), -6.0), path
  n_state = sum(x.size for x in jax.tree.leaves(out["state"].opt_state) if x.ndim)
  assert n_state == 2 * 2 * 4  # Adam mu, nu: 2 layers x 4 heads


# ----------------------------------------------------------------------------- workdir contract


def _copy_of_full_run(runs, tmp_path) -> str:
  workdir = str(tmp_path / "copy")
  shutil.copytree(runs["full_dir"], workdir)
  return workdir


def _snapshot(workdir) -> dict:
  """Every file's bytes (the lock file aside: a trainer writes its PID there)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      if name != workdir_lib.LOCK:
        out[os.path.relpath(path, workdir)] = open(path, "rb").read()
  return out


def _checkpoint_dirs(workdir) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.mark.parametrize("overrides, lines", [
    ({"model.hidden_size": 64}, ["model.hidden_size: 32 -> 64"]),
    # the case: a short run without checkpoints over a finished one
    ({"checkpoint.enabled": False, "train.steps": 2},
     ["train.steps: 40 -> 2 (below the last checkpoint's step 40)"]),
    ({"optim.lr": 1e-3, "data.seq_len": 32, "train.log_every": 1},
     ["data.seq_len: 64 -> 32", "optim.lr: 0.003 -> 0.001"]),
])
@pytest.mark.slow
def test_changed_config_stops_before_touching_the_workdir(runs, tmp_path, overrides, lines):
  workdir = _copy_of_full_run(runs, tmp_path)
  before = _snapshot(workdir)
  with pytest.raises(workdir_lib.WorkdirError) as e:
    train.run(tiny_config(**overrides), workdir)
  message = str(e.value)
  listed = [l.strip() for l in message.splitlines() if ": " in l and " -> " in l]
  assert listed == lines, message
  assert "--config.train.fresh=True" in message and "previous" in message
  assert _snapshot(workdir) == before  # config.json, metrics.jsonl, checkpoints untouched


@pytest.mark.slow
def test_watching_keys_change_freely_and_more_steps_extend_the_run(runs, tmp_path):
  workdir = _copy_of_full_run(runs, tmp_path)
  metrics = open(os.path.join(workdir, "metrics.jsonl")).read()
  out = train.run(tiny_config(**{"train.log_every": 2, "train.eval_every": 10,
                                 "train.eval_batches": 2, "checkpoint.every": 5,
                                 "checkpoint.keep": 3, "checkpoint.enabled": False}), workdir)
  assert out["losses"] == [] and out["final_step"] == STEPS  # resumed: nothing left to do
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics
  with fast_compiles():
    out = train.run(tiny_config(**{"train.steps": STEPS + 5}), workdir)
  assert len(out["losses"]) == 5 and out["final_step"] == STEPS + 5
  logged = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [l["step"] for l in logged if "loss" in l] == list(range(5, STEPS + 6, 5))
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == STEPS + 5


@pytest.mark.slow
def test_fresh_moves_the_old_run_aside(runs, tmp_path):
  workdir = _copy_of_full_run(runs, tmp_path)
  old = _snapshot(workdir)
  config = tiny_config(**{"train.fresh": True, "train.steps": 3, "train.log_every": 1,
                          "checkpoint.every": 3, "optim.lr": 1e-3})
  with fast_compiles():
    out = train.run(config, workdir)
  assert out["final_step"] == 3 and len(out["losses"]) == 3
  [previous] = glob.glob(os.path.join(workdir, "previous", "*"))
  moved = _snapshot(previous)  # the whole old run, byte for byte
  assert moved == {k: v for k, v in old.items() if not k.startswith("previous")}
  assert [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))] == [
      1, 2, 3, 3]  # three losses, then the final eval
  assert _checkpoint_dirs(workdir) == ["3"]
  assert json.load(open(os.path.join(workdir, "config.json")))["optim"]["lr"] == 1e-3


def _largest_data_file(step_dir) -> str:
  files = glob.glob(os.path.join(step_dir, "default", "ocdbt.process_0", "d", "*"))
  return max(files, key=os.path.getsize)


def _flip_middle(path, n=4096):
  size = os.path.getsize(path)
  n = min(n, size // 2)
  with open(path, "r+b") as f:
    f.seek(size // 2 - n // 2)
    data = f.read(n)
    f.seek(size // 2 - n // 2)
    f.write(bytes(b ^ 0xFF for b in data))
  assert os.path.getsize(path) == size


def _corrupt(step_dir, how):
  if how == "flip":
    _flip_middle(_largest_data_file(step_dir))
  elif how == "truncate":
    path = _largest_data_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)
  elif how == "delete_metadata":
    os.remove(os.path.join(step_dir, "default", "_METADATA"))
  elif how == "delete_metadata_no_manifest":  # as saved before manifests: orbax's error
    os.remove(os.path.join(step_dir, workdir_lib.MANIFEST))
    os.remove(os.path.join(step_dir, "default", "_METADATA"))
  else:
    raise ValueError(how)


@pytest.mark.parametrize("how, reason", [
    ("flip", "changed since it was saved (sha256 mismatch"),
    ("truncate", "when saved (cut short)"),
    ("delete_metadata", "default/_METADATA is missing"),
    ("delete_metadata_no_manifest", "orbax cannot restore it"),
])
@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_one_before(runs, tmp_path, capsys, how,
                                                               reason):
  workdir = _copy_of_full_run(runs, tmp_path)
  latest = os.path.join(workdir, "checkpoints", "40")
  _corrupt(latest, how)
  with fast_compiles():
    out = train.run(tiny_config(), workdir)
  err = capsys.readouterr().err
  warning = [l for l in err.splitlines() if l.startswith("warning: checkpoint")]
  assert len(warning) == 1 and f"{latest} is bad: " in warning[0] and reason in warning[0], err
  # resumed from step 30: the same losses as the uninterrupted run from there
  assert out["losses"] == runs["full"]["losses"][30:]
  for a, b in zip(jax.tree.leaves(runs["full"]["state"]), jax.tree.leaves(out["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the bad one is kept aside, the new step 40 is whole
  assert _checkpoint_dirs(workdir) == ["30", "40", "corrupt-40"]
  assert workdir_lib.verify(latest) is None and workdir_lib.has_manifest(latest)


@pytest.mark.slow
def test_no_intact_checkpoint_stops_and_keeps_everything(runs, tmp_path):
  workdir = _copy_of_full_run(runs, tmp_path)
  for step in (30, 40):
    _corrupt(os.path.join(workdir, "checkpoints", str(step)), "flip")
  metrics = open(os.path.join(workdir, "metrics.jsonl")).read()
  with pytest.raises(workdir_lib.CheckpointError,
                     match=r"no intact checkpoint in .*never deleted(.|\n)*step 40: .*sha256 "
                           r"mismatch(.|\n)*step 30: "):
    train.run(tiny_config(), workdir)
  assert _checkpoint_dirs(workdir) == ["corrupt-30", "corrupt-40"]  # never from scratch
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics


def test_second_trainer_in_a_workdir_is_refused(tmp_path):
  workdir = str(tmp_path / "w")
  with workdir_lib.Lock(workdir, "another trainer"):
    with pytest.raises(workdir_lib.WorkdirError,
                       match=rf"is locked by PID {os.getpid()} \(another trainer on "):
      train.run(tiny_config(), workdir)
  assert os.listdir(workdir) == [workdir_lib.LOCK]


def test_no_mask_counts_every_target_even_the_byte_pad_id():
  """Without a loss_mask every target counts: id 256 is a real token in a real vocabulary."""
  logits = jax.random.normal(jax.random.key(1), (1, 4, 300))
  tokens = np.array([[256, 256, 7, 256]])
  total, count = train.cross_entropy(logits, tokens)
  logp = jax.nn.log_softmax(logits, -1)
  expect = -(logp[0, 0, 256] + logp[0, 1, 7] + logp[0, 2, 256])
  assert float(count) == 3 and float(total) == pytest.approx(float(expect), rel=1e-6)
