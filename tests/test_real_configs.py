"""``load_hf`` against the ``config.json`` of real model families.

``tests/real_configs/*.json`` are the published ``config.json`` files of
Llama-2-7B, Llama-3.1-8B, Llama-3.2-1B, TinyLlama-1.1B-Chat, Mistral-7B-v0.1,
Qwen2-0.5B, Qwen2.5-0.5B-Instruct, SmolLM-135M and SmolLM2-135M-Instruct,
transcribed into the repository (no downloads). They carry the metadata real
checkpoints carry (``_name_or_path``, ``torch_dtype``, ``transformers.js_config``,
``pad_token_id``...), which must be accepted, while anything that changes the
numerics stays refused.

Shapes are checked for every family against transformers' own model built on
the meta device (no memory): every tensor name it would save maps to one of our
parameters with the shape our loader expects. The small family (SmolLM2-135M)
is loaded for real: random weights of the right shapes written by transformers'
``save_pretrained`` (so the directory also carries transformers' own
``config.json``), loaded by ``load_hf``, logits compared.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import Lazy, requires  # noqa: E402

pytestmark = requires("torch", "transformers")
torch, transformers = Lazy("torch"), Lazy("transformers")

import hf_fixtures  # noqa: E402
from edgeinfinite_jax.checkpoints import hf as convert  # noqa: E402
from edgeinfinite_jax.model import transformer as model
from edgeinfinite_jax.model.config import ConfigError  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "real_configs")
FAMILIES = sorted(f[:-5] for f in os.listdir(ROOT) if f.endswith(".json"))


def _config(name):
  with open(os.path.join(ROOT, name + ".json")) as f:
    return json.load(f)


def test_every_family_is_present():
  assert FAMILIES == ["llama2_7b", "llama3.1_8b", "llama3.2_1b", "mistral_7b_v0.1",
                      "qwen2.5_0.5b_instruct", "qwen2_0.5b", "smollm2_135m_instruct",
                      "smollm_135m", "tinyllama_1.1b_chat"]


@pytest.mark.parametrize("name", FAMILIES)
def test_config_accepted_or_refused_by_name(name):
  d = _config(name)
  if name == "mistral_7b_v0.1":  # sliding_window 4096: refused; null (v0.2 style): accepted
    with pytest.raises(ConfigError, match="sliding_window=4096"):
      convert.config_from_hf(d)
    d = dict(d, sliding_window=None)
  c = convert.config_from_hf(d)
  assert (c.hidden_size, c.num_layers, c.vocab_size) == (
      d["hidden_size"], d["num_hidden_layers"], d["vocab_size"])
  assert c.num_kv_heads == d.get("num_key_value_heads", d["num_attention_heads"])
  assert c.tie_word_embeddings == bool(d.get("tie_word_embeddings", False))
  assert c.attention_bias == (d["model_type"] == "qwen2")
  if (d.get("rope_scaling") or {}).get("rope_type") == "llama3":
    assert c.rope_scaling.rope_type == "llama3"
    assert c.rope_scaling.factor == d["rope_scaling"]["factor"]


@pytest.mark.parametrize("change,fragment", [
    ({"rope_interleaved": True}, "rope_interleaved=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"pretraining_tp": 2}, "pretraining_tp=2"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_local_experts": 8}, "mixture-of-experts"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0: unknown attribute"),
])
def test_numerics_changing_keys_still_refused(change, fragment):
  with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
    convert.config_from_hf({**_config("smollm2_135m_instruct"), **change})


def _meta_model(d):
  try:  # skipping the (meta-device) weight init makes building an 8B model 4x faster
    from transformers.initialization import no_init_weights
  except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights
  cfg = transformers.AutoConfig.for_model(**d)
  with torch.device("meta"), no_init_weights():
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_tensor_shapes_match_transformers(name):
  d = _config(name)
  d = dict(d, sliding_window=None) if name == "mistral_7b_v0.1" else d
  ours = convert.config_from_hf(d)
  expected = {k: tuple(v.shape) for k, v in
              convert.flatten(model.abstract_params(ours)["params"]).items()}
  seen = set()
  for hf_name, t in _meta_model(d).state_dict().items():
    if hf_name == "lm_head.weight" and ours.tie_word_embeddings:
      continue
    path, kind = convert.hf_to_ours(hf_name)
    assert path in expected, hf_name
    assert convert.hf_shape(kind, expected[path]) == tuple(t.shape), hf_name
    seen.add(path)
  assert seen == set(expected)


@pytest.mark.slow
def test_smollm2_checkpoint_written_by_transformers_loads(tmp_path):
  """A directory transformers writes for this architecture (its own config.json) loads."""
  d = _config("smollm2_135m_instruct")
  cfg = transformers.LlamaConfig(**d)
  torch.manual_seed(0)
  ref = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
  hf_fixtures.randomize_(ref, seed=0, std=0.02)
  ref.save_pretrained(tmp_path, safe_serialization=True)
  written = json.load(open(tmp_path / "config.json"))
  assert "transformers_version" in written
  config, params = convert.load_hf(tmp_path)
  tokens = hf_fixtures.long_prompt(config.vocab_size, batch=1, length=64)
  got = np.asarray(model.forward(config, params, tokens))
  np.testing.assert_allclose(got, hf_fixtures.torch_logits(ref, tokens), atol=1e-4, rtol=0)
