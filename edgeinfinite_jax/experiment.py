"""Experiment configs: defaults, ``arg`` parsing, sweeps and validation.

An experiment is one file ``experiments/configs/NAME.py`` (big_vision style):

* ``get_config(arg=None)`` starts from ``base_config()`` and overrides only what
  it changes. ``arg`` is the text after ``:`` on the command line
  (``--config=experiments/configs/NAME.py:tiny,lr=1e-3``), parsed with
  ``parse_arg(arg, tiny=False, lr=3e-4, ...)``.
* ``sweep(add, arg=None)`` (optional) calls ``add({...})`` once per sweep
  point. Each point is a dict of *dotted config keys* to values, the same keys
  as the CLI's ``--config.KEY=VALUE`` overrides, e.g.
  ``add({"optim.lr": 1e-3, "model.num_layers": 4})``. ``sweep_points`` collects
  them, ``apply_overrides`` applies one to a config and ``sweep_commands``
  turns them into command lines. This is the one sweep convention; every
  config file follows it.
* ``metrics()`` (optional) lists the metric names worth plotting.

``validate(config)`` checks every section and raises ``ConfigError`` naming the
key, its value and the rule, before anything is traced or compiled. New
top-level sections (for new jobs) are added to ``base_config`` here, so a typo
in a section name is always an error.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Mapping

import ml_collections

from edgeinfinite_jax.config import ConfigError, ModelConfig

# Jobs that ``main.py`` can dispatch; main.JOBS must agree (tested).
JOBS = ("train", "demo", "quant")


def base_config() -> ml_collections.ConfigDict:
  """Every top-level section with its defaults; experiment files override."""
  model = dataclasses.asdict(ModelConfig())
  model["head_dim"] = 0  # 0 = hidden_size // num_heads, recomputed after overrides
  return ml_collections.ConfigDict({
      "job": "train",
      "seed": 0,
      "model": model,
      "data": {
          "source": "embedded",     # embedded | text | json | parquet | hub
          "path": "",               # files (comma-separated / globs) or a hub name
          "text_field": "text",
          "split": "train",         # hub only
          "tokenizer": "byte",      # "byte" or a local HF tokenizer directory
          "seq_len": 128,
          "batch_size": 8,          # global batch, in rows
          "max_bytes": 3_000_000,   # cap on the text read
          "heldout_fraction": 0.05,
          # source "task" (S-SFT rows, loss on answers) and task_mix (share of
          # task rows, full loss, mixed into a text source); see data.py.
          "tasks": "passkey",       # "passkey" or weighted "passkey:3,kv_recall:1"
          "task_length": 0,         # target sample length, 0 = seq_len
          "task_samples": 1024,     # training samples drawn for source "task"
          "task_digits": 5,         # digits of passkey / needle values
          "task_seed": 0,
          "task_mix": 0.0,
      },
      "optim": {
          "lr": 3e-4,
          "warmup_steps": 100,
          "min_lr_ratio": 0.1,      # cosine decays to lr * min_lr_ratio
          "b1": 0.9,
          "b2": 0.95,
          "eps": 1e-8,
          "weight_decay": 0.1,
          "clip_norm": 1.0,         # global-norm clipping, 0 = off
          "trainable": "all",       # preset name, see optim.PRESETS
          "groups": None,           # or [(regex, lr_mult|"frozen"[, wd_mult]), ...]
      },
      "train": {
          "steps": 1000,
          "log_every": 10,
          "eval_every": 200,        # 0 = only at the end
          "eval_batches": 4,
          "progress": True,         # tqdm progress bar
          "fresh": False,           # move a recorded run aside (workdir/previous/), start over
      },
      "checkpoint": {
          "every": 500,             # save every k steps (and always at the end)
          "keep": 3,                # keep the last N
          "enabled": True,
      },
      "mesh": {"data": -1, "fsdp": 1, "tensor": 1},  # -1 = the remaining devices
      "distributed": {
          "initialize": False,      # call jax.distributed.initialize()
          "coordinator_address": "",
          "num_processes": 0,       # 0 = auto-detect
          "process_id": -1,         # -1 = auto-detect
      },
      "init": {"hf_path": "",       # HF checkpoint directory to start from, or
               "gguf": ""},         # a .gguf file or a named model (models.MODELS: smollm2)
      "demo": demo_defaults(),      # job "demo" (pipeline.py): its stages' settings
      "quant": quant_defaults(),    # a QuantConfig (preset + overrides), see quant/qconfig.py
      "quantize": quantize_defaults(),  # job "quant" (qat.py): method, base model, calibration
  })


def demo_defaults() -> dict:
  """The ``demo`` section's keys (see ``pipeline.py`` for what each stage does)."""
  from edgeinfinite_jax import pipeline  # lazy: the pipeline imports this module
  return pipeline.defaults()


def quant_defaults() -> dict:
  from edgeinfinite_jax import qat  # lazy: qat imports this module
  return qat.quant_defaults()


def quantize_defaults() -> dict:
  from edgeinfinite_jax import qat
  return qat.defaults()


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


# ----------------------------------------------------------------------------- sweeps


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


def sweep_commands(path: str, arg: str | None = None, workdir: str = "workdirs") -> list[str]:
  """One ``python -m edgeinfinite_jax.main`` command line per sweep point."""
  cfg = f"{path}:{arg}" if arg else path
  base = os.path.splitext(os.path.basename(path))[0]
  cmds = []
  for i, point in enumerate(sweep_points(load_module(path), arg)):
    flags = " ".join(f"--config.{k}={v!r}" if isinstance(v, str) else f"--config.{k}={v}"
                     for k, v in point.items())
    cmds.append(f"python -m edgeinfinite_jax.main --config={cfg} {flags} "
                f"--workdir={workdir}/{base}/{i}")
  return cmds


# ----------------------------------------------------------------------------- validation


def model_config(config) -> ModelConfig:
  """The ModelConfig of ``config.model`` (raises ConfigError naming the key)."""
  return ModelConfig.from_dict(config.model)


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
  if not ok:
    raise ConfigError(f"{key}={value!r}: {rule}")


def _positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_sections(config) -> None:
  base = base_config()
  unknown = sorted(set(config.keys()) - set(base.keys()))
  if unknown:
    raise ConfigError(f"unknown top-level key(s) {', '.join(unknown)}; valid keys: "
                      f"{', '.join(sorted(base.keys()))}")
  for section in ("data", "optim", "train", "checkpoint", "distributed", "init"):
    extra = sorted(set(config[section].keys()) - set(base[section].keys()))
    if extra:
      raise ConfigError(f"unknown key(s) {', '.join(f'{section}.{k}' for k in extra)}; "
                        f"valid keys: {', '.join(sorted(base[section].keys()))}")


def check_trainable(config, m: ModelConfig) -> None:
  """The trainable groups cover the model's parameters and select at least one."""
  from edgeinfinite_jax import model as model_lib
  from edgeinfinite_jax import optim as optim_lib
  shapes = model_lib.abstract_params(m)  # shapes only: traced, never compiled
  groups = optim_lib.groups_from_config(config.optim)
  if not optim_lib.trainable_paths(shapes, groups):
    spec = config.optim.groups or config.optim.trainable
    raise ConfigError(f"optim.{'groups' if config.optim.groups else 'trainable'}={spec!r}: "
                      "selects 0 trainable parameters of this model (model.memory."
                      f"attention_type={m.memory.attention_type!r})")


def validate(config, n_devices: int | None = None, check_paths: bool = True) -> None:
  """Checks the whole experiment config; raises ConfigError naming key and rule.

  ``n_devices`` (default: ``jax.device_count()``) resolves the mesh so batch
  divisibility can be checked. ``check_paths=False`` skips the existence of
  data files and checkpoints (shape-only tests of config files). Nothing is
  traced or compiled.
  """
  from edgeinfinite_jax import data as data_lib
  from edgeinfinite_jax import models
  from edgeinfinite_jax import optim as optim_lib
  from edgeinfinite_jax import sharding as sharding_lib

  _check_sections(config)
  _require(config.job in JOBS, "job", config.job, f"must be one of {JOBS}")
  _require(isinstance(config.seed, int) and config.seed >= 0, "seed", config.seed,
           "must be an integer >= 0")
  m = model_config(config)
  t = config.train
  _require(_positive_int(t.steps), "train.steps", t.steps, "must be a positive integer")
  _require(_positive_int(t.log_every), "train.log_every", t.log_every,
           "must be a positive integer")
  _require(isinstance(t.eval_every, int) and t.eval_every >= 0, "train.eval_every",
           t.eval_every, "must be an integer >= 0 (0 = only at the end)")
  _require(isinstance(t.eval_batches, int) and t.eval_batches >= 0, "train.eval_batches",
           t.eval_batches, "must be an integer >= 0")
  c = config.checkpoint
  _require(_positive_int(c.every), "checkpoint.every", c.every, "must be a positive integer")
  _require(_positive_int(c.keep), "checkpoint.keep", c.keep, "must be a positive integer")
  optim_lib.validate(config.optim)
  if n_devices is None:
    import jax
    n_devices = jax.device_count()
  sizes = sharding_lib.mesh_shape(config.mesh, n_devices)
  shards = sizes["data"] * sizes["fsdp"]
  data_lib.validate(config.data, n_batch_shards=shards, check_paths=check_paths)
  pretrained = bool(models.init_source(config.init))
  if config.data.tokenizer == "byte" and not pretrained:
    _require(m.vocab_size >= 259, "model.vocab_size", m.vocab_size,
             "must be >= 259, the byte tokenizer's vocabulary (data.tokenizer='byte')")
  if not pretrained:  # (with a checkpoint the architecture comes from its file)
    check_trainable(config, m)
    m.check_sequence_length(config.data.seq_len)
  if config.job == "quant":
    from edgeinfinite_jax import qat
    qat.validate(config)
  if config.job == "demo":
    from edgeinfinite_jax import pipeline
    pipeline.validate(config)
  if check_paths:
    models.validate_init(config.init)
