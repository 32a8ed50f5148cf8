"""edgeinfinite_jax: long inputs on an edge budget, in JAX/Flax.

Public API (stable; documented in README.md):

* ``load_hf(path, dtype) -> (config, params)`` / ``save_hf(config, params, path)``
* ``load_gguf(path, dtype) -> (config, params)``: llama.cpp's GGUF files, dequantized
* ``load_tokenizer(path)``: byte tokenizer, HF directory or ``.gguf`` file
* ``models.smollm2() -> (config, params, tokenizer)``: the packaged real model
* ``forward(config, params, tokens) -> logits``
* ``with_memory(config, params, *, rng, **memory_options) -> (config, params)``
* ``Scenario``, ``Engine``, ``state_nbytes``
"""

from edgeinfinite_jax.config import ConfigError, MemoryConfig, ModelConfig, RopeScaling
from edgeinfinite_jax.engine import Engine, EngineState, Scenario, state_nbytes
from edgeinfinite_jax.gate import with_memory
from edgeinfinite_jax.model import forward, init_params
from edgeinfinite_jax.tokenizer import load_tokenizer


def load_hf(path, dtype=None):
  """Loads a Hugging Face Llama-family checkpoint directory; see convert.load_hf."""
  from edgeinfinite_jax import convert  # transformers-free, but only when asked for
  return convert.load_hf(path) if dtype is None else convert.load_hf(path, dtype=dtype)


def load_gguf(path, dtype=None, **kwargs):
  """Loads a llama.cpp GGUF file (llama / qwen2), dequantized; see gguf_loader.load_gguf."""
  from edgeinfinite_jax import gguf_loader  # numpy-only, but only when asked for
  return gguf_loader.load_gguf(path, **kwargs) if dtype is None else gguf_loader.load_gguf(
      path, dtype, **kwargs)


def save_hf(config, params, path, **kwargs):
  """Writes a checkpoint directory that transformers loads; see convert.save_hf."""
  from edgeinfinite_jax import convert
  return convert.save_hf(config, params, path, **kwargs)


__all__ = ["ConfigError", "Engine", "EngineState", "MemoryConfig", "ModelConfig", "RopeScaling",
           "Scenario", "forward", "init_params", "load_gguf", "load_hf", "load_tokenizer",
           "save_hf", "state_nbytes", "with_memory"]
