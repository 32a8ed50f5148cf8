"""Metrics on hand-computed cases (values derived in the comments)."""

import pytest

from edgeinfinite_jax.eval import metrics as M


def test_normalize_and_exact_match():
  assert M.normalize_answer("  The Cat, sat!  on a   MAT. ") == "cat sat on mat"
  assert M.exact_match("The answer.", "answer") == 1.0
  assert M.exact_match("answers", "answer") == 0.0
  assert M.exact_match("The answer.", "answer", normalize=False) == 0.0


def test_f1_known_values():
  # Articles drop out: [cat sat on mat] vs [cat sat on hat]: 3 shared, P = R = 3/4.
  assert M.f1("the cat sat on the mat", "a cat sat on a hat") == pytest.approx(0.75)
  # Multiset overlap: red x1, blue x1 -> 2 of 3 each side.
  assert M.f1("red red blue", "red blue blue") == pytest.approx(2 / 3)
  # P = 1/4, R = 1: F = 2 * (1/4) / (5/4) = 0.4.
  assert M.f1("Paris is the capital, France", "Paris") == pytest.approx(0.4)
  assert M.f1("dog", "cat") == 0.0 and M.f1("", "cat") == 0.0


def test_rouge_l_known_values():
  # LCS "the cat on the mat" = 5 of 6 on both sides.
  assert M.rouge_l("the cat sat on the mat", "the cat was on the mat") == pytest.approx(5 / 6)
  # LCS "a c" = 2: P = 2/4, R = 2/3, F = 4/7.
  assert M.rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
  assert M.rouge_l("x y", "x y") == 1.0 and M.rouge_l("", "x") == 0.0 and M.rouge_l("a", "b") == 0.0
  assert M.rouge_l("The Cat", "cat", normalize=True) == 1.0


def test_rouge_l_longbench_matches_rouge_package():
  # Values checked against rouge==1.0.1 (what LongBench calls). Distinct words:
  # pred {the cat sat on mat}, ref {the cat was on mat}, LCS words {the cat on mat}:
  # P = R = 4/5, F = 2PR / (P + R + 1e-8).
  assert M.rouge_l_longbench("the cat sat on the mat", "the cat was on the mat") == 0.7999999950000002
  # Sentences split at ".": both prediction sentences share only {the, gunman} with
  # the reference: R = 2/7, P = 2/5 -> F = 1/3.
  assert M.rouge_l_longbench("police killed the gunman. the gunman died",
                             "the gunman was shot dead by police") == pytest.approx(1 / 3, abs=1e-7)
  assert M.rouge_l_longbench("", "anything") == 0.0 and M.rouge_l_longbench("...", "a") == 0.0


def test_best_over_answers():
  assert M.best_over_answers("Paris", ["London", "paris", "Rome"], M.exact_match) == 1.0
  assert M.best_over_answers("red blue", ["red", "blue green"], M.f1) == pytest.approx(2 / 3)
  assert M.best_over_answers("x", "x", M.exact_match) == 1.0
  with pytest.raises(ValueError, match="answers is empty"):
    M.best_over_answers("x", [], M.f1)


def test_passkey_accuracy():
  assert M.passkey_accuracy("The pass key is 12345.", "12345") == 1.0
  assert M.passkey_accuracy(" 12345", " 12345") == 1.0
  assert M.passkey_accuracy("123456", "12345") == 0.0          # longer number: not exact
  assert M.passkey_accuracy("123456", "12345", protocol="contains") == 1.0
  assert M.passkey_accuracy("7 then 12345", "12345") == 0.0    # the first number counts
  assert M.passkey_accuracy("no digits", "12345") == 0.0
  with pytest.raises(ValueError, match="protocol='fuzzy'"):
    M.passkey_accuracy("1", "1", protocol="fuzzy")


def test_longbench_task_metrics():
  assert M.count_score("There are 3 or 4 paragraphs", "3") == 0.5
  assert M.count_score("none", "3") == 0.0
  assert M.retrieval_score("Paragraph 7", "Paragraph 7") == 1.0
  assert M.retrieval_score("Paragraph 7, maybe 8", "Paragraph 7") == 0.5
  assert M.retrieval_zh_score("段落3", "段落3") == 1.0
  with pytest.raises(ValueError, match="does not match"):
    M.retrieval_score("7", "seven")
  classes = ["Location", "Person", "Number"]
  assert M.classification_score("Person", "Person", all_classes=classes) == 1.0
  assert M.classification_score("Person or Location", "Person", all_classes=classes) == 0.5
  # LongBench's remove-while-iterating skips "AB" after removing "A": 1/2, not 1.
  assert M.classification_score("ABC", "ABC", all_classes=["A", "AB", "ABC"]) == 0.5
  # InDel similarity 100 * 2 * LCS / (len a + len b), rounded: "abcd"/"abce" share 3 of
  # 8 characters -> 75. "bab"/"acb": LCS "ab", 4/6 -> 67 (difflib's greedy blocks find
  # one common character: 33, the old fallback's number).
  assert M.fuzz_ratio("abcd", "abce") == 75 and M.fuzz_ratio("", "") == 100 and M.fuzz_ratio("", "a") == 0
  assert M.fuzz_ratio("bab", "acb") == 67
  # First line without ``` / # / // is the prediction.
  assert M.code_sim_score("\n```python\n# set x\nx = 1\ny = 2", "x = 1") == 1.0
  # "x = foo(a, b)" vs "x = foo(b)": LCS 10 of 13 + 10 characters -> 86.96 -> 87.
  assert M.code_sim_score("x = foo(a, b)\n", "x = foo(b)") == 0.87
