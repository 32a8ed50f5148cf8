"""``fast_compiles()``: XLA's cheap CPU compiles for tests that compile many programs
(as Flax's lm1b test does); ``fast_env()``: the same for a subprocess.

The flag changes what XLA emits, so results may differ in the last bits from an
optimised compile, and jax's in-memory jit cache does not key on it: a function
compiled inside this context would be reused, unoptimised, by a later test outside
it (and vice versa), making that test's last bits depend on test order. The caches
are therefore cleared on entry and on exit: each mode's programs stay its own.
"""

import contextlib
import os

import jax

# The same switch for a subprocess (a CLI run, a notebook kernel, a bench worker): jax
# reads it at start-up. A process is wholly in one mode, so no cache mixes the two.
ENV_VAR = "JAX_DISABLE_MOST_OPTIMIZATIONS"


def fast_env(**extra) -> dict:
  """This process's environment (plus ``extra``) with cheap compiles switched on."""
  return {**os.environ, ENV_VAR: "1", **extra}


@contextlib.contextmanager
def fast_compiles():
  prev = jax.config.read("jax_disable_most_optimizations")
  jax.clear_caches()
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", prev)
    jax.clear_caches()
