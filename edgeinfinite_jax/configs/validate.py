"""Schema rules of an experiment config: known keys, the job, the generic sections.

Each rule raises ``ConfigError`` naming the key, its value and the rule. The
rules that need more than the schema (data files, the mesh, trainable groups,
each job's own section) live with the code that owns them and are run together,
in order, by ``jobs.registry.validate``: this module imports config dataclasses
only, so loading a config file never imports the trainer.
"""

from __future__ import annotations

import difflib

import ml_collections

from edgeinfinite_jax.configs import schema
from edgeinfinite_jax.model.config import ConfigError, ModelConfig, require


def positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def model_config(config) -> ModelConfig:
  """The ModelConfig of ``config.model`` (raises ConfigError naming the key)."""
  return ModelConfig.from_dict(config.model)


# Sections whose keys are fixed by the schema. ``model`` is checked by
# ModelConfig.from_dict, ``quant`` by QuantConfig.from_dict, ``mesh`` by the mesh rules.
_CLOSED = ("data", "optim", "train", "checkpoint", "distributed", "init", "demo",
           "demo.memory", "quant_job")


def _section(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def check_keys(config) -> None:
  """Every top-level section and every key of a closed section exists in the schema."""
  base = schema.base_config()
  unknown = sorted(set(config.keys()) - set(base.keys()))
  if unknown:
    raise ConfigError(f"unknown top-level key(s) {', '.join(unknown)}"
                      f"{schema.renamed_hint(unknown[0])}; valid keys: "
                      f"{', '.join(sorted(base.keys()))}")
  for section in _CLOSED:
    have, known = _section(config, section), _section(base, section)
    if not isinstance(have, ml_collections.ConfigDict):
      raise ConfigError(f"{section}={have!r}: must be a config section")
    extra = sorted(set(have.keys()) - set(known.keys()))
    if extra:
      near = difflib.get_close_matches(extra[0], list(known.keys()), n=1)
      hint = f" (did you mean {section}.{near[0]}?)" if near else ""
      raise ConfigError(f"unknown key(s) {', '.join(f'{section}.{k}' for k in extra)}{hint}; "
                        f"valid keys: {', '.join(sorted(known.keys()))}")


def check(config) -> None:
  """The schema rules: known keys, the job's name, seed, step counts, checkpoints."""
  check_keys(config)
  require(config.job in schema.JOB_NAMES, "job", config.job,
          f"must be one of {schema.JOB_NAMES}")
  require(isinstance(config.seed, int) and config.seed >= 0, "seed", config.seed,
          "must be an integer >= 0")
  t = config.train
  require(positive_int(t.steps), "train.steps", t.steps, "must be a positive integer")
  require(positive_int(t.log_every), "train.log_every", t.log_every,
          "must be a positive integer")
  require(isinstance(t.eval_every, int) and t.eval_every >= 0, "train.eval_every",
          t.eval_every, "must be an integer >= 0 (0 = only at the end)")
  require(isinstance(t.eval_batches, int) and t.eval_batches >= 0, "train.eval_batches",
          t.eval_batches, "must be an integer >= 0")
  c = config.checkpoint
  require(positive_int(c.every), "checkpoint.every", c.every, "must be a positive integer")
  require(positive_int(c.keep), "checkpoint.keep", c.keep, "must be a positive integer")
