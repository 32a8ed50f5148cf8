"""Shared test settings: float32 matmuls so parity tolerances mean what they say."""

import importlib
import importlib.util
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


def requires(*modules: str):
  """Skip mark for a test module whose outside reference is an optional package of the
  test extra (torch, transformers, accelerate), checked without importing it."""
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (test extra)")


class Lazy:
  """A module imported on first attribute access. Collecting the suite imports every
  test module; torch + transformers at module level cost each xdist worker ~6 s,
  even when the tests that use them are deselected (``-m "not slow"``)."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr):
    if attr.startswith(("_", "pytest")):  # collection probes every module global for
      raise AttributeError(attr)  # fixture / test markers: answer without importing
    return getattr(importlib.import_module(self._name), attr)
