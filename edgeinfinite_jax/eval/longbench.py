"""LongBench-style evaluation from local JSON-lines files: load, prompt, truncate, score.

Records follow the LongBench format: ``context``, ``input``, ``answers`` (list
of str), optionally ``length``, ``all_classes``, ``_id``. Files are read with
``datasets.load_dataset("json", data_files=...)``; nothing is fetched from the
hub, the caller brings the files.

Scoring follows LongBench's ``eval.py``: per-dataset metric, best over the
reference answers, the first line of the prediction only for the few-shot sets,
mean x 100 rounded to 2 decimals. Chinese sets that LongBench scores through
``jieba`` word segmentation (multifieldqa_zh, dureader, vcsum) are refused
rather than scored differently.
"""

from __future__ import annotations

import math
import os
import string
from typing import Any, Callable, Mapping, Sequence

from edgeinfinite_jax.eval import metrics

Metric = Callable[..., float]

# LongBench eval.py's dataset2metric (English, code and segmentation-free Chinese sets).
DATASET_METRICS: dict[str, Metric] = {
    "narrativeqa": metrics.f1,
    "qasper": metrics.f1,
    "multifieldqa_en": metrics.f1,
    "hotpotqa": metrics.f1,
    "2wikimqa": metrics.f1,
    "musique": metrics.f1,
    "triviaqa": metrics.f1,
    "gov_report": metrics.rouge_l_longbench,
    "qmsum": metrics.rouge_l_longbench,
    "multi_news": metrics.rouge_l_longbench,
    "samsum": metrics.rouge_l_longbench,
    "trec": metrics.classification_score,
    "lsht": metrics.classification_score,
    "passage_retrieval_en": metrics.retrieval_score,
    "passage_retrieval_zh": metrics.retrieval_zh_score,
    "passage_count": metrics.count_score,
    "lcc": metrics.code_sim_score,
    "repobench-p": metrics.code_sim_score,
}
NEEDS_JIEBA = frozenset({"multifieldqa_zh", "dureader", "vcsum"})
# Few-shot sets: the model tends to continue with more examples, so only the first line counts.
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
REQUIRED_FIELDS = ("context", "input", "answers")
DEFAULT_TEMPLATE = ("Read the text below and answer the question.\n\n{context}\n\n"
                    "Question: {input}\nAnswer:")


def metric_for(dataset: str) -> Metric:
  """The metric LongBench uses for ``dataset`` (a LongBench-E name ``x_e`` maps to ``x``)."""
  name = dataset[:-2] if dataset.endswith("_e") and dataset[:-2] in DATASET_METRICS else dataset
  if name in NEEDS_JIEBA:
    raise ValueError(f"dataset {dataset!r}: LongBench scores it on jieba word segmentation, which this "
                     "package does not reproduce; score it with LongBench's own eval.py")
  if name not in DATASET_METRICS:
    raise ValueError(f"dataset {dataset!r} has no LongBench metric; known: {sorted(DATASET_METRICS)}")
  return DATASET_METRICS[name]


def validate_record(record: Mapping[str, Any], index: int) -> dict[str, Any]:
  """Checks one record and returns it as a plain dict with the optional fields filled (None)."""
  if not isinstance(record, Mapping):
    raise ValueError(f"record {index}: expected a JSON object, got {type(record).__name__}")
  for field in REQUIRED_FIELDS:
    if record.get(field) is None:  # json loading turns a key absent from one line into None
      raise ValueError(f"record {index}: missing required field {field!r} (has: {sorted(record)})")
  for field in ("context", "input"):
    if not isinstance(record[field], str):
      raise ValueError(f"record {index}: field {field!r} must be a string, got {type(record[field]).__name__}")
  answers = record["answers"]
  if isinstance(answers, str) or not isinstance(answers, Sequence) or len(answers) == 0 \
      or not all(isinstance(a, str) for a in answers):
    raise ValueError(f"record {index}: field 'answers' must be a non-empty list of strings, got {answers!r:.80}")
  out = dict(record)
  out["answers"] = list(answers)
  for field in ("length", "all_classes", "_id"):
    out.setdefault(field, None)
  return out


def load_jsonl(data_files: str | os.PathLike | Sequence[str | os.PathLike],
               cache_dir: str | None = None) -> list[dict[str, Any]]:
  """Reads LongBench-style JSON-lines file(s) through ``datasets`` and validates every record."""
  import datasets  # heavy import, only when loading

  files = [os.fspath(data_files)] if isinstance(data_files, (str, os.PathLike)) else [os.fspath(f) for f in data_files]
  for f in files:
    if not os.path.isfile(f):
      raise FileNotFoundError(f"LongBench data file {f!r} does not exist")
  ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache_dir)
  return [validate_record(r, i) for i, r in enumerate(ds)]


def format_prompt(record: Mapping[str, Any], template: str = DEFAULT_TEMPLATE, index: int = 0) -> str:
  """Fills ``template`` from the record's fields (``{context}``, ``{input}``, any other field)."""
  names = {f for _, f, _, _ in string.Formatter().parse(template) if f}
  for name in sorted(names):
    if name not in record or record[name] is None:
      raise ValueError(f"record {index}: template placeholder {{{name}}} is not a field of the record "
                       f"(fields: {sorted(record)})")
  return template.format_map(record)


def truncate_middle(ids: Sequence[int], max_tokens: int) -> list[int]:
  """LongBench truncation: if too long, keep the first and last ``max_tokens // 2`` tokens.

  The middle of a long prompt is the middle of its context, while the
  instruction (head) and the question (tail) survive. Like LongBench, an odd
  budget gives ``max_tokens - 1`` tokens.
  """
  if not isinstance(max_tokens, int) or max_tokens < 2:
    raise ValueError(f"truncate_middle: max_tokens={max_tokens!r} must be an int >= 2 (a head and a tail)")
  ids = list(ids)
  if len(ids) <= max_tokens:
    return ids
  half = max_tokens // 2
  return ids[:half] + ids[-half:]


def build_prompt(record: Mapping[str, Any], tokenizer, max_tokens: int, template: str = DEFAULT_TEMPLATE,
                 index: int = 0, add_bos: bool = True) -> list[int]:
  """Formatted prompt as token ids, middle-truncated to ``max_tokens``.

  LongBench decodes the kept halves and re-encodes the text; the ids are kept
  here instead, so the two halves are exactly what the budget allows.
  """
  ids = tokenizer.encode(format_prompt(record, template, index), add_bos=add_bos)
  return truncate_middle(ids, max_tokens)


def _check_pairs(dataset: str, preds: Sequence[str], records: Sequence[Mapping[str, Any]]) -> None:
  if len(preds) != len(records):
    raise ValueError(f"{dataset}: {len(preds)} predictions for {len(records)} records; need one each")
  if len(preds) == 0:
    raise ValueError(f"{dataset}: no predictions to score")


def sample_scores(dataset: str, preds: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[float]:
  """Per-record scores in [0, 1]: best over ``answers``, as LongBench's ``scorer``."""
  metric = metric_for(dataset)
  _check_pairs(dataset, preds, records)
  name = dataset[:-2] if dataset.endswith("_e") else dataset
  out = []
  for i, (pred, rec) in enumerate(zip(preds, records)):
    rec = validate_record(rec, i)
    if not isinstance(pred, str):
      raise ValueError(f"{dataset}: prediction {i} is a {type(pred).__name__}, not a str")
    if name in FIRST_LINE_DATASETS:
      pred = pred.lstrip("\n").split("\n")[0]
    out.append(metrics.best_over_answers(pred, rec["answers"], metric, all_classes=rec["all_classes"]))
  return out


def score_predictions(dataset: str, preds: Sequence[str], records: Sequence[Mapping[str, Any]]) -> float:
  """LongBench's dataset score: 100 x mean per-record score, rounded to 2 decimals."""
  scores = sample_scores(dataset, preds, records)
  return round(100 * sum(scores) / len(scores), 2)


def score_by_length(dataset: str, preds: Sequence[str], records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """LongBench-E buckets by the ``length`` field: "0-4k", "4-8k", "8k+" (NaN when a bucket is empty)."""
  scores = sample_scores(dataset, preds, records)
  buckets: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
  for i, (s, rec) in enumerate(zip(scores, records)):
    length = rec.get("length")
    if length is None:
      raise ValueError(f"{dataset}: record {i} has no 'length' field, needed for length buckets")
    buckets["0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"].append(s)
  return {k: round(100 * sum(v) / len(v), 2) if v else math.nan for k, v in buckets.items()}
