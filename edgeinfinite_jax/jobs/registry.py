"""The jobs ``main`` dispatches: ``config.job`` -> (run, validate).

``validate(config)`` is the one entry to every rule of an experiment config: the
schema's (``configs.validate``), a training run's (``train.trainer.validate``:
optimizer, mesh, data, init, model) and the job's own section. ``main`` and the
sweep launcher call it before anything is compiled; each job's ``run`` calls it
again, so a notebook that calls ``run`` directly gets the same errors.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from edgeinfinite_jax.configs import schema
from edgeinfinite_jax.jobs import demo, quant
from edgeinfinite_jax.train import trainer


class Job(NamedTuple):
  run: Callable[[Any, str], dict]      # (config, workdir) -> metrics
  validate: Callable[[Any], None]      # the job's own section; raises ConfigError


def _no_section(config) -> None:
  del config  # job "train" has no section of its own


JOBS = {
    "train": Job(trainer.run, _no_section),
    "demo": Job(demo.run, demo.validate),
    "quant": Job(quant.run, quant.validate),
}
assert tuple(JOBS) == schema.JOB_NAMES, "configs/schema.py JOB_NAMES and JOBS disagree"


def validate(config, n_devices: int | None = None, check_paths: bool = True) -> None:
  """Every rule of ``config`` (see the module doc); raises ConfigError naming key and rule."""
  trainer.validate(config, n_devices=n_devices, check_paths=check_paths)
  JOBS[config.job].validate(config)


def run(config, workdir: str) -> dict:
  """Runs ``config.job`` in ``workdir``."""
  return JOBS[config.job].run(config, workdir)
