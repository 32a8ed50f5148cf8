"""Answer metrics, computed the way LongBench computes them.

LongBench (THUDM/LongBench ``metrics.py``) scores with its own normalisation
plus three packages: ``rouge`` 1.0.1 (ROUGE-L), ``fuzzywuzzy`` (code
similarity) and ``jieba`` (Chinese). ROUGE-L is re-implemented here to give the
same numbers; code similarity is ``rapidfuzz.fuzz.ratio``, the maintained
equivalent of fuzzywuzzy's ratio with python-Levenshtein (the InDel similarity
100 * (1 - distance / (len(a) + len(b)))), rounded to an int as fuzzywuzzy
rounds it; Chinese word segmentation is not reproduced (see ``longbench.py``).

Every metric takes ``(prediction, ground_truth, **kwargs)`` and returns a float
in [0, 1], so any of them can go to ``best_over_answers``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Sequence

from rapidfuzz import fuzz

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
  """SQuAD / LongBench normalisation: lowercase, drop punctuation, drop articles, squeeze spaces."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
  return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, ground_truth: str, normalize: bool = True, **_) -> float:
  """1.0 if the strings are equal (after ``normalize_answer`` unless ``normalize=False``)."""
  if normalize:
    prediction, ground_truth = normalize_answer(prediction), normalize_answer(ground_truth)
  return float(prediction == ground_truth)


def token_f1(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
  """Bag-of-tokens F1 (multiset overlap); 0 when nothing overlaps (LongBench ``f1_score``)."""
  common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision = same / len(prediction_tokens)
  recall = same / len(ground_truth_tokens)
  return 2 * precision * recall / (precision + recall)


def f1(prediction: str, ground_truth: str, **_) -> float:
  """QA token F1 on normalised whitespace tokens (LongBench ``qa_f1_score``)."""
  return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _lcs_len(x: Sequence[str], y: Sequence[str]) -> int:
  # One rolling row: summaries are hundreds of words, a full table is not needed.
  if len(x) < len(y):
    x, y = y, x
  prev = [0] * (len(y) + 1)
  for xi in x:
    cur = [0]
    for j, yj in enumerate(y):
      cur.append(prev[j] + 1 if xi == yj else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l(prediction: str, ground_truth: str, normalize: bool = False, **_) -> float:
  """Sentence-level ROUGE-L F1: LCS over whitespace tokens, P = LCS/|pred|, R = LCS/|ref|.

  The textbook definition (beta = 1). LongBench's own number comes from the
  ``rouge`` package, which differs (see ``rouge_l_longbench``); use that one to
  compare with LongBench tables.
  """
  if normalize:
    prediction, ground_truth = normalize_answer(prediction), normalize_answer(ground_truth)
  p, r = prediction.split(), ground_truth.split()
  if not p or not r:
    return 0.0
  lcs = _lcs_len(p, r)
  if lcs == 0:
    return 0.0
  precision, recall = lcs / len(p), lcs / len(r)
  return 2 * precision * recall / (precision + recall)


def _rouge_sentences(text: str) -> list[str]:
  # rouge 1.0.1 splits on "." and keeps every non-empty piece; a whitespace-only
  # piece becomes "" and later the word "" (reproduced on purpose).
  return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
  """Words of one LCS of x and y, traced back exactly as rouge 1.0.1's ``_recon_lcs`` does.

  Which LCS is traced matters because the package counts distinct words; the
  tie rule (step in y unless stepping in x keeps a strictly longer LCS) is its.
  """
  n, m = len(x), len(y)
  table = [[0] * (m + 1) for _ in range(n + 1)]
  for i in range(1, n + 1):
    row, up = table[i], table[i - 1]
    for j in range(1, m + 1):
      row[j] = up[j - 1] + 1 if x[i - 1] == y[j - 1] else max(up[j], row[j - 1])
  words, i, j = set(), n, m
  while i > 0 and j > 0:
    if x[i - 1] == y[j - 1]:
      words.add(x[i - 1])
      i, j = i - 1, j - 1
    elif table[i - 1][j] > table[i][j - 1]:
      i -= 1
    else:
      j -= 1
  return words


def rouge_l_longbench(prediction: str, ground_truth: str, **_) -> float:
  """ROUGE-L F as LongBench gets it: ``Rouge().get_scores([pred], [ref])["rouge-l"]["f"]``, rouge==1.0.1.

  That package splits both texts into sentences at ".", takes the union-LCS
  (summary level) and counts *distinct* words (``exclusive=True``): with U the
  set of words on an LCS of some (reference sentence, prediction sentence)
  pair, R = |U| / |distinct ref words|, P = |U| / |distinct pred words|,
  F = 2PR / (P + R + 1e-8). An empty text scores 0.0, as LongBench's
  ``except: return 0.0`` does. One known difference: the package recurses per
  word and raises RecursionError (LongBench: 0.0) on sentence pairs of roughly
  1000+ words combined; here those are scored.
  """
  hyp, ref = _rouge_sentences(prediction), _rouge_sentences(ground_truth)
  if not hyp or not ref:
    return 0.0
  hyp_words = [s.split(" ") for s in hyp]
  ref_words = [s.split(" ") for s in ref]
  union: set[str] = set()
  for r in ref_words:
    for h in hyp_words:
      union |= _lcs_words(r, h)
  recall = len(union) / len({w for s in ref_words for w in s})
  precision = len(union) / len({w for s in hyp_words for w in s})
  return 2.0 * (precision * recall) / (precision + recall + 1e-8)


def best_over_answers(prediction: str, answers: Sequence[str] | str, metric: Callable[..., float],
                      **kwargs) -> float:
  """Max of ``metric(prediction, a, **kwargs)`` over the reference answers (LongBench's rule)."""
  if isinstance(answers, str):
    answers = [answers]
  if len(answers) == 0:
    raise ValueError("best_over_answers: answers is empty; need at least one reference answer")
  return max(float(metric(prediction, a, **kwargs)) for a in answers)


def passkey_accuracy(prediction: str, answer: str, protocol: str = "exact") -> float:
  """Passkey / numeric-needle score.

  ``exact`` (default): the first run of digits in the prediction equals the
  key's digits (a longer or shorter number fails). ``contains``: the key's
  digits appear anywhere in the prediction (the HF blog protocol, reference §9).
  """
  key = re.sub(r"\D", "", answer)
  if not key:
    raise ValueError(f"passkey_accuracy: answer={answer!r} has no digits")
  if protocol == "exact":
    m = re.search(r"\d+", prediction)
    return float(m is not None and m.group() == key)
  if protocol == "contains":
    return float(key in prediction)
  raise ValueError(f"passkey_accuracy: protocol={protocol!r} must be 'exact' or 'contains'")


# ----------------------------------------------------------------------------
# The remaining LongBench task metrics (synthetic, few-shot, code)
# ----------------------------------------------------------------------------

def _share_equal(numbers: list[str], target: str) -> float:
  return 0.0 if not numbers else sum(n == target for n in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **_) -> float:
  """passage_count: share of the numbers in the prediction equal to the answer."""
  return _share_equal(re.findall(r"\d+", prediction), str(ground_truth))


def retrieval_score(prediction: str, ground_truth: str, pattern: str = r"Paragraph (\d+)", **_) -> float:
  """passage_retrieval: share of the numbers in the prediction equal to the paragraph id.

  The id is read from the ground truth with ``pattern`` ("Paragraph N" for
  English, r"段落(\\d+)" for the Chinese set).
  """
  found = re.findall(pattern, ground_truth)
  if not found:
    raise ValueError(f"retrieval_score: ground truth {ground_truth!r} does not match {pattern!r}")
  return _share_equal(re.findall(r"\d+", prediction), found[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **_) -> float:
  return retrieval_score(prediction, ground_truth, pattern=r"段落(\d+)")


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None,
                         **_) -> float:
  """trec / lsht: 1/k if the answer is among the k class names found in the prediction.

  Class names that are substrings of the answer are dropped first. LongBench
  drops them while iterating over the same list, which skips the element after
  each removal; that loop is kept as is so scores match.
  """
  if all_classes is None:
    raise ValueError("classification_score needs all_classes (the record's class list), got None")
  matches = [c for c in all_classes if c in prediction]
  for term in matches:  # mutating while iterating: intentional, see docstring
    if term in ground_truth and term != ground_truth:
      matches.remove(term)
  return 1.0 / len(matches) if ground_truth in matches else 0.0


def fuzz_ratio(a: str, b: str) -> int:
  """``fuzzywuzzy.fuzz.ratio`` (with python-Levenshtein), as LongBench calls it: 0..100.

  ``rapidfuzz.fuzz.ratio`` computes the same InDel similarity, as a float; fuzzywuzzy
  rounds it to an int (Python's ``round``), which is kept so scores match LongBench's.
  Two empty strings are equal (100). difflib's ``SequenceMatcher`` (fuzzywuzzy's
  fallback without python-Levenshtein) is not this: it matches greedy blocks, not a
  longest common subsequence, and drops frequent characters of long lines as junk.
  """
  return int(round(fuzz.ratio(a, b)))


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
  """lcc / repobench-p: similarity of the first code line (no ``` ``# //`` lines) to the answer line."""
  first = ""
  for line in prediction.lstrip("\n").split("\n"):
    if "`" not in line and "#" not in line and "//" not in line:
      first = line
      break
  return fuzz_ratio(first, ground_truth) / 100
