"""edgeinfinite_jax: long inputs on an edge budget, in JAX/Flax.

Public API (stable): see README.md.
"""

from edgeinfinite_jax.config import ConfigError, MemoryConfig, ModelConfig, RopeScaling
from edgeinfinite_jax.model import forward, init_params

__all__ = ["ConfigError", "MemoryConfig", "ModelConfig", "RopeScaling", "forward", "init_params"]
