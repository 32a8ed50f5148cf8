"""Integer mode at model level: agreement with fake-quant, the engine in three numerics
modes (compile once, integer KV cache), the exported integer step functions."""

import json

import jax
import numpy as np
import pytest

from edgeinfinite_jax import Engine, Scenario, state_nbytes, with_memory
from edgeinfinite_jax.model import transformer as model
from edgeinfinite_jax.train import qat
from edgeinfinite_jax.quant import layer_quant as qapply
from edgeinfinite_jax.train import calib
from edgeinfinite_jax.quant import intsim
from edgeinfinite_jax.quant import qconfig as qc
from edgeinfinite_jax.model.config import quantized
from export_check import assert_exported_matches_engine
from fast_compile import fast_compiles
from quant_fixtures import tiny, tokens, trained

L = 8


@pytest.fixture(scope="module", autouse=True)
def _fast():
  """XLA's cheap compiles for the module (tests/fast_compile.py); module-scoped, so the
  tests share compiled programs instead of clearing the caches around each one."""
  with fast_compiles():
    yield


@pytest.mark.parametrize("preset, mode", [("w8a8", "tflite_optimized"), ("w4a8", "gemmlowp"),
                                          ("a16w8", "litert_reference")])
@pytest.mark.slow
def test_integer_logits_agree_with_fake_quant_on_held_out_text(preset, mode):
  """Trained tiny model (80 steps on the embedded corpus), 1024 held-out positions.

  Both sides use the same grids (the int16 linear-output grid included); they differ
  in the accumulator rescaling (float vs fixed point ``mode``) and dot order."""
  mc, params, held, cal = trained()
  qcfg = quantized(mc, qc.preset(preset))
  qp = calib.quantize_model(qcfg, params, cal)
  got = qat.integer_agreement(qcfg, qp, held, cal, output_bits=16, requant_mode=mode)
  assert got["int_positions"] == 4 * 8 * 32
  assert got["int_max_diff_steps"] <= 2.0, got
  assert got["int_greedy_agree_pct"] >= 99.0, got


@pytest.mark.slow
def test_exact_dot_reference_isolates_the_requantization():
  """fake_quant_dots='exact' is the quantized function without float32 accumulation
  error. Against it, single-rounding requantization (float64, LiteRT's reference
  kernels) leaves only rare ties, closer than against float dots;
  the double rounding of TFLite's optimized kernels moves int16 outputs by a step."""
  mc, params, held, cal = trained()
  qcfg = quantized(mc, qc.preset("w8a8"))
  qp = calib.quantize_model(qcfg, params, cal)
  single = qat.integer_agreement(qcfg, qp, held, cal, requant_mode="litert_reference")
  double = qat.integer_agreement(qcfg, qp, held, cal, requant_mode="tflite_optimized")
  assert single["int_max_diff_steps"] <= 0.005, single
  assert single["int_vs_float_dots_max_diff_steps"] > single["int_max_diff_steps"], single
  assert double["int_max_diff_steps"] >= 10 * 0.005, double


def test_exact_dot_projection_rounds_once_like_single_rounding_requantization():
  """A projection's exact-dot fake quantization is the output grid's code of the exact
  value: bit for bit what float64 single-rounding requantization (litert_reference)
  gives. Rescaling in float32 first (s_x·s_w, the product, the division: three
  roundings) moved about one int16 code in two thousand here; which ones depends on the
  last bits of the inputs, so the model-level comparison above varied with XLA's compile
  options (the jit cache ignores jax_disable_most_optimizations), test order and machine."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 128)).astype(np.float32)
  w = (0.05 * rng.normal(size=(128, 256))).astype(np.float32)
  scales = {"mlp_input": {"scale": np.float32(np.abs(x).max() / 127), "zero_point": np.float32(3)},
            "gate_out": {"scale": np.float32(4.0 / 32767), "zero_point": np.float32(0)}}
  quant = qc.integer_mode(qc.preset("w8a8"), 16, "litert_reference")
  out = {}
  for name, q in (("integer", quant),
                  ("exact", quant.replace(mode="fake_quant", fake_quant_dots="exact"))):
    project = jax.jit(lambda x, w, s, q=q: qapply.project(
        qapply.LayerQuant(q, s), "mlp_input", "gate_out", x, w, equation="...k,kn->...n",
        n_in=1, n_contract=1))
    out[name] = np.asarray(project(x, w, scales))
  assert np.abs(out["integer"]).max() < 3.0  # inside the grid (+-4.0): no code clipped
  np.testing.assert_array_equal(out["exact"], out["integer"])


def _model():
  base = tiny()
  params = model.init_params(base, jax.random.key(0))
  return with_memory(base, params, rng=jax.random.key(1), attention_type="edgeinfinite",
                     gate="mlp", gate_init_bias=0.0)


def _scenario():
  return Scenario(segment_len=L, n_sink=2, n_window=16, batch_size=1, max_new_tokens=8,
                  short_threshold=4, max_context=64)


def _calibrated(cfg, params, quant):
  long_cfg = Engine(cfg, params, _scenario(), quant=quant).route_configs["long"]
  return calib.calibrate(long_cfg, params, [tokens(40, seed=7, batch=2)])


@pytest.mark.slow
def test_engine_in_three_numerics_modes_compiles_once_and_exports_integer_steps(tmp_path):
  """float / fake_quant on the long route, integer on both routes: one compilation per
  step function whatever the prompt; integer KV cache; the exported integer steps
  (int8 weights and cache as inputs) reproduce the engine in a fresh process."""
  cfg, params = _model()
  quant = qc.integer_mode(qc.preset("w8a8"))
  qp = _calibrated(cfg, params, quant.replace(mode="fake_quant"))
  last, sizes = {}, {}
  for mode in ("float", "fake_quant", "integer"):
    engine = Engine(cfg, qp, _scenario(), quant=quant.replace(mode=mode))
    lengths = (3, 9, 40) if mode == "integer" else (9, 40)  # 3: short route (full attention)
    for t in lengths:
      state, logits = engine.prefill(tokens(t, seed=t, batch=1))
      state, logits = engine.decode(state, np.array([5], np.int32))
    want = {"prefill_long": 1, "decode_long": 1}
    if mode == "integer":
      want.update(prefill_short=1, decode_short=1)
    assert engine.compile_counts() == want, mode
    last[mode], sizes[mode] = np.asarray(logits), state_nbytes(state)
    assert state.caches[0].ring_k.dtype == (np.int8 if mode == "integer" else np.float32)
  assert sizes["integer"] < sizes["fake_quant"] == sizes["float"]
  np.testing.assert_allclose(last["integer"], last["fake_quant"], atol=1e-3)
  assert np.abs(last["fake_quant"] - last["float"]).max() > 1e-3

  manifest = engine.export(str(tmp_path), routes=("long",))  # the integer engine
  inputs = " ".join(manifest["functions"]["prefill_long"]["inputs"])
  assert "int8[32,16]" in inputs  # k_proj's kernel as int8 values [hidden, kv_heads*hd]
  assert "int8[1,2,2,8]" in inputs  # the integer sink cache [batch, sink, kv_heads, hd]
  assert manifest["routes"]["long"]["model_config"]["quant"]["mode"] == "integer"
  assert_exported_matches_engine(tmp_path, engine, tokens(19, batch=1))
  assert json.loads((tmp_path / "manifest.json").read_text())["scenario"]["segment_len"] == L


@pytest.mark.parametrize("mode", ["tflite_optimized", "litert_reference"])
def test_qlinear_matmul_bias_matches_fully_connected(mode):
  """The model's integer projection (qlinear_matmul + int32 bias, [K, N] weights) is
  TFLite FULLY_CONNECTED ([N, K] weights) with the same multipliers, bit for bit."""
  rng = np.random.default_rng(0)
  x = rng.integers(-128, 128, (6, 40)).astype(np.int8)
  w = rng.integers(-127, 128, (40, 12)).astype(np.int8)
  bias = rng.integers(-5000, 5000, (12,)).astype(np.int32)
  sx, sy = np.float32(0.02), np.float32(0.05)
  sw = rng.uniform(0.001, 0.01, (12,)).astype(np.float32)
  got = intsim.qlinear_matmul(x, sx, 3, w, sw, 0, sy, -2, np.int8, mode, bias_q=bias)
  real = np.float64(sx) * sw.astype(np.float64) / np.float64(sy)
  m, shift = intsim.quantize_multiplier(real)
  want = intsim.fully_connected(x, 3, w.T, bias, m, shift, -2, np.int8, mode,
                                real_multiplier=real)
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match=r"bias_q has shape \(3,\); expected \(\) or \(12,\)"):
    intsim.qlinear_matmul(x, sx, 3, w, sw, 0, sy, -2, np.int8, mode, bias_q=bias[:3])
