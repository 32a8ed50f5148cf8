"""Passkey evaluation: oracle 100%, constant ~0, key outside the local reach, the task data source."""

import jax
import numpy as np
import pytest

from edgeinfinite_jax import Engine, Scenario, with_memory
from edgeinfinite_jax.data import corpus as data, tasks
from edgeinfinite_jax.eval import passkey as evaluate
from edgeinfinite_jax import configs
from edgeinfinite_jax.model import transformer as model
from edgeinfinite_jax.model.config import ConfigError, ModelConfig
from edgeinfinite_jax.checkpoints.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
LENGTHS, DEPTHS = [600, 1200], [0.0, 0.5]
REACH = evaluate.local_reach(64, 64)


def test_oracle_scores_100_and_constant_scores_about_0():
  oracle = evaluate.passkey_grid(evaluate.oracle_predictor(TOK), TOK, LENGTHS, DEPTHS, 6,
                                 reach=REACH, batch_size=4, progress=False)
  assert oracle["mean"] == 1.0 and np.all(np.asarray(oracle["accuracy"]) == 1.0)
  const = evaluate.passkey_grid(evaluate.constant_predictor("12345"), TOK, LENGTHS, DEPTHS, 6,
                                reach=REACH, batch_size=4, progress=False)
  assert const["mean"] <= 0.05
  assert np.asarray(const["accuracy"]).shape == (len(LENGTHS), len(DEPTHS))


def test_every_key_lies_outside_window_and_segment():
  for n in LENGTHS:
    for d in DEPTHS:
      for s in evaluate.passkey_cell(TOK, n, d, 4, 1234, reach=REACH):
        assert tasks.key_distance(s) > REACH
        assert s.prompt_len - s.key_end > 64 + 64
  # a key at the end of a short prompt would be visible to local attention: refused
  with pytest.raises(ValueError, match="inside the local reach"):
    evaluate.passkey_cell(TOK, 600, 1.0, 2, 1234, reach=REACH)


def test_every_cell_draws_its_own_keys():
  g = evaluate.passkey_grid(evaluate.oracle_predictor(TOK), TOK, LENGTHS, DEPTHS, 1,
                            reach=REACH, progress=False)
  keys = [answer for answer, _ in g["examples"].values()]
  assert len(set(keys)) == len(keys) == len(LENGTHS) * len(DEPTHS)
  assert g["mean"] == 1.0


def test_cells_share_one_prompt_length():
  samples = evaluate.passkey_cell(TOK, 1200, 0.5, 5, 7)
  assert len({s.prompt_len for s in samples}) == 1
  assert len({s.answer for s in samples}) > 1  # but different keys


@pytest.mark.slow
def test_engine_predictor_runs_the_fixed_shape_engine():
  base = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                     num_kv_heads=1)
  cfg, params = with_memory(base, model.init_params(base, jax.random.key(0)),
                            rng=jax.random.key(1), segment_len=64, n_window=64, n_sink=4)
  engine = Engine(cfg, params, Scenario(segment_len=64, n_sink=4, n_window=64, batch_size=2,
                                        max_new_tokens=7, short_threshold=0))
  plain = evaluate.engine_predictor(engine, TOK, 7)
  g = evaluate.passkey_grid(plain, TOK, [600, 1200], [0.0], 2, reach=REACH, batch_size=2,
                            progress=False)
  assert 0.0 <= g["mean"] <= 1.0  # an untrained model: any score, but it ran
  assert engine.compile_count() == 2  # one prefill + one decode, whatever the length
  # The timed predictor (prefill of all but the last token, generate continues from that
  # state) answers exactly as one generate does, and compiles nothing more.
  timings = {}
  timed = evaluate.engine_predictor(engine, TOK, 7, timings)
  t = evaluate.passkey_grid(timed, TOK, [600, 1200], [0.0], 2, reach=REACH, batch_size=2,
                            progress=False)
  assert t["examples"] == g["examples"] and t["accuracy"] == g["accuracy"]
  assert engine.compile_count() == 2
  cost = evaluate.cost_curve(timings, engine, [600, 1200])
  assert cost["lengths"] == [600, 1200] and cost["prompts"] == [1, 1]
  assert cost["state_bytes"][0] == cost["state_bytes"][1] > 0
  assert all(t > 0 for t in cost["ttft_s"])
  with pytest.raises(ValueError, match="longer than every length"):
    evaluate.cost_curve(timings, engine, [600])


def _task_data_config(**kw):
  c = configs.base_config().data
  c.update(source="task", seq_len=400, batch_size=2, task_samples=6, tasks="passkey:2,kv_recall:1",
           heldout_fraction=0.34)
  c.update(**kw)
  return c


def test_task_source_masks_cover_answers_only():
  c = _task_data_config()
  split = data.load(c)
  assert isinstance(split.train, data.MaskedRows) and split.train.tokens.shape == (6, 400)
  samples = data.task_samples(c, TOK, 6, 0)
  for i, s in enumerate(samples):
    row, mask = split.train.tokens[i], split.train.loss_mask[i]
    np.testing.assert_array_equal(row[:s.length], s.tokens)
    assert np.all(row[s.length:] == TOK.pad_id)
    assert mask.sum() == s.length - s.prompt_len  # the answer (and its EOS) only
    assert np.all(mask[:s.prompt_len] == 0) and np.all(mask[s.prompt_len:s.length] == 1)
    assert TOK.decode(row[mask == 1]).strip() == s.answer
  batch = data.batch_at(split.train, 3, 2, seed=0)
  assert set(batch) == {"tokens", "loss_mask"} and batch["loss_mask"].shape == (2, 400)
  held = data.eval_batches(split.heldout, 2, 1)
  assert len(held) == 1 and set(held[0]) == {"tokens", "loss_mask"}


def test_task_mix_into_text_rows_keeps_text_loss_everywhere():
  c = configs.base_config().data
  c.update(seq_len=400, batch_size=2, max_bytes=100_000, task_mix=0.25)
  split = data.load(c)
  assert isinstance(split.train, data.MaskedRows)
  text = TOK.decode(split.train.tokens.reshape(-1))
  assert text.count("What is the pass key?") == int(round(len(split.train.tokens) * 0.25))
  assert np.all(split.train.loss_mask[split.train.tokens != TOK.pad_id] == 1)


def test_task_max_depth_caps_where_the_needle_sits():
  capped = data.task_samples(_task_data_config(tasks="passkey", task_max_depth=0.3), TOK, 24, 0)
  free = data.task_samples(_task_data_config(tasks="passkey"), TOK, 24, 0)
  assert max(s.meta["realized_depth"] for s in capped) <= 0.3 + 1e-9
  assert max(s.meta["realized_depth"] for s in free) > 0.5  # uncapped: the whole range
  # The cap scales each sample's draw, so a capped key lies further from the question.
  assert min(tasks.key_distance(s) for s in capped) > min(
      tasks.key_distance(s) for s in free)


@pytest.mark.parametrize("kw, message", [
    ({"tasks": "passkey,nope"}, "unknown task 'nope'"),
    ({"task_length": 999}, r"data.task_length=999"),
    ({"task_samples": 0}, r"data.task_samples=0"),
    ({"task_max_depth": 0.0}, r"data.task_max_depth=0.0"),
    ({"task_max_depth": 1.5}, r"data.task_max_depth=1.5"),
])
def test_task_source_config_errors(kw, message):
  with pytest.raises(ConfigError, match=message):
    data.load(_task_data_config(**kw))
