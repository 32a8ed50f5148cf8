"""Dotted-key overrides (``optim.lr``, ``demo.memory.gate``) applied to a config."""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from edgeinfinite_jax.model.config import ConfigError


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of ``config`` with dotted keys set; an unknown key is an error."""
  config = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    node, leaf = key_parent(config, dotted, what="sweep key")
    node[leaf] = value
  return config


def key_parent(config: ml_collections.ConfigDict, dotted: str, what: str = "key"):
  """(section, leaf name) of an existing dotted key; an unknown key is an error."""
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
      raise ConfigError(f"{what} {dotted!r}: {p!r} is not a config section")
    node = node[p]
  if leaf not in node:
    raise ConfigError(f"{what} {dotted!r}: no such config key")
  return node, leaf
