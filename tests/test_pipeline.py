"""The demo job end to end (``demo.py:tiny``): outputs, resumability, config rules."""

import json
import os

import pytest

from edgeinfinite_jax import configs
from edgeinfinite_jax.jobs import registry
from edgeinfinite_jax.jobs import demo as pipeline
from edgeinfinite_jax.model.config import ConfigError
from edgeinfinite_jax.quant import qconfig
from fast_compile import fast_compiles

pytestmark = pytest.mark.slow  # end to end: minutes on a 2-core CPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "experiments/configs/demo.py")


def tiny(**overrides):
  config = configs.load_module(DEMO).get_config("tiny")
  config.train.progress = False
  return configs.apply_overrides(config, overrides)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
  with fast_compiles():
    workdir = str(tmp_path_factory.mktemp("demo"))
    first = pipeline.run(tiny(), workdir)
    second = pipeline.run(tiny(), workdir)
  return workdir, first, second


def test_demo_writes_metrics_table_plots_and_checkpoints(demo_runs):
  workdir, first, _ = demo_runs
  files = set(os.listdir(workdir))
  assert {"metrics.json", "results.md", "ttft_memory.png", "passkey_heatmap_full.png",
          "passkey_heatmap_streaming.png", "passkey_heatmap_edgeinfinite.png"} <= files
  for stage in ("pretrain", "sft_gate", "sft_all"):
    assert os.listdir(os.path.join(workdir, stage, "checkpoints")), stage
  assert os.path.exists(os.path.join(workdir, "pretrain", "hf", "config.json"))
  m = json.load(open(os.path.join(workdir, "metrics.json")))
  assert set(m["eval"]["passkey"]) == {"full", "streaming", "edgeinfinite", "edgeinfinite[all]"}
  for g in m["eval"]["passkey"].values():
    assert len(g["accuracy"]) == 2 and len(g["accuracy"][0]) == 2
  assert m["eval"]["lengths"][-1] >= 2 * m["eval"]["sft_len"]
  cost = m["eval"]["cost"]
  assert cost["edgeinfinite"]["state_bytes"][0] == cost["edgeinfinite"]["state_bytes"][-1]
  assert cost["full"]["kv_bytes"][-1] > cost["full"]["kv_bytes"][0]
  assert m["sft"]["gate"]["trainable"] < m["sft"]["all"]["trainable"]
  assert set(m["quant"]["presets"]) == {"float", "fine_grained", "rtn_per_tensor"}
  ip = m["quant"]["integer_path"]
  assert ip["status"] == "ok", ip
  assert set(ip["modes"]) == set(qconfig.REQUANT_MODES)
  table = open(os.path.join(workdir, "results.md")).read()
  assert "| edgeinfinite |" in table and "| streaming |" in table and "fine_grained" in table
  assert "| litert_reference |" in table and "| tflite_optimized |" in table


def test_rerun_skips_every_finished_stage(demo_runs):
  _, first, second = demo_runs
  assert first["stages_skipped"] == []
  assert set(second["stages_skipped"]) == {"pretrain", "sft[gate]", "sft[all]", "eval", "quant"}
  assert second["eval"]["passkey"] == first["eval"]["passkey"]


def test_demo_job_is_registered():
  assert "demo" in registry.JOBS
  assert configs.load_module(DEMO).get_config().job == "demo"


def test_demo_config_errors_name_the_key():
  with pytest.raises(ConfigError, match="demo.sft_runs"):
    registry.validate(tiny(**{"demo.sft_runs": "gate,everything"}))
  with pytest.raises(ConfigError, match="demo.eval_depths"):
    registry.validate(tiny(**{"demo.eval_depths": "0.5,2"}))
  with pytest.raises(ConfigError, match="demo.quant_presets"):
    registry.validate(tiny(**{"demo.quant_presets": "int3"}))


def test_sweep_points_are_valid_overrides():
  module = configs.load_module(DEMO)
  points = configs.sweep_points(module)
  assert len(points) >= 4
  for p in points:
    registry.validate(configs.apply_overrides(module.get_config("tiny"), p),
                        check_paths=False)
