"""The token-id rule, in numpy only (``deploy`` runtimes check ids without JAX)."""

from __future__ import annotations

import numpy as np


def check_token_ids(tokens, vocab_size: int, what: str = "tokens", ndim: int = 2):
  """``tokens`` as an int32 numpy array of rank ``ndim``, ids in ``[0, vocab_size)``.

  The concrete-array half of ``transformer.check_tokens`` (see there for why each
  rule exists); ValueError naming ``what``, the value and the rule otherwise.
  """
  tokens = np.asarray(tokens)
  check_token_layout(tokens, what, ndim)
  lo, hi = tokens.min(), tokens.max()
  if lo < 0 or hi >= vocab_size:
    raise ValueError(f"{what}: ids must lie in [0, {vocab_size}), got [{lo}, {hi}]")
  return tokens.astype(np.int32)


def check_token_layout(tokens, what: str, ndim: int) -> None:
  """Rank ``ndim``, an integer dtype, no empty axis (works on tracers too)."""
  layout = "[batch, time]" if ndim == 2 else "[batch]" if ndim == 1 else f"rank {ndim}"
  if tokens.ndim != ndim or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{what}: expected an integer array of rank {ndim} {layout}, got "
                     f"{tokens.dtype}{list(tokens.shape)}")
  if 0 in tokens.shape:
    raise ValueError(f"{what}: shape {list(tokens.shape)} is empty; need at least one row "
                     "and one token per row")
