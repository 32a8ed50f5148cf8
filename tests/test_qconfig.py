"""QuantConfig: presets, dict / ConfigDict round trips, validation messages."""

import ml_collections
import pytest

from edgeinfinite_jax.quant import qconfig as qc
from edgeinfinite_jax.quant.qconfig import QuantConfig, QuantConfigError
from edgeinfinite_jax.quant.quantizers import QuantSpec


@pytest.mark.parametrize("name", sorted(qc.PRESETS))
def test_presets_round_trip_through_config_dict(name):
  c = qc.preset(name)
  cd = c.to_config_dict()
  assert isinstance(cd, ml_collections.ConfigDict)
  assert QuantConfig.from_dict(cd) == c
  assert QuantConfig.from_dict(c.to_dict()) == c
  hash(c)  # static jit argument


def test_preset_contents():
  w8a8 = qc.preset("w8a8")
  assert w8a8.mode == "fake_quant" and w8a8.activation_scales == "calibrated"
  w = w8a8.linear_weights
  assert (w.bits, w.symmetric, w.narrow_range, w.granularity) == (8, True, True, "per_channel")
  assert (w.qmin, w.qmax) == (-127, 127)
  a = w8a8.linear_inputs
  assert (a.bits, a.symmetric, a.narrow_range, a.qmin) == (8, False, False, -128)
  assert (w8a8.attn_probs.qmin, w8a8.attn_probs.qmax) == (0, 255)
  assert w8a8.memory_state is None and w8a8.embeddings is None and w8a8.lm_head is None
  assert qc.preset("w4a8").linear_weights.qmin == -7
  w4a16 = qc.preset("w4a16")
  assert w4a16.linear_weights.bits == 4 and w4a16.linear_inputs is None and w4a16.q is None
  a16 = qc.preset("a16w8")
  assert a16.linear_weights.bits == 8
  assert (a16.linear_inputs.bits, a16.linear_inputs.symmetric, a16.kv_cache.bits) == (16, True, 16)
  w4a4 = qc.preset("w4a4")
  assert w4a4.linear_inputs.bits == 4 and w4a4.attn_probs.bits == 8
  e = qc.preset("edgeqat")
  assert (e.linear_weights.granularity, e.linear_weights.qmin) == ("per_tensor", -8)
  assert not e.quantize_o_input and e.activation_scales == "learned"
  assert (e.edgeqat.entropy_weight, e.edgeqat.distribution_weight) == (0.5, 1.0)
  assert not e.edgeqat.published_sign and e.kv_cache is None


def test_fine_grained_and_rtn():
  f = qc.fine_grained("w4a8", group_size=64)
  assert (f.linear_weights.granularity, f.linear_weights.group_size, f.linear_weights.axis) \
      == ("per_group", 64, 0)
  assert f.linear_inputs.granularity == "per_token" and f.q.granularity == "per_token"
  assert (f.kv_cache.bits, f.kv_cache.granularity) == (8, "per_token")
  assert f.activation_scales == "dynamic"
  r = qc.rtn_per_tensor(4, act_bits=8)
  assert r.linear_weights.granularity == "per_tensor" and r.linear_inputs.bits == 8
  assert qc.preset("fine_grained", base="w8a8", group_size=32).linear_weights.bits == 8


def test_from_dict_preset_with_overrides():
  cd = ml_collections.ConfigDict({
      "preset": "fine_grained", "preset_args": {"base": "w4a8", "group_size": 32},
      "mode": "float", "linear_weights": {"bits": 8}, "kv_cache": None,
      "edgeqat": {"kd_weight": 0.5, "adaptive_fraction": 0.5, "adaptive_bits": [8, 4]}})
  c = QuantConfig.from_dict(cd)
  assert c.linear_weights == QuantSpec(8, granularity="per_group", group_size=32)
  assert c.mode == "float" and c.kv_cache is None
  assert c.edgeqat.adaptive_bits == (8, 4) and c.edgeqat.kd_weight == 0.5
  assert c.adaptive_specs("linear_inputs")[1].bits == 4
  # A placement dict without a preset spec builds a new spec.
  c = QuantConfig.from_dict({"embeddings": {"bits": 8, "granularity": "per_channel"}})
  assert c.embeddings == QuantSpec(8, granularity="per_channel") and c.mode == "float"


@pytest.mark.parametrize("d, needle", [
    ({"preset": "w3a3"}, r"preset='w3a3'.*valid presets: \['a16w8'"),
    ({"bogus": 1}, r"unknown key\(s\) quant.bogus"),
    ({"linear_weights": {"bitz": 4}}, r"quant.linear_weights.bitz"),
    ({"edgeqat": {"kd_wieght": 1.0}}, r"quant.edgeqat.kd_wieght"),
    ({"linear_weights": {"bits": 17}}, r"quant.linear_weights: bits=17"),
    ({"preset": "w8a8", "linear_weights": {"group_size": 48}}, r"group_size=48"),
    ({"mode": "int8"}, r"quant.mode='int8'"),
    ({"ste": "soft"}, r"quant.ste='soft'"),
    ({"activation_scales": "static"}, r"activation_scales='static'"),
    ({"preset": "w8a8", "linear_weights": {"granularity": "per_token"}},
     r"linear_weights.granularity='per_token'"),
    ({"preset": "w8a8", "q": {"granularity": "per_token"}}, r"q.granularity='per_token'.*dynamic"),
    ({"preset": "w8a8", "mode": "integer", "linear_weights": {"symmetric": False}},
     r"linear_weights.symmetric=False.*integer mode"),
    ({"preset": "w8a8", "mode": "integer"}, r"quant.linear_outputs=None.*requantizes"),
    ({"preset": "fine_grained", "mode": "integer", "linear_outputs": {"bits": 16}},
     r"linear_weights.granularity='per_group'.*one multiplier per output column"),
    ({"preset": "w8a8", "mode": "integer", "activation_scales": "dynamic",
      "kv_cache": {"granularity": "per_token"}, "linear_outputs": {"bits": 16}},
     r"activation_scales='dynamic'.*static scales"),
    ({"preset": "w8a8", "linear_inputs": {"granularity": "per_channel"}},
     r"linear_inputs.granularity='per_channel'.*one static scale per site"),
    ({"preset": "w8a8", "activation_scales": "dynamic"},
     r"kv_cache.granularity='per_tensor'.*quantized once on write"),
    ({"preset": "w4a8", "weight_scales": "learned", "linear_weights": {
        "granularity": "per_group", "group_size": 32}}, r"weight_scales='learned'"),
    ({"requant_mode": "banker"}, r"requant_mode='banker'"),
    ({"fake_quant_dots": "fast"}, r"fake_quant_dots='fast'"),
    ({"preset": "fine_grained", "fake_quant_dots": "exact"},
     r"linear_weights.granularity='per_group'.*fake_quant_dots='exact'"),
    ({"edgeqat": {"kd_temperature": 0}}, r"edgeqat.kd_temperature=0"),
    ({"edgeqat": {"entropy_weight": -1.0}}, r"edgeqat.entropy_weight=-1.0"),
    ({"preset": "w8a8", "edgeqat": {"adaptive_fraction": 1.0}}, r"adaptive_fraction=1.0"),
    ({"preset": "w8a8", "edgeqat": {"adaptive_fraction": 0.5, "adaptive_bits": [4, 8]}},
     r"adaptive_bits=\(4, 8\).*high > low"),
    ({"edgeqat": {"adaptive_fraction": 0.5}}, r"adaptive_fraction=0.5.*linear_inputs is None"),
    ({"preset": "fine_grained", "preset_args": {"group": 3}}, r"preset_args=\{'group': 3\}"),
    ({"preset_args": {"base": "w8a8"}}, r"preset_args.*needs a preset"),
])
def test_validation_names_key_and_value(d, needle):
  with pytest.raises(QuantConfigError, match=needle):
    QuantConfig.from_dict(d)


def test_integer_mode_helper():
  c = qc.integer_mode(qc.preset("w8a8"), requant_mode="gemmlowp")
  assert c.mode == "integer" and c.linear_outputs == QuantSpec(16) and c.requant_mode == "gemmlowp"
  assert QuantConfig.from_dict(c.to_dict()) == c
  assert qc.preset("edgeqat").weight_scales == "learned"


def test_direct_construction_is_validated():
  with pytest.raises(QuantConfigError, match=r"quant.kv_cache=8: must be a QuantSpec or None"):
    QuantConfig(kv_cache=8)
  assert QuantConfig().specs() == {}
  assert set(qc.preset("w4a16").specs()) == {"linear_weights"}
