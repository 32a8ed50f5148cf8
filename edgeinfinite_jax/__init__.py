"""edgeinfinite_jax: long inputs on an edge budget, in JAX/Flax.

Public API (stable; documented in README.md):

* ``load_hf(path, dtype) -> (config, params)`` / ``save_hf(config, params, path)``
* ``load_gguf(path, dtype) -> (config, params)``: llama.cpp's GGUF files, dequantized
* ``load_tokenizer(path)``: byte tokenizer, HF directory or ``.gguf`` file
* ``models.smollm2() -> (config, params, tokenizer)``: the packaged real model
* ``forward(config, params, tokens) -> logits``
* ``with_memory(config, params, *, rng, **memory_options) -> (config, params)``
* ``with_lora(config, params, *, rank, rng) -> (config, params)``; ``lora.merge``
* ``Scenario``, ``Engine``, ``state_nbytes``
* ``deploy.load(directory, runtime)``: exported graphs in LiteRT / ONNX Runtime

The names resolve on first use (PEP 562): importing a sub-package such as
``edgeinfinite_jax.deploy``, which runs with numpy and an edge runtime only, must
not import JAX through this file.
"""

import importlib

_PUBLIC = {
    "ConfigError": "edgeinfinite_jax.model.config",
    "MemoryConfig": "edgeinfinite_jax.model.config",
    "ModelConfig": "edgeinfinite_jax.model.config",
    "RopeScaling": "edgeinfinite_jax.model.config",
    "Engine": "edgeinfinite_jax.engine.engine",
    "EngineState": "edgeinfinite_jax.engine.engine",
    "Scenario": "edgeinfinite_jax.engine.engine",
    "state_nbytes": "edgeinfinite_jax.engine.engine",
    "with_memory": "edgeinfinite_jax.model.gate",
    "with_lora": "edgeinfinite_jax.model.lora",
    "forward": "edgeinfinite_jax.model.transformer",
    "init_params": "edgeinfinite_jax.model.transformer",
    "load_tokenizer": "edgeinfinite_jax.checkpoints.tokenizer",
    "load_hf": "edgeinfinite_jax.checkpoints.hf",        # (path, dtype=float32)
    "save_hf": "edgeinfinite_jax.checkpoints.hf",        # (config, params, path)
    "load_gguf": "edgeinfinite_jax.checkpoints.gguf",    # (path, dtype=float32)
}
_MODULES = {"convert": "edgeinfinite_jax.checkpoints.hf",
            "gguf_loader": "edgeinfinite_jax.checkpoints.gguf",
            "lora": "edgeinfinite_jax.model.lora",
            "models": "edgeinfinite_jax.checkpoints.models"}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
  if name in _PUBLIC:
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
  elif name in _MODULES:
    value = importlib.import_module(_MODULES[name])
  else:
    try:  # a sub-package: edgeinfinite_jax.deploy, edgeinfinite_jax.model, ...
      value = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{name}":
        raise
      raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
  globals()[name] = value  # resolved once
  return value


def __dir__():
  return sorted(set(globals()) | set(_PUBLIC) | set(_MODULES))
