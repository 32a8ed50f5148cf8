"""``fast_compiles()``: XLA's cheap CPU compiles for tests that compile many programs
(as Flax's lm1b test does); numerics are unaffected."""

import contextlib

import jax


@contextlib.contextmanager
def fast_compiles():
  prev = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", prev)
