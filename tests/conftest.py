"""Shared test settings: float32 matmuls so parity tolerances mean what they say."""

import zlib

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "float32")


def rng_for(request) -> np.random.Generator:
  """A generator seeded by the test's own id: its random inputs do not depend on
  which tests ran before it (pytest-randomly changes the order on every run)."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
