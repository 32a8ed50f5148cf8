"""The quantized model: float mode unchanged, weight paths, engine == training path,
calibration, PTQ round trip and gap, adaptive bits, bad input before compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from edgeinfinite_jax import ConfigError, Engine, Scenario, with_memory
from edgeinfinite_jax.model import transformer as model
from edgeinfinite_jax.train import calib
from edgeinfinite_jax.quant import ptq
from edgeinfinite_jax.quant import qconfig as qc
from edgeinfinite_jax.quant.qconfig import QuantConfig, QuantConfigError
from edgeinfinite_jax.quant.quantizers import QuantSpec
from edgeinfinite_jax.model.config import quantized
from fast_compile import fast_compiles
from quant_fixtures import tiny, tokens, trained

L = 8


@pytest.fixture(scope="module", autouse=True)
def fast():
  """The whole module under XLA's cheap compiles (tests/fast_compile.py): it compiles
  dozens of small quantized programs and runs each briefly."""
  with fast_compiles():
    yield


def _memory_model(attention_type):
  base = tiny()
  params = model.init_params(base, jax.random.key(0))
  if attention_type == "full":
    return base, params
  return with_memory(base, params, rng=jax.random.key(1), attention_type=attention_type,
                     gate="mlp", gate_init_bias=0.0, segment_len=L, n_sink=2, n_window=16)


@pytest.mark.parametrize("attention_type", ["full", "edgeinfinite"])
def test_float_mode_is_bit_identical(attention_type):
  cfg, params = _memory_model(attention_type)
  x = tokens(40)
  want = model.forward(cfg, params, x)
  assert type(quantized(cfg, None)) is type(cfg) and quantized(cfg, None) == cfg
  float_cfg = quantized(cfg, qc.preset("w8a8").replace(mode="float"))
  np.testing.assert_array_equal(model.forward(float_cfg, params, x), want)


@pytest.mark.slow
def test_fake_quant_weights_equal_the_dequantized_ptq_kernels():
  base = tiny()
  params = model.init_params(base, jax.random.key(0))
  q = qc.preset("w4a16").replace(embeddings=QuantSpec(8, granularity="per_channel"),
                                 lm_head=QuantSpec(4, granularity="per_group", group_size=16))
  x = tokens(12)
  on_the_fly = model.forward(base, params, x, quant=q)
  qp = ptq.quantize_params(params, q)
  from_ptq = model.forward(base, qp, x, quant=q)
  np.testing.assert_array_equal(on_the_fly, from_ptq)
  np.testing.assert_allclose(model.forward(base, ptq.dequantize_params(qp), x), from_ptq,
                             atol=1e-6)
  assert float(jnp.abs(on_the_fly - model.forward(base, params, x)).max()) > 1e-3


def _engine_vs_forward(cfg, params, quant, calib_tokens):
  qcfg = quantized(cfg, quant)
  sc = Scenario(segment_len=L, n_sink=2, n_window=16, batch_size=2, max_new_tokens=16,
                short_threshold=4, max_context=64)
  long_cfg = Engine(qcfg, params, sc).route_configs["long"]
  if quant.activation_scales != "dynamic":
    params = calib.calibrate(long_cfg, params, [calib_tokens])
  engine = Engine(qcfg, params, sc)
  x = tokens(32, seed=3)
  want = model.forward(long_cfg, params, x)
  prompt = 19  # 2 segments + 3; decoding crosses the next block boundaries
  state, logits = engine.prefill(x[:, :prompt])
  got = [logits]
  for t in range(prompt, x.shape[1]):
    state, logits = engine.decode(state, x[:, t])
    got.append(logits)
  return np.stack(got, 1), np.asarray(want[:, prompt - 1:]), engine


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fine_grained", "w8a8+memory", "w8a8+memory, integer"])
def test_engine_equals_training_path_with_quantized_kv_and_memory(name):
  """Teacher forcing through the engine (quantize-on-write KV, chunked prefill, decode)
  against the training path's forward, edgeinfinite.

  Integer mode: the projections and attention dots are exact integer arithmetic, so
  the two agree to float noise. fake_quant: the projections are float dots, and
  XLA:CPU rounds a dot over 8 rows and one over 32 rows differently in the last bit;
  a quantizer turns that ulp into a whole step when a value sits on a rounding
  boundary. So fake_quant agrees to 1e-4 except at such rare flips, each moving the
  logits by about one quantization step of one activation."""
  cfg, params = _memory_model("edgeinfinite")
  w8a8_mem = qc.integer_mode(qc.preset("w8a8")).replace(memory_state=QuantSpec(8))
  quant = {"fine_grained": qc.fine_grained("w4a8", group_size=16),  # dynamic per-token
           "w8a8+memory": w8a8_mem.replace(mode="fake_quant"),
           "w8a8+memory, integer": w8a8_mem}[name]
  got, want, engine = _engine_vs_forward(cfg, params, quant, tokens(32, seed=9))
  assert engine.compile_counts() == {"prefill_long": 1, "decode_long": 1}
  if quant.mode == "integer":
    np.testing.assert_allclose(got, want, atol=1e-4)
  else:
    d = np.abs(got - want)
    assert np.mean(d <= 1e-4) >= 0.95 and d.max() < 3e-3, (np.mean(d <= 1e-4), d.max())


@pytest.mark.slow
def test_capture_through_the_segment_scan_with_a_quantized_memory():
  cfg, params = _memory_model("edgeinfinite")
  quant = qc.fine_grained("w4a8", group_size=16).replace(memory_state=QuantSpec(8))
  got = calib.capture(quantized(cfg, quant), params, tokens(40))
  # per segment: [segments, B, kv_heads, groups, L, sink + window + L]
  assert got["layers_1/logits"].shape == (5, 2, 2, 2, L, 2 + 16 + L)
  assert got["layers_0/q_hat"].shape == (5, 2, L, 4, 8) and "layers_0/memory" not in got


@pytest.mark.slow
def test_calibration_writes_every_static_site_and_learned_inits():
  cfg = tiny()
  params = model.init_params(cfg, jax.random.key(0))
  q = qc.preset("edgeqat").replace(
      edgeqat=qc.EdgeQATOptions(adaptive_fraction=0.5, adaptive_bits=(8, 4)))
  qcfg = quantized(cfg, q)
  out = calib.calibrate(qcfg, params, [tokens(16), tokens(16, seed=1)])
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(out["params"]).items()}
  shapes = {"/".join(k) for k in traverse_util.flatten_dict(
      model.abstract_params(qcfg)["params"])}
  assert shapes == set(flat)  # exactly the student's parameters, none missing
  for site in ("attn_input", "attn_input_lo", "q", "k", "v_lo", "attn_probs"):
    assert f"layers_1/attn/quant/{site}/scale" in flat
  assert "layers_0/mlp/quant/down_input_lo/zero_point" in flat
  assert "layers_0/attn/quant/o_input/scale" not in flat  # EdgeQAT leaves o_proj's input float
  assert flat["layers_0/attn/q_proj/quant/scale"].shape == ()  # W4 per-tensor LSQ step
  w = params["params"]["layers_0"]["attn"]["q_proj"]["kernel"]
  np.testing.assert_allclose(flat["layers_0/attn/q_proj/quant/scale"],
                             2 * np.mean(np.abs(w)) / np.sqrt(7), rtol=1e-5)
  for k, v in flat.items():
    if k.endswith("/scale") and "/quant/" in k:
      assert np.all(np.asarray(v) > 0), k
  # The low-bit branch gets the same range on a coarser grid.
  hi, lo = flat["layers_0/attn/quant/v/scale"], flat["layers_0/attn/quant/v_lo/scale"]
  np.testing.assert_allclose(lo / hi, 255 / 15, rtol=1e-5)


@pytest.mark.slow
def test_adaptive_bits_select_the_least_important_fraction_per_layer():
  cfg = tiny()
  params = model.init_params(cfg, jax.random.key(0))
  q = qc.preset("w8a8").replace(activation_scales="dynamic", kv_cache=None,
                                edgeqat=qc.EdgeQATOptions(adaptive_fraction=0.25))
  qcfg = quantized(cfg, q)
  x = tokens(16)
  logits, state = model.Transformer(qcfg).apply(params, x, mutable=["intermediates"])
  inter = state["intermediates"]
  for i in range(2):
    low = np.asarray(inter[f"layers_{i}"]["attn"]["low_bits"][0])
    assert low.shape == (2, 16) and np.all(low.sum(1) == 4)  # floor(16 * 0.25) per sequence
    # The chosen tokens have the lowest logits against token 0 (summed over heads).
    col = np.asarray(inter[f"layers_{i}"]["attn"]["logits"][0])[..., 0].sum(axis=(1, 2))
    for b in range(2):
      assert col[b][low[b]].max() <= col[b][~low[b]].min()
  off = model.forward(quantized(cfg, q.replace(edgeqat=qc.EdgeQATOptions())), params, x)
  assert np.abs(np.asarray(logits) - np.asarray(off)).max() > 1e-4  # low bits change outputs


@pytest.mark.slow
def test_ptq_params_save_and_restore(tmp_path):
  cfg = tiny()
  params = model.init_params(cfg, jax.random.key(0))
  qcfg = quantized(cfg, qc.preset("w8a8"))
  qp = calib.quantize_model(qcfg, params, [tokens(16)])
  ptq.save_quantized(tmp_path / "ptq", qp)
  got = ptq.restore_quantized(tmp_path / "ptq")
  assert jax.tree.structure(got) == jax.tree.structure(qp)
  x = tokens(12, seed=4)
  np.testing.assert_array_equal(model.forward(qcfg, got, x), model.forward(qcfg, qp, x))


@pytest.mark.slow
def test_fine_grained_ptq_beats_round_to_nearest_per_tensor_at_w4():
  """Logit error vs the float model on held-out text (this small, briefly trained
  model's held-out loss moves less than its noise, so the error is the measure)."""
  mc, params, held, cal = trained()
  ref = [np.asarray(model.forward(mc, params, t)) for t in held[:2]]

  def err(quant):
    qcfg = quantized(mc, quant)
    qp = calib.quantize_model(qcfg, params, cal)
    return np.mean([np.mean((np.asarray(model.forward(qcfg, qp, t)) - r) ** 2)
                    for t, r in zip(held[:2], ref)])

  w = qc.preset("w4a4").linear_weights
  rtn = err(qc.preset("w4a4").replace(linear_weights=w.replace(granularity="per_tensor",
                                                                axis=None)))
  fine = err(qc.fine_grained("w4a4", group_size=16))
  assert fine < 0.5 * rtn, (fine, rtn)


@pytest.mark.slow
def test_bad_input_raises_before_compilation():
  cfg = tiny()
  params = model.init_params(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match=r"bits=17: must be an integer in 2..16"):
    QuantSpec(17)
  with pytest.raises(QuantConfigError, match=r"group_size=24: does not divide the input "
                                             r"dimension 32 of q_proj"):
    quantized(cfg, qc.fine_grained("w4a8", group_size=24))
  big = tiny(intermediate_size=70_000)
  with pytest.raises(QuantConfigError, match=r"down_proj.*depth 70000.*> the int32 limit "
                                             r"2147483647"):
    quantized(big, qc.integer_mode(qc.preset("w8a8")))
  qcfg = quantized(cfg, qc.preset("w8a8"))
  good = calib.calibrate(qcfg, params, [tokens(8)])
  n_compiled = model._forward_jit._cache_size()
  bad = jax.tree_util.tree_map_with_path(
      lambda p, v: -v if "attn_input" in jax.tree_util.keystr(p) and "scale" in
      jax.tree_util.keystr(p) else v, good)
  with pytest.raises(ValueError, match=r"attn_input/scale=\[-.*must be finite and > 0"):
    model.forward(qcfg, bad, tokens(8))
  bad = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 400.0 if "q_out" not in jax.tree_util.keystr(p) and "zero_point" in
      jax.tree_util.keystr(p) else v, good)
  with pytest.raises(ValueError, match=r"zero_point=\[.*outside the 8-bit integer range "
                                       r"\[-128, 127\]"):
    model.forward(qcfg, bad, tokens(8))
  assert model._forward_jit._cache_size() == n_compiled  # nothing was compiled
  sc = Scenario(segment_len=L, n_sink=0, n_window=0, batch_size=1, max_new_tokens=4,
                short_threshold=4, max_context=70_000)
  with pytest.raises(QuantConfigError, match=r"integer PV \(70000 keys\).*int32 limit"):
    Engine(cfg, good, sc, quant=qc.integer_mode(qc.preset("w8a8")))
  with pytest.raises(ConfigError, match=r"adaptive_fraction=0.5: token-adaptive bits"):
    Engine(cfg, params, sc, quant=qc.preset("w8a8").replace(
        activation_scales="dynamic", kv_cache=None,
        edgeqat=qc.EdgeQATOptions(adaptive_fraction=0.5)))
  with pytest.raises(QuantConfigError, match=r"quant.mode='int4'"):
    quantized(cfg, {"preset": "w8a8", "mode": "int4"})
  assert QuantConfig.from_dict({"preset": "w8a8"}) == qc.preset("w8a8")
