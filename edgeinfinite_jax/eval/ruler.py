"""RULER's synthetic tasks that need no download, generated from local text.

The generators, templates, answer prefixes, tokens to generate and scoring follow
hsiehjackson/RULER (``scripts/synthetic.yaml``, ``scripts/data/synthetic/{niah,
variable_tracking,common_words_extraction,freq_words_extraction,constants}.py``,
``scripts/eval/synthetic/constants.py``) with the ``base`` model template (no chat
template; the answer prefix ends the prompt):

* ``niah_single_1-3``, ``niah_multikey_1-3``, ``niah_multivalue``, ``niah_multiquery``:
  needles "One of the special magic {type} for {key} is: {value}." in a haystack,
  values of 7-digit numbers, word pairs or UUIDs, inserted at depths drawn from
  RULER's 40 depths over 0-100% (essay) or at random sentences (repeat, needle); one
  question about 1 or 4 keys; the singular rewrite of the template when one value is
  asked (RULER's "Some" -> "A", "are" -> "is", ...). 128 tokens generated.
* ``vt``: variable tracking, 1 chain of 4 hops in the repeated noise text, with
  RULER's one-shot example (3-letter names, its template with the last word of the
  question dropped and whitespace squeezed, as RULER's ``is_icl`` path does) in
  front. 30 tokens.
* ``cwe``: common words extraction: 10 words repeated 30 times (6 below 4096
  tokens) among words repeated 3 times (1), numbered, after a one-shot example.
  120 tokens.
* ``fwe``: frequent words extraction: coded 6-letter words with zeta(alpha = 2)
  counts, the top-ranked one replaced by "..." (noise); the answer is ranks 2-4. 50
  tokens.

What differs from RULER, and why:

* **Haystacks.** ``repeat`` (niah_single_1) is RULER's sentence; ``needle``
  (multikey_2/3) RULER's distractor needles. Where RULER reads Paul Graham essays (a
  download), the ``essay`` haystack here is held-out real local prose: the
  docstrings and comments (``corpus.prose``) of the held-out standard-library
  ``.py`` files and the held-out ``.txt``/``.rst`` files, split
  ``corpus.is_heldout(path, heldout_fraction)`` (``corpus.heldout_sources``), in
  path order; sentences are cut at ``.!?`` + space (RULER uses nltk's punkt).
* **Words.** RULER's key words ("adjective-noun") and the cwe words come from the
  ``wonderwords`` package's lists; here from the distinct lowercase words (3-12
  letters) of the same held-out prose ("word-word" pairs for keys).
* **Length.** RULER grows the haystack in fixed increments until the prompt plus
  the tokens to generate reaches ``max_seq_length``; here a bisection finds the
  largest haystack with ``prompt tokens + tokens to generate <= length``, for every
  task (RULER's fwe only bounds the prompt), so a sample plus its answer fits an
  engine whose capacity is ``length``.
* **Randomness.** numpy generators seeded by (seed, task, length, sample), so any
  sample is reproducible on its own, not Python's global ``random`` stream.

Scoring is RULER's ``string_match_all``: the fraction of the references found,
case-insensitively, in the prediction (control characters turned into newlines and
stripped first, as RULER's ``postprocess_pred``); a task's score is the mean.
"""

from __future__ import annotations

import functools
import re
import string
import uuid
from typing import Callable, NamedTuple, Sequence

import numpy as np
from scipy.special import zeta  # a dependency of jax

from edgeinfinite_jax.data import corpus
from edgeinfinite_jax.model.config import ConfigError, require

# RULER scripts/data/synthetic/constants.py (template, answer prefix, tokens to generate).
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are "
    "all the special magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
    "above.")
# "assgined" is RULER's spelling: the published prompt, kept.
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, "
             "{num_v} variables are assgined the value {query}, they are: ")
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most "
    "common words in the above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the "
    "three most frequently appeared coded words. {context}\nQuestion: Do not provide any "
    "explanation. Please ignore the dots '....'. What are the three most frequently appeared "
    "words in the above coded text?")
FWE_PREFIX = (" Answer: According to the coded text above, the three most frequently "
              "appeared words are:")
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
REPEAT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again.")
VT_NOISE = REPEAT + "\n"
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}


class Sample(NamedTuple):
  task: str
  length: int          # the nominal length: prompt tokens + max_new_tokens <= length
  prompt: str
  tokens: np.ndarray   # int32 [prompt tokens] (BOS by the tokenizer's rule)
  answers: list        # the references string_match_all looks for
  max_new_tokens: int


def _niah(k_type, v_type, haystack, k=1, v=1, q=1):
  return ("niah", dict(type_needle_k=k_type, type_needle_v=v_type, type_haystack=haystack,
                       num_needle_k=k, num_needle_v=v, num_needle_q=q))


# RULER scripts/synthetic.yaml.
TASKS = {
    "niah_single_1": _niah("words", "numbers", "repeat"),
    "niah_single_2": _niah("words", "numbers", "essay"),
    "niah_single_3": _niah("words", "uuids", "essay"),
    "niah_multikey_1": _niah("words", "numbers", "essay", k=4),
    "niah_multikey_2": _niah("words", "numbers", "needle"),
    "niah_multikey_3": _niah("uuids", "uuids", "needle"),
    "niah_multivalue": _niah("words", "numbers", "essay", v=4),
    "niah_multiquery": _niah("words", "numbers", "essay", q=4),
    "vt": ("vt", dict(num_chains=1, num_hops=4)),
    "cwe": ("cwe", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("fwe", dict(alpha=2.0)),
}


# ----------------------------------------------------------------------------- local text


@functools.lru_cache(maxsize=4)
def heldout_prose(heldout_fraction: float) -> str:
  """The held-out prose of the corpus: docstrings/comments of .py files, .txt/.rst whole."""
  return "\n\n".join(corpus.prose(text) if path.endswith(".py") else text
                     for path, text in corpus.heldout_sources(heldout_fraction))


@functools.lru_cache(maxsize=4)
def heldout_words(heldout_fraction: float) -> tuple[str, ...]:
  """Distinct lowercase words (3-12 letters) of the held-out prose, sorted."""
  return tuple(sorted(set(re.findall(r"\b[a-z]{3,12}\b", heldout_prose(heldout_fraction)))))


def _sentences(text: str) -> list[str]:
  return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


# ----------------------------------------------------------------------------- scoring


def postprocess(prediction: str) -> str:
  """RULER's ``postprocess_pred``: strip, control characters -> newline, strip."""
  return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
  """Fraction of ``references`` found in the prediction, case-insensitively (RULER)."""
  require(len(references) > 0, "references", list(references), "must name at least one")
  pred = postprocess(prediction).lower()
  return sum(r.lower() in pred for r in references) / len(references)


# ----------------------------------------------------------------------------- generators


class _Draw:
  """The random parts of one sample: a numpy generator plus RULER's value types."""

  def __init__(self, key: Sequence[int], words: Sequence[str]):
    self.rng = np.random.default_rng(list(key))
    self.words = words

  def value(self, kind: str) -> str:
    if kind == "numbers":  # 7 digits, as RULER's generate_random_number
      return str(int(self.rng.integers(10**6, 10**7)))
    if kind == "words":
      a, b = self.rng.choice(len(self.words), 2)
      return f"{self.words[a]}-{self.words[b]}"
    return str(uuid.UUID(int=int.from_bytes(self.rng.bytes(16), "big"), version=4))

  def sample(self, seq: Sequence, k: int) -> list:
    return [seq[i] for i in self.rng.choice(len(seq), k, replace=False)]


def _niah_prompt(n: int, draw: _Draw, essay: Sequence[str], type_needle_k, type_needle_v,
                 type_haystack, num_needle_k, num_needle_v, num_needle_q):
  """RULER niah.py's generate_input_output for a haystack of ``n`` words (essay) or
  sentences (repeat, needle)."""
  num_needle_k = max(num_needle_k, num_needle_q)
  keys, values, needles = [], [], []
  for _ in range(num_needle_k):
    keys.append(draw.value(type_needle_k))
    values.append([draw.value(type_needle_v) for _ in range(num_needle_v)])
    needles += [NEEDLE.format(type_needle_v=type_needle_v, key=keys[-1], value=v)
                for v in values[-1]]
  needles = [needles[i] for i in draw.rng.permutation(len(needles))]
  if type_haystack == "essay":
    sents = _sentences(" ".join(essay[:n]))
    cuts = [0] + sorted(int(len(sents) * d / 100) for d in draw.sample(DEPTHS, len(needles)))
    cuts.append(len(sents))
    parts = []
    for i in range(1, len(cuts)):
      parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
      if i - 1 < len(needles):
        parts.append(needles[i - 1])
    context = " ".join(parts)
  else:
    if type_haystack == "repeat":
      sentences = [REPEAT] * n
    else:
      sentences = [NEEDLE.format(type_needle_v=type_needle_v, key=draw.value(type_needle_k),
                                 value=draw.value(type_needle_v)) for _ in range(n)]
    for index, needle in zip(sorted(draw.sample(range(n), len(needles)), reverse=True),
                             needles):
      sentences.insert(index, needle)
    context = "\n".join(sentences)
  asked = draw.sample(range(num_needle_k), num_needle_q)
  queries = [keys[i] for i in asked]
  answers = [a for i in asked for a in values[i]]
  query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
  template = NIAH_TEMPLATE + NIAH_PREFIX
  if num_needle_q * num_needle_v == 1:  # RULER's singular rewrite, in its order
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
      template = template.replace(old, new)
    type_needle_v = type_needle_v[:-1]
  return template.format(type_needle_v=type_needle_v, context=context, query=query), answers


def _vt_text(n: int, draw: _Draw, num_chains: int, num_hops: int, icl: bool):
  """RULER variable_tracking.py's generate_input_output with ``n`` noise repeats."""
  width = 3 if icl else 5
  names: list[str] = []
  while len(set(names)) < (num_hops + 1) * num_chains:
    names.append("".join(draw.rng.choice(list(string.ascii_uppercase), width)))
  names = list(dict.fromkeys(names))
  chains, chain_names = [], []
  for c in range(num_chains):
    these = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
    chain_names.append(these)
    chain = [f"VAR {these[0]} = {int(draw.rng.integers(10000, 99999))}"]
    chain += [f"VAR {these[j + 1]} = VAR {these[j]} " for j in range(num_hops)]
    chains.append(chain)
  sentences = [VT_NOISE] * n
  if len(sentences) <= len(chains[0]):  # too few repeats: RULER splits them into sentences
    sentences = [p + "." if p.strip() else p for s in sentences for p in s.split(".")]
    chains = [c[:len(sentences) - 1] for c in chains] if len(sentences) <= len(chains[0]) \
        else chains
  for chain in chains:
    positions = sorted(draw.rng.choice(len(sentences), len(chain), replace=False))
    for j, (pos, line) in enumerate(zip(positions, chain)):
      sentences.insert(int(pos) + j, line)
  context = " ".join(sentences).replace(". \n", ".\n")
  template = VT_TEMPLATE + VT_PREFIX
  if icl:  # RULER drops the question's last word and squeezes its whitespace here
    template = " ".join(VT_TEMPLATE.split()[:-1]) + VT_PREFIX
  value = chains[0][0].split("=")[-1].strip()
  return template.format(context=context, query=value, num_v=num_hops + 1), chain_names[0]


def _cwe_example(draw: _Draw, words: Sequence[str], num_words: int, common: int,
                 uncommon: int, num_cw: int):
  picked = draw.sample(words, num_words)
  top = picked[:num_cw]
  listed = top * common + picked[num_cw:] * uncommon
  listed = [listed[i] for i in draw.rng.permutation(len(listed))]
  return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), top


def _cwe_prompt(n: int, draw: _Draw, words: Sequence[str], length: int, freq_cw, freq_ucw,
                num_cw):
  """RULER common_words_extraction.py: a one-shot example, then the list of ``n`` words."""
  small = length < 4096
  ex_context, ex_answer = _cwe_example(draw, words, 20 if small else 40, 3 if small else 10,
                                       1 if small else 3, num_cw)
  context, answer = _cwe_example(draw, words, n, 6 if small else freq_cw,
                                 1 if small else freq_ucw, num_cw)
  template = CWE_TEMPLATE + CWE_PREFIX
  example = template.format(context=ex_context) + " ".join(
      f"{i + 1}. {w}" for i, w in enumerate(ex_answer))
  return example + "\n" + template.format(context=context), answer


def _fwe_prompt(n: int, draw: _Draw, length: int, alpha: float, wordlen: int = 6):
  """RULER freq_words_extraction.py: ``n`` draws of coded words with zeta counts."""

  size = length // 50
  vocab: list[str] = []
  while len(set(vocab)) < size:
    vocab.append("".join(draw.rng.choice(list(string.ascii_lowercase), wordlen)))
  vocab = sorted(set(vocab))
  vocab = [vocab[i] for i in draw.rng.permutation(len(vocab))]
  vocab[0] = "..."  # the top rank is noise
  counts = (n * np.arange(1, size + 1, dtype=np.float64) ** -alpha / zeta(alpha)).astype(int)
  text = [w for w, c in zip(vocab, counts) for _ in range(c)]
  text = [text[i] for i in draw.rng.permutation(len(text))]
  return (FWE_TEMPLATE + FWE_PREFIX).format(context=" ".join(text)), vocab[1:4]


def _builder(task: str, length: int, heldout_fraction: float):
  """(build(n, draw) -> (prompt, answers), the smallest and the largest haystack size,
  tokens to generate) of ``task``: the size counts essay words, sentences, noise
  repeats or list words; the largest is all the source text where that is finite."""
  kind, args = TASKS[task]
  words = heldout_words(heldout_fraction)
  gen = TOKENS_TO_GENERATE[kind]
  if kind == "niah":
    essay = re.sub(r"\s+", " ", heldout_prose(heldout_fraction)).split(" ")
    top = len(essay) if args["type_haystack"] == "essay" else None
    return (lambda n, d: _niah_prompt(n, d, essay, **args)), 4, top, gen  # 4: every needle
  if kind == "vt":  # has a sentence to follow
    return (lambda n, d: _vt_text(n, d, icl=False, **args)), 1, None, gen
  if kind == "cwe":
    return (lambda n, d: _cwe_prompt(n, d, words, length, **args)), args["num_cw"], \
        len(words), gen
  return (lambda n, d: _fwe_prompt(n, d, length, **args)), 1, None, gen


def _largest(build: Callable[[int], tuple[str, list]], tokenizer, budget: int, lo: int,
             top: int | None, what: str):
  """(prompt, answers, ids) of the largest ``n >= lo`` whose prompt has <= ``budget``
  tokens (doubling, then bisection; each ``build(n)`` is deterministic), or None when
  even ``lo`` is over. ``top``: the most the source text allows (None: unbounded);
  ConfigError when all of it is still short of the budget."""
  def attempt(n):
    text, answers = build(n)
    ids = tokenizer.encode(text)
    return (text, answers, ids) if len(ids) <= budget else None

  best = attempt(lo)
  if best is None:
    return None
  hi = 2 * lo
  while True:
    if top is not None and hi >= top:
      hi = top
      got = attempt(top)
      if got is not None:
        raise ConfigError(f"{what}: all the held-out source text makes {len(got[2])} "
                          f"prompt tokens, short of {budget}: not enough source text")
      break
    got = attempt(hi)
    if got is None:
      break
    lo, best, hi = hi, got, 2 * hi
  while hi - lo > 1:
    mid = (lo + hi) // 2
    got = attempt(mid)
    if got is None:
      hi = mid
    else:
      lo, best = mid, got
  return best


def samples(task: str, tokenizer, length: int, n: int, seed: int = 0, *,
            heldout_fraction: float = corpus.HELDOUT_FRACTION) -> list[Sample]:
  """``n`` samples of RULER ``task`` at ``length`` tokens (prompt + tokens to generate),
  sample i a pure function of (seed, task, length, i). ConfigError, before any model
  runs, for an unknown task, ``n <= 0``, a length too short for the task's smallest
  prompt, or one the held-out text cannot fill."""
  require(task in TASKS, "task", task, f"must be one of {sorted(TASKS)}")
  require(isinstance(n, int) and not isinstance(n, bool) and n > 0, "n", n,
          "must be a positive int")
  require(isinstance(length, int) and not isinstance(length, bool) and length > 0,
          "length", length, "must be a positive int")
  build, lo, top, gen = _builder(task, length, heldout_fraction)
  words = heldout_words(heldout_fraction)
  task_id = sorted(TASKS).index(task)
  what = f"{task} length={length}"
  prefix = ""
  if task == "vt":  # RULER's one-shot example, fitted into 500 tokens, shared by the samples
    icl_draw = lambda: _Draw([seed, task_id, length, 1 << 30], words)
    icl = lambda k: _vt_text(k, icl_draw(), icl=True, **TASKS[task][1])
    # A byte tokenizer fits no noise into RULER's 500 tokens: one repeat then.
    text, answers, _ = _largest(icl, tokenizer, 500 - gen, 1, None, what) or (*icl(1), None)
    prefix = " " + text + " " + " ".join(answers) + "\n\n" + "\n\n"
  out = []
  for i in range(n):
    key = [seed, task_id, length, i]
    got = _largest(lambda k: _prefixed(prefix, build(k, _Draw(key, words))), tokenizer,
                   length - gen, lo, top, what)
    if got is None:
      raise ConfigError(f"length={length}: {task}'s smallest prompt plus {gen} tokens to "
                        "generate does not fit; must be a longer length")
    text, answers, ids = got
    out.append(Sample(task, length, text, np.asarray(ids, np.int32), list(answers), gen))
  return out


def _prefixed(prefix: str, built: tuple[str, list]) -> tuple[str, list]:
  return prefix + built[0], built[1]
