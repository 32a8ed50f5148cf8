"""The trainer on a tiny model: loss falls, determinism, exact resume, metrics, errors.

One uninterrupted run and one "killed" run (stopped after step 25 with the last
checkpoint at 20) resumed by a fresh ``run`` call share a module fixture, so the
whole file compiles the step three times.
"""

import json
import os

import jax
import numpy as np
import pytest

from edgeinfinite_jax import convert, experiment, optim, train
from edgeinfinite_jax import model as model_lib
from edgeinfinite_jax.config import ConfigError, ModelConfig
from fast_compile import fast_compiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40


def tiny_config(**overrides):
  module = experiment.load_module(os.path.join(ROOT, "experiments/configs/pretrain_tiny.py"))
  config = module.get_config("tiny")
  config.data.update(max_bytes=200_000, seq_len=64, batch_size=8)
  config.train.update(steps=STEPS, log_every=5, eval_every=0, eval_batches=1, progress=False)
  config.checkpoint.update(every=10, keep=2)
  return experiment.apply_overrides(config, overrides)


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


def test_loss_falls(runs):
  losses = runs["full"]["losses"]
  assert len(losses) == STEPS
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
  assert np.isfinite(runs["full"]["eval_loss"]) and runs["full"]["eval_ppl"] > 1


def test_same_seed_same_losses(runs):
  # the killed run is a second run of the same config from scratch
  assert runs["killed"]["losses"] == runs["full"]["losses"][:25]


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


def test_non_finite_loss_raises_naming_the_step(tmp_path):
  config = tiny_config(**{"optim.lr": 1e30, "optim.warmup_steps": 0, "train.steps": 3,
                          "train.log_every": 3, "checkpoint.enabled": False})
  with fast_compiles(), pytest.raises(FloatingPointError,
                                      match=r"non-finite training value at step [23]"):
    train.run(config, str(tmp_path))


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
