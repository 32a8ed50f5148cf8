"""The embedded corpus, packing, datasets-based local files, batches, config errors."""

import json
import re

import numpy as np
import pytest

from edgeinfinite_jax.data import corpus as data
from edgeinfinite_jax import configs
from edgeinfinite_jax.model.config import ConfigError
from edgeinfinite_jax.checkpoints.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _data_config(**kw):
  c = configs.base_config().data
  c.update(seq_len=64, batch_size=4, max_bytes=200_000)
  c.update(**kw)
  return c


def test_corpus_is_real_english_text():
  train, held = data.embedded_documents(200_000, 0.05)
  assert train and held
  text = "\n".join(train)
  assert 190_000 * 0.9 < len(text.encode()) <= 200_000
  words = re.findall(r"[a-z]+", text.lower())
  common = sum(w in {"the", "a", "of", "to", "and", "is", "in"} for w in words)
  assert common / len(words) > 0.1  # English function words are ~20% of prose
  letters = sum(ch.isalpha() or ch.isspace() for ch in text)
  assert letters / len(text) > 0.8


def test_corpus_and_packing_are_deterministic():
  a = data.load(_data_config())
  data._embedded.cache_clear()
  b = data.load(_data_config())
  np.testing.assert_array_equal(a.train, b.train)
  np.testing.assert_array_equal(a.heldout, b.heldout)
  assert a.train.dtype == np.int32 and a.train.shape[1] == 64 and len(a.heldout) > 0
  assert a.train[0, 0] == TOK.bos_id and a.train.max() <= TOK.eos_id
  # held-out files never appear in training (split by file hash)
  train_docs, held_docs = data.embedded_documents(200_000, 0.05)
  assert not set(train_docs) & set(held_docs)


def test_pack_shape():
  rows = data.pack(["hello world", "abc"], 5, TOK)
  flat = [TOK.bos_id, *b"hello world", TOK.eos_id, TOK.bos_id, *b"abc", TOK.eos_id]
  assert rows.shape == (len(flat) // 5, 5) and rows.dtype == np.int32
  np.testing.assert_array_equal(rows.reshape(-1), flat[:rows.size])


def test_batches_are_a_function_of_seed_and_step():
  rows = np.arange(10 * 3, dtype=np.int32).reshape(10, 3)
  b1 = data.batch_at(rows, 7, 4, seed=1)["tokens"]
  np.testing.assert_array_equal(b1, data.batch_at(rows, 7, 4, seed=1)["tokens"])
  assert not np.array_equal(b1, data.batch_at(rows, 7, 4, seed=2)["tokens"])
  # steps 0..4 with batch 4 cover two epochs of 10 rows: each row exactly twice
  seen = np.concatenate([data.batch_rows(10, s, 4, seed=1) for s in range(5)])
  assert sorted(np.bincount(seen).tolist()) == [2] * 10
  it = data.iterate(rows, 4, seed=1, start_step=7)
  step, batch = next(it)
  assert step == 7 and np.array_equal(batch["tokens"], b1)
  host = data.batch_at(rows, 7, 4, seed=1, shard=slice(2, 4))["tokens"]
  np.testing.assert_array_equal(host, b1[2:4])


def test_local_jsonl_and_text_via_datasets(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
  docs = [f"Document number {i} talks about the weather and the sea." for i in range(40)]
  jsonl = tmp_path / "d.jsonl"
  jsonl.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)))
  split = data.load(_data_config(source="json", path=str(jsonl), text_field="body", seq_len=32,
                                 heldout_fraction=0.2))
  assert split.train.shape[1] == 32 and len(split.train) > 0
  text = TOK.decode(split.train.reshape(-1))
  assert "Document number" in text and "weather" in text
  txt = tmp_path / "d.txt"
  txt.write_text("\n".join(docs))
  split = data.load(_data_config(source="text", path=str(tmp_path / "*.txt"), seq_len=32))
  assert "the sea." in TOK.decode(split.train.reshape(-1))
  with pytest.raises(ConfigError, match="data.text_field='nope': no such column"):
    data.load(_data_config(source="json", path=str(jsonl), text_field="nope"))


@pytest.mark.parametrize("changes, message", [
    ({"seq_len": 0}, "data.seq_len=0: must be a positive integer"),
    ({"batch_size": -1}, "data.batch_size=-1: must be a positive integer"),
    ({"source": "csv"}, "data.source='csv': must be one of"),
    ({"source": "json", "path": "/no/such/file.jsonl"}, "matches no file"),
    ({"source": "text", "path": ""}, "data.path='': must name the text file"),
    ({"heldout_fraction": 1.5}, r"data.heldout_fraction=1.5: must be in \[0, 1\)"),
])
def test_bad_config_errors(changes, message):
  with pytest.raises(ConfigError, match=message):
    data.validate(_data_config(**changes))


def test_batch_divisibility():
  with pytest.raises(ConfigError, match="data.batch_size=6: must be divisible by .* 4"):
    data.validate(_data_config(batch_size=6), n_batch_shards=4)


def test_too_small_corpus_errors():
  with pytest.raises(ConfigError, match="no training row"):
    data.load(_data_config(max_bytes=10, seq_len=64))


def test_embedded_source_form_keeps_the_code_and_the_same_split():
  prose_train, _ = data.embedded_paths(300_000, 0.25)
  src_train, src_held = data.embedded_paths(300_000, 0.25, form="source")
  assert not set(src_train) & set(src_held)
  assert all(data.is_heldout(p, 0.25) for p in src_held)
  code = "\n".join(data.embedded_documents(300_000, 0.25, form="source")[0])
  assert re.search(r"^(def|class|import) ", code, re.M)  # whole files, not their docstrings
  assert not re.search(r"^(def|class|import) ", "\n".join(
      data.embedded_documents(300_000, 0.25)[0]), re.M)
  assert prose_train[0] == src_train[0]  # the same files, in the same order


def test_text_mix_replaces_a_share_of_the_task_rows_by_corpus_text():
  c = _data_config(source="task", seq_len=256, tasks="passkey", task_samples=20,
                   heldout_fraction=0.1, text_mix=0.25, embedded_form="source")
  split = data.load(c, TOK)
  full = split.train.loss_mask.sum(1) == split.train.shape[1]
  assert full.sum() == 5  # the text rows: loss on every token
  assert (split.train.loss_mask[~full].sum(1) < 20).all()  # task rows: the answer only
  text_rows = data.pack(data.embedded_documents(200_000, 0.1, form="source")[0], 256, TOK)
  got = {bytes(r) for r in split.train.tokens[full]}
  assert got <= {bytes(r) for r in text_rows}
  again = data.load(c, TOK)
  np.testing.assert_array_equal(split.train.tokens, again.train.tokens)


@pytest.mark.parametrize("kw, match", [
    (dict(source="task", text_mix=1.0), r"data.text_mix=1.0: must be a number in \[0, 1\)"),
    (dict(source="task", text_mix=-0.1), r"data.text_mix=-0.1"),
    (dict(text_mix=0.5), r"mixes text into data.source='task' only"),
    (dict(embedded_form="code"), r"data.embedded_form='code': must be one of"),
])
def test_text_mix_and_form_errors_name_the_value(kw, match):
  with pytest.raises(ConfigError, match=match):
    data.validate(_data_config(**kw))
