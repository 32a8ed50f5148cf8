"""Synthetic task generators: lengths, depth placement, determinism, answers and masks, batching."""

import numpy as np
import pytest

from edgeinfinite_jax.data import tasks as T

try:
  from edgeinfinite_jax.checkpoints.tokenizer import ByteTokenizer
except ImportError:  # the tokenizer module is written separately; same contract

  class ByteTokenizer:
    pad_id, bos_id, eos_id, vocab_size = 256, 257, 258, 259

    def encode(self, text, add_bos=True):
      return ([self.bos_id] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids):
      return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class PairTokenizer:
  """Two bytes per token (odd tail: one byte): pieces of uneven token cost, like a real BPE."""
  pad_id, bos_id, eos_id = 0, 1, 2
  vocab_size = 3 + 256 + 65536

  def encode(self, text, add_bos=True):
    b = text.encode("utf-8")
    ids = [3 + 256 + b[i] * 256 + b[i + 1] for i in range(0, len(b) - 1, 2)]
    if len(b) % 2:
      ids.append(3 + b[-1])
    return ([self.bos_id] if add_bos else []) + ids

  def decode(self, ids):
    out = bytearray()
    for i in map(int, ids):
      if 3 <= i < 259:
        out.append(i - 3)
      elif i >= 259:
        out += bytes(divmod(i - 259, 256))
    return out.decode("utf-8", errors="replace")


CORPUS = [
    "The harbour town woke early. Fishing boats left before dawn, and the market filled with voices. "
    "Children ran between the stalls! Nobody noticed the storm clouds gathering in the west?",
    "Mountains rise slowly over millions of years.\n\nErosion wears them down again, grain by grain. "
    "Rivers carry the sand to the sea, where it settles into new layers of rock.",
    "A library is a quiet place. Its shelves hold the memory of a city. Readers come and go, "
    "and the books stay, waiting for the next pair of hands.",
]
TOKENIZERS = [ByteTokenizer(), PairTokenizer()]
KW = {"passkey": {}, "multi_needle": {}, "kv_recall": {}, "doc_qa": {"corpus": CORPUS},
      "summarize": {"corpus": CORPUS, "n_sections": 3}}
RETRIEVAL = ("passkey", "multi_needle", "kv_recall", "doc_qa")


def _max_unit(tok, task):
  """Largest filler unit the task can stop short by (tokens)."""
  if task in ("passkey", "multi_needle"):
    return max(len(tok.encode(" " + s, add_bos=False)) for s in T.FILLER_SENTENCES)
  if task == "kv_recall":  # the reserve question may undercount the asked key by one unit
    return 2 * len(tok.encode("\nabcdef: ghijkl", add_bos=False)) + 2
  return max(len(tok.encode(" " + s, add_bos=False)) for d in CORPUS for s in T.split_sentences(d))


@pytest.mark.parametrize("tok", TOKENIZERS, ids=["byte", "pair"])
@pytest.mark.parametrize("task", sorted(T.TASKS))
def test_length_hits_target_never_exceeds(task, tok):
  unit = _max_unit(tok, task)
  for length in (400, 777, 2048):
    for depth in (0.0, 0.37, 1.0):
      s = T.TASKS[task](tok, length, depth, seed=3, **KW[task])
      assert s.length == len(s.tokens) == len(s.loss_mask) <= length
      assert length - s.length < unit, (task, length, depth, s.length)
      assert s.tokens.dtype == np.int32 and s.target_length == length and s.task == task


@pytest.mark.parametrize("tok", TOKENIZERS, ids=["byte", "pair"])
@pytest.mark.parametrize("task", RETRIEVAL)
def test_depth_places_needle_monotonically(task, tok):
  grid = np.linspace(0, 1, 11)
  samples = [T.TASKS[task](tok, 1500, float(d), seed=1, **KW[task]) for d in grid]
  pos = [s.key_position for s in samples]
  assert all(a <= b for a, b in zip(pos, pos[1:])), pos
  assert pos[-1] - pos[0] > 0.6 * samples[0].length  # spans most of the sequence
  first, last = samples[0], samples[-1]
  # depth 0: right after the preamble; depth 1: right before the question.
  assert first.key_position == first.meta["spans"]["preamble"][1]
  assert last.key_end == last.meta["spans"]["question"][0]
  assert first.key_position < 0.2 * first.length and last.key_end > 0.9 * last.prompt_len
  # The key really is where the metadata says: its span decodes to text holding the answer.
  for s in samples:
    assert s.answer in tok.decode(s.tokens[s.key_position:s.key_end])


@pytest.mark.parametrize("task", sorted(T.TASKS))
def test_deterministic_per_seed_and_index(task):
  tok = ByteTokenizer()
  a = T.TASKS[task](tok, 900, 0.5, seed=7, index=4, **KW[task])
  b = T.TASKS[task](tok, 900, 0.5, seed=7, index=4, **KW[task])
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert a.answer == b.answer and a.key_position == b.key_position
  others = {T.TASKS[task](tok, 900, 0.5, seed=s, index=i, **KW[task]).answer for s, i in [(7, 5), (8, 4), (9, 0)]}
  assert len(others | {a.answer}) == 4  # the key changes with seed and with index


@pytest.mark.parametrize("tok", TOKENIZERS, ids=["byte", "pair"])
@pytest.mark.parametrize("task", sorted(T.TASKS))
def test_answer_and_loss_mask(task, tok):
  s = T.TASKS[task](tok, 1200, 0.4, seed=2, **KW[task])
  mask = np.arange(s.length) >= s.prompt_len
  np.testing.assert_array_equal(s.loss_mask, mask.astype(np.float32))
  assert s.loss_mask.dtype == np.float32
  assert s.tokens[0] == tok.bos_id and s.tokens[-1] == tok.eos_id
  assert tok.decode(s.tokens[s.prompt_len:]) == " " + s.answer
  context = tok.decode(s.tokens[:s.prompt_len])
  if task in RETRIEVAL:
    assert s.answer in context
  else:  # summarize: every title appears, in the answer's order
    titles = s.answer.split(", ")
    found = [context.index(f"\n\n{t}:") for t in titles]
    assert found == sorted(found) and titles == s.meta["titles"]
    assert s.meta["title_positions"] == sorted(s.meta["title_positions"])


def test_passkey_format_and_key_distance():
  tok = ByteTokenizer()
  s = T.passkey(tok, 600, 0.5, seed=0, digits=4)
  text = tok.decode(s.tokens)
  assert len(s.answer) == 4 and s.answer[0] != "0"
  assert text.startswith(T.PASSKEY_PREAMBLE)
  assert f"The pass key is {s.answer}. Remember it. {s.answer} is the pass key." in text
  assert text.endswith("What is the pass key? The pass key is " + s.answer)
  assert "There and back again." in text
  assert T.key_distance(s) == s.prompt_len - s.key_end > 0
  assert T.key_distance(T.passkey(tok, 600, 0.0, seed=0)) > T.key_distance(s)
  with pytest.raises(ValueError, match="min_key_distance=500"):
    T.passkey(tok, 600, 1.0, seed=0, min_key_distance=500)
  T.passkey(tok, 600, 0.0, seed=0, min_key_distance=300)  # far enough: no error


def test_multi_needle_and_kv_recall_content():
  tok = ByteTokenizer()
  s = T.multi_needle(tok, 1500, 0.8, seed=5, n_needles=5)
  text = tok.decode(s.tokens)
  for k, v, p in zip(s.meta["keys"], s.meta["values"], s.meta["needle_positions"]):
    assert f"The magic number for {k} is {v}." in text
    assert tok.decode(s.tokens[p:p + 40]).startswith(f" The magic number for {k} is {v}.")
  assert len(set(s.meta["keys"])) == 5 and len(set(s.meta["values"])) == 5
  assert s.answer == s.meta["values"][s.meta["asked"]]
  kv = T.kv_recall(tok, 1500, 0.5, seed=5)
  lines = tok.decode(kv.tokens[:kv.prompt_len]).split("\n")[1:-1]
  keys = [ln.split(": ")[0] for ln in lines]
  assert len(keys) == kv.meta["n_pairs"] == len(set(keys)) > 10
  assert lines[kv.meta["asked"]] == f"{kv.meta['key']}: {kv.answer}"


def test_errors_name_the_value():
  tok = ByteTokenizer()
  with pytest.raises(ValueError, match=r"length=50 .*length >= \d+"):
    T.passkey(tok, 50, 0.5, seed=0)
  with pytest.raises(ValueError, match=r"depth=1.5"):
    T.passkey(tok, 500, 1.5, seed=0)
  with pytest.raises(ValueError, match="corpus"):
    T.doc_qa(tok, 500, 0.5, seed=0)
  with pytest.raises(ValueError, match="blank"):
    T.doc_qa(tok, 500, 0.5, seed=0, corpus=["  ", "\n"])
  with pytest.raises(ValueError, match="section"):
    T.summarize(tok, 300, 0.5, seed=0, corpus=CORPUS, n_sections=8)
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    T.generate("nope", tok, 1, 500)


def test_generate_grid_and_random_depth():
  tok = ByteTokenizer()
  out = T.generate("passkey", tok, n=2, length=[300, 600], depth=[0.0, 1.0], seed=4)
  assert len(out) == 8
  assert [s.target_length for s in out] == [300] * 4 + [600] * 4
  assert [s.depth for s in out] == [0.0, 0.0, 1.0, 1.0] * 2
  np.testing.assert_array_equal(out[5].tokens, T.passkey(tok, 600, 0.0, seed=4, index=5).tokens)
  rand = T.generate("doc_qa", tok, n=6, length=500, depth=None, seed=4, corpus=CORPUS)
  depths = [s.depth for s in rand]
  assert all(0 <= d <= 1 for d in depths) and len(set(depths)) == 6
  assert depths == [s.depth for s in T.generate("doc_qa", tok, 6, 500, None, 4, corpus=CORPUS)]


def test_long_sample_is_cheap():
  s = T.passkey(ByteTokenizer(), 32768, 0.25, seed=0)
  assert 32768 - 30 < s.length <= 32768


def test_make_batch_pads_and_rejects_long():
  tok = ByteTokenizer()
  samples = [T.passkey(tok, n, 0.5, seed=0) for n in (300, 400)]
  batch = T.make_batch(samples, 512, tok.pad_id)
  assert set(batch) == {"tokens", "loss_mask"}
  assert batch["tokens"].shape == batch["loss_mask"].shape == (2, 512)
  assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
  for row, s in enumerate(samples):
    np.testing.assert_array_equal(batch["tokens"][row, :s.length], s.tokens)
    assert (batch["tokens"][row, s.length:] == tok.pad_id).all()
    assert batch["loss_mask"][row, s.length:].sum() == 0
    assert batch["loss_mask"][row].sum() == s.length - s.prompt_len
  with pytest.raises(ValueError, match=rf"sample 1 .*length {samples[1].length} > seq_len=350"):
    T.make_batch(samples, 350, tok.pad_id)
  with pytest.raises(ValueError, match="no samples"):
    T.make_batch([], 10, 0)
