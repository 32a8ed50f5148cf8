"""Tokenizers behind one small interface: ``encode``/``decode`` and the special ids.

``ByteTokenizer`` needs no files (ids 0..255 are bytes, then pad/bos/eos), so the
embedded default model (``ModelConfig.vocab_size == 259``) and the tests run
anywhere. ``load_tokenizer(path)`` wraps a local Hugging Face tokenizer
directory or a ``.gguf`` file (never a hub download) in the same interface, so
callers do not care which one they hold.

``add_bos`` is each tokenizer's own rule for starting a text with BOS (the byte
tokenizer: yes; a GGUF file: its ``tokenizer.ggml.add_bos_token``, false for
SmolLM2, whose "BOS" ``<|im_start|>`` belongs to the chat template).
``encode(text)`` follows it; ``encode(text, add_bos=False/True)`` overrides it.
"""

from __future__ import annotations

import os
from typing import Sequence

from edgeinfinite_jax.checkpoints import gguf as gguf_loader

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "spiece.model")


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; pad=256, bos=257, eos=258 (vocab_size 259)."""
  pad_id, bos_id, eos_id = 256, 257, 258
  vocab_size = 259
  add_bos = True
  chat_template = None

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    add_bos = self.add_bos if add_bos is None else add_bos
    return ([self.bos_id] if add_bos else []) + list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    """Bytes back to text; special ids are skipped, broken UTF-8 becomes U+FFFD."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def batch_encode(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
    return [self.encode(t, add_bos) for t in texts]


class HFTokenizer:
  """A ``transformers`` tokenizer behind the ``ByteTokenizer`` interface.

  ``encode`` adds no special tokens of its own besides an optional BOS (the
  ``add_bos`` rule above), so the result does not depend on each tokenizer's
  post-processor habits.
  """

  def __init__(self, tok, add_bos: bool | None = None):
    self.hf = tok
    self.bos_id = tok.bos_token_id
    self.eos_id = tok.eos_token_id
    self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    self.vocab_size = len(tok)
    if add_bos is None:
      add_bos = getattr(tok, "add_bos_token", True)
    self.add_bos = bool(add_bos) and self.bos_id is not None
    self.chat_template = getattr(tok, "chat_template", None)

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    ids = list(self.hf.encode(text, add_special_tokens=False))
    add_bos = self.add_bos if add_bos is None else add_bos
    return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

  def batch_encode(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
    return [self.encode(t, add_bos) for t in texts]

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True
                          ) -> list[int]:
    """Token ids of ``messages`` ([{"role", "content"}, ...]) in the model's chat format.

    The template is the one shipped with the tokenizer (a GGUF file's
    ``tokenizer.chat_template``); ``add_generation_prompt`` ends with the
    assistant's turn header so that generation continues as the assistant.
    """
    if not self.chat_template:
      raise ValueError("this tokenizer has no chat template (none in its files)")
    out = self.hf.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                      tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]


# transformers' names of the special tokens' GGUF id keys (its get_gguf_tokenizer).
_GGUF_SPECIAL = (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                 ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))


def gguf_tokenizer_parts(path: str) -> tuple[str, dict, dict]:
  """``(architecture, tokenizer_dict, tokenizer_config)`` of a GGUF file, as transformers'
  ``get_gguf_tokenizer`` returns them, from this package's header reader: transformers'
  own metadata reader imports torch, which the JAX path must not need."""
  # transformers: optional and slow to import; only GGUF tokenizers need it
  from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING
  md = gguf_loader.read_header(path).metadata
  grouped = {group: {name: md[f"tokenizer.{key}"] for key, name in renames.items()
                     if f"tokenizer.{key}" in md}
             for group, renames in GGUF_TOKENIZER_MAPPING.items()}
  tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
  if tokenizer.get("tokenizer_type") == "llama":  # older files: llama.cpp adds BOS
    config.setdefault("add_bos_token", True)
  for name, key in _GGUF_SPECIAL:
    token_id = md.get(f"tokenizer.ggml.{key}")
    config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
  return md["general.architecture"], tokenizer, config


def _gguf_tokenizer(path: str) -> HFTokenizer:
  """The tokenizer a GGUF file describes (vocabulary, merges, special ids, chat template).

  transformers builds it from the file's metadata with the same code its
  ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` runs. That public call
  first loads the whole checkpoint through ``gguf.GGUFReader`` (20-30 s for
  SmolLM2's vocabulary on this CPU) and needs torch, so the builder is called
  directly on the metadata this package reads (``gguf_tokenizer_parts``) where this
  transformers version has it (5.x: 3-4 s), and the public call otherwise.
  """
  try:
    # transformers: optional and slow to import (2-3 s); only GGUF tokenizers need it
    from transformers.integrations.gguf import convert_gguf_tokenizer
  except ImportError:  # transformers 4.x: only the public (slow) route
    from transformers import AutoTokenizer  # (see above)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".",
                                        gguf_file=os.path.basename(path), local_files_only=True)
    return HFTokenizer(tok)
  from transformers import PreTrainedTokenizerFast  # (see above)
  architecture, tokenizer_dict, tokenizer_config = gguf_tokenizer_parts(path)
  backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
  kwargs = {**tokenizer_config, **extra}
  add_bos = kwargs.pop("add_bos_token", None)
  return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs), add_bos=add_bos)


def load_tokenizer(path: str | None = None):
  """``None`` or ``"byte"`` -> ByteTokenizer; a local directory or ``.gguf`` file -> HFTokenizer.

  Only local files are read (``local_files_only=True``); a path without any of
  ``TOKENIZER_FILES`` is a FileNotFoundError naming the path and the files looked for.
  (``models.resolve`` turns a model name such as ``"smollm2"`` into its file.)
  """
  if path is None or path == "byte":
    return ByteTokenizer()
  path = os.fspath(path)
  if path.endswith(".gguf"):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer path {path!r}: no such GGUF file")
    return _gguf_tokenizer(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer path {path!r}: not a directory (give a local "
                            "tokenizer directory, or None/'byte' for the byte tokenizer)")
  if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
    raise FileNotFoundError(f"tokenizer path {path!r}: no tokenizer files (looked for "
                            f"{', '.join(TOKENIZER_FILES)})")
  from transformers import AutoTokenizer  # heavy import, only when needed
  return HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
