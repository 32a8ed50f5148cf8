"""Every experiment file builds: get_config(), every sweep point, validation, shapes.

Shape-only (``jax.eval_shape``): no parameter is allocated, nothing compiles, so
the test stays fast as config files are added.
"""

import glob
import os
import warnings

import jax
import pytest

from edgeinfinite_jax import configs
from edgeinfinite_jax.jobs import registry
from edgeinfinite_jax import with_memory
from edgeinfinite_jax.model import transformer as model_lib
from edgeinfinite_jax.model.config import ConfigError, MemoryConfig, ModelConfig, RopeScaling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py")))


def _check(config):
  registry.validate(config, n_devices=1, check_paths=False)
  shapes = model_lib.abstract_params(configs.model_config(config))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
  assert jax.tree.leaves(shapes)


def test_there_are_config_files():
  assert any(f.endswith("pretrain_tiny.py") for f in CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_and_sweep_build(path):
  module = configs.load_module(path)
  config = module.get_config()
  _check(config)
  for point in configs.sweep_points(module):
    _check(configs.apply_overrides(config, point))


def test_pretrain_tiny_variants():
  module = configs.load_module(os.path.join(ROOT, "experiments/configs/pretrain_tiny.py"))
  tiny = module.get_config("tiny")
  assert tiny.model.hidden_size == 32 and tiny.train.steps == 60
  assert module.get_config("runlocal").to_dict() == tiny.to_dict()
  assert module.get_config("tiny,lr=0.01,steps=5").optim.lr == 0.01
  points = configs.sweep_points(module, "tiny")
  assert len(points) == 4 and all("optim.lr" in p for p in points)
  for point in points:
    _check(configs.apply_overrides(tiny, point))


def test_parse_arg():
  a = configs.parse_arg("tiny,lr=1e-3,layers=4", tiny=False, lr=3e-4, layers=2, name="x")
  assert a.tiny is True and a.lr == 1e-3 and a.layers == 4 and a.name == "x"
  with pytest.raises(ConfigError, match="unknown key 'nope'"):
    configs.parse_arg("nope=1", tiny=False)
  with pytest.raises(ConfigError, match="'layers' is not a flag"):
    configs.parse_arg("layers", layers=2)
  with pytest.raises(ConfigError, match="must be a int"):
    configs.parse_arg("layers=x", layers=2)


def test_validate_names_key_and_rule():
  base = configs.base_config()
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
      registry.validate(configs.apply_overrides(base, {key: value}), n_devices=1)
  bad = configs.base_config()
  bad.unknown_section = 1
  with pytest.raises(ConfigError, match="unknown top-level key.*unknown_section"):
    registry.validate(bad, n_devices=1)
  bad = configs.base_config()  # a config written before the rename is told the new name
  bad.quantize = {"method": "fp"}
  with pytest.raises(ConfigError, match="quantize \\('quantize' was renamed 'quant_job'\\)"):
    registry.validate(bad, n_devices=1)
  with pytest.raises(ConfigError, match="'quantize' was renamed 'quant_job'"):
    configs.apply_overrides(configs.base_config(), {"quantize.method": "fp"})
  bad = configs.base_config()
  bad.data.batch_size = 6
  with pytest.raises(ConfigError, match="data.batch_size=6: must be divisible by .* 4"):
    registry.validate(bad, n_devices=4)
  bad = configs.base_config()
  bad.mesh.tensor = 3
  with pytest.raises(ConfigError, match="mesh.data=-1"):
    registry.validate(bad, n_devices=4)


def test_jobs_registry_matches_the_schema():
  assert tuple(registry.JOBS) == configs.JOB_NAMES


@pytest.mark.parametrize("options, message", [
    (dict(segment_len="16"), r"model.memory.segment_len='16': must be an int"),
    (dict(n_window=True), r"model.memory.n_window=True: must be an int"),
    (dict(gate_init_bias=float("nan")), r"model.memory.gate_init_bias=nan: must be a finite number"),
    (dict(eps=float("inf")), r"model.memory.eps=inf: must be a finite number"),
    (dict(remat="yes"), r"model.memory.remat='yes': must be a bool"),
    (dict(gate=3), r"model.memory.gate=3: must be a str"),
    (dict(segmnt_len=16), r"unknown key\(s\) model.memory.segmnt_len; valid keys: .*segment_len"),
])
def test_memory_options_name_the_option_and_its_type(options, message):
  """with_memory(segment_len='16') used to raise TypeError: '>' not supported, and NaN
  passed every rule (each comparison with NaN is False)."""
  base = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4,
                     num_kv_heads=2)
  params = model_lib.abstract_params(base)  # the option is refused before params are read
  with pytest.raises(ConfigError, match=message):
    with_memory(base, params, rng=jax.random.key(1), **options)
  with pytest.raises(ConfigError, match=message):
    base.with_memory(**options)
  if "segmnt_len" not in options:
    with pytest.raises(ConfigError, match=message):
      MemoryConfig(**options)
    with pytest.raises(ConfigError, match=message):
      ModelConfig.from_dict({"memory": options})


def test_model_fields_name_their_type():
  cases = [
      (dict(vocab_size=True), r"model.vocab_size=True: must be an int"),
      (dict(num_heads=4.0), r"model.num_heads=4.0: must be an int"),
      (dict(rope_theta=float("nan")), r"model.rope_theta=nan: must be a finite number"),
      (dict(tie_word_embeddings=1), r"model.tie_word_embeddings=1: must be a bool"),
      (dict(memory={"segment_len": 8}), r"model.memory=\{'segment_len': 8\}: must be a MemoryConfig"),
      (dict(rope_scaling=RopeScaling(factor=2)), None),
  ]
  for kwargs, message in cases:
    if message is None:
      ModelConfig(**kwargs)  # an int where a float is expected is fine
      continue
    with pytest.raises(ConfigError, match=message):
      ModelConfig(**kwargs)
  with pytest.raises(ConfigError, match=r"model.rope_scaling.factor='2': must be a finite"):
    RopeScaling(factor="2")
  with pytest.raises(ConfigError, match=r"unknown key\(s\) model.hidden; valid keys"):
    ModelConfig().replace(hidden=3)


def test_seq_len_beyond_the_models_positions():
  """data.seq_len above model.max_position_embeddings used to pass without a word."""
  base = configs.apply_overrides(configs.base_config(),
                                    {"model.max_position_embeddings": 64, "data.seq_len": 65})
  with pytest.raises(ConfigError, match=r"data.seq_len=65: exceeds model.max_position_"
                                        r"embeddings=64 with full attention"):
    registry.validate(base, n_devices=1)
  memory = configs.apply_overrides(base, {"model.memory.attention_type": "edgeinfinite",
                                             "model.memory.segment_len": 16,
                                             "model.memory.n_window": 32})
  with pytest.warns(UserWarning, match=r"data.seq_len=65 exceeds model.max_position_"
                                       r"embeddings=64: the edgeinfinite model's local"):
    registry.validate(memory, n_devices=1)
  relative = configs.apply_overrides(memory, {"model.memory.rope_positions": "cache_relative"})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    registry.validate(relative, n_devices=1)
    registry.validate(configs.apply_overrides(base, {"data.seq_len": 64}), n_devices=1)
