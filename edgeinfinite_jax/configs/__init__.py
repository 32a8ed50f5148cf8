"""Experiment configs: the schema (every default as data), ``arg`` parsing, sweeps,
overrides and the schema's rules. Experiment files use this namespace::

  from edgeinfinite_jax import configs

  def get_config(arg=None):
    a = configs.parse_arg(arg, tiny=False)
    config = configs.base_config()
    ...
"""

from edgeinfinite_jax.configs.args import load_module, parse_arg, sweep_points
from edgeinfinite_jax.configs.overrides import apply_overrides, key_parent
from edgeinfinite_jax.configs.schema import JOB_NAMES, base_config, renamed_hint
from edgeinfinite_jax.configs.validate import model_config

__all__ = ["JOB_NAMES", "apply_overrides", "base_config", "key_parent", "load_module",
           "model_config", "parse_arg", "renamed_hint", "sweep_points"]
