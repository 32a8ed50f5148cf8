"""Shared test settings: float32 matmuls so parity tolerances mean what they say."""

import zlib

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "float32")


def rng_for(request) -> np.random.Generator:
  """A generator seeded by the test's own id: its random inputs do not depend on
  which tests ran before it (pytest-randomly changes the order on every run)."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _seeded_module_rng(request):
  """A test module that draws its inputs from a module-level ``RNG`` gets a fresh one
  per test, seeded by the test's id: with one shared generator, each test's inputs
  depended on which tests of the module ran before it."""
  if hasattr(request.module, "RNG"):
    request.module.RNG = rng_for(request)
