"""Command line: ``python -m edgeinfinite_jax.main --config=FILE[:ARG] --workdir=DIR``.

Intentionally thin so everything stays importable from notebooks (call
``get_config("tiny")`` and ``train.run`` directly there; ``DEFINE_config_file``
does not work inside a notebook). Overrides: ``--config.optim.lr=1e-3``.

Order matters: multi-host initialisation first (before anything touches the
JAX backend), then the whole config is validated, then ``config.job`` is
dispatched through ``JOBS`` (later stages register their jobs there and in
``experiment.JOBS``).
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from edgeinfinite_jax import experiment, sharding

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file experiments/configs/NAME.py[:ARG].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")


def _train(config, workdir):
  from edgeinfinite_jax import train
  return train.run(config, workdir)


def _demo(config, workdir):
  from edgeinfinite_jax import pipeline
  return pipeline.run(config, workdir)


def _quant(config, workdir):
  from edgeinfinite_jax import qat
  return qat.run(config, workdir)


# job name -> fn(config, workdir); keep in sync with experiment.JOBS.
JOBS = {"train": _train, "demo": _demo, "quant": _quant}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  config = _CONFIG.value
  if config is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  sharding.maybe_initialize_distributed(config)
  experiment.validate(config)
  if config.job not in JOBS:
    raise app.UsageError(f"job={config.job!r}: no such job; registered: {sorted(JOBS)}")
  JOBS[config.job](config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
