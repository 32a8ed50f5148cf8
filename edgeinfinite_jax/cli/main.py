"""Command line: ``python -m edgeinfinite_jax.cli.main --config=FILE[:ARG] --workdir=DIR``.

Intentionally thin so everything stays importable from notebooks (call
``get_config("tiny")`` and ``train.run`` directly there; ``DEFINE_config_file``
does not work inside a notebook). Overrides: ``--config.optim.lr=1e-3``.

Order matters: the override keys are checked against the config file first
(a mistyped ``--config.KEY`` is one line naming the nearest valid key, exit code
2, where ml_collections would print a long traceback), then multi-host
initialisation (before anything touches the JAX backend), then the whole config
is validated, then ``config.job`` is dispatched through ``jobs.registry.JOBS``.
"""

from __future__ import annotations

import difflib
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from edgeinfinite_jax import configs
from edgeinfinite_jax.cli import errors
from edgeinfinite_jax.jobs import registry
from edgeinfinite_jax.train import sharding

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file experiments/configs/NAME.py[:ARG].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")



def _config_keys(config, prefix=""):
  """Every dotted key of a ConfigDict: sections and leaves."""
  keys = []
  for k in config.keys():
    keys.append(prefix + k)
    if isinstance(config[k], ml_collections.ConfigDict):
      keys += _config_keys(config[k], prefix + k + ".")
  return keys


def override_error(argv) -> str | None:
  """The first ``--config.KEY`` override in ``argv`` that names no key of the config
  file, as a one-line message with the nearest valid key; None when all exist (or when
  the config file does not load: absl reports that itself)."""
  spec, keys = None, []
  for i, a in enumerate(argv[1:], 1):
    if a in ("--config", "-config") and i + 1 < len(argv):
      spec = argv[i + 1]
    elif a.startswith(("--config=", "-config=")):
      spec = a.split("=", 1)[1]
    else:
      for lead in ("--config.", "-config.", "--noconfig.", "-noconfig."):
        if a.startswith(lead):
          keys.append(a[len(lead):].split("=", 1)[0])
  if spec is None or not keys:
    return None
  path, sep, arg = spec.partition(":")
  try:
    module = configs.load_module(path)
    config = module.get_config(arg) if sep else module.get_config()
  except Exception:  # noqa: BLE001 - a config that does not load is absl's to report
    return None
  valid = _config_keys(config)
  for key in keys:
    if key not in valid:
      near = difflib.get_close_matches(key, valid, n=1)
      hint = f"; did you mean --config.{near[0]}?" if near else ""
      hint = configs.renamed_hint(key) + hint
      return f"--config.{key}: no such config key in {spec}{hint}"
  return None


HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "-?")


def argv_error(argv) -> str | None:
  """What is wrong with the command line before any flag is parsed, as one line: a
  config file that does not exist (absl would report it as a 36-line double traceback
  once the config is read) or a ``--config.KEY`` override that names no key."""
  for i, a in enumerate(argv[1:], 1):
    spec = argv[i + 1] if a in ("--config", "-config") and i + 1 < len(argv) else (
        a.split("=", 1)[1] if a.startswith(("--config=", "-config=")) else None)
    if spec is not None:
      path = spec.partition(":")[0]
      if not os.path.isfile(path):
        return f"--config={spec}: no such config file {path!r}"
  return override_error(argv)


def _parse_flags(argv):
  if any(a in HELP_FLAGS for a in argv[1:]):
    try:  # absl prints the usage, then exits with status 1: asking for help is no error
      app.parse_flags_with_usage(argv)
    except SystemExit:
      pass
    sys.exit(0)
  error = argv_error(argv)
  if error:
    print(f"main: error: {error}", file=sys.stderr)
    sys.exit(errors.EXIT_USAGE)
  return app.parse_flags_with_usage(argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  config = _CONFIG.value
  if config is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  workdir = _WORKDIR.value
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir={workdir}: exists and is not a directory")
  sharding.maybe_initialize_distributed(config)
  registry.validate(config)  # names the key and the rule; an unknown job included
  registry.run(config, workdir)


def cli(argv=None):
  """The console script ``edgeinfinite-run``: user errors as one line (``errors.run``)."""
  errors.run(lambda args: app.run(main, argv=[sys.argv[0], *args], flags_parser=_parse_flags),
             "main", argv)


if __name__ == "__main__":
  cli()
