"""Bit-exactness of edgeinfinite_jax.quant.intsim against runtimes nobody here wrote.

Oracles
- onnxruntime CPU EP (ORT_DISABLE_ALL), tiny opset-21 graphs built in memory:
  QuantizeLinear, QLinearMatMul (per tensor / per column), MatMulInteger.
- ai-edge-litert Interpreter on .tflite flatbuffers written by tests/tflite_builder.py
  (no TensorFlow): QUANTIZE and FULLY_CONNECTED (int8 and 16x8), each model run under
  BUILTIN_REF, BUILTIN_WITHOUT_DEFAULT_DELEGATES ("OPT") and AUTO (XNNPACK delegate).
Every random case mixes tie-heavy configurations (power-of-two multipliers, exact
k + 0.5 quotients): random data alone cannot tell the rounding modes apart.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgeinfinite_jax.quant import intsim

N_CASES = 200


def _iinfo(dtype):
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


# ----------------------------------------------------------------------------- onnxruntime
def _session(node, inputs, output):
    """One-node opset-21 session; inputs / output are (name, numpy dtype, shape) triples."""
    ort = pytest.importorskip("onnxruntime")
    helper = pytest.importorskip("onnx").helper
    vi = lambda n, t, s: helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.dtype(t)), s)
    graph = helper.make_graph([node], "g", [vi(*i) for i in inputs], [vi(*output)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _scales(rng, n, tie):
    """float32 scales: log-uniform, or short-mantissa (odd * 2^e) so ties are exact."""
    if tie:
        return (rng.choice([1, 3, 5, 7], n) * 2.0 ** rng.integers(-9, 2, n)).astype(np.float32)
    return (10.0 ** rng.uniform(-3, 1, n)).astype(np.float32)


# onnxruntime's x86 u8 x s8 GEMM (MLAS), on CPUs without AVX-VNNI / AVX512-VNNI, multiplies
# with vpmaddubsw: it adds each adjacent pair of *raw* u8 * s8 products (zero points are
# folded in afterwards, exactly) with int16 saturation. The ONNX spec has no such step.
# onnxruntime documents it ("U8S8 ... VPMADDUBSW ... might suffer from saturation issues",
# onnxruntime.ai/docs/performance/model-optimizations/quantization.html; its quantizer's
# reduce_range = 7-bit weights; PR #12088). Observed with onnxruntime 1.19.2, 1.31.1 and
# 1.32.0 on an AVX2 AMD EPYC: every u8s8 difference from the spec is that saturation, bit
# for bit, while s8s8, u8u8 and s8u8 equal the spec even at the extremes. So u8s8 cases
# draw b (and its zero point) from [-64, 63]: every pair then stays within 2 * 255 * 64 =
# 32640 < 2^15, where every onnxruntime kernel computes exactly the spec's integer product.
# Full-range s8 weights are still covered bit-exactly by the s8s8 cases.
def _b_range(ta, tb):
    if np.dtype(ta) == np.uint8 and np.dtype(tb) == np.int8:
        return -64, 63
    return _iinfo(tb)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_quantize_linear_matches_onnxruntime(dtype):
    rng = np.random.default_rng(1)
    lo, hi = _iinfo(dtype)
    n = N_CASES  # one case per row; ORT's per-axis scale (axis 0) batches them in one run
    scale = np.where(np.arange(n) % 2 == 0, _scales(rng, n, False), _scales(rng, n, True))
    zp = rng.integers(lo, hi + 1, n).astype(dtype)
    s = scale[:, None].astype(np.float64)
    k = rng.integers(-150, 150, (n, 32)) + 0.5
    x = np.concatenate([
        rng.standard_normal((n, 16)) * 40 * s,                            # ordinary values
        k * s,                                                            # (near-)exact ties
        np.nextafter((k[:, :8] * s).astype(np.float32), np.float32(np.inf)),  # 1 ulp off a tie
        rng.choice([-1, 1], (n, 6)) * 10.0 ** rng.uniform(2.5, 9, (n, 6)) * s,  # saturation
        np.tile([0.0, -0.0], (n, 1)),
    ], axis=1).astype(np.float32)
    helper = pytest.importorskip("onnx").helper
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=0)
    sess = _session(node, [("x", np.float32, list(x.shape)), ("s", np.float32, [n]), ("z", dtype, [n])],
                    ("y", dtype, list(x.shape)))
    want = sess.run(None, {"x": x, "s": scale, "z": zp})[0]
    got = np.asarray(intsim.quantize(x, scale[:, None], zp[:, None], dtype, "half_to_even"))
    assert np.array_equal(got, want), f"{(got != want).sum()} mismatches"
    node = helper.make_node("DequantizeLinear", ["y", "s", "z"], ["x"], axis=0)
    sess = _session(node, [("y", dtype, list(x.shape)), ("s", np.float32, [n]), ("z", dtype, [n])],
                    ("x", np.float32, list(x.shape)))
    deq = np.asarray(intsim.dequantize(want, scale[:, None], zp[:, None]))
    assert np.array_equal(deq, sess.run(None, {"y": want, "s": scale, "z": zp})[0])
    # The cases really exercise ties and saturation.
    q = x / scale[:, None]
    assert (q == np.trunc(q) + np.copysign(0.5, q)).sum() > 2000
    assert (want == lo).any() and (want == hi).any()
    # A scalar runtime divisor under jit is where XLA would use a reciprocal.
    f = jax.jit(lambda x, s, z: intsim.quantize(x, s, z, dtype, "half_to_even"))
    for r in range(0, n, 10):
        assert np.array_equal(np.asarray(f(x[r], scale[r], zp[r])), want[r]), f"row {r}"


def _qlinear_case(rng, i, ta, tb, per_col):
    m, k, n = [(1, 1, 1), (3, 7, 5), (4, 32, 8), (2, 129, 3)][i % 4]
    (alo, ahi), (blo, bhi), nb = _iinfo(ta), _b_range(ta, tb), n if per_col else None  # see _b_range
    a_zp, b_zp = rng.integers(alo, ahi + 1), rng.integers(blo, bhi + 1, nb)
    if i % 3 == 0:  # tie-heavy: M = s_a * s_b / s_y is a power of two, small accumulators
        a = np.clip(a_zp + rng.integers(-3, 4, (m, k)), alo, ahi)
        b = np.clip(b_zp + rng.integers(-3, 4, (k, n)), blo, bhi)
        a_s = np.float32(2.0 ** -rng.integers(2, 9))
        b_s = np.asarray(2.0 ** -rng.integers(2, 6, nb), np.float32)
        y_s = np.float32(a_s * np.max(b_s) * 2.0 ** rng.integers(1, 4))
    else:
        a, b = rng.integers(alo, ahi + 1, (m, k)), rng.integers(blo, bhi + 1, (k, n))
        a_s = np.float32(10 ** rng.uniform(-3, -1))
        b_s = np.asarray(10 ** rng.uniform(-3, -1, nb), np.float32)
        y_s = np.float32(a_s * np.mean(b_s) * np.sqrt(k) * 120 * rng.uniform(0.2, 2) / 50)
    return dict(a=a.astype(ta), a_s=a_s, a_zp=np.asarray(a_zp, ta), b=b.astype(tb),
                b_s=np.asarray(b_s, np.float32), b_zp=np.asarray(b_zp, tb), y_s=y_s,
                y_zp=np.asarray(rng.integers(*_iinfo(ta)), ta))


@pytest.mark.parametrize("per_col", [False, True], ids=["per_tensor", "per_column"])
def test_qlinear_matmul_matches_onnxruntime(per_col):
    helper = pytest.importorskip("onnx").helper
    rng = np.random.default_rng(2)
    names = ["a", "a_s", "a_zp", "b", "b_s", "b_zp", "y_s", "y_zp"]
    node = helper.make_node("QLinearMatMul", names, ["y"])
    col = ["N"] if per_col else []
    mismatches, total, ties = 0, 0, 0
    # The three type combinations onnxruntime implements (y has a's type); u8s8: see _b_range.
    combos = [(np.int8, np.int8)] * 2 + [(np.uint8, np.int8), (np.uint8, np.uint8)]
    sessions = {}
    for i in range(N_CASES):
        ta, tb = combos[i % 4]
        if (ta, tb) not in sessions:
            sessions[ta, tb] = _session(node, [
                ("a", ta, ["M", "K"]), ("a_s", np.float32, []), ("a_zp", ta, []), ("b", tb, ["K", "N"]),
                ("b_s", np.float32, col), ("b_zp", tb, col), ("y_s", np.float32, []), ("y_zp", ta, [])],
                ("y", ta, ["M", "N"]))
        c = _qlinear_case(rng, i, ta, tb, per_col)
        want = sessions[ta, tb].run(None, {k: np.asarray(c[k]) for k in names})[0]
        got = np.asarray(intsim.qlinear_matmul(c["a"], c["a_s"], c["a_zp"], c["b"], c["b_s"], c["b_zp"],
                                               c["y_s"], c["y_zp"], ta, "onnx"))
        mismatches += int((got != want).sum())
        total += want.size
        acc = (c["a"].astype(np.int64) - c["a_zp"]) @ (c["b"].astype(np.int64) - c["b_zp"])
        v = acc * np.float32(c["a_s"] * c["b_s"] / c["y_s"])
        ties += int((v - np.floor(v) == 0.5).sum())
    assert mismatches == 0, f"{mismatches} of {total} outputs differ from onnxruntime"
    assert ties > 100


def test_matmul_integer_matches_onnxruntime():
    helper = pytest.importorskip("onnx").helper
    rng = np.random.default_rng(3)
    node = helper.make_node("MatMulInteger", ["a", "b", "a_zp", "b_zp"], ["y"])
    types = [np.int8, np.uint8]
    sessions = {}
    for i in range(N_CASES):
        ta, tb, per_col = types[i % 2], types[(i // 2) % 2], (i // 4) % 2 == 1
        m, k, n = [(3, 7, 5), (4, 300, 2)][(i // 8) % 2]  # few shapes: each one compiles
        key = (ta, tb, per_col)
        if key not in sessions:
            col = ["N"] if per_col else []
            sessions[key] = _session(node, [("a", ta, ["M", "K"]), ("b", tb, ["K", "N"]),
                                            ("a_zp", ta, []), ("b_zp", tb, col)], ("y", np.int32, ["M", "N"]))
        (alo, ahi), (blo, bhi) = _iinfo(ta), _b_range(ta, tb)  # u8s8: see _b_range
        a = rng.integers(alo, ahi + 1, (m, k)).astype(ta)
        b = rng.integers(blo, bhi + 1, (k, n)).astype(tb)
        a_zp = np.asarray(rng.integers(alo, ahi + 1), ta)
        b_zp = rng.integers(blo, bhi + 1, n if per_col else None).astype(tb)
        want = sessions[key].run(None, {"a": a, "b": b, "a_zp": a_zp, "b_zp": np.asarray(b_zp)})[0]
        got = intsim.matmul_integer(a, a_zp, b, b_zp)
        assert got.dtype == jnp.int32 and np.array_equal(np.asarray(got), want), f"case {i}"
    # Deep and extreme: 255 * 255 * 33000 = 2,145,825,000 still fits int32 exactly.
    a, b = np.full((1, 33000), 255, np.uint8), np.full((33000, 2), 255, np.uint8)
    want = sessions[np.uint8, np.uint8, False].run(None, {"a": a, "b": b, "a_zp": np.array(0, np.uint8), "b_zp": np.array(0, np.uint8)})[0]
    assert np.array_equal(np.asarray(intsim.matmul_integer(a, 0, b, 0)), want)


# ----------------------------------------------------------------------------- ai-edge-litert
@pytest.fixture(scope="module")
def tfl():
    pytest.importorskip("ai_edge_litert")
    path = pathlib.Path(__file__).with_name("tflite_builder.py")
    spec = importlib.util.spec_from_file_location("_intsim_tflite_builder", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quantize_half_away_matches_litert(tfl):
    rng = np.random.default_rng(4)
    for i in range(50):
        s = _scales(rng, 1, tie=i % 2 == 0)[0]
        zp = int(rng.integers(-128, 128))
        k = rng.integers(-150, 150, 64) + 0.5
        x = np.concatenate([rng.standard_normal(64) * 60 * s, k * s, [0.0, 1e6 * s, -1e6 * s]]).astype(np.float32)
        want = tfl.run(tfl.quantize_model(shape=x.shape, scale=s, zero_point=zp), x, "BUILTIN_REF")
        got = np.asarray(intsim.quantize(x, s, zp, jnp.int8, "half_away_from_zero"))
        assert np.array_equal(got, want), f"case {i}: {(got != want).sum()} mismatches"


ACTIVATION_RANGES = ("none", "relu", "relu6")


def _fc_case(rng, i, wide):
    b_, k, n = [(4, 16, 8), (3, 37, 5), (2, 130, 16), (1, 1, 3)][i % 4]
    per_channel, tie = (i // 4) % 2 == 1, i % 3 == 0
    act = ACTIVATION_RANGES[(i // 8) % 3] if not wide else "none"
    xdt, (xlo, xhi) = (np.int16, _iinfo(np.int16)) if wide else (np.int8, _iinfo(np.int8))
    z_in = 0 if wide else int(rng.integers(-128, 128))
    z_out = 0 if wide else int(rng.integers(-128, 128))
    nw = n if per_channel else None
    if tie:  # M[c] = s_in * s_w[c] / s_out = 2^-j: many exact .5 products
        x = np.clip(z_in + rng.integers(-20, 21, (b_, k)), xlo, xhi)
        w = rng.integers(-3, 4, (n, k))
        bias = rng.integers(-40, 41, n)
        s_in = np.float32(2.0 ** -rng.integers(4, 10))
        s_w = np.asarray(2.0 ** -rng.integers(3, 6, nw), np.float32)
        s_out = np.float32(s_in * 2.0**-3 * 2.0 ** rng.integers(1, 5))
    else:
        x, w = rng.integers(xlo, xhi + 1, (b_, k)), rng.integers(-127, 128, (n, k))
        bias = rng.integers(-(2**33) if wide else -(2**14), 2**33 if wide else 2**14, n)
        s_in = np.float32(10 ** rng.uniform(-5 if wide else -3, -3 if wide else -1))
        s_w = np.asarray(10 ** rng.uniform(-3, -1.5, nw), np.float32)
        spread = 70 * np.sqrt(k) * (100 if wide else 1)  # outputs span the range, some saturate
        s_out = np.float32(s_in * np.mean(s_w) * spread * rng.uniform(0.3, 2))
    return dict(x=x.astype(xdt), w=w.astype(np.int8), bias=bias.astype(np.int64 if wide else np.int32),
                s_in=s_in, z_in=z_in, s_w=np.asarray(s_w, np.float32), s_out=s_out, z_out=z_out, act=act)


def _fc_run(tfl, c, resolvers):
    model = tfl.fully_connected_model(batch=c["x"].shape[0], w_q=c["w"], bias_q=c["bias"], s_in=c["s_in"],
                                      z_in=c["z_in"], s_w=c["s_w"], s_out=c["s_out"], z_out=c["z_out"],
                                      in_dtype=c["x"].dtype, activation=c["act"])
    return {r: tfl.run(model, c["x"], r) for r in resolvers}


def _fc_emulate(c, mode, real=None):
    dt = c["x"].dtype
    # TFLite PopulateConvolutionQuantizationParams: double(s_in) * double(s_w) / double(s_out).
    m = np.float64(c["s_in"]) * c["s_w"].astype(np.float64) / np.float64(c["s_out"])
    m0, shift = intsim.quantize_multiplier(m)
    act_min = act_max = None
    if c["act"] != "none":  # TFLite CalculateActivationRangeQuantized
        act_min = max(_iinfo(dt)[0], c["z_out"])
    if c["act"] == "relu6":
        act_max = int(intsim.quantize(np.float32(6.0), c["s_out"], c["z_out"], dt, "half_away_from_zero"))
    real_m = {"f64": m, "f32": (c["s_in"] * c["s_w"]) / c["s_out"], None: None}[real]
    return np.asarray(intsim.fully_connected(c["x"], c["z_in"], c["w"], c["bias"], m0, shift, c["z_out"], dt,
                                             mode, act_min=act_min, act_max=act_max, real_multiplier=real_m))


# resolver -> (intsim mode, real multiplier) that must match it bit for bit (§4 of the
# integer-numerics reference; re-observed here with ai-edge-litert 2.3.0).
INT8_EXPECT = {
    "BUILTIN_REF": [("litert_reference", None), ("litert_reference", "f64")],
    "BUILTIN_WITHOUT_DEFAULT_DELEGATES": [("tflite_optimized", None)],
    "AUTO": [("xnnpack", "f32")],
}


@pytest.mark.slow
def test_fully_connected_int8_matches_litert(tfl):
    rng = np.random.default_rng(5)
    bad, total, disagree = {}, 0, 0
    for i in range(N_CASES):
        c = _fc_case(rng, i, wide=False)
        outs = _fc_run(tfl, c, INT8_EXPECT)
        for r, expectations in INT8_EXPECT.items():
            for mode, real in expectations:
                d = int((_fc_emulate(c, mode, real) != outs[r]).sum())
                bad[r, mode, real] = bad.get((r, mode, real), 0) + d
        total += outs["AUTO"].size
        disagree += int((outs["BUILTIN_REF"] != outs["BUILTIN_WITHOUT_DEFAULT_DELEGATES"]).sum())
    assert all(v == 0 for v in bad.values()), f"mismatches (of {total} outputs): {bad}"
    assert disagree > 50, "cases too tie-poor to tell the rounding modes apart"


def test_fully_connected_rounding_modes_differ_on_ties(tfl):
    """The tie probe of the reference doc: M = 0.5, acc = -9..9 (K = 1, W = 1)."""
    acc = np.arange(-9, 10)
    c = dict(x=acc[:, None].astype(np.int8), w=np.ones((1, 1), np.int8), bias=np.zeros(1, np.int32),
             s_in=np.float32(0.5), z_in=0, s_w=np.float32(1.0), s_out=np.float32(1.0), z_out=0, act="none")
    outs = _fc_run(tfl, c, ["BUILTIN_REF", "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "AUTO"])
    expect = {"BUILTIN_REF": ("litert_reference", [-5, -4, -4, -3, -3, -2, -2, -1, -1, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]),
              "BUILTIN_WITHOUT_DEFAULT_DELEGATES": ("tflite_optimized", [-4, -4, -3, -3, -2, -2, -1, -1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]),
              "AUTO": ("xnnpack", [-4, -4, -4, -3, -2, -2, -2, -1, 0, 0, 0, 1, 2, 2, 2, 3, 4, 4, 4])}
    for r, (mode, want) in expect.items():
        assert outs[r].ravel().tolist() == want, r
        assert _fc_emulate(c, mode).ravel().tolist() == want, mode
    # gemmlowp at shift 0: SRDHM itself rounds ties up (tflite-runtime 2.14 behaviour).
    assert _fc_emulate(c, "gemmlowp").ravel().tolist() == expect["BUILTIN_WITHOUT_DEFAULT_DELEGATES"][1]


def test_fully_connected_16x8_matches_litert(tfl):
    rng = np.random.default_rng(6)
    resolvers = ["BUILTIN_REF", "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "AUTO"]
    bad, total, fixed_point_differs = {}, 0, 0
    for i in range(N_CASES // 2):
        c = _fc_case(rng, i, wide=True)
        outs = _fc_run(tfl, c, resolvers)
        got = _fc_emulate(c, "litert_reference")
        assert got.dtype == np.int16
        for r in resolvers:  # ai-edge-litert 2.3 runs the float64 path for 16x8 everywhere
            bad[r] = bad.get(r, 0) + int((got != outs[r]).sum())
        total += got.size
        # TFLite's int64 fixed-point overload (16-bit multiplier, ties up) is a different
        # rounding; the cases must be tie-rich enough to show it.
        fixed_point_differs += int((_fc_emulate(c, "gemmlowp") != got).sum())
    assert all(v == 0 for v in bad.values()), f"mismatches (of {total} outputs): {bad}"
    assert fixed_point_differs > 20


# ----------------------------------------------------------------------------- unit tests
def _away(v):
    from decimal import ROUND_HALF_UP, Decimal  # ROUND_HALF_UP rounds ties away from zero

    return int(Decimal(float(v)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _py_requant(x, m0, e, mode, wide):
    """The integer-numerics reference formulas (§7), in Python big integers."""
    if wide:  # TFLite int64 overload, every build
        red = (m0 + (1 << 15)) >> 16 if m0 < 0x7FFF0000 else 0x7FFF
        t = 15 - e
        return (x * red + (1 << (t - 1))) >> t
    xs = ((x << max(e, 0)) + 2**31) % 2**32 - 2**31
    p = xs * m0
    q = p + ((1 << 30) if p >= 0 else 1 - (1 << 30))
    h = abs(q) >> 31 if q >= 0 else -(abs(q) >> 31)
    r = max(-e, 0)
    if mode == "gemmlowp":
        mask = (1 << r) - 1
        return (h >> r) + int((h & mask) > (mask >> 1) + int(h < 0))
    return (h + ((1 << r) >> 1)) >> r


@pytest.mark.parametrize("wide", [False, True], ids=["int32_acc", "int64_acc"])
@pytest.mark.parametrize("mode", ["gemmlowp", "tflite_optimized", "litert_reference", "xnnpack"])
def test_requantize_matches_python_reference(mode, wide):
    rng = np.random.default_rng(7)
    n = 6
    m0 = rng.integers(2**30, 2**31, n)
    shift = rng.integers(-20, 3 if not wide else 8, n)
    m0[:3], shift[:3] = [2**30, 2**30, 2**31 - 1], [0, -3, -1]  # M = 1/2, 1/16: exact ties
    lim = 2**40 if wide else 2**31
    acc = rng.integers(-lim, lim, (300, n))
    acc[:4] = [[-lim], [lim - 1], [0], [-1]]
    acc[4:40] = (rng.integers(-40, 40, (36, 1)) * 2 + 1) * np.where(np.arange(36) % 2, 1, 8)[:, None]
    acc = acc.astype(np.int64 if wide else np.int32)
    lo, hi = _iinfo(np.int16 if wide else np.int8)
    zp = 3
    got = np.asarray(intsim.requantize(acc, m0, shift, zp, np.int16 if wide else np.int8, mode))
    for (i, j), a in np.ndenumerate(acc):
        m = float(m0[j]) * 2.0 ** (int(shift[j]) - 31)
        if mode == "litert_reference":
            y = _away(float(a) * m)
        elif mode == "xnnpack":
            y = int(np.rint(np.float32(a) * np.float32(m)))
        else:
            y = _py_requant(int(a), int(m0[j]), int(shift[j]), mode, wide)
        assert got[i, j] == min(max(y + zp, lo), hi), (mode, int(a), int(m0[j]), int(shift[j]))


def test_litert_reference_rounds_the_rounded_double_product():
    # fl(acc * M) is exactly k + 0.5 although the exact product is not: LiteRT's C code
    # rounds fl(acc * M) away from zero; an FMA-contracted "v - trunc(v)" would not.
    for acc, m in [(3, 2.5 / 3), (7, 4.5 / 7), (-3, 2.5 / 3), (13, 0.5 / 13)]:
        p = np.float64(acc) * np.float64(m)
        assert abs(p) % 1 == 0.5
        want = int(np.sign(p) * (np.floor(abs(p)) + 1))
        y = intsim.requantize(np.array([acc], np.int32), *intsim.quantize_multiplier(m), 0, jnp.int8,
                              "litert_reference", real_multiplier=m)
        assert int(y[0]) == want, (acc, m)


def test_quantize_multiplier_edge_cases():
    qm = intsim.quantize_multiplier
    assert qm(0.0) == (0, 0)
    assert qm(0.5) == (2**30, 0)
    assert qm(1.0) == (2**30, 1)
    assert qm(2.0**-32) == (2**30, -31)
    assert qm(2.0**-33) == (0, 0)  # below 2^-32 TFLite flushes to zero
    assert qm(1 - 2.0**-40) == (2**30, 1)  # mantissa rounds up to 2^31: carry into the shift
    assert qm(0.75 - 2.0**-34) == (3 * 2**29, 0)  # exactly half an LSB: rounds away from zero
    m = 10.0 ** np.random.default_rng(8).uniform(-9, 3, 1000)
    m0, e = qm(m)
    assert m0.dtype == np.int32 and np.all((m0 >= 2**30) & (m0 < 2**31))
    assert np.all(np.abs(m0 * 2.0 ** (e.astype(np.float64) - 31) / m - 1) <= 2.0**-31)
    for bad in (-0.5, np.nan, np.inf):
        with pytest.raises(ValueError, match="real_multiplier"):
            qm(bad)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.int16, jnp.int4])
@pytest.mark.parametrize("rounding", intsim.ROUNDINGS)
def test_quantize_matches_numpy_under_jit(dtype, rounding):
    # A runtime scalar divisor under jit is exactly where XLA substitutes a reciprocal.
    rng = np.random.default_rng(9)
    lo, hi = int(jnp.iinfo(dtype).min), int(jnp.iinfo(dtype).max)
    x = (rng.standard_normal(100_000) * (hi - lo) / 4).astype(np.float32)
    s, zp = np.float32(0.0123), (lo + hi) // 2
    f = jax.jit(lambda x, s: intsim.quantize(x, s, zp, dtype, rounding))
    q = x / s
    r = np.rint(q) if rounding == "half_to_even" else np.trunc(q) + (np.abs(q - np.trunc(q)) >= 0.5) * np.sign(q)
    want = np.clip(r + zp, lo, hi)
    assert np.array_equal(np.asarray(f(x, s)).astype(np.int64), want)
    per_axis = intsim.quantize(x.reshape(100, 1000), np.full((100, 1), s), zp, dtype, rounding)
    assert np.array_equal(np.asarray(per_axis).astype(np.int64).ravel(), want)


def test_quantize_rounding_edge_values():
    x = np.array([0.49999997, -0.49999997, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 1e30, -np.inf], np.float32)
    away = intsim.quantize(x, 1.0, 0, jnp.int16, "half_away_from_zero")
    even = intsim.quantize(x, 1.0, 0, jnp.int16, "half_to_even")
    assert np.asarray(away).tolist() == [0, 0, 1, -1, 2, -2, 3, -3, 32767, -32768]
    assert np.asarray(even).tolist() == [0, 0, 0, 0, 2, -2, 2, -2, 32767, -32768]


def test_modes_agree_between_qlinear_matmul_and_fully_connected():
    rng = np.random.default_rng(10)
    a = rng.integers(-128, 128, (2, 3, 40)).astype(np.int8)  # batched [..., K]
    w = rng.integers(-127, 128, (6, 40)).astype(np.int8)  # TFLite layout [N, K]
    s_a, s_w, s_y, z_a, z_y = np.float32(0.02), rng.uniform(0.001, 0.01, 6).astype(np.float32), np.float32(0.3), 5, -7
    m = np.float64(s_a) * s_w.astype(np.float64) / np.float64(s_y)
    m0, shift = intsim.quantize_multiplier(m)
    for mode in intsim.REQUANT_MODES:
        real = (s_a * s_w) / s_y if mode in ("onnx", "xnnpack") else m
        y1 = intsim.qlinear_matmul(a, s_a, z_a, w.T, s_w, np.zeros(6, np.int8), s_y, z_y, jnp.int8, mode)
        y2 = intsim.fully_connected(a, z_a, w, None, m0, shift, z_y, jnp.int8, mode, real_multiplier=real)
        assert y1.shape == (2, 3, 6) and np.array_equal(np.asarray(y1), np.asarray(y2)), mode


def test_traced_arguments_under_jit_match_eager():
    rng = np.random.default_rng(11)
    a = rng.integers(-128, 128, (4, 24)).astype(np.int8)
    b = rng.integers(-128, 128, (24, 5)).astype(np.int8)
    b_s, b_zp = rng.uniform(0.01, 0.02, 5).astype(np.float32), rng.integers(-5, 5, 5).astype(np.int8)
    m0, sh = intsim.quantize_multiplier(np.full(5, 0.013))
    bias = rng.integers(-1000, 1000, 5).astype(np.int32)
    fc = lambda x, z, m0, sh, bias: intsim.fully_connected(x, z, b.T, bias, m0, sh, 1, jnp.int8, "gemmlowp")
    with jax.enable_x64(False):  # callers need not enable x64; the internal scope must not leak
        for mode in intsim.REQUANT_MODES:
            args = (a, np.float32(0.05), np.int8(3), b, b_s, b_zp, np.float32(0.4), np.int8(-2))
            eager = intsim.qlinear_matmul(*args, jnp.int8, mode)
            traced = jax.jit(lambda *t: intsim.qlinear_matmul(*t, jnp.int8, mode))(*args)
            assert np.array_equal(np.asarray(eager), np.asarray(traced)), mode
        assert np.array_equal(np.asarray(fc(a, 3, m0, sh, bias)), np.asarray(jax.jit(fc)(a, 3, m0, sh, bias)))
        assert not jax.config.jax_enable_x64 and jnp.asarray(1).dtype == jnp.int32


X8 = np.zeros((2, 4), np.int8)
W8 = np.zeros((3, 4), np.int8)
BAD_INPUTS = [
    (lambda: intsim.quantize(np.ones(3), 0.0, 0, jnp.int8), r"scale must be finite and > 0.*\[0\.0\]"),
    (lambda: intsim.quantize(np.ones(3), -1.5, 0, jnp.int8), r"scale .*\[-1\.5\]"),
    (lambda: intsim.quantize(np.ones(3), np.nan, 0, jnp.int8), r"scale .*nan"),
    (lambda: intsim.quantize(np.ones(3), np.inf, 0, jnp.int8), r"scale .*inf"),
    (lambda: intsim.quantize(np.ones(3), 1e-50, 0, jnp.int8), r"scale .*1e-50"),
    (lambda: intsim.quantize(np.ones(3), 1.0, 200, jnp.int8), r"zero_point=\[200\] is outside the int8 range \[-128, 127\]"),
    (lambda: intsim.quantize(np.ones(3), 1.0, -1, jnp.uint8), r"zero_point=\[-1\] is outside the uint8 range"),
    (lambda: intsim.quantize(np.ones(3), 1.0, 0, jnp.int8, "nearest"), r"rounding='nearest'.*half_to_even.*half_away_from_zero"),
    (lambda: intsim.quantize(np.ones(3), 1.0, 0, jnp.float32), r"dtype=.*float32.* not an integer dtype"),
    (lambda: intsim.quantize(np.ones((2, 3)), np.ones(2), 0, jnp.int8), r"scale shape \(2,\) does not broadcast to x shape \(2, 3\)"),
    (lambda: intsim.dequantize(X8, -1.0, 0), r"scale .*\[-1\.0\]"),
    (lambda: intsim.dequantize(X8, 1.0, 300), r"zero_point=\[300\]"),
    (lambda: intsim.qlinear_matmul(X8, 1.0, 0, W8.T, 1.0, 0, 1.0, 0, jnp.int8, "banana"), r"mode='banana'.*'onnx', 'gemmlowp', 'tflite_optimized', 'litert_reference', 'xnnpack'"),
    (lambda: intsim.qlinear_matmul(X8, 1.0, 0, W8, 1.0, 0, 1.0, 0, jnp.int8), r"shapes a=\(2, 4\), b=\(3, 4\) do not line up"),
    (lambda: intsim.qlinear_matmul(X8, 1.0, 0, W8.T, np.ones(2), 0, 1.0, 0, jnp.int8), r"b_scale has shape \(2,\); expected \(\) or \(3,\)"),
    (lambda: intsim.qlinear_matmul(X8, 1.0, 0, W8.T, 1.0, 0, 0.0, 0, jnp.int8), r"y_scale .*\[0\.0\]"),
    (lambda: intsim.qlinear_matmul(X8, 1.0, 0, W8.T, 1.0, 128, 1.0, 0, jnp.int8), r"b_zero_point=\[128\]"),
    (lambda: intsim.qlinear_matmul(X8, 1.0, 0, W8.T.astype(np.int32), 1.0, 0, 1.0, 0, jnp.int8), r"dtypes a=int8, b=int32 unsupported"),
    (lambda: intsim.matmul_integer(np.zeros((1, 140000), np.int8), 0, np.zeros((140000, 1), np.int8), 0), r"K=140000.*exceeds the int32"),
    (lambda: intsim.matmul_integer(np.zeros((1, 40000), np.uint8), 255, np.zeros((40000, 1), np.uint8), 0), r"K=40000"),
    (lambda: intsim.fully_connected(X8, 0, W8.T, None, 2**30, -3, 0, jnp.int8, "gemmlowp"), r"shapes x=\(2, 4\), w=\(4, 3\) do not line up"),
    (lambda: intsim.fully_connected(X8, 0, W8, np.array([0, 2**31, 0]), 2**30, -3, 0, jnp.int8, "gemmlowp"), r"bias_q=\[2147483648\] is outside the int32 range"),
    (lambda: intsim.fully_connected(X8, 0, W8, None, -1, -3, 0, jnp.int8, "gemmlowp"), r"multiplier=\[-1\]"),
    (lambda: intsim.fully_connected(X8, 0, W8, None, 2**31, -3, 0, jnp.int8, "gemmlowp"), r"multiplier=\[2147483648\]"),
    (lambda: intsim.fully_connected(X8, 0, W8, None, 2**30, 31, 0, jnp.int8, "gemmlowp"), r"shift=\[31\]"),
    (lambda: intsim.fully_connected(X8, 0, W8, None, 2**30, [-3, -32, -3], 0, jnp.int8, "gemmlowp"), r"shift=\[-32\]"),
    (lambda: intsim.fully_connected(X8.astype(np.int16), 0, W8, None, 2**30, 15, 0, jnp.int16, "gemmlowp"), r"shift=\[15\].*int64"),
    (lambda: intsim.fully_connected(X8.astype(np.int16), 0, W8, np.array([2**47, 0, 0], np.int64), 2**30, -3, 0, jnp.int16, "gemmlowp"), r"K=4.*exceeds"),
    (lambda: intsim.fully_connected(X8, 0, W8, None, 2**30, -3, 0, jnp.int8, "gemmlowp", act_min=5, act_max=4), r"act_min=5 > act_max=4"),
    (lambda: intsim.fully_connected(X8, 0, W8, None, 2**30, -3, 0, jnp.int8, "gemmlowp", act_max=300), r"act_max=\[300\]"),
    (lambda: intsim.fully_connected(X8.astype(np.uint8), 0, W8, None, 2**30, -3, 0, jnp.int8, "gemmlowp"), r"dtypes x=uint8"),
    (lambda: intsim.requantize(np.zeros(3, np.float32), 2**30, 0, 0, jnp.int8, "gemmlowp"), r"acc dtype float32"),
    (lambda: intsim.requantize(np.zeros((2, 3), np.int32), np.full(2, 2**30), 0, 0, jnp.int8, "gemmlowp"), r"multiplier has shape \(2,\)"),
    (lambda: intsim.requantize(np.zeros(3, np.int32), 2**30, 0, 0, jnp.int8, "xnnpack", real_multiplier=-2.0), r"real_multiplier .*\[-2\.0\]"),
]


@pytest.mark.parametrize("call,message", BAD_INPUTS,
                         ids=[f"{i}-" + re.sub(r"\W+", "_", m)[:28].strip("_") for i, (_, m) in enumerate(BAD_INPUTS)])
def test_bad_input_raises_value_error_naming_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()
