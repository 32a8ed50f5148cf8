"""Quantizer math: specs, ranges, rounding, round-trip bounds, STE, LSQ, observers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgeinfinite_jax.quant import lsq
from edgeinfinite_jax.quant import observers as obs
from edgeinfinite_jax.quant import quantizers as qz
from edgeinfinite_jax.quant.quantizers import QuantSpec

RNG = None  # a generator seeded by each test's id, set by conftest before the test


# ----------------------------------------------------------------------------- specs
@pytest.mark.parametrize("kwargs, needle", [
    (dict(bits=1), "bits=1"), (dict(bits=17), "bits=17"), (dict(bits=8.0), "bits=8.0"),
    (dict(granularity="per_row"), "granularity='per_row'"),
    (dict(rounding="stochastic"), "rounding='stochastic'"),
    (dict(granularity="per_group"), "group_size=None"),
    (dict(granularity="per_tensor", group_size=64), "group_size=64"),
    (dict(granularity="per_tensor", axis=0), "axis=0"),
    (dict(symmetric=False, signed=False, narrow_range=True), "narrow_range=True"),
    (dict(granularity="per_group", group_size=4, axis=(0, 1)), "axis=(0, 1)"),
])
def test_spec_validation_names_value(kwargs, needle):
  with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    QuantSpec(**kwargs)


def test_group_size_must_divide_dimension():
  spec = QuantSpec(4, granularity="per_group", group_size=48)
  with pytest.raises(ValueError, match=r"group_size=48.*dimension 64.*axis 0"):
    qz.compute_qparams(jnp.ones((64, 8)), spec)
  with pytest.raises(ValueError, match="axis=3"):
    qz.compute_qparams(jnp.ones((4, 4)), QuantSpec(8, granularity="per_channel", axis=3))


@pytest.mark.parametrize("bits, narrow, signed, lo, hi", [
    (8, True, True, -127, 127), (8, False, True, -128, 127), (4, True, True, -7, 7),
    (4, False, True, -8, 7), (8, False, False, 0, 255), (16, True, True, -32767, 32767),
    (2, True, True, -1, 1)])
def test_integer_ranges(bits, narrow, signed, lo, hi):
  spec = QuantSpec(bits, symmetric=True, narrow_range=narrow, signed=signed)
  assert (spec.qmin, spec.qmax) == (lo, hi)
  assert QuantSpec(8).narrow_range and not QuantSpec(8, symmetric=False).narrow_range


def test_narrow_symmetric_never_produces_lowest_code():
  spec = QuantSpec(8)  # NPU weights: [-127, 127]
  x = jnp.array([-1.0, -0.999, 0.3, 1.0])
  s, z = qz.compute_qparams(x, spec)
  q = qz.quantize_int(x, s, z, spec)
  assert q.dtype == jnp.int8 and int(q[0]) == -127 and int(q[-1]) == 127
  # Far below the range (an explicit small scale) still clips to -127, not -128.
  assert int(qz.quantize_int(jnp.array([-5.0]), 0.01, 0, spec)[0]) == -127
  assert int(qz.quantize_int(jnp.array([-5.0]), 0.01, 0, spec.replace(narrow_range=False))[0]) \
      == -128


def test_tie_rounding_modes():
  x = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, -0.49999997])
  even = qz.quantize_int(x, 1.0, 0, QuantSpec(8, rounding="half_to_even"))
  away = qz.quantize_int(x, 1.0, 0, QuantSpec(8, rounding="half_away_from_zero"))
  np.testing.assert_array_equal(even, [0, 2, 2, 0, -2, -2, 0, 0])
  np.testing.assert_array_equal(away, [1, 2, 3, -1, -2, -3, 0, 0])


def test_division_is_correctly_rounded_at_ties():
  # XLA compiles x / s as x * (1/s); candidates where that flips a .5 tie.
  s = np.float32(3.0) / np.float32(127)  # an absmax / 127 scale
  k = np.arange(-2000, 2000).astype(np.float64) + 0.5
  x = (k * np.float64(s)).astype(np.float32)
  exact = x / s
  recip = x * (np.float32(1) / s)
  pick = (exact == k) & (np.rint(recip) != np.rint(exact))
  assert pick.sum() >= 100
  q = qz.quantize_int(jnp.asarray(x[pick]), s, 0, QuantSpec(16, rounding="half_to_even"))
  np.testing.assert_array_equal(np.asarray(q), np.rint(exact[pick]).astype(np.int16))


def test_exact_div_with_a_broadcast_divisor_is_correctly_rounded():
  # What the quantizers divide by: a per-channel scale broadcast over a weight matrix.
  x = RNG.standard_normal((300, 64)).astype(np.float32)
  s = (RNG.uniform(0.001, 0.1, 64)).astype(np.float32)
  plain = np.asarray(jax.jit(lambda x, s: x / s)(x, s))
  assert (plain != x / s).any()  # the trap is real: XLA multiplies by 1/s
  np.testing.assert_array_equal(np.asarray(jax.jit(qz.exact_div)(x, s)), x / s)
  edge = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], np.float32)
  np.testing.assert_array_equal(np.asarray(jax.jit(qz.exact_div)(edge, s[:1])), edge / s[:1])
  w = RNG.standard_normal(x.shape).astype(np.float32)
  dx, ds = jax.grad(lambda x, s: jnp.sum(qz.exact_div(x, s) * w), argnums=(0, 1))(x, s)
  np.testing.assert_allclose(dx, w / s, rtol=1e-6)
  # ds sums 300 terms of both signs: float32 guarantees n*2^-24*sum|term| (not a
  # relative bound, which cancellation can break for some draws) against float64.
  terms = -(w * x / s.astype(np.float64) ** 2)
  bound = terms.shape[0] * 2.0**-24 * np.abs(terms).sum(0)
  assert np.all(np.abs(ds - terms.sum(0)) <= bound), np.max(np.abs(ds - terms.sum(0)) / bound)


# ----------------------------------------------------------------------------- round trip
SPECS = [QuantSpec(b, symmetric=sym, granularity=g, group_size=16 if g == "per_group" else None)
         for b in (2, 4, 8) for sym in (True, False)
         for g in ("per_tensor", "per_channel", "per_group", "per_token")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity}-"
                         f"{'sym' if s.symmetric else 'asym'}")
def test_round_trip_error_bound(spec):
  x = jnp.asarray(RNG.standard_normal((32, 24)) * RNG.uniform(0.1, 3, (1, 24)), jnp.float32)

  @jax.jit  # one compile per case: the library's jitted pieces inline into it
  def round_trip(x):
    s, z = qz.compute_qparams(x, spec)
    q = qz.quantize_int(x, s, z, spec)
    return q, qz.dequantize(q, s, z, spec), qz.fake_quant(x, spec), \
        qz.expand_qparams(s, x.shape, spec)

  q, dq, fq, s = round_trip(x)
  assert q.dtype == spec.int_dtype and int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
  bound = s * 0.5 * (1 + 1e-5)
  assert bool(jnp.all(jnp.abs(dq - x) <= bound)), float(jnp.max(jnp.abs(dq - x) - bound))
  np.testing.assert_array_equal(fq, dq)  # fake_quant is exactly dequantize(quantize(x))


def test_qparam_shapes():
  x = jnp.ones((8, 6, 4))
  shape = lambda **kw: qz.compute_qparams(x, QuantSpec(8, **kw))[0].shape
  assert shape() == ()
  assert shape(granularity="per_channel") == (1, 1, 4)
  assert shape(granularity="per_channel", axis=(0, 1)) == (8, 6, 1)
  assert shape(granularity="per_token") == (8, 6, 1)
  assert shape(granularity="per_group", group_size=2, axis=0) == (4, 6, 4)


def test_all_zero_and_asymmetric_zero_exact():
  for spec in (QuantSpec(8), QuantSpec(8, symmetric=False), QuantSpec(4, symmetric=False)):
    s, z = qz.compute_qparams(jnp.zeros((4, 4)), spec)
    assert float(s) == 1.0 and spec.qmin <= int(z) <= spec.qmax
    np.testing.assert_array_equal(qz.fake_quant(jnp.zeros((4, 4)), spec), 0.0)
  x = jnp.array([0.0, 0.3, 1.7, 2.0])  # all >= 0: the range is widened to include 0
  spec = QuantSpec(8, symmetric=False)
  s, z = qz.compute_qparams(x, spec)
  assert int(z) == -128 and float(qz.fake_quant(x, spec)[0]) == 0.0


def test_matches_intsim_conventions():
  intsim = pytest.importorskip("edgeinfinite_jax.quant.intsim")
  x = jnp.asarray(RNG.standard_normal((16, 16)) * 3, jnp.float32)
  for spec in (QuantSpec(8), QuantSpec(8, symmetric=False, rounding="half_away_from_zero")):
    s, z = qz.compute_qparams(x, spec)
    q = qz.quantize_int(x, s, z, spec)
    np.testing.assert_array_equal(q, intsim.quantize(x, s, z, jnp.int8, spec.rounding))
    np.testing.assert_array_equal(qz.dequantize(q, s, z, spec), intsim.dequantize(q, s, z))


@pytest.mark.parametrize("scale, zp, needle", [
    (0.0, 0, r"scale=\[0.0\]"), (-1.0, 0, r"scale=\[-1.0\]"), (float("nan"), 0, "nan"),
    (float("inf"), 0, "inf"), (0.1, 300, r"zero_point=\[300\].*\[-128, 127\]"),
    (0.1, 1.5, r"zero_point=\[1.5\].*integer"), (jnp.ones((3,)), 0, r"scale shape \(3,\)")])
def test_bad_user_qparams(scale, zp, needle):
  spec = QuantSpec(8, symmetric=False)
  with pytest.raises(ValueError, match=needle):
    qz.quantize_int(jnp.ones((2, 4)), scale, zp, spec)


def test_symmetric_spec_rejects_nonzero_zero_point():
  with pytest.raises(ValueError, match=r"zero_point=\[3\].*symmetric"):
    qz.fake_quant(jnp.ones(4), QuantSpec(8), scale=0.1, zero_point=3)


# ----------------------------------------------------------------------------- STE
def test_ste_gradients():
  spec, s = QuantSpec(4), 0.1  # representable [-0.7, 0.7]
  x = jnp.array([-2.0, -0.69, -0.2, 0.0, 0.33, 0.7, 0.9])
  plain = jax.grad(lambda x: jnp.sum(qz.fake_quant(x, spec, s) * 2.0))(x)
  np.testing.assert_array_equal(plain, 2.0)
  clipped = jax.grad(lambda x: jnp.sum(qz.fake_quant(x, spec, s, ste="clipped")))(x)
  np.testing.assert_array_equal(clipped, [0, 1, 1, 1, 1, 1, 0])
  ds = jax.grad(lambda s: jnp.sum(qz.fake_quant(x, spec, s)))(jnp.float32(s))
  assert float(ds) == 0.0  # fake_quant never learns its scale (LSQ does)
  dyn = jax.grad(lambda x: jnp.sum(qz.fake_quant(x, spec, ste="clipped")))(x)
  np.testing.assert_array_equal(dyn, 1.0)  # dynamic range covers x: nothing clipped
  with pytest.raises(ValueError, match="ste='soft'"):
    qz.fake_quant(x, spec, ste="soft")


# ----------------------------------------------------------------------------- LSQ / LSQ+
def _lsq_analytic(x, w, s, z, spec, n_per_scale):
  zr = np.round(z)
  v = x / s + zr
  lo, hi = spec.qmin, spec.qmax
  inside = (v >= lo) & (v <= hi)
  g = 1 / np.sqrt(n_per_scale * spec.qmax)
  dx = w * inside
  ds_el = np.where(inside, np.round(v) - v, np.where(v < lo, lo - zr, hi - zr))
  dz_el = np.where(inside, 0.0, -s)
  return dx, g * w * ds_el, g * w * dz_el


def test_lsq_plus_gradients_match_analytic():
  spec = QuantSpec(4, symmetric=False)  # LSQ+ activations: [-8, 7], learned zero point
  x = (RNG.standard_normal((6, 10)) * 0.6).astype(np.float32)
  w = RNG.standard_normal((6, 10)).astype(np.float32)
  s, z = np.float32(0.11), np.float32(1.3)
  f = lambda x, s, z: jnp.sum(lsq.lsq_fake_quant(x, s, z, spec) * w)
  dx, ds, dz = jax.grad(f, argnums=(0, 1, 2))(x, s, z)
  ex, es, ez = _lsq_analytic(x.astype(np.float64), w, float(s), float(z), spec, x.size)
  v = x / s + np.round(z)
  assert ((v < spec.qmin) | (v > spec.qmax)).any() and ((v > spec.qmin) & (v < spec.qmax)).any()
  np.testing.assert_allclose(dx, ex, atol=1e-6)
  np.testing.assert_allclose(ds, es.sum(), rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(dz, ez.sum(), rtol=2e-4, atol=1e-6)


def test_lsq_per_channel_weights_gradients_and_forward():
  spec = QuantSpec(4, granularity="per_channel", narrow_range=False)  # EdgeQAT W4 [-8, 7]
  x = RNG.standard_normal((12, 3)).astype(np.float32)
  w = RNG.standard_normal((12, 3)).astype(np.float32)
  s = np.array([[0.1, 0.2, 0.35]], np.float32)
  dx, ds = jax.grad(lambda x, s: jnp.sum(lsq.lsq_fake_quant(x, s, None, spec) * w),
                    argnums=(0, 1))(x, s)
  ex, es, _ = _lsq_analytic(x.astype(np.float64), w, s.astype(np.float64), 0.0, spec, 12)
  np.testing.assert_allclose(dx, ex, atol=1e-6)
  np.testing.assert_allclose(ds, es.sum(0, keepdims=True), rtol=2e-4, atol=1e-6)
  # Forward equals the plain fake quantizer with the same scale.
  np.testing.assert_array_equal(lsq.lsq_fake_quant(x, s, None, spec), qz.fake_quant(x, spec, s))


def test_lsq_per_group_gradients_sum_over_each_group():
  spec = QuantSpec(4, granularity="per_group", group_size=4, axis=0)
  x = RNG.standard_normal((12, 3)).astype(np.float32)
  w = RNG.standard_normal((12, 3)).astype(np.float32)
  s = RNG.uniform(0.05, 0.4, (3, 3)).astype(np.float32)  # one step per group of 4 rows
  dx, ds = jax.grad(lambda x, s: jnp.sum(lsq.lsq_fake_quant(x, s, None, spec) * w),
                    argnums=(0, 1))(x, s)
  ex, es, _ = _lsq_analytic(x.astype(np.float64), w, np.repeat(s, 4, 0).astype(np.float64),
                            0.0, spec, 4)
  np.testing.assert_allclose(dx, ex, atol=1e-6)
  np.testing.assert_allclose(ds, es.reshape(3, 4, 3).sum(1), rtol=2e-4, atol=1e-6)
  np.testing.assert_array_equal(lsq.lsq_fake_quant(x, s, None, spec), qz.fake_quant(x, spec, s))


def test_lsq_inits():
  x = jnp.asarray(RNG.standard_normal((64, 8)), jnp.float32)
  spec = QuantSpec(4)
  np.testing.assert_allclose(lsq.lsq_init_scale(x, spec), 2 * np.mean(np.abs(x)) / np.sqrt(7),
                             rtol=1e-5)
  aspec = QuantSpec(8, symmetric=False)
  s, z = lsq.lsq_plus_init(x, aspec)
  np.testing.assert_allclose(z, 0.1 * (np.min(x) - float(s) * -128), rtol=1e-5)
  s2, z2 = lsq.lsq_plus_init(x, aspec, method="minmax")
  assert z2.dtype == jnp.float32 and -128 <= float(z2) <= 127
  assert lsq.infer_signed(x) and not lsq.infer_signed(jnp.abs(x))
  assert float(lsq.lsq_init_scale(jnp.zeros(4), spec)) == 1.0
  with pytest.raises(ValueError, match=r"scale=\[-0.1\]"):
    lsq.lsq_fake_quant(x, -0.1, None, spec)


# ----------------------------------------------------------------------------- observers
def test_minmax_and_ema_observers():
  spec = QuantSpec(8, symmetric=False)
  a, b = jnp.array([-1.0, 2.0]), jnp.array([-3.0, 1.0])
  o = obs.MinMaxObserver()
  st = o.update(o.update(o.init(spec), a), b)
  assert (float(st.stats["min"]), float(st.stats["max"])) == (-3.0, 2.0)
  np.testing.assert_array_equal(o.qparams(st)[0], qz.qparams_from_range(-3.0, 2.0, spec)[0])
  e = obs.MovingAverageMinMaxObserver(momentum=0.75)
  st = e.update(e.update(e.init(spec), a), b)
  np.testing.assert_allclose([st.stats["min"], st.stats["max"]],
                             [0.75 * -1 + 0.25 * -3, 0.75 * 2 + 0.25 * 1])
  pc = o.update(o.init(QuantSpec(8, granularity="per_channel")), jnp.array([[1.0, -4], [2, 3]]))
  np.testing.assert_allclose(o.qparams(pc)[0], [[2 / 127, 4 / 127]], rtol=1e-6)
  with pytest.raises(ValueError, match="no data"):
    o.qparams(o.init(spec))
  with pytest.raises(ValueError, match="granularity='per_token'"):
    o.init(QuantSpec(8, granularity="per_token"))


def test_percentile_observer_known_distribution():
  x = jnp.arange(-10000, 10001, dtype=jnp.float32)  # |x| percentile p is ~ p% of 10000
  p = obs.PercentileObserver(percentile=99.0)
  st = p.update(p.init(QuantSpec(8)), x)
  np.testing.assert_allclose(st.stats["max"], 9900.0, rtol=1e-3)
  st = p.update(st, x * 3)  # mean of the per-batch percentiles
  np.testing.assert_allclose(st.stats["max"], 2 * 9900.0, rtol=1e-3)
  a = p.update(p.init(QuantSpec(8, symmetric=False)), x + 10000)
  np.testing.assert_allclose([a.stats["min"], a.stats["max"]], [200.0, 19800.0], rtol=1e-3)


def test_mse_search_beats_minmax_on_heavy_tails():
  x = jnp.asarray(RNG.standard_t(3.0, (4096,)), jnp.float32)  # Student-t, 3 dof
  spec = QuantSpec(4)
  mse, mm = obs.MseObserver(), obs.MinMaxObserver()
  st = mse.update(mse.init(spec), x)
  err = lambda qp: float(jnp.mean((qz.fake_quant(x, spec, *qp) - x) ** 2))
  e_mse, e_mm = err(mse.qparams(st)), err(mm.qparams(mm.update(mm.init(spec), x)))
  assert e_mse < 0.5 * e_mm, (e_mse, e_mm)
  assert float(mse.qparams(st)[0]) < float(mm.qparams(mm.update(mm.init(spec), x))[0])
  with pytest.raises(ValueError, match="bits/range must match"):
    mse.qparams(st, QuantSpec(8))


def test_per_group_beats_per_tensor_on_outliers():
  w = RNG.standard_normal((128, 16)).astype(np.float32) * 0.02
  w[5, 3], w[77, 9] = 2.0, -1.5  # a few outlier weights
  w = jnp.asarray(w)
  err = lambda spec: float(jnp.mean((qz.fake_quant(w, spec) - w) ** 2))
  per_tensor, per_group = err(QuantSpec(4)), err(QuantSpec(4, granularity="per_group",
                                                            group_size=32))
  assert per_group < 0.2 * per_tensor, (per_group, per_tensor)


def test_traced_qparams_under_jit_match_eager():
  spec = QuantSpec(4, granularity="per_group", group_size=8)
  x = jnp.asarray(RNG.standard_normal((16, 4)), jnp.float32)
  s, z = qz.compute_qparams(x, spec)
  np.testing.assert_array_equal(jax.jit(lambda x, s: qz.fake_quant(x, spec, s))(x, s),
                                qz.fake_quant(x, spec, s))
  loss = lambda x, s: jnp.sum(lsq.lsq_fake_quant(x, s, None, spec) ** 2)
  for a, b in zip(jax.jit(jax.grad(loss, (0, 1)))(x, s), jax.grad(loss, (0, 1))(x, s)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
