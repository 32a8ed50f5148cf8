"""Byte tokenizer round trips and local Hugging Face tokenizer loading (no downloads)."""

from __future__ import annotations

import pytest

from edgeinfinite_jax.model.config import ModelConfig
from edgeinfinite_jax.checkpoints.tokenizer import ByteTokenizer, load_tokenizer


@pytest.mark.parametrize("text", ["", "hello", "héllo wörld — ☃ 你好 🙂", "tab\tnew\nline\x00"])
def test_byte_round_trip(text):
  tok = ByteTokenizer()
  ids = tok.encode(text)
  assert ids[0] == tok.bos_id and len(ids) == 1 + len(text.encode("utf-8"))
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text
  assert tok.encode(text, add_bos=False) == ids[1:]


def test_byte_specials_and_vocab():
  tok = ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
  assert tok.vocab_size == ModelConfig().vocab_size
  assert tok.decode([tok.bos_id, 104, 105, tok.eos_id, tok.pad_id]) == "hi"
  assert tok.decode([0xE2, 0x98]) == "\ufffd"  # truncated UTF-8 is replaced, not raised
  assert tok.batch_encode(["a", "bc"], add_bos=False) == [[97], [98, 99]]


@pytest.mark.parametrize("spec", [None, "byte"])
def test_load_byte(spec):
  assert isinstance(load_tokenizer(spec), ByteTokenizer)


def test_load_local_hf_tokenizer(tmp_path):
  import hf_fixtures
  path = hf_fixtures.make_hf_tokenizer(tmp_path / "tok")
  tok = load_tokenizer(path)
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 10)
  ids = tok.encode("hello world jax !", add_bos=True)
  assert ids == [1, 4, 5, 6, 9]
  assert tok.encode("flax memory", add_bos=False) == [7, 8]
  assert tok.decode(ids + [2]) == "hello world jax !"
  assert tok.encode("unseen", add_bos=True) == [1, 3]
  # By default BOS follows the tokenizer's own add_bos_token (this one: none set).
  assert tok.add_bos == bool(getattr(tok.hf, "add_bos_token", True))
  assert tok.encode("unseen") == ([1] if tok.add_bos else []) + [3]


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer files"):
    load_tokenizer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    load_tokenizer(str(tmp_path / "missing"))
