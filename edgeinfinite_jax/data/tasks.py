"""Synthetic long-context tasks on token ids: passkey, needles, KV recall, doc QA, summaries.

Every generator builds one ``Sample`` = context + question + answer, with a
loss mask on the answer only (the S-SFT layout of reference §4.4: long document,
instruction, answer packed into one sequence, loss on the answer). Nothing is
downloaded: the passkey / needle / KV tasks are made of fixed filler or random
strings, and ``doc_qa`` / ``summarize`` take their real text from the caller.

Conventions shared by every generator:

- **Determinism.** The random stream is keyed by (task name, ``seed``,
  ``index``), so sample ``index`` is the same whatever else was generated.
- **Length.** ``length`` is a target in tokens: the sample never exceeds it and
  falls short by less than one filler unit (a sentence, a KV line). The real
  length is ``Sample.length``.
- **Pieces.** Text is encoded piece by piece (each sentence with its leading
  space) and the ids concatenated, so lengths and the needle's token index are
  exact for any tokenizer. For merging tokenizers (BPE) the ids can differ from
  encoding the joined text at piece boundaries; the sequence still decodes to
  the same text for byte-level tokenizers.
- **Depth.** ``depth`` in [0, 1] is the needle's relative position among the
  filler units: 0 puts it right after the preamble, 1 right before the
  question. ``Sample.key_position`` / ``key_end`` give its token span so an
  evaluator can check that it lies outside the local window (reference §9: a
  key inside the current segment or window tests local attention, not memory).
- **Answer.** ``tokens[prompt_len:]`` are the answer tokens (``" " + answer``
  then EOS); ``loss_mask`` is 1 exactly there. Feed ``tokens[:prompt_len]`` to
  generate and compare the continuation with ``Sample.answer``.

The tokenizer interface: ``encode(text, add_bos=...) -> list[int]``,
``decode(ids) -> str`` and the attributes ``bos_id``, ``eos_id``, ``pad_id``,
``vocab_size`` (``bos_id`` / ``eos_id`` may be None to omit them).

(Over 400 lines on purpose: five task generators that share one encoder, filler and answer-placement toolkit; split, each would import the rest.)
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
  bos_id: int | None
  eos_id: int | None
  pad_id: int
  vocab_size: int

  def encode(self, text: str, add_bos: bool = ...) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class Sample(NamedTuple):
  """One packed sequence: context + question + answer.

  Attributes:
    tokens: int32 [T], T == length.
    loss_mask: float32 [T]; 1.0 where ``tokens[t]`` is an answer token (EOS
      included), i.e. on the target side: a trainer predicting ``tokens[t]``
      from ``tokens[:t]`` weights its loss at ``t - 1`` with ``loss_mask[t]``.
    answer: the expected answer text, without the leading space.
    prompt_len: index of the first answer token.
    task: generator name.
    length: real length in tokens (<= target_length).
    target_length: the ``length`` asked for.
    depth: the depth asked for.
    key_position: token index where the needle (key / fact / queried pair /
      first title) starts; -1 if the task has none.
    key_end: token index one past the needle's end; -1 if none.
    meta: task-specific extras (realised depth, keys, all needle positions...).
  """
  tokens: np.ndarray
  loss_mask: np.ndarray
  answer: str
  prompt_len: int
  task: str
  length: int
  target_length: int
  depth: float
  key_position: int
  key_end: int
  meta: dict


def key_distance(sample: Sample) -> int:
  """Tokens between the needle's end and the answer start.

  A memory test is only meaningful when this exceeds the model's local reach
  (sink + window + current segment): ``key_distance(s) > n_win + segment_len``.
  """
  if sample.key_end < 0:
    raise ValueError(f"task {sample.task!r} has no needle (key_end=-1), so no key distance")
  return sample.prompt_len - sample.key_end


# ----------------------------------------------------------------------------
# Shared machinery
# ----------------------------------------------------------------------------

# Passkey text: Infini-attention App. B / Landmark attention (reference §9), with
# the "There and ack again" typo of the printed template fixed.
PASSKEY_PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. "
                    "Find it and memorize it. I will quiz you about the important information there.")
FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

# Short words for needle keys: distinct, no digits, so they never collide with values.
NEEDLE_KEYS = ("apple", "river", "candle", "forest", "marble", "violin", "harbor", "pepper", "lantern",
               "meadow", "copper", "falcon", "garden", "island", "jacket", "kettle", "ladder", "mirror",
               "needle", "orange", "pillow", "rocket", "saddle", "tunnel", "velvet", "window", "anchor",
               "basket", "castle", "dragon", "engine", "feather")
DOC_TOPICS = ("the old lighthouse", "the northern valley", "the glass tower", "the river festival",
              "the silent library", "the copper mine", "the winter garden", "the hidden harbor",
              "the stone bridge", "the mountain observatory", "the royal orchard", "the desert caravan")
_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _rng(task: str, seed: int, index: int) -> np.random.Generator:
  # crc32 rather than hash(): str hashes are salted per process.
  return np.random.default_rng([zlib.crc32(task.encode()), int(seed), int(index)])


def _check_common(task: str, length: int, depth: float, seed: int, index: int) -> None:
  if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 1:
    raise ValueError(f"{task}: length={length!r} must be a positive int (target tokens)")
  if not isinstance(depth, (int, float, np.floating, np.integer)) or not (0.0 <= float(depth) <= 1.0):
    raise ValueError(f"{task}: depth={depth!r} must be a number in [0, 1]")
  for name, v in (("seed", seed), ("index", index)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
      raise ValueError(f"{task}: {name}={v!r} must be a non-negative int")


class _Encoder:
  """Caches piece encodings within one sample: filler sentences repeat thousands of times."""

  def __init__(self, tokenizer: Tokenizer):
    self.tok = tokenizer
    self._cache: dict[str, list[int]] = {}

  def __call__(self, text: str) -> list[int]:
    ids = self._cache.get(text)
    if ids is None:
      ids = [int(t) for t in self.tok.encode(text, add_bos=False)]
      self._cache[text] = ids
    return ids


def _fill(units: Iterator[list[int]], budget: int) -> list[list[int]]:
  """Takes units in order while they fit in ``budget`` tokens; stops at the first that does not.

  Stopping (rather than skipping to a shorter unit) keeps the text in order, so
  the shortfall is below one unit.
  """
  out, used = [], 0
  for u in units:
    if used + len(u) > budget:
      break
    out.append(u)
    used += len(u)
  return out


def _cycle(units: Sequence[list[int]]) -> Iterator[list[int]]:
  while True:
    yield from units


def _too_short(task: str, length: int, fixed: int, what: str) -> ValueError:
  return ValueError(f"{task}: length={length} is below the {fixed} tokens needed for {what}; "
                    f"ask for length >= {fixed}")


def _finish(task: str, tokenizer: Tokenizer, parts: list[tuple[str, list[int]]], answer_ids: list[int],
            answer: str, target_length: int, depth: float, needle: str | None, meta: dict,
            add_bos: bool, add_eos: bool) -> Sample:
  """Concatenates named prompt parts + answer; records where part ``needle`` sits."""
  ids: list[int] = []
  if _uses_bos(tokenizer, add_bos):
    ids.append(int(tokenizer.bos_id))
  spans: dict[str, tuple[int, int]] = {}
  for name, part in parts:
    start = len(ids)
    ids.extend(part)
    if name:
      spans[name] = (start, len(ids))
  prompt_len = len(ids)
  ids.extend(answer_ids)
  if add_eos and tokenizer.eos_id is not None:
    ids.append(int(tokenizer.eos_id))
  if len(ids) > target_length:  # a bug here, not a user error: the budget arithmetic is off
    raise AssertionError(f"{task}: built {len(ids)} tokens for target length {target_length}")
  tokens = np.asarray(ids, dtype=np.int32)
  loss_mask = np.zeros(len(ids), np.float32)
  loss_mask[prompt_len:] = 1.0
  k0, k1 = spans.get(needle, (-1, -1)) if needle else (-1, -1)
  meta = dict(meta, spans=spans)
  return Sample(tokens, loss_mask, answer, prompt_len, task, len(ids), int(target_length), float(depth),
                k0, k1, meta)


def _uses_bos(tokenizer: Tokenizer, add_bos: bool) -> bool:
  # add_bos=True asks for the tokenizer's own rule: a GGUF tokenizer may say "no BOS".
  return add_bos and tokenizer.bos_id is not None and getattr(tokenizer, "add_bos", True)


def _special_len(tokenizer: Tokenizer, add_bos: bool, add_eos: bool) -> int:
  return int(_uses_bos(tokenizer, add_bos)) + int(add_eos and tokenizer.eos_id is not None)


def _random_word(rng: np.random.Generator, syllables: int) -> str:
  # Consonant-vowel syllables: pronounceable (tokenizes like a word) yet absent from real text.
  return "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                 for _ in range(syllables))


def _random_alnum(rng: np.random.Generator, n: int) -> str:
  return "".join(_ALNUM[i] for i in rng.integers(len(_ALNUM), size=n))


def _slot(depth: float, n: int) -> int:
  """Needle slot among n filler units: 0 (before all) .. n (after all); monotone in depth."""
  return int(math.floor(depth * n + 0.5))


# ----------------------------------------------------------------------------
# Passkey (reference §9)
# ----------------------------------------------------------------------------

def passkey(tokenizer: Tokenizer, length: int, depth: float, seed: int, index: int = 0, *, digits: int = 5,
            min_key_distance: int | None = None, add_bos: bool = True, add_eos: bool = True) -> Sample:
  """Infini-attention passkey: preamble, filler x, key sentence, filler y, question.

  Args:
    length: target total tokens (never exceeded; short by < one filler sentence).
    depth: key position among the filler sentences, 0 = start, 1 = end.
    digits: digits of the key N (first digit non-zero).
    min_key_distance: if set, raise unless at least this many tokens separate
      the key sentence's end from the answer start (see ``key_distance``).
  """
  task = "passkey"
  _check_common(task, length, depth, seed, index)
  if not isinstance(digits, int) or not 1 <= digits <= 18:
    raise ValueError(f"{task}: digits={digits!r} must be an int in [1, 18] (int64 keys)")
  rng = _rng(task, seed, index)
  key = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
  enc = _Encoder(tokenizer)
  head = enc(PASSKEY_PREAMBLE)
  needle = enc(" " + PASSKEY_NEEDLE.format(key=key))
  question = enc(" " + PASSKEY_QUESTION)
  answer_ids = enc(" " + key)
  fixed = len(head) + len(needle) + len(question) + len(answer_ids) + _special_len(tokenizer, add_bos, add_eos)
  if fixed > length:
    raise _too_short(task, length, fixed, "preamble, key sentence, question and answer")
  filler = _fill(_cycle([enc(" " + s) for s in FILLER_SENTENCES]), length - fixed)
  x = _slot(depth, len(filler))
  parts = [("preamble", head), ("", _flat(filler[:x])), ("needle", needle), ("", _flat(filler[x:])),
           ("question", question)]
  meta = dict(key=key, filler_units=len(filler), realized_depth=x / max(len(filler), 1))
  sample = _finish(task, tokenizer, parts, answer_ids, key, length, depth, "needle", meta, add_bos, add_eos)
  if min_key_distance is not None and key_distance(sample) < min_key_distance:
    raise ValueError(f"{task}: the key ends at token {sample.key_end}, {key_distance(sample)} tokens before "
                     f"the answer (token {sample.prompt_len}), below min_key_distance={min_key_distance}; "
                     f"lower depth={depth} or raise length={length}")
  return sample


def _flat(units: Iterable[list[int]]) -> list[int]:
  return [t for u in units for t in u]


# ----------------------------------------------------------------------------
# Multi-needle: several key-value needles in filler, the question asks one
# ----------------------------------------------------------------------------

def multi_needle(tokenizer: Tokenizer, length: int, depth: float, seed: int, index: int = 0, *,
                 n_needles: int = 4, digits: int = 5, add_bos: bool = True, add_eos: bool = True) -> Sample:
  """``n_needles`` sentences "The magic number for <word> is N." in passkey filler.

  The queried needle sits at ``depth``; the distractors at uniform random
  depths. ``meta`` lists every needle's key, value and token start.
  """
  task = "multi_needle"
  _check_common(task, length, depth, seed, index)
  if not isinstance(n_needles, int) or not 1 <= n_needles <= len(NEEDLE_KEYS):
    raise ValueError(f"{task}: n_needles={n_needles!r} must be an int in [1, {len(NEEDLE_KEYS)}]")
  if not isinstance(digits, int) or not 1 <= digits <= 18:
    raise ValueError(f"{task}: digits={digits!r} must be an int in [1, 18]")
  rng = _rng(task, seed, index)
  keys = [NEEDLE_KEYS[i] for i in rng.choice(len(NEEDLE_KEYS), size=n_needles, replace=False)]
  values: list[str] = []
  while len(values) < n_needles:  # distinct values, so one answer is right
    v = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
    if v not in values:
      values.append(v)
  asked = int(rng.integers(n_needles))
  depths = rng.random(n_needles)
  depths[asked] = depth
  enc = _Encoder(tokenizer)
  head = enc("There are several magic numbers hidden inside a lot of irrelevant text. "
             "Find them and memorize them. I will quiz you about one of them.")
  needles = [enc(f" The magic number for {k} is {v}.") for k, v in zip(keys, values)]
  question = enc(f" What is the magic number for {keys[asked]}? The magic number for {keys[asked]} is")
  answer_ids = enc(" " + values[asked])
  fixed = (len(head) + sum(map(len, needles)) + len(question) + len(answer_ids)
           + _special_len(tokenizer, add_bos, add_eos))
  if fixed > length:
    raise _too_short(task, length, fixed, f"preamble, {n_needles} needles, question and answer")
  filler = _fill(_cycle([enc(" " + s) for s in FILLER_SENTENCES]), length - fixed)
  slots = [_slot(float(d), len(filler)) for d in depths]
  # Stable order by slot; at a shared slot the asked needle goes first when its
  # depth is 0 and last otherwise, so depth 0 / 1 really mean first / last.
  order = sorted(range(n_needles), key=lambda i: (slots[i], (0 if depth == 0 else 2) if i == asked else 1))
  parts: list[tuple[str, list[int]]] = [("preamble", head)]
  prev = 0
  for i in order:
    parts.append(("", _flat(filler[prev:slots[i]])))
    parts.append((f"needle{i}", needles[i]))
    prev = slots[i]
  parts += [("", _flat(filler[prev:])), ("question", question)]
  meta = dict(keys=keys, values=values, asked=asked, filler_units=len(filler),
              realized_depth=slots[asked] / max(len(filler), 1))
  s = _finish(task, tokenizer, parts, answer_ids, values[asked], length, depth, f"needle{asked}", meta,
              add_bos, add_eos)
  s.meta["needle_positions"] = [s.meta["spans"][f"needle{i}"][0] for i in range(n_needles)]
  return s


# ----------------------------------------------------------------------------
# KV recall: a list of random "key: value" lines, ask one key's value
# ----------------------------------------------------------------------------

def kv_recall(tokenizer: Tokenizer, length: int, depth: float, seed: int, index: int = 0, *, key_len: int = 6,
              value_len: int = 6, add_bos: bool = True, add_eos: bool = True) -> Sample:
  """As many unique random alphanumeric ``key: value`` lines as fit; asks the line at ``depth``."""
  task = "kv_recall"
  _check_common(task, length, depth, seed, index)
  for name, v in (("key_len", key_len), ("value_len", value_len)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"{task}: {name}={v!r} must be a positive int")
  rng = _rng(task, seed, index)
  enc = _Encoder(tokenizer)
  head = enc("Below is a list of key: value pairs. Remember the value of every key. "
             "I will ask for the value of one of them.")

  def qa(k: str, v: str) -> tuple[list[int], list[int]]:
    return enc(f"\nWhat is the value of key {k}? The value of key {k} is"), enc(" " + v)

  # Reserve room for a question about a typical key; re-checked below once the asked key is known.
  q0, a0 = qa("k" * key_len, "v" * value_len)
  fixed = len(head) + len(q0) + len(a0) + _special_len(tokenizer, add_bos, add_eos)
  seen: set[str] = set()

  def lines() -> Iterator[list[int]]:
    while True:
      k = _random_alnum(rng, key_len)
      if k in seen:  # keys must be unique for the question to have one answer
        continue
      seen.add(k)
      v = _random_alnum(rng, value_len)
      pairs.append((k, v))
      yield enc(f"\n{k}: {v}")

  pairs: list[tuple[str, str]] = []
  units = _fill(lines(), length - fixed) if fixed <= length else []
  pairs = pairs[:len(units)]  # the generator drew one pair more than fitted
  while True:
    if not units:
      raise _too_short(task, length, fixed + len(enc(f"\n{'k' * key_len}: {'v' * value_len}")),
                       "preamble, one key: value line, question and answer")
    asked = _slot(depth, len(units) - 1)
    question, answer_ids = qa(*pairs[asked])
    total = (len(head) + sum(map(len, units)) + len(question) + len(answer_ids)
             + _special_len(tokenizer, add_bos, add_eos))
    if total <= length:
      break
    units, pairs = units[:-1], pairs[:-1]  # the asked key tokenized longer than the reserved one
  parts = [("preamble", head)] + [(f"line{i}" if i == asked else "", u) for i, u in enumerate(units)]
  parts.append(("question", question))
  meta = dict(key=pairs[asked][0], n_pairs=len(units), asked=asked,
              realized_depth=asked / max(len(units) - 1, 1))
  return _finish(task, tokenizer, parts, answer_ids, pairs[asked][1], length, depth, f"line{asked}", meta,
                 add_bos, add_eos)


# ----------------------------------------------------------------------------
# Real-text tasks: the caller supplies the corpus (list of documents)
# ----------------------------------------------------------------------------

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


def split_sentences(doc: str, max_words: int = 64) -> list[str]:
  """Sentences of ``doc`` (split after . ! ? and at blank lines), whitespace-normalised.

  Sentences longer than ``max_words`` are cut into word chunks: the length
  target is hit to within one unit, so units must stay short.
  """
  out = []
  for s in _SENT_SPLIT.split(doc):
    words = s.split()
    for i in range(0, len(words), max_words):
      out.append(" ".join(words[i:i + max_words]))
  return out


def _check_corpus(task: str, corpus: Sequence[str] | None) -> None:
  if corpus is None or isinstance(corpus, str) or len(corpus) == 0:
    raise ValueError(f"{task}: corpus must be a non-empty list of document strings, got {type(corpus).__name__}"
                     f"{'' if corpus is None or isinstance(corpus, str) else f' of {len(corpus)} docs'}")
  for i, d in enumerate(corpus):
    if not isinstance(d, str):
      raise ValueError(f"{task}: corpus[{i}] is a {type(d).__name__}, not a str")


def _corpus_units(enc: _Encoder, corpus: Sequence[str], start_doc: int, task: str) -> Iterator[list[int]]:
  """Encoded sentences from ``corpus[start_doc]`` on, cycling through the documents forever.

  Documents are split lazily: a long sample touches only the docs it needs.
  """
  split: dict[int, list[str]] = {}
  n = 0
  while True:
    d = (start_doc + n) % len(corpus)
    if d not in split:
      split[d] = split_sentences(corpus[d])
    for s in split[d]:
      yield enc(" " + s)
    n += 1
    if n == len(corpus) and not any(split.values()):
      raise ValueError(f"{task}: corpus of {len(corpus)} docs has no text (every doc is blank)")


def doc_qa(tokenizer: Tokenizer, length: int, depth: float, seed: int, index: int = 0, *,
           corpus: Sequence[str] | None = None, add_bos: bool = True, add_eos: bool = True) -> Sample:
  """Real text (from ``corpus``, starting at a random document) with one inserted fact.

  The fact "The secret word of <topic> is <word>." goes between corpus
  sentences at ``depth``; <word> is a random pseudo-word, so the answer is
  nowhere else in the text.
  """
  task = "doc_qa"
  _check_common(task, length, depth, seed, index)
  _check_corpus(task, corpus)
  rng = _rng(task, seed, index)
  topic = DOC_TOPICS[rng.integers(len(DOC_TOPICS))]
  word = _random_word(rng, 3)
  start_doc = int(rng.integers(len(corpus)))
  enc = _Encoder(tokenizer)
  head = enc("Read the document below and answer the question after it.\n\nDocument:")
  fact = enc(f" The secret word of {topic} is {word}.")
  question = enc(f"\n\nQuestion: What is the secret word of {topic}?\nAnswer: The secret word of {topic} is")
  answer_ids = enc(" " + word)
  fixed = len(head) + len(fact) + len(question) + len(answer_ids) + _special_len(tokenizer, add_bos, add_eos)
  if fixed > length:
    raise _too_short(task, length, fixed, "instruction, fact, question and answer")
  units = _fill(_corpus_units(enc, corpus, start_doc, task), length - fixed)
  x = _slot(depth, len(units))
  parts = [("preamble", head), ("", _flat(units[:x])), ("fact", fact), ("", _flat(units[x:])),
           ("question", question)]
  meta = dict(topic=topic, start_doc=start_doc, n_sentences=len(units), realized_depth=x / max(len(units), 1))
  return _finish(task, tokenizer, parts, answer_ids, word, length, depth, "fact", meta, add_bos, add_eos)


def summarize(tokenizer: Tokenizer, length: int, depth: float, seed: int, index: int = 0, *,
              corpus: Sequence[str] | None = None, n_sections: int = 8, add_bos: bool = True,
              add_eos: bool = True) -> Sample:
  """Extractive "summary": ``n_sections`` paragraphs of corpus text, each under a random title.

  The answer is the titles in order, comma-separated: checkable exactly, and it
  needs every segment of the document, so memory has to hold all of it. The
  sections share the text budget evenly.

  ``depth`` is accepted so every task has the same signature; the answer spans
  the whole document, so it has no effect on the layout.
  """
  task = "summarize"
  _check_common(task, length, depth, seed, index)
  _check_corpus(task, corpus)
  if not isinstance(n_sections, int) or n_sections < 1:
    raise ValueError(f"{task}: n_sections={n_sections!r} must be a positive int")
  rng = _rng(task, seed, index)
  titles: list[str] = []
  while len(titles) < n_sections:  # distinct titles, so order is checkable
    t = _random_word(rng, int(rng.integers(2, 4))).capitalize()
    if t not in titles:
      titles.append(t)
  start_doc = int(rng.integers(len(corpus)))
  enc = _Encoder(tokenizer)
  head = enc("Read the document below. Each section starts with its title.")
  title_ids = [enc(f"\n\n{t}:") for t in titles]
  answer = ", ".join(titles)
  question = enc("\n\nList the titles of all sections in order, separated by commas.\nTitles:")
  answer_ids = enc(" " + answer)
  fixed = (len(head) + sum(map(len, title_ids)) + len(question) + len(answer_ids)
           + _special_len(tokenizer, add_bos, add_eos))
  if fixed > length:
    raise _too_short(task, length, fixed, f"instruction, {n_sections} titles, question and answer")
  budget = length - fixed
  source = _corpus_units(enc, corpus, start_doc, task)
  parts: list[tuple[str, list[int]]] = [("preamble", head)]
  used, pending = 0, next(source)
  for i in range(n_sections):
    target = (budget * (i + 1)) // n_sections  # cumulative share: rounding never adds up past budget
    body = []
    while used + len(pending) <= target:
      body.append(pending)
      used += len(pending)
      pending = next(source)
    if not body:
      raise ValueError(f"{task}: section {i} of {n_sections} got no sentence at length={length} "
                       f"({budget} text tokens, next sentence {len(pending)} tokens); "
                       f"raise length or lower n_sections")
    parts += [(f"title{i}", title_ids[i]), ("", _flat(body))]
  parts.append(("question", question))
  meta = dict(titles=titles, start_doc=start_doc)
  s = _finish(task, tokenizer, parts, answer_ids, answer, length, depth, "title0", meta, add_bos, add_eos)
  s.meta["title_positions"] = [s.meta["spans"][f"title{i}"][0] for i in range(n_sections)]
  return s


# ----------------------------------------------------------------------------
# Registry, batching
# ----------------------------------------------------------------------------

TASKS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey,
    "multi_needle": multi_needle,
    "kv_recall": kv_recall,
    "doc_qa": doc_qa,
    "summarize": summarize,
}


def _as_list(name: str, v: Any) -> list:
  if isinstance(v, (list, tuple, np.ndarray)):
    if len(v) == 0:
      raise ValueError(f"generate: {name} is an empty sequence")
    return list(v)
  return [v]


def generate(task: str, tokenizer: Tokenizer, n: int, length: int | Sequence[int],
             depth: float | Sequence[float] | None = 0.5, seed: int = 0, **kwargs: Any) -> list[Sample]:
  """``n`` samples per (length, depth) cell, lengths outermost.

  Sample k of the returned list is ``TASKS[task](..., seed=seed, index=k)``,
  so every sample has its own key. ``depth=None`` draws a uniform depth per
  sample from (seed, k) (training data); ``kwargs`` go to the generator (e.g.
  ``corpus=`` for ``doc_qa`` / ``summarize``).
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
  if not isinstance(n, int) or n < 0:
    raise ValueError(f"generate: n={n!r} must be a non-negative int (samples per length x depth)")
  fn = TASKS[task]
  out, k = [], 0
  for L in _as_list("length", length):
    for d in _as_list("depth", depth):
      for _ in range(n):
        dk = float(_rng("depth", seed, k).random()) if d is None else d
        out.append(fn(tokenizer, L, dk, seed, k, **kwargs))
        k += 1
  return out


def make_batch(samples: Sequence[Sample], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-pads samples to ``seq_len``: ``tokens`` int32 [B, T], ``loss_mask`` float32 [B, T].

  Padding gets loss 0. Never truncates: a longer sample is an error, since
  cutting it would drop the answer.
  """
  if len(samples) == 0:
    raise ValueError("make_batch: got no samples")
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"make_batch: seq_len={seq_len!r} must be a positive int")
  tokens = np.full((len(samples), seq_len), pad_id, np.int32)
  loss_mask = np.zeros((len(samples), seq_len), np.float32)
  for i, s in enumerate(samples):
    n = len(s.tokens)
    if n > seq_len:
      raise ValueError(f"make_batch: sample {i} ({s.task}) has length {n} > seq_len={seq_len}; "
                       f"raise seq_len or generate shorter samples")
    tokens[i, :n] = s.tokens
    loss_mask[i, :n] = s.loss_mask
  return {"tokens": tokens, "loss_mask": loss_mask}
