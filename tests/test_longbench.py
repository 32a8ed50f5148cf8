"""LongBench-style loader, prompts, truncation and scoring, on a small JSONL in tmp_path."""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only; never the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from edgeinfinite_jax.eval import longbench as LB

RECORDS = [
    {"context": "Alice lives in Paris. Bob lives in Rome.", "input": "Where does Alice live?",
     "answers": ["Paris"], "length": 12, "all_classes": None, "_id": "a"},
    {"context": "The sky is blue.", "input": "What colour is the sky?", "answers": ["blue", "light blue"],
     "length": 5000, "all_classes": None, "_id": "b"},
    {"context": "x " * 50, "input": "Count?", "answers": ["two"], "length": 9000, "all_classes": None,
     "_id": "c"},
]


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


class _Bytes:
  bos_id = 257

  def encode(self, text, add_bos=True):
    return ([self.bos_id] if add_bos else []) + list(text.encode())


def test_load_jsonl_and_missing_fields(tmp_path):
  recs = LB.load_jsonl(_write(tmp_path / "qa.jsonl", RECORDS), cache_dir=str(tmp_path / "cache"))
  assert [r["_id"] for r in recs] == ["a", "b", "c"]
  assert recs[1]["answers"] == ["blue", "light blue"] and recs[0]["length"] == 12
  minimal = LB.load_jsonl(_write(tmp_path / "min.jsonl", [{"context": "c", "input": "i", "answers": ["a"]}]),
                          cache_dir=str(tmp_path / "cache"))
  assert minimal[0]["all_classes"] is None and minimal[0]["_id"] is None
  broken = [RECORDS[0], {k: v for k, v in RECORDS[1].items() if k != "answers"}]
  with pytest.raises(ValueError, match=r"record 1: missing required field 'answers'"):
    LB.load_jsonl(_write(tmp_path / "broken.jsonl", broken), cache_dir=str(tmp_path / "cache"))
  with pytest.raises(ValueError, match=r"record 0: missing required field 'input'"):
    LB.validate_record({"context": "c", "answers": ["a"]}, 0)
  with pytest.raises(ValueError, match=r"record 2: field 'answers' must be a non-empty list"):
    LB.validate_record({"context": "c", "input": "i", "answers": "a"}, 2)
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    LB.load_jsonl(tmp_path / "nope.jsonl")


def test_prompt_and_middle_truncation():
  rec = LB.validate_record(RECORDS[0], 0)
  text = LB.format_prompt(rec, "Doc: {context}\nQ: {input}\nA:")
  assert text == "Doc: Alice lives in Paris. Bob lives in Rome.\nQ: Where does Alice live?\nA:"
  with pytest.raises(ValueError, match=r"record 4: template placeholder \{question\}"):
    LB.format_prompt(rec, "{context} {question}", index=4)
  assert LB.truncate_middle(list(range(10)), 6) == [0, 1, 2, 7, 8, 9]
  assert LB.truncate_middle(list(range(10)), 7) == [0, 1, 2, 7, 8, 9]  # odd budget: LongBench's 2 * (n // 2)
  assert LB.truncate_middle([1, 2, 3], 6) == [1, 2, 3]
  with pytest.raises(ValueError, match="max_tokens=1"):
    LB.truncate_middle([1, 2, 3], 1)
  long = dict(rec, context="filler " * 500)
  ids = LB.build_prompt(long, _Bytes(), max_tokens=200)
  full = _Bytes().encode(LB.format_prompt(long))
  assert len(ids) == 200 and ids[:100] == full[:100] and ids[100:] == full[-100:]
  assert bytes(ids[-30:]).decode().endswith("Where does Alice live?\nAnswer:")


def test_score_predictions():
  recs = [LB.validate_record(r, i) for i, r in enumerate(RECORDS)]
  # F1: "Paris" 1.0; "blue sky" vs "blue" 2/3 (P 1/2, R 1), vs "light blue" 1/2 -> best 2/3; "three" 0.
  preds = ["Paris", "blue sky", "three"]
  assert LB.sample_scores("narrativeqa", preds, recs) == pytest.approx([1.0, 2 / 3, 0.0])
  assert LB.score_predictions("narrativeqa", preds, recs) == round(100 * (1 + 2 / 3) / 3, 2) == 55.56
  assert LB.score_predictions("qasper_e", preds, recs) == 55.56  # LongBench-E name
  by_len = LB.score_by_length("hotpotqa", preds, recs)
  assert by_len == {"0-4k": 100.0, "4-8k": pytest.approx(66.67), "8k+": 0.0}
  # Few-shot sets score only the first line.
  assert LB.score_predictions("triviaqa", ["\nParis\nmore text", "blue", "two"], recs) == 100.0
  trec = [{"context": "", "input": "q", "answers": ["Person"], "all_classes": ["Person", "Location"]}]
  assert LB.score_predictions("trec", ["Person"], trec) == 100.0
  assert LB.score_predictions("gov_report", ["the cat sat on the mat"],
                              [{"context": "", "input": "", "answers": ["the cat was on the mat"]}]) == 80.0
  assert LB.score_predictions("passage_retrieval_en", ["Paragraph 3"],
                              [{"context": "", "input": "", "answers": ["Paragraph 3"]}]) == 100.0
  with pytest.raises(ValueError, match="2 predictions for 3 records"):
    LB.score_predictions("narrativeqa", preds[:2], recs)
  with pytest.raises(ValueError, match="jieba"):
    LB.score_predictions("dureader", preds, recs)
  with pytest.raises(ValueError, match="'mystery' has no LongBench metric"):
    LB.metric_for("mystery")
  assert math.isnan(LB.score_by_length("narrativeqa", preds[:1], recs[:1])["8k+"])
