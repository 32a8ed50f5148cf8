"""Hugging Face import/export: logit parity with torch on tiny random models.

No downloads: every model is built from a config in ``hf_fixtures`` and saved
locally. Prompts are 520 tokens, batch 2, so that RoPE (and its llama3/linear
scaling) is exercised far from position 0.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import Lazy, requires  # noqa: E402

pytestmark = requires("torch", "transformers")
torch, transformers = Lazy("torch"), Lazy("transformers")

import hf_fixtures  # noqa: E402
from edgeinfinite_jax.checkpoints import hf as convert  # noqa: E402
from edgeinfinite_jax.model import transformer as model
from edgeinfinite_jax.model.config import ConfigError, ModelConfig, RopeScaling  # noqa: E402

ATOL = 1e-4


class Case:
  """One tiny HF model, loaded into JAX, with both sides' logits on a long prompt."""

  def __init__(self, kind, root):
    self.kind = kind
    self.torch_model, self.path = hf_fixtures.make_hf_model(kind, root)
    self.config, self.params = convert.load_hf(self.path)
    self.tokens = hf_fixtures.long_prompt(self.config.vocab_size)
    self.torch_logits = hf_fixtures.torch_logits(self.torch_model, self.tokens)
    self.jax_logits = np.asarray(model.forward(self.config, self.params, self.tokens))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("hf")


_CASES: dict[str, Case] = {}  # one build per kind per session, shared by all tests


def _case(kind, root):
  if kind not in _CASES:
    _CASES[kind] = Case(kind, root)
  return _CASES[kind]


@pytest.fixture(scope="module", params=sorted(hf_fixtures.KINDS))
def case(request, root):
  return _case(request.param, root)


@pytest.fixture(scope="module")
def gqa(root):
  return _case("gqa", root)


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _assert_same_params(a, b):
  fa, fb = convert.flatten(a["params"]), convert.flatten(b["params"])
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == jnp.float32, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _hf_reload_logits(path, tokens):
  m = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
  return hf_fixtures.torch_logits(m.float().eval(), tokens)


# ----------------------------------------------------------------- parity

def test_logits_match_torch(case):
  assert case.jax_logits.shape == case.torch_logits.shape == (2, 520, case.config.vocab_size)
  assert _max_diff(case.jax_logits, case.torch_logits) <= ATOL, case.kind
  # The comparison must be meaningful: logits vary well beyond the tolerance.
  assert np.std(case.torch_logits) > 100 * ATOL


def test_config_fields(case):
  c, over = case.config, hf_fixtures.KINDS[case.kind][1]
  assert c.num_kv_heads == over.get("num_key_value_heads", 2)
  assert c.num_layers == over.get("num_hidden_layers", 2)
  assert c.head_dim == over.get("head_dim", 16)
  assert c.tie_word_embeddings == over.get("tie_word_embeddings", False)
  assert c.attention_bias == (case.kind == "qwen2")
  assert ("lm_head" in case.params["params"]) != c.tie_word_embeddings
  want = {"llama3": "llama3", "linear": "linear"}.get(case.kind, "default")
  assert c.rope_scaling.rope_type == want
  assert c.memory.attention_type == "full" and c.dtype == "float32"


def test_save_hf_loads_in_transformers(case, tmp_path):
  convert.save_hf(case.config, case.params, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    cfg = json.load(f)
  assert cfg["model_type"] == ("qwen2" if case.kind == "qwen2" else "llama")
  assert cfg["rope_parameters"]["rope_type"] == case.config.rope_scaling.rope_type
  assert "rope_scaling" not in cfg and cfg["dtype"] == "float32"
  reloaded = _hf_reload_logits(str(tmp_path), case.tokens)
  assert _max_diff(reloaded, case.torch_logits) <= ATOL


def test_load_of_save_is_identity(case, tmp_path):
  convert.save_hf(case.config, case.params, str(tmp_path))
  config, params = convert.load_hf(str(tmp_path))
  assert config == case.config
  _assert_same_params(params, case.params)


def test_sharded_save(gqa, tmp_path):
  convert.save_hf(gqa.config, gqa.params, str(tmp_path), max_shard_bytes=40_000)
  shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
  assert len(shards) > 2 and "model.safetensors" not in shards
  with open(tmp_path / "model.safetensors.index.json") as f:
    assert sorted(set(json.load(f)["weight_map"].values())) == shards
  _assert_same_params(convert.load_hf(str(tmp_path))[1], gqa.params)
  assert _max_diff(_hf_reload_logits(str(tmp_path), gqa.tokens), gqa.torch_logits) <= ATOL
  # Saving again unsharded removes the stale shards.
  convert.save_hf(gqa.config, gqa.params, str(tmp_path))
  assert sorted(f for f in os.listdir(tmp_path) if f.startswith("model")) == ["model.safetensors"]


def test_bf16_checkpoint_upcasts(gqa, tmp_path):
  copy.deepcopy(gqa.torch_model).to(torch.bfloat16).save_pretrained(str(tmp_path))
  config, params = convert.load_hf(str(tmp_path), dtype=jnp.bfloat16)
  assert config == gqa.config.replace(dtype="bfloat16")
  want = jax.tree.map(lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16), np.float32),
                      gqa.params)
  _assert_same_params(params, want)


def test_edgeinfinite_saves_backbone_only(tmp_path):
  base = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=2, num_kv_heads=1)
  cfg = base.with_memory(attention_type="edgeinfinite", segment_len=8, n_window=8, n_sink=2)
  rng = np.random.default_rng(0)  # random leaves of the real tree, without a slow init
  params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32),
                        model.abstract_params(cfg))
  with pytest.raises(ValueError, match="memory_gate"):
    convert.save_hf(cfg, params, str(tmp_path), drop_memory_gate=False)
  with pytest.warns(UserWarning, match="layers_0/attn/memory_gate/bias"):
    convert.save_hf(cfg, params, str(tmp_path))
  config, loaded = convert.load_hf(str(tmp_path))
  assert config == base
  backbone = {"params": jax.tree.map(lambda x: x, params["params"])}
  del backbone["params"]["layers_0"]["attn"]["memory_gate"]
  _assert_same_params(loaded, backbone)


# ----------------------------------------------------------------- checkpoint errors

def _rewrite_weights(src, dst, edit):
  from safetensors import safe_open
  from safetensors.numpy import save_file
  shutil.copytree(src, dst)
  with safe_open(os.path.join(src, "model.safetensors"), framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def test_checkpoint_errors_are_collected(gqa, tmp_path):
  def edit(t):
    del t["model.layers.1.mlp.up_proj.weight"]
    del t["model.norm.weight"]
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
    t["model.layers.2.self_attn.q_proj.bias"] = np.zeros((64,), np.float32)
    t["model.layers.7.mlp.up_proj.weight"] = np.zeros((128, 64), np.float32)
    t["vision_tower.weight"] = np.zeros((3,), np.float32)
  _rewrite_weights(gqa.path, tmp_path / "bad", edit)
  with pytest.raises(convert.CheckpointError) as e:
    convert.load_hf(str(tmp_path / "bad"))
  msg = str(e.value)
  for key in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight",
              "model.layers.0.self_attn.k_proj.weight", "model.layers.2.self_attn.q_proj.bias",
              "model.layers.7.mlp.up_proj.weight", "vision_tower.weight"):
    assert key in msg, (key, msg)
  assert "6 bad tensor(s)" in msg and "[8, 64]" in msg and "[32, 64]" in msg


def test_tied_checkpoint_with_lm_head(root, tmp_path):
  tied = _case("tied", root).path
  _rewrite_weights(tied, tmp_path / "same",
                   lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
  config, params = convert.load_hf(str(tmp_path / "same"))
  assert "lm_head" not in params["params"]
  _rewrite_weights(tied, tmp_path / "diff",
                   lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
  with pytest.warns(UserWarning, match="lm_head.weight differs"):
    convert.load_hf(str(tmp_path / "diff"))


def test_missing_weights_file(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump(REAL_CONFIGS["tinyllama"], f)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    convert.load_hf(str(tmp_path))


# ----------------------------------------------------------------- configs

# Real config.json files (from memory), as shipped on the hub.
REAL_CONFIGS = {
    "llama-2-7b": {
        "_name_or_path": "meta-llama/Llama-2-7b-hf", "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000},
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256},
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
        "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
        "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936},
    "tinyllama": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 2048,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 22,
        "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.35.0", "use_cache": True,
        "vocab_size": 32000},
    "mistral-7b-v0.3": {
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.42.0.dev0", "use_cache": True,
        "vocab_size": 32768},
}

REAL_EXPECTED = {
    "llama-2-7b": dict(num_layers=32, num_kv_heads=32, head_dim=128, rope_theta=10000.0),
    "llama-3.2-1b": dict(num_layers=16, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                         tie_word_embeddings=True,
                         rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)),
    "qwen2.5-0.5b": dict(num_layers=24, num_kv_heads=2, head_dim=64, attention_bias=True,
                         tie_word_embeddings=True, rope_theta=1e6),
    "tinyllama": dict(num_layers=22, num_kv_heads=4, head_dim=64, rms_norm_eps=1e-5),
    "mistral-7b-v0.3": dict(num_layers=32, num_kv_heads=8, head_dim=128, rope_theta=1e6),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_configs(name):
  c = convert.config_from_hf(REAL_CONFIGS[name])
  for k, v in REAL_EXPECTED[name].items():
    assert getattr(c, k) == v, (name, k)
  # Export and re-import (v5 layout) gives the same config back.
  assert convert.config_from_hf(convert.config_to_hf(c)) == c


def _v5(d):
  """The v5 spelling of a v4 config dict: rope settings under rope_parameters."""
  d = dict(d)
  rope = dict(d.pop("rope_scaling", None) or {"rope_type": "default"})
  rope["rope_theta"] = d.pop("rope_theta", 10000.0)
  d["rope_parameters"] = rope
  return d


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_v4_and_v5_layouts_agree(name):
  assert convert.config_from_hf(_v5(REAL_CONFIGS[name])) == \
      convert.config_from_hf(REAL_CONFIGS[name])


def test_v4_layout_checkpoint(root, tmp_path):
  path = _case("llama3", root).path
  dst = tmp_path / "v4"
  shutil.copytree(path, dst)
  with open(dst / "config.json") as f:
    cfg = json.load(f)
  rope = cfg.pop("rope_parameters")
  cfg["rope_theta"] = rope.pop("rope_theta")
  cfg["rope_scaling"] = rope
  with open(dst / "config.json", "w") as f:
    json.dump(cfg, f)
  assert convert.load_hf(str(dst))[0] == convert.load_hf(path)[0]
  assert convert.load_hf(str(dst))[0].rope_scaling.original_max_position_embeddings == 64


def test_v4_linear_type_spelling():
  d = dict(REAL_CONFIGS["llama-2-7b"], rope_scaling={"type": "linear", "factor": 2.0})
  assert convert.config_from_hf(d).rope_scaling == RopeScaling("linear", factor=2.0)


LLAMA = REAL_CONFIGS["tinyllama"]
QWEN = REAL_CONFIGS["qwen2.5-0.5b"]
BAD_CONFIGS = {
    "qwen_sliding": (dict(QWEN, use_sliding_window=True), "use_sliding_window"),
    "layer_types": (dict(QWEN, layer_types=["full_attention", "sliding_attention"]),
                    "layer_types"),
    "mistral_sliding": (dict(REAL_CONFIGS["mistral-7b-v0.3"], sliding_window=4096),
                        "sliding_window=4096"),
    "moe": (dict(LLAMA, num_local_experts=8), "num_local_experts=8: mixture-of-experts"),
    "yarn_v5": (_v5(dict(LLAMA, rope_scaling={"rope_type": "yarn", "factor": 4.0})),
                "rope_parameters.rope_type='yarn'"),
    "dynamic_v4": (dict(LLAMA, rope_scaling={"type": "dynamic", "factor": 2.0}),
                   "rope_scaling.rope_type='dynamic'"),
    "rope_extra": (_v5(dict(LLAMA, rope_scaling={"rope_type": "linear", "factor": 2.0,
                                                 "attention_factor": 0.5})),
                   "rope_parameters.attention_factor"),
    "unknown": (dict(LLAMA, frobnicate=3), "frobnicate=3: unknown attribute"),
    "mlp_bias": (dict(LLAMA, mlp_bias=True), "mlp_bias"),
    "gelu": (dict(LLAMA, hidden_act="gelu"), "hidden_act='gelu'"),
    "llama_bias": (dict(LLAMA, attention_bias=True), "attention_bias=True"),
    "tp": (dict(LLAMA, pretraining_tp=2), "pretraining_tp=2"),
    "gemma": (dict(LLAMA, model_type="gemma"), "model_type='gemma'"),
    "no_vocab": ({k: v for k, v in LLAMA.items() if k != "vocab_size"}, "vocab_size: missing"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_config_errors_name_the_key(name):
  d, needle = BAD_CONFIGS[name]
  with pytest.raises(ConfigError) as e:
    convert.config_from_hf(d)
  assert needle in str(e.value)


def test_config_errors_are_collected(tmp_path):
  d = dict(LLAMA, frobnicate=1, num_experts=4, hidden_act="relu",
           rope_scaling={"rope_type": "longrope"})
  with open(tmp_path / "config.json", "w") as f:
    json.dump(d, f)
  with pytest.raises(ConfigError) as e:
    convert.load_hf(str(tmp_path))
  for needle in ("frobnicate", "num_experts", "hidden_act", "longrope"):
    assert needle in str(e.value)
