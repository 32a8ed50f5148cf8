"""Experiment files: loading them, their ``arg`` string, their sweeps.

* ``get_config(arg=None)``: ``arg`` is the text after ``:`` on the command line
  (``--config=experiments/configs/NAME.py:tiny,lr=1e-3``), parsed with
  ``parse_arg(arg, tiny=False, lr=3e-4, ...)``.
* ``sweep(add, arg=None)`` (optional) calls ``add({...})`` once per sweep point,
  each a dict of dotted config keys to values (the CLI's ``--config.KEY=VALUE``
  keys): ``add({"optim.lr": 1e-3, "model.num_layers": 4})``. ``sweep_points``
  collects them; ``cli/sweep.py`` runs them. This is the one sweep convention.
* ``metrics()`` (optional) lists the metric names worth plotting.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import ml_collections

from edgeinfinite_jax.model.config import ConfigError


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """``"tiny,lr=1e-3,layers=4"`` -> ConfigDict with typed values.

  Each item is ``key=value`` (converted to the type of ``defaults[key]``) or a
  bare ``flag`` (sets a boolean default to True). Unknown keys are an error.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in (s.strip() for s in (arg or "").split(",")):
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"config arg {item!r}: unknown key {key!r}; valid: {sorted(defaults)}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ConfigError(f"config arg {item!r}: {key!r} is not a flag; write {key}=VALUE")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"config arg {item!r}: {key!r} must be a boolean")
      out[key] = value.lower() in ("true", "1", "yes")
    elif default is None or isinstance(default, str):
      out[key] = value
    else:
      try:
        out[key] = type(default)(value)
      except ValueError:
        raise ConfigError(f"config arg {item!r}: {key!r} must be a "
                          f"{type(default).__name__}") from None
  return out


def load_module(path: str):
  """Imports an experiment file by path (``experiments/configs/NAME.py``)."""
  name = "edgeinfinite_experiment_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sweep_points(module, arg: str | None = None) -> list[dict[str, Any]]:
  """The override dicts that ``module.sweep(add, arg)`` adds ([] if none)."""
  points: list[dict[str, Any]] = []
  if hasattr(module, "sweep"):
    def add(overrides: Mapping[str, Any]) -> None:
      points.append(dict(overrides))
    module.sweep(add, arg)
  return points
