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

from edgeinfinite_jax.model.config import ConfigError, MemoryConfig, ModelConfig, RopeScaling
from edgeinfinite_jax.engine.engine import Engine, EngineState, Scenario, state_nbytes
from edgeinfinite_jax.model.gate import with_memory
from edgeinfinite_jax.model.transformer import forward, init_params
from edgeinfinite_jax.checkpoints.tokenizer import load_tokenizer
from edgeinfinite_jax.checkpoints import hf as convert
from edgeinfinite_jax.checkpoints import gguf as gguf_loader


def load_hf(path, dtype=None):
  """Loads a Hugging Face Llama-family checkpoint directory; see convert.load_hf."""
  return convert.load_hf(path) if dtype is None else convert.load_hf(path, dtype=dtype)


def load_gguf(path, dtype=None, **kwargs):
  """Loads a llama.cpp GGUF file (llama / qwen2), dequantized; see gguf_loader.load_gguf."""
  return gguf_loader.load_gguf(path, **kwargs) if dtype is None else gguf_loader.load_gguf(
      path, dtype, **kwargs)


def save_hf(config, params, path, **kwargs):
  """Writes a checkpoint directory that transformers loads; see convert.save_hf."""
  return convert.save_hf(config, params, path, **kwargs)


__all__ = ["ConfigError", "Engine", "EngineState", "MemoryConfig", "ModelConfig", "RopeScaling",
           "Scenario", "forward", "init_params", "load_gguf", "load_hf", "load_tokenizer",
           "save_hf", "state_nbytes", "with_memory"]
