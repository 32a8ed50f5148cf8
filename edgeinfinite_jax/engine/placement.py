"""Where a prompt goes, what fits, and how it is cut into fixed-shape prefill calls.

Numpy only: the rules of the Engine's call contract that do not need JAX.

Shared by ``Engine`` and the JAX-free ``deploy`` runtimes, so the exported graphs
are fed exactly as the engine feeds its own step functions.
"""

from __future__ import annotations

import numpy as np


def chunks(tokens, start: int, segment_len: int):
  """Yields ``(chunk int32 [batch, segment_len], n_valid)`` for ``tokens [batch, t]``
  read from position ``start``: the first chunk runs to the end of the current block
  (so every later one is block-aligned), the last is zero-padded after ``n_valid``."""
  t, read = tokens.shape[1], 0
  while read < t:
    n = min(segment_len - (start + read) % segment_len, t - read)
    chunk = np.zeros((tokens.shape[0], segment_len), np.int32)
    chunk[:, :n] = tokens[:, read:read + n]
    yield chunk, n
    read += n


def route_for(prompt_len: int, short_threshold: int) -> str:
  """``short`` (the base model, full attention) up to ``short_threshold`` tokens."""
  return "short" if prompt_len <= short_threshold else "long"


def check_capacity(route: str, start: int, t: int, limit: int | None,
                   decoded: int | None = None) -> None:
  """ValueError, before any work, when ``t`` tokens read from position ``start`` (plus
  ``decoded`` generated ones) exceed the route's cache capacity ``limit`` (None:
  unbounded, the memory absorbs what leaves the window)."""
  if limit is None:
    return
  if decoded is not None and start + t + decoded > limit:
    raise ValueError(f"generate: {start + t} prompt tokens + {decoded} decoded exceed the "
                     f"{route} route's cache capacity {limit} (raise Scenario.max_context, "
                     "or ask for fewer new tokens)")
  if start + t > limit:
    have = f"{start} + {t} = {start + t}" if start else f"{t}"
    raise ValueError(f"prompt of {have} tokens exceeds the {route} route's cache capacity "
                     f"{limit} (raise Scenario.max_context"
                     + (", or prefill the whole text on the long route)" if start else ")"))


def check_decode_room(route: str, length: int, limit: int | None) -> None:
  """ValueError when a state of ``length`` tokens has no room for one more."""
  if limit is not None and length + 1 > limit:
    raise ValueError(f"decode: the {route} route's cache holds {limit} tokens; "
                     f"state already has {length}")


def new_tokens(max_new_tokens, limit: int) -> int:
  """``max_new_tokens`` (None: ``limit``) checked: an int in ``[1, limit]``, the
  compiled ``Scenario.max_new_tokens``."""
  n = limit if max_new_tokens is None else max_new_tokens
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 < n <= limit:
    raise ValueError(f"max_new_tokens={n!r}: must be an int in [1, Scenario.max_new_tokens="
                     f"{limit}]")
  return int(n)


def check_eos_id(eos_id, vocab_size: int) -> None:
  if eos_id is not None and (not isinstance(eos_id, (int, np.integer))
                             or isinstance(eos_id, bool) or not 0 <= eos_id < vocab_size):
    raise ValueError(f"eos_id={eos_id!r}: must be None or a token id in [0, {vocab_size})")
