"""Shared test settings: float32 matmuls so parity tolerances mean what they say."""

import jax

jax.config.update("jax_default_matmul_precision", "float32")
