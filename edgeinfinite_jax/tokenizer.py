"""Tokenizers behind one small interface: ``encode``/``decode`` and the special ids.

``ByteTokenizer`` needs no files (ids 0..255 are bytes, then pad/bos/eos), so the
embedded default model (``ModelConfig.vocab_size == 259``) and the tests run
anywhere. ``load_tokenizer(path)`` wraps a local Hugging Face tokenizer
directory (never a hub download) in the same interface, so callers do not care
which one they hold.
"""

from __future__ import annotations

import os
from typing import Sequence

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "spiece.model")


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; pad=256, bos=257, eos=258 (vocab_size 259)."""
  pad_id, bos_id, eos_id = 256, 257, 258
  vocab_size = 259

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    return ([self.bos_id] if add_bos else []) + list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    """Bytes back to text; special ids are skipped, broken UTF-8 becomes U+FFFD."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def batch_encode(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
    return [self.encode(t, add_bos) for t in texts]


class HFTokenizer:
  """A ``transformers`` tokenizer behind the ``ByteTokenizer`` interface.

  ``encode`` adds no special tokens of its own besides an optional BOS, so the
  result does not depend on each tokenizer's ``add_bos_token`` habits.
  """

  def __init__(self, tok):
    self.hf = tok
    self.bos_id = tok.bos_token_id
    self.eos_id = tok.eos_token_id
    self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    self.vocab_size = len(tok)

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    ids = list(self.hf.encode(text, add_special_tokens=False))
    return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

  def batch_encode(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
    return [self.encode(t, add_bos) for t in texts]


def load_tokenizer(path: str | None = None):
  """``None`` or ``"byte"`` -> ByteTokenizer; a local directory -> HFTokenizer.

  Only local files are read (``local_files_only=True``); a path without any of
  ``TOKENIZER_FILES`` is a FileNotFoundError naming the path and the files looked for.
  """
  if path is None or path == "byte":
    return ByteTokenizer()
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer path {path!r}: not a directory (give a local "
                            "tokenizer directory, or None/'byte' for the byte tokenizer)")
  if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
    raise FileNotFoundError(f"tokenizer path {path!r}: no tokenizer files (looked for "
                            f"{', '.join(TOKENIZER_FILES)})")
  from transformers import AutoTokenizer  # heavy import, only when needed
  return HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
