"""Every experiment file builds: get_config(), every sweep point, validation, shapes.

Shape-only (``jax.eval_shape``): no parameter is allocated, nothing compiles, so
the test stays fast as config files are added.
"""

import glob
import os

import jax
import pytest

from edgeinfinite_jax import experiment, main
from edgeinfinite_jax import model as model_lib
from edgeinfinite_jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py")))


def _check(config):
  experiment.validate(config, n_devices=1, check_paths=False)
  shapes = model_lib.abstract_params(experiment.model_config(config))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
  assert jax.tree.leaves(shapes)


def test_there_are_config_files():
  assert any(f.endswith("pretrain_tiny.py") for f in CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_and_sweep_build(path):
  module = experiment.load_module(path)
  config = module.get_config()
  _check(config)
  for point in experiment.sweep_points(module):
    _check(experiment.apply_overrides(config, point))


def test_pretrain_tiny_variants():
  module = experiment.load_module(os.path.join(ROOT, "experiments/configs/pretrain_tiny.py"))
  tiny = module.get_config("tiny")
  assert tiny.model.hidden_size == 32 and tiny.train.steps == 60
  assert module.get_config("runlocal").to_dict() == tiny.to_dict()
  assert module.get_config("tiny,lr=0.01,steps=5").optim.lr == 0.01
  points = experiment.sweep_points(module, "tiny")
  assert len(points) == 4 and all("optim.lr" in p for p in points)
  for point in points:
    _check(experiment.apply_overrides(tiny, point))
  cmds = experiment.sweep_commands(os.path.join(ROOT, "experiments/configs/pretrain_tiny.py"),
                                   "tiny")
  assert len(cmds) == 4 and "--config.optim.lr=" in cmds[0]


def test_parse_arg():
  a = experiment.parse_arg("tiny,lr=1e-3,layers=4", tiny=False, lr=3e-4, layers=2, name="x")
  assert a.tiny is True and a.lr == 1e-3 and a.layers == 4 and a.name == "x"
  with pytest.raises(ConfigError, match="unknown key 'nope'"):
    experiment.parse_arg("nope=1", tiny=False)
  with pytest.raises(ConfigError, match="'layers' is not a flag"):
    experiment.parse_arg("layers", layers=2)
  with pytest.raises(ConfigError, match="must be a int"):
    experiment.parse_arg("layers=x", layers=2)


def test_validate_names_key_and_rule():
  base = experiment.base_config()
  cases = [
      ("data.seq_len", 0, "data.seq_len=0: must be a positive integer"),
      ("train.steps", -5, "train.steps=-5: must be a positive integer"),
      ("optim.lr", -1.0, "optim.lr=-1.0: must be > 0"),
      ("checkpoint.keep", 0, "checkpoint.keep=0: must be a positive integer"),
      ("model.hidden_size", -8, "model.hidden_size=-8"),
      ("optim.trainable", "nope", "optim.trainable='nope': must be one of"),
      ("job", "dance", "job='dance': must be one of"),
  ]
  for key, value, message in cases:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
      experiment.validate(experiment.apply_overrides(base, {key: value}), n_devices=1)
  bad = experiment.base_config()
  bad.unknown_section = 1
  with pytest.raises(ConfigError, match="unknown top-level key.*unknown_section"):
    experiment.validate(bad, n_devices=1)
  bad = experiment.base_config()
  bad.data.batch_size = 6
  with pytest.raises(ConfigError, match="data.batch_size=6: must be divisible by .* 4"):
    experiment.validate(bad, n_devices=4)
  bad = experiment.base_config()
  bad.mesh.tensor = 3
  with pytest.raises(ConfigError, match="mesh.data=-1"):
    experiment.validate(bad, n_devices=4)


def test_jobs_registry_matches():
  assert set(main.JOBS) == set(experiment.JOBS)
