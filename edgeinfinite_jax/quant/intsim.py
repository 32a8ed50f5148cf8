"""Bit-exact integer simulation of quantized kernels (ONNX, TFLite / LiteRT) in JAX.

Conventions
- ``real = (q - zero_point) * scale``; scales are float32, as in both file formats.
  The package's single definitions of the quantization arithmetic live here, and
  ``quantizers`` / ``lsq`` / ``layer_quant`` / ``qconfig`` import them: ``to_codes`` and
  ``to_real`` (quantize / dequantize without checks, traceable), ``round_int`` (the
  rounding modes, ``ROUNDINGS``), ``REQUANT_MODES``, and the accumulator bounds
  (``I32_MAX``, ``WIDE_LIMIT`` = TFLite's 2^47, ``accumulator_limit``).
- Rounding is a parameter, not a fact: each runtime rounds differently.
  ``quantize``: ``"half_to_even"`` is ONNX QuantizeLinear (float32 ``x / scale``, then
  rint); ``"half_away_from_zero"`` is TFLite's reference Quantize (``std::round``).
  (LiteRT's optimized QUANTIZE and XNNPACK compute rint(x * f32(1/scale)): neither.)
  Requantization ``mode`` (accumulator -> output; M = real multiplier):
    ``onnx``             rint(f32(acc) * M), M = f32(s_a*s_b) / s_y in f32   onnxruntime
    ``xnnpack``          the same formula (XNNPACK also forms M in f32)     LiteRT default
    ``gemmlowp``         SRDHM, then RoundingDivideByPOT (ties away)        TF 2.14 REF
    ``tflite_optimized`` SRDHM, then rounding shift with ties up (ruy)      LiteRT/TF OPT
    ``litert_reference`` round_half_away(f64(acc) * M), M in f64            LiteRT 2.3 REF
  TFLite has one int64 (16x8) fixed-point overload, in every build: a reduced 16-bit
  multiplier with ties up; ``gemmlowp`` and ``tflite_optimized`` both use it for int64
  accumulators. (ai-edge-litert 2.3 runs the f64 path for 16x8 under all resolvers.)
- Why float64 / int64: LiteRT's reference kernels multiply in C ``double``, and the
  fixed-point products need 64 bits. Each public function enters ``jax.enable_x64``
  locally, so callers need not enable x64 (this also works inside a caller's
  ``jax.jit`` traced without x64, and keeps numpy int64 inputs from being truncated).
- XLA compiles ``x / broadcast(s)`` as ``x * (1/s)``, 1 ulp off for about half of the
  quotients, which flips ties; divisions here go through an optimization barrier.
- Accumulators: 8-bit x 8-bit accumulates in int32, as the runtimes do. If the worst
  case ``max|a-a_zp| * max|b-b_zp| * K (+ max|bias|)`` could overflow int32 we raise
  ValueError rather than widen silently (the runtimes would wrap). Any 16-bit operand
  accumulates in int64 (TFLite 16x8 contract, int64 bias), bounded by TFLite's 2^47.
- Layouts: ``qlinear_matmul`` / ``matmul_integer`` take ``a [..., K]``, ``b [K, N]`` (ONNX);
  ``fully_connected`` takes TFLite's weight layout ``w [N, K]`` with zero point 0.
- Validation runs on concrete (numpy / python / committed jax) values before any
  computation. Values traced by a caller's ``jax.jit`` skip the value checks (scale > 0,
  zero-point range, bias magnitude); dtype, shape and mode checks always run. Debug mode:
  ``quantize`` / ``dequantize`` with ``checked=True`` check a traced scale (finite, > 0)
  and zero point (in range) inside the computation with ``jax.experimental.checkify``;
  wrap the jitted function in ``checkify.checkify`` and throw its error (without the
  wrapper JAX refuses to stage the check, saying so). Unchecked, a zero or negative
  traced scale saturates every value silently.

(Over 400 lines on purpose: every integer kernel and the arithmetic they share, the one definition the rest of quant/ imports; each kernel is a short checked entry point plus its jitted body.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

ROUNDINGS = ("half_to_even", "half_away_from_zero")
REQUANT_MODES = ("onnx", "gemmlowp", "tflite_optimized", "litert_reference", "xnnpack")
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
WIDE_LIMIT = 2**47  # TFLite's int64 requantization assumes |acc| < 2^47


def accumulator_limit(wide: bool) -> tuple[int, str]:
    """(largest |accumulator| the runtimes handle, its name in messages): int32, or
    (``wide``: an operand above 8 bits) TFLite's int64 bound 2^47."""
    return (WIDE_LIMIT, "int64 (TFLite 2^47)") if wide else (I32_MAX, "int32")


# ----------------------------------------------------------------------------- validation
def _host(v):  # concrete numpy value, or None when v is traced
    return None if v is None or isinstance(v, jax.core.Tracer) else np.asarray(v)


def _choice(name, value, valid):
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {list(valid)}")


def _int_range(name, dtype):
    try:
        info = jnp.iinfo(dtype)
    except Exception:
        raise ValueError(f"{name}={dtype!r} is not an integer dtype") from None
    return int(info.min), int(info.max)


def _check_scale(name, scale):
    if (s := _host(scale)) is None:
        return
    with np.errstate(all="ignore"):  # checked in float32, where 1e-50 / 1e40 become 0 / inf
        bad = ~np.isfinite(s.astype(np.float32)) | ~(s.astype(np.float32) > 0)
    if bad.any():
        raise ValueError(f"{name} must be finite and > 0 in float32; got {s[bad].ravel()[:4].tolist()}")


def _check_int(name, value, lo, hi, what):
    if (v := _host(value)) is None:
        return
    if v.dtype.kind not in "iub" and not np.all(np.floor(v) == v):
        raise ValueError(f"{name}={v.ravel()[:4].tolist()} must be integers")
    bad = (v < lo) | (v > hi)
    if np.any(bad):
        raise ValueError(f"{name}={v[bad].ravel()[:4].tolist()} is outside {what} [{lo}, {hi}]")


def _check_zp(name, zp, dtype):
    lo, hi = _int_range("dtype", dtype)
    _check_int(name, zp, lo, hi, f"the {jnp.dtype(dtype).name} range")


def _checked_in_graph(scale, zero_point, dtype):
    """``checked=True``: the value checks of traced scale / zero point as checkify checks
    (see the module doc). Called outside ``_x64``: checkify's error state keeps the
    caller's integer width, and an int64 one inside x64 would not merge with it."""
    if _host(scale) is None:
        f = jnp.asarray(scale, jnp.float32)
        checkify.check(jnp.all(jnp.isfinite(f) & (f > 0)),
                       "scale must be finite and > 0 in float32; got values in [{lo}, {hi}]",
                       lo=jnp.min(f), hi=jnp.max(f))
    if _host(zero_point) is None:
        lo, hi = _int_range("dtype", dtype)
        z = jnp.asarray(zero_point)
        ok = (z >= lo) & (z <= hi)
        if not jnp.issubdtype(z.dtype, jnp.integer):
            ok = ok & (jnp.floor(z) == z)
        checkify.check(jnp.all(ok), f"zero_point must be integers in the "
                       f"{jnp.dtype(dtype).name} range [{lo}, {hi}]; got values in "
                       "[{zlo}, {zhi}]", zlo=jnp.min(z), zhi=jnp.max(z))


def _check_shape(name, value, n):
    shape = tuple(np.shape(value))
    if shape not in ((), (1,), (n,)):
        raise ValueError(f"{name} has shape {shape}; expected () or ({n},)")


def _check_scalar(**values):
    for name, v in values.items():
        if np.ndim(v) != 0:
            raise ValueError(f"{name} has shape {np.shape(v)}; expected a scalar (per tensor)")


def _span(zp, dtype):
    """max |q - zp| over the dtype's range (full width when zp is traced)."""
    lo, hi = _int_range("dtype", dtype)
    if (z := _host(zp)) is None:
        return hi - lo
    return max(hi - int(z.min()), int(z.max()) - lo)


def _acc_dtype(a_dtype, a_zp, b_dtype, b_zp, k, bias=None):
    wide = max(jnp.dtype(a_dtype).itemsize, jnp.dtype(b_dtype).itemsize) > 1
    worst = _span(a_zp, a_dtype) * _span(b_zp, b_dtype) * k
    if (b := _host(bias)) is not None and b.size:
        worst += int(np.abs(b.astype(np.int64)).max())
    limit, kind = accumulator_limit(wide)
    if worst > limit:
        raise ValueError(
            f"depth K={k}: worst case |a-a_zp|max*|b-b_zp|max*K (+|bias|max) = {worst} exceeds "
            f"the {kind} accumulator limit {limit}; "
            "the runtimes would wrap, so intsim refuses. Split K.")
    return jnp.int64 if wide else jnp.int32


def _check_requant(multiplier, shift, real_multiplier, mode, wide, n):
    for name, v in (("multiplier", multiplier), ("shift", shift), ("real_multiplier", real_multiplier)):
        if v is not None:
            _check_shape(name, v, n)
    _check_int("multiplier", multiplier, 0, I32_MAX, "the non-negative int32 range")
    # TFLite asserts shift in [-31, 30]; its int64 overload needs 15 - shift >= 1.
    hi = 14 if wide else 30
    _check_int("shift", shift, -31, hi, f"TFLite's {'int64' if wide else 'int32'} requantization range")
    if real_multiplier is not None:
        _check_scale("real_multiplier", real_multiplier)


def _act_range(act_min, act_max, dtype):
    lo, hi = _int_range("out_dtype", dtype)
    for name, v in (("act_min", act_min), ("act_max", act_max)):
        if v is not None:
            _check_scalar(**{name: v})
            _check_int(name, v, lo, hi, f"the {jnp.dtype(dtype).name} range")
    a = lo if act_min is None else int(act_min)
    b = hi if act_max is None else int(act_max)
    if a > b:
        raise ValueError(f"act_min={a} > act_max={b}")
    return a, b


def _x64(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(True):
            return fn(*args, **kwargs)
    return wrapper


# ----------------------------------------------------------------------------- primitives
def exact_div(a, b):
    """a / b, correctly rounded, in one fused elementwise pass, in XLA and in the
    exported graphs.

    XLA's algebraic simplifier compiles ``a / broadcast(b)`` as ``a * broadcast(1/b)``,
    1 ulp off in a third of the quotients, which flips rounding ties. A divisor that
    depends on ``a`` element by element is no broadcast: ``b + (m - m)`` with
    ``m = min(|a|, 1)`` equals ``b`` (also for infinite ``a``: m is 1) and fuses with
    the division. Not ``b + 0·m``: LiteRT's converter folds ``x·0`` to 0 and the
    division by a constant into a multiply (one MUL op; a third of the quotients 1 ulp
    off, ``deploy_check --float-ops``); it keeps ``m - m``. An optimization barrier
    around the broadcast works in XLA too, but writes the full-size divisor to memory
    (3x slower on CPU).
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    m = jnp.minimum(jnp.abs(lax.stop_gradient(a)), 1)
    return a / (b + (m - m).astype(b.dtype))


def round_int(v, rounding):
    """Rounding to integers (float result, v's dtype) in the named mode (``ROUNDINGS``):
    ``half_to_even`` (ONNX, ``jnp.round``) or ``half_away_from_zero`` (C ``std::round``).

    Half away: floor(|v| + 0.5) is wrong for 0.49999997 (the sum rounds up to 1.0), and
    "v - trunc(v)" on a product v may be contracted into an FMA by XLA:CPU (it does so
    for a*b - c), seeing the unrounded product. Comparisons against floor + 0.5 avoid
    both. A zero result is +0.0 (the sign is applied only where |v| >= 0.5).
    """
    if rounding == "half_to_even":
        return jnp.round(v)
    a = jnp.abs(v)
    f = jnp.floor(a)
    r = jnp.where(a >= f + 0.5, f + 1, f)
    r = jnp.where(a >= 2.0 ** jnp.finfo(v.dtype).nmant, a, r)  # integral; f + 0.5 inexact
    return jnp.where(v <= -0.5, -r, r)


def to_codes(x, scale, zero_point, lo, hi, dtype, rounding):
    """The quantization arithmetic, defined once: clip(round(f32(x) / scale) + zero_point,
    lo, hi) as ``dtype``. No checks, no broadcasting of qparams (the caller's
    entry point does both); scale float32, zero point float32 (integer-valued)."""
    r = round_int(exact_div(x.astype(jnp.float32), scale), rounding)
    # Clip before the cast: XLA's float->int cast saturates, numpy's is undefined.
    return jnp.clip(r + zero_point, lo, hi).astype(dtype)


def to_real(q, scale, zero_point, dtype=jnp.float32):
    """The dequantization arithmetic, defined once: ``(q - zero_point) * scale`` in
    float32, then ``dtype``. No checks, no broadcasting of qparams (the caller's entry
    point does both). The subtraction runs in the promoted type of q and zero_point:
    int32 codes and zero point (ONNX DequantizeLinear, ``dequantize``), or codes and a
    float32 zero point (the fake-quant forward; exact for |q - zero_point| < 2^24)."""
    return ((q - zero_point).astype(jnp.float32) * scale).astype(dtype)


def _quantize_multiplier(m, xp):
    """TFLite QuantizeMultiplier (default, double-rounding build) for numpy or jax.numpy."""
    q, e = xp.frexp(m)
    m0 = xp.floor(q * 2.0**31 + 0.5)  # q >= 0, so this is std::round
    carry = m0 == 2.0**31
    m0, e = xp.where(carry, 2.0**30, m0), xp.where(carry, e + 1, e)
    tiny = e < -31  # TFLite flushes multipliers below 2^-32 to zero
    m0, e = xp.where(tiny, 0, m0), xp.where(tiny, 0, e)
    return m0.astype(xp.int64), e.astype(xp.int64)


def quantize_multiplier(real_multiplier):
    """Host-side TFLite QuantizeMultiplier: M ~= multiplier * 2**(shift - 31).

    float64, scalar or array. Returns (int32 multiplier in [2^30, 2^31), or 0; shift).
    M == 0 and M < 2^-32 give (0, 0); a mantissa that rounds up to 2^31 becomes 2^30
    with shift + 1. Raises ValueError for negative or non-finite M.
    """
    m = np.asarray(real_multiplier, np.float64)
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError(f"real_multiplier={m.ravel()[:4].tolist()} must be finite and >= 0")
    m0, e = _quantize_multiplier(m, np)
    if m.ndim == 0:
        return np.int32(m0), int(e)
    return m0.astype(np.int32), e.astype(np.int32)


def _srdhm(a, b):
    """gemmlowp SaturatingRoundingDoublingHighMul on int64-held int32 values."""
    p = a * b
    p = p + jnp.where(p >= 0, 1 << 30, 1 - (1 << 30))
    r = lax.div(p, jnp.asarray(1 << 31, p.dtype))  # truncates toward zero, as C does
    return jnp.where((a == I32_MIN) & (b == I32_MIN), I32_MAX, r)


def _rdbpot(x, n):
    """gemmlowp RoundingDivideByPOT: arithmetic shift, ties away from zero."""
    mask = (jnp.int64(1) << n) - 1
    threshold = (mask >> 1) + (x < 0)
    return (x >> n) + ((x & mask) > threshold)


def _requant(acc, m0, shift, real_m, zp, lo, hi, mode):
    """acc (int32 or int64) -> clamp(rescale(acc) + zp, lo, hi) as int64 (int32 for the
    float32 modes with static bounds inside float32's exact integers)."""
    if mode in ("onnx", "xnnpack"):
        y = jnp.round(acc.astype(jnp.float32) * real_m.astype(jnp.float32))
        if isinstance(lo, int) and isinstance(hi, int) and max(-lo, hi) <= 2**24:
            # All in float32 and int32, as the runtimes compute it, and so no 64-bit op in
            # an exported graph: below 2^24 adding the zero point and clipping in float32
            # are exact, and any |y| above it saturates to lo or hi either way.
            y = jnp.clip(y + zp.astype(jnp.float32), np.float32(lo), np.float32(hi))
            return y.astype(jnp.int32)
    elif mode == "litert_reference":
        y = round_int(acc.astype(jnp.float64) * real_m.astype(jnp.float64), "half_away_from_zero")
    else:
        x, m0, shift = acc.astype(jnp.int64), m0.astype(jnp.int64), shift.astype(jnp.int64)
        if acc.dtype == jnp.int64:
            # TFLite's int64 MultiplyByQuantizedMultiplier keeps 16 multiplier bits.
            red = jnp.where(m0 < 0x7FFF0000, (m0 + (1 << 15)) >> 16, 0x7FFF)
            t = 15 - shift
            y = (x * red + (jnp.int64(1) << (t - 1))) >> t
        else:
            left, right = jnp.maximum(shift, 0), jnp.maximum(-shift, 0)
            xs = x << left
            xs = ((xs - I32_MIN) & 0xFFFFFFFF) + I32_MIN  # C's int32 left shift wraps
            h = _srdhm(xs, m0)
            if mode == "gemmlowp":
                y = _rdbpot(h, right)
            else:  # ruy native rounding: add half, arithmetic shift (ties toward +inf)
                y = (h + ((jnp.int64(1) << right) >> 1)) >> right
    lo, hi = jnp.asarray(lo).astype(y.dtype), jnp.asarray(hi).astype(y.dtype)
    y = jnp.clip(y + zp.astype(y.dtype), lo, hi)  # clip before the cast: casts saturate
    return y.astype(jnp.int64)


def _int_matmul(a, a_zp, b, b_zp, acc_dtype, b_k_axis):
    """sum_k (a - a_zp)(b - b_zp) with the zero points folded out of the integer dot.

    The dot is batched, [1, M, K] x [1, K, N]: LiteRT's converter turns an integer dot
    against a constant matrix (the weights of an exported graph) into FULLY_CONNECTED,
    which wants quantized types, and a batched one into BATCH_MATMUL, which multiplies
    plain int8 codes into int32 (the same sums: only the op differs).
    """
    dims = (((2,), (1 + b_k_axis,)), ((0,), (0,)))
    lead = a.shape[:-1]
    acc = lax.dot_general(a.reshape(1, -1, a.shape[-1]), b[None], dims,
                          preferred_element_type=acc_dtype)
    acc = acc.reshape(lead + acc.shape[-1:])
    a_zp, b_zp = a_zp.astype(acc_dtype), b_zp.astype(acc_dtype)
    # Wrapping int32 arithmetic is exact here: the true result fits (checked upstream).
    acc = acc - b_zp * jnp.sum(a, axis=-1, keepdims=True, dtype=acc_dtype)
    acc = acc - a_zp * jnp.sum(b, axis=b_k_axis, dtype=acc_dtype)
    return acc + jnp.asarray(a.shape[-1], acc_dtype) * a_zp * b_zp


def _mult_args(multiplier, shift, real_multiplier):
    m0, sh = jnp.asarray(multiplier, jnp.int64), jnp.asarray(shift, jnp.int64)
    if real_multiplier is None:  # exact in float64: M0 has 31 bits
        real = jnp.ldexp(m0.astype(jnp.float64), (sh - 31).astype(jnp.int32))  # exp2 is inexact
    else:
        real = jnp.asarray(real_multiplier, jnp.float64)
    return m0, sh, real


# ----------------------------------------------------------------------------- public API
def quantize(x, scale, zero_point, dtype, rounding="half_to_even", *, checked=False):
    """q = saturate(round(f32(x) / f32(scale)) + zero_point) as `dtype`.

    scale / zero_point broadcast against x (per tensor, or per axis with singleton dims
    elsewhere, e.g. scale[:, None]). NaN maps to 0 (XLA's cast), not a runtime's value.
    ``checked``: check traced scale / zero point under checkify (module doc).
    """
    if checked:
        _int_range("dtype", dtype)  # a bad dtype is named before any check is staged
        _checked_in_graph(scale, zero_point, dtype)
    return _quantize(x, scale, zero_point, dtype, rounding)


@_x64
def _quantize(x, scale, zero_point, dtype, rounding):
    _choice("rounding", rounding, ROUNDINGS)
    lo, hi = _int_range("dtype", dtype)
    _check_scale("scale", scale)
    _check_zp("zero_point", zero_point, dtype)
    xshape = tuple(np.shape(x))
    for name, v in (("scale", scale), ("zero_point", zero_point)):
        try:
            ok = np.broadcast_shapes(np.shape(v), xshape) == xshape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{name} shape {np.shape(v)} does not broadcast to x shape {xshape}")
    return _quantize_jit(jnp.asarray(x), jnp.asarray(scale, jnp.float32),
                         jnp.asarray(zero_point, jnp.int32), jnp.dtype(dtype), rounding, lo, hi)


@functools.partial(jax.jit, static_argnames=("dtype", "rounding", "lo", "hi"))
def _quantize_jit(x, scale, zp, dtype, rounding, lo, hi):
    return to_codes(x, scale, zp.astype(jnp.float32), lo, hi, dtype, rounding)


def dequantize(q, scale, zero_point, *, checked=False):
    """float32 (q - zero_point) * scale, as ONNX DequantizeLinear computes it.

    ``checked``: check traced scale / zero point under checkify (module doc).
    """
    if checked:
        _checked_in_graph(scale, zero_point, q.dtype if hasattr(q, "dtype") else np.asarray(q).dtype)
    return _dequantize(q, scale, zero_point)


@_x64
def _dequantize(q, scale, zero_point):
    q = jnp.asarray(q)
    _check_scale("scale", scale)
    _check_zp("zero_point", zero_point, q.dtype)
    return to_real(q.astype(jnp.int32), jnp.asarray(scale, jnp.float32),
                   jnp.asarray(zero_point, jnp.int32))


def _matmul_checks(a_q, a_zp, b_q, b_zp, b_types):
    a_q, b_q = jnp.asarray(a_q), jnp.asarray(b_q)
    a_types = (jnp.int8, jnp.uint8, jnp.int16)
    if a_q.dtype not in a_types or b_q.dtype not in b_types:
        raise ValueError(f"dtypes a={a_q.dtype}, b={b_q.dtype} unsupported; a in "
                         f"{[jnp.dtype(t).name for t in a_types]}, b in {[jnp.dtype(t).name for t in b_types]}")
    if a_q.ndim < 1 or b_q.ndim != 2 or a_q.shape[-1] != b_q.shape[0]:
        raise ValueError(f"shapes a={a_q.shape}, b={b_q.shape} do not line up; need a [..., K], b [K, N]")
    _check_scalar(a_zero_point=a_zp)
    _check_shape("b_zero_point", b_zp, b_q.shape[1])
    _check_zp("a_zero_point", a_zp, a_q.dtype)
    _check_zp("b_zero_point", b_zp, b_q.dtype)
    return a_q, b_q


@_x64
def matmul_integer(a_q, a_zp, b_q, b_zp):
    """ONNX MatMulInteger: (a - a_zp) @ (b - b_zp) as int32 (int64 if an operand is 16-bit).

    a [..., K], b [K, N]; a_zp scalar, b_zp scalar or per column [N].
    """
    a_q, b_q = _matmul_checks(a_q, a_zp, b_q, b_zp, (jnp.int8, jnp.uint8, jnp.int16))
    acc_dtype = _acc_dtype(a_q.dtype, a_zp, b_q.dtype, b_zp, a_q.shape[-1])
    # Per-tensor b_zp is broadcast to [N] so both granularities share one compilation.
    b_zp = jnp.broadcast_to(jnp.asarray(b_zp, jnp.int32), (b_q.shape[1],))
    return _matmul_integer_jit(a_q, jnp.asarray(a_zp, jnp.int32), b_q, b_zp, acc_dtype)


@functools.partial(jax.jit, static_argnames=("acc_dtype",))
def _matmul_integer_jit(a, a_zp, b, b_zp, acc_dtype):
    return _int_matmul(a, a_zp, b, b_zp, acc_dtype, 0)


@_x64
def qlinear_matmul(a_q, a_scale, a_zp, b_q, b_scale, b_zp, y_scale, y_zp, out_dtype, mode="onnx",
                   *, bias_q=None):
    """ONNX QLinearMatMul, a [..., K] @ b [K, N] -> [..., N] `out_dtype`, requantized by `mode`.

    a and y are per tensor; b_scale / b_zp are scalars or per column [N]. For non-onnx
    modes M[c] = s_a*s_b[c]/s_y is formed the way that runtime does (f64 for
    litert_reference and the fixed-point modes, f32 for xnnpack), and the fixed-point
    modes convert it with QuantizeMultiplier (in-graph, so traced scales work).
    bias_q [N] (not part of ONNX QLinearMatMul): integer bias on the s_a*s_b[c] grid,
    added to the accumulator before requantization, as TFLite FULLY_CONNECTED does.
    """
    _choice("mode", mode, REQUANT_MODES)
    lo, hi = _int_range("out_dtype", out_dtype)
    a_q, b_q = _matmul_checks(a_q, a_zp, b_q, b_zp, (jnp.int8, jnp.uint8))
    _check_scalar(a_scale=a_scale, y_scale=y_scale, y_zero_point=y_zp)
    _check_shape("b_scale", b_scale, b_q.shape[1])
    for name, s in (("a_scale", a_scale), ("b_scale", b_scale), ("y_scale", y_scale)):
        _check_scale(name, s)
    _check_zp("y_zero_point", y_zp, out_dtype)
    if bias_q is not None:
        _check_shape("bias_q", bias_q, b_q.shape[1])
        if not jnp.issubdtype(jnp.asarray(bias_q).dtype, jnp.integer):
            raise ValueError(f"bias_q dtype {jnp.asarray(bias_q).dtype} must be an integer dtype")
    acc_dtype = _acc_dtype(a_q.dtype, a_zp, b_q.dtype, b_zp, a_q.shape[-1], bias_q)
    if acc_dtype == jnp.int64 and mode in ("gemmlowp", "tflite_optimized"):
        # The int64 overload needs shift <= 14, i.e. M < 2^14; only checkable on the host.
        ms = [_host(v) for v in (a_scale, b_scale, y_scale)]
        if all(v is not None for v in ms):
            m = ms[0].astype(np.float64) * ms[1] / ms[2]
            _check_requant(*quantize_multiplier(m), None, mode, True, b_q.shape[1])
    i32, f32 = (lambda v: jnp.asarray(v, jnp.int32)), (lambda v: jnp.asarray(v, jnp.float32))
    col = lambda v: jnp.broadcast_to(v, (b_q.shape[1],))
    bias = jnp.zeros((b_q.shape[1],), acc_dtype) if bias_q is None else col(jnp.asarray(bias_q).astype(acc_dtype))
    return _qlinear_jit(a_q, i32(a_zp), b_q, col(i32(b_zp)), f32(a_scale), col(f32(b_scale)), f32(y_scale),
                        i32(y_zp), bias, acc_dtype, jnp.dtype(out_dtype), mode, lo, hi)


@functools.partial(jax.jit, static_argnames=("acc_dtype", "out_dtype", "mode", "lo", "hi"))
def _qlinear_jit(a, a_zp, b, b_zp, a_s, b_s, y_s, y_zp, bias, acc_dtype, out_dtype, mode, lo, hi):
    acc = _int_matmul(a, a_zp, b, b_zp, acc_dtype, 0) + bias
    if mode in ("onnx", "xnnpack"):  # both runtimes: (s_a * s_b[c]) / s_y in float32
        real = exact_div(a_s * b_s, y_s)
        m0 = shift = None  # no fixed-point multiplier: nothing 64-bit in an exported graph
    else:  # TFLite PopulateConvolutionQuantizationParams: double(s_a) * double(s_b) / double(s_y)
        f64 = lambda s: s.astype(jnp.float64)
        real = exact_div(f64(a_s) * f64(b_s), f64(y_s))
        m0, shift = _quantize_multiplier(real, jnp)
    return _requant(acc, m0, shift, real, y_zp, lo, hi, mode).astype(out_dtype)


@_x64
def requantize(acc, multiplier, shift, zero_point, out_dtype, mode, *, real_multiplier=None,
               act_min=None, act_max=None):
    """clamp(rescale(acc) + zero_point, act_min, act_max) as `out_dtype`.

    multiplier (int32 in [0, 2^31)) and shift encode M = multiplier * 2^(shift - 31),
    per tensor or per channel along acc's last axis. The float modes (onnx, xnnpack,
    litert_reference) use `real_multiplier` when given, else that M exactly. Runtimes
    form their float M from the float scales, so pass it for bit-exactness; without it
    results differ only when acc*M lies within ~2^-24 (relative) of a rounding tie.
    An int64 `acc` selects TFLite's int64 (16x8) requantization.
    """
    _choice("mode", mode, REQUANT_MODES)
    acc = jnp.asarray(acc)
    if acc.dtype not in (jnp.int32, jnp.int64):
        raise ValueError(f"acc dtype {acc.dtype} must be int32 or int64")
    n = acc.shape[-1] if acc.ndim else 1
    _check_requant(multiplier, shift, real_multiplier, mode, acc.dtype == jnp.int64, n)
    _check_scalar(zero_point=zero_point)
    _check_zp("zero_point", zero_point, out_dtype)
    lo, hi = _act_range(act_min, act_max, out_dtype)
    m0, sh, real = _mult_args(multiplier, shift, real_multiplier)
    # lo / hi are traced so that per-model activation ranges do not recompile.
    return _requant_jit(acc, m0, sh, real, jnp.asarray(zero_point, jnp.int32), jnp.int64(lo),
                        jnp.int64(hi), mode, jnp.dtype(out_dtype))


@functools.partial(jax.jit, static_argnames=("mode", "out_dtype"))
def _requant_jit(acc, m0, shift, real, zp, lo, hi, mode, out_dtype):
    return _requant(acc, m0, shift, real, zp, lo, hi, mode).astype(out_dtype)


@_x64
def fully_connected(x_q, x_zp, w_q, bias_q, multiplier, shift, y_zp, out_dtype, mode, *,
                    act_min=None, act_max=None, real_multiplier=None):
    """TFLite FULLY_CONNECTED: clamp(requant(sum_k (x - x_zp) * w[c, k] + bias[c]) + y_zp).

    x_q [..., K] int8 (int32 accumulator and bias) or int16 (16x8: int64 accumulator
    and bias); w_q [N, K] int8, TFLite's layout, zero point 0; bias_q [N] or None;
    multiplier / shift scalar or per channel [N], from `quantize_multiplier`.
    act_min / act_max: fused-activation clamp, concrete ints (default: out_dtype's range).
    real_multiplier: as in `requantize` (LiteRT REF uses f64 s_in * s_w[c] / s_out).
    """
    _choice("mode", mode, REQUANT_MODES)
    x_q, w_q = jnp.asarray(x_q), jnp.asarray(w_q)
    if x_q.dtype not in (jnp.int8, jnp.int16) or w_q.dtype != jnp.int8:
        raise ValueError(f"dtypes x={x_q.dtype}, w={w_q.dtype} unsupported; x int8 or int16, w int8")
    if x_q.ndim < 1 or w_q.ndim != 2 or x_q.shape[-1] != w_q.shape[1]:
        raise ValueError(f"shapes x={x_q.shape}, w={w_q.shape} do not line up; need x [..., K], w [N, K]")
    n, wide = w_q.shape[0], x_q.dtype == jnp.int16
    if bias_q is not None and tuple(np.shape(bias_q)) != (n,):
        raise ValueError(f"bias_q has shape {np.shape(bias_q)}; expected ({n},)")
    _check_scalar(x_zero_point=x_zp, y_zero_point=y_zp)
    _check_zp("x_zero_point", x_zp, x_q.dtype)
    _check_zp("y_zero_point", y_zp, out_dtype)
    if bias_q is not None:
        if not wide:
            _check_int("bias_q", bias_q, I32_MIN, I32_MAX, "the int32 range")
        elif not jnp.issubdtype(jnp.asarray(bias_q).dtype, jnp.integer):
            raise ValueError(f"bias_q dtype {jnp.asarray(bias_q).dtype} must be an integer dtype")
    _check_requant(multiplier, shift, real_multiplier, mode, wide, n)
    lo, hi = _act_range(act_min, act_max, out_dtype)
    acc_dtype = _acc_dtype(x_q.dtype, x_zp, w_q.dtype, 0, x_q.shape[-1], bias_q)
    bias = jnp.zeros((n,), acc_dtype) if bias_q is None else jnp.asarray(bias_q).astype(acc_dtype)
    m0, sh, real = (jnp.broadcast_to(v, (n,)) for v in _mult_args(multiplier, shift, real_multiplier))
    return _fc_jit(x_q, jnp.asarray(x_zp, jnp.int32), w_q, bias, m0, sh, real,
                   jnp.asarray(y_zp, jnp.int32), jnp.int64(lo), jnp.int64(hi), mode, jnp.dtype(out_dtype))


@functools.partial(jax.jit, static_argnames=("mode", "out_dtype"))
def _fc_jit(x, x_zp, w, bias, m0, shift, real, y_zp, lo, hi, mode, out_dtype):
    acc = _int_matmul(x, x_zp, w, jnp.zeros((), jnp.int32), bias.dtype, 1) + bias
    return _requant(acc, m0, shift, real, y_zp, lo, hi, mode).astype(out_dtype)
