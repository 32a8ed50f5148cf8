"""Dotted-key overrides (``optim.lr``, ``demo.memory.gate``) and their command-line text.

The one value codec: ``cli_value`` writes a value as the text after
``--config.KEY=``, ``parse_cli_value`` reads such text the way ``main`` does (by
the type of the field it replaces), ``resolve`` applies ``{key: text}`` to a config.
The sweep launcher builds and checks every run's command line with these.
"""

from __future__ import annotations

import ast
from typing import Any, Mapping

import ml_collections

from edgeinfinite_jax.configs import schema
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
      raise ConfigError(f"{what} {dotted!r}: {p!r} is not a config section"
                        f"{schema.renamed_hint(dotted)}")
    node = node[p]
  if leaf not in node:
    raise ConfigError(f"{what} {dotted!r}: no such config key")
  return node, leaf


def cli_value(value: Any, key: str = "value") -> str:
  """The text after ``--config.KEY=`` that makes ``main`` set ``value``."""
  if isinstance(value, bool):
    return "True" if value else "False"
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, str):
    return value
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  raise ConfigError(f"sweep key {key!r}: value {value!r} of type {type(value).__name__} cannot "
                   "be passed on the command line (use bool, int, float, str or tuple)")


_TRUE, _FALSE = ("true", "t", "1", "yes", "y"), ("false", "f", "0", "no", "n")


def parse_cli_value(text: str, current: Any, key: str) -> Any:
  """``text`` parsed as ``--config.KEY=text`` parses it for a field holding ``current``."""
  rule = None
  if isinstance(current, bool):
    if text.lower() in _TRUE + _FALSE:
      return text.lower() in _TRUE
    rule = "must be a boolean (True/False)"
  elif isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      rule = "must be an int (the field's default is an int)"
  elif isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      rule = "must be a float"
  elif isinstance(current, str):
    return text
  elif isinstance(current, tuple):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = None
    if isinstance(value, (tuple, list)):
      return tuple(value)
    rule = "must be a tuple literal such as (8, 4)"
  elif current is None:
    rule = ("cannot be set from the command line: its value in get_config() is None; give it "
            "a default of the right type there")
  elif isinstance(current, ml_collections.ConfigDict):
    rule = "is a config section; sweep its leaves (section.key) instead"
  else:
    rule = f"cannot be set from the command line (type {type(current).__name__})"
  raise ConfigError(f"{key}={text!r}: {rule}")


def value_at(config, dotted: str):
  """The value of an existing dotted key (an unknown key is an error)."""
  node, leaf = key_parent(config, dotted)
  return node[leaf]


def resolve(config, overrides: Mapping[str, str]) -> ml_collections.ConfigDict:
  """``config`` with ``{dotted key: command-line text}`` applied as ``main`` would."""
  parsed = {k: parse_cli_value(text, value_at(config, k), k) for k, text in overrides.items()}
  try:
    return apply_overrides(config, parsed)
  except TypeError as e:  # ConfigDict type safety
    raise ConfigError(str(e)) from None
