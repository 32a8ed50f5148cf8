"""A QuantConfig applied inside the model: per-layer quantizer context, projections, checks.

Every layer of the model takes its quantizers from a ``LayerQuant``; with no
active ``QuantConfig`` (None or mode ``float``) each of them is the identity and
the layer is the float model.

Sites. Every quantized activation has a site name, per layer (``ptq.ACTIVATION_SITES``
maps each to its QuantConfig placement)::

  attention: attn_input -> {q,k,v}_proj -> {q,k,v}_out -> kv_cache_{k,v} (K, V as
             cached: pre-RoPE, quantized on write) -> q, k (after RoPE), v (at use)
             -> attn_probs -> o_input -> o_proj -> o_out
  mlp:       mlp_input -> {gate,up}_proj -> {gate,up}_out -> down_input -> down_proj
             -> down_out

Scales per site: ``dynamic`` (computed from the tensor; softmax probabilities use
their known range [0, 1]), or static per-tensor parameters under
``layers_i/{attn,mlp}/quant/{site}/{scale,zero_point}`` (``calibrated``: written by
``calib.py``; ``learned``: LSQ+ trained by QAT; ``{site}_lo`` holds the low-bit
branch of token-adaptive bits). Learned weight step sizes sit at
``.../{name}_proj/quant/scale``. The regex ``.*/quant/.*`` selects all of them.

Integer mode, exactly which ops are integer:

* every q/k/v/o/gate/up/down projection: input quantized to int8/int16 with its
  static scale, weights int8 (4-bit values held in int8), ``lax.dot_general``
  with int32 accumulation (int64 for 16-bit inputs), zero point folded, int32
  bias, fixed-point requantization (``quant.requant_mode``: intsim's gemmlowp /
  tflite_optimized / litert_reference / xnnpack / onnx) to the ``linear_outputs``
  grid; ``intsim.qlinear_matmul`` computes it;
* QK^T and PV: integer (q - z_q)·(k - z_k) and (p - z_p)·(v - z_v) dots with
  int32 accumulation (int64 above 8 bits); the accumulator is rescaled to float32
  (s_q·s_k/sqrt(d), s_p·s_v) for the softmax and the output projection's
  quantizer, as NPUs dequantize around a float softmax;
* the engine's KV cache holds the int8 values (``kv_cache`` grid).

Float (dequantize / requantize around them, as NPU toolchains do): RMSNorm, RoPE,
softmax, SiLU·up, residual adds, the embedding lookup and lm_head (over their
fake-quantized weights when ``embeddings`` / ``lm_head`` are set), and the
EdgeInfinite memory (sigma, retrieval, update, gate; M fake-quantized on write
when ``memory_state`` is set). ``intsim.to_real(integer values)`` equals the
fake-quantized value bit for bit at every site, so fake_quant and integer differ
only in how the projections' accumulators are rescaled (float vs fixed point)
and in the float summation order of the attention dots.

(Over 400 lines on purpose: the per-layer quantization context is one object, LayerQuant, whose methods the layers call; its projections and integer dots use its state.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from edgeinfinite_jax.quant import losses, lsq, ptq
from edgeinfinite_jax.quant import quantizers as qz
from edgeinfinite_jax.quant.qconfig import QuantConfig, QuantConfigError
from edgeinfinite_jax.quant.quantizers import QuantSpec
from edgeinfinite_jax.quant import intsim
from flax import traverse_util

ATTN_SITES = ("attn_input", "q_out", "k_out", "v_out", "kv_cache_k", "kv_cache_v", "q", "k", "v",
              "attn_probs", "o_input", "o_out")
MLP_SITES = ("mlp_input", "gate_out", "up_out", "down_input", "down_out")
# Token-adaptive bits (edgeqat.md §6): the layer's attention input, Q and K use the
# low-bit tokens chosen by the previous layer; V, the o_proj input and the MLP use
# the ones chosen by this layer (from its own Q̂K̂ logits against token 0).
PREV_MASK_SITES = ("attn_input", "q", "k")
CUR_MASK_SITES = ("v", "o_input", "mlp_input", "down_input")


def active(quant: QuantConfig | None) -> bool:
  return quant is not None and quant.mode != "float"


def site_spec(quant: QuantConfig | None, site: str) -> QuantSpec | None:
  if not active(quant):
    return None
  if site == "o_input" and not quant.quantize_o_input:
    return None
  return getattr(quant, ptq.ACTIVATION_SITES[site])


def adaptive(quant) -> bool:
  """Token-adaptive bit widths are on."""
  return active(quant) and quant.edgeqat.adaptive_fraction > 0


def low_spec(quant: QuantConfig, spec: QuantSpec) -> QuantSpec:
  return spec.replace(bits=quant.edgeqat.adaptive_bits[1])


def high_spec(quant: QuantConfig, site: str, spec: QuantSpec) -> QuantSpec:
  if adaptive(quant) and site in PREV_MASK_SITES + CUR_MASK_SITES:
    return spec.replace(bits=quant.edgeqat.adaptive_bits[0])
  return spec


def static_sites(quant: QuantConfig | None, sites) -> tuple[tuple[str, QuantSpec], ...]:
  """(param name, spec) of the sites with static scales among ``sites`` (+ ``_lo``)."""
  if not active(quant) or quant.activation_scales == "dynamic":
    return ()
  out = []
  for site in sites:
    spec = site_spec(quant, site)
    if spec is None:
      continue
    out.append((site, high_spec(quant, site, spec)))
    if adaptive(quant) and site in PREV_MASK_SITES + CUR_MASK_SITES:
      out.append((site + "_lo", low_spec(quant, spec)))
  return tuple(out)


# ----------------------------------------------------------------------------- context
class LayerQuant(NamedTuple):
  """One layer's quantizers: config (static), static qparams, adaptive masks, captures.

  ``params``: site -> {"scale", "zero_point"?} arrays (static scales). ``prev`` /
  ``cur``: [B, T] bool, True = low bit width (token-adaptive bits), or None.
  ``cap``: a dict that collects pre-quantization activations and the attention
  internals while tracing (calibration, EdgeQAT losses), or None.
  """
  quant: QuantConfig | None
  params: Any = None
  prev: Any = None
  cur: Any = None
  cap: dict | None = None

  @property
  def active(self) -> bool:
    return active(self.quant)

  @property
  def integer(self) -> bool:
    return self.active and self.quant.mode == "integer"

  @property
  def code_dots(self) -> bool:
    """Dots over the integer codes: integer mode, or fake_quant_dots='exact'."""
    return self.integer or (self.active and self.quant.fake_quant_dots == "exact")

  def fresh_capture(self) -> "LayerQuant":
    """A copy with its own capture dict (inside scan bodies: tracers must not leak)."""
    return self._replace(cap=None if self.cap is None else {})

  def record(self, name, x):
    if self.cap is not None:
      self.cap[name] = x

  def _mask(self, site, pos):
    m = self.prev if site in PREV_MASK_SITES else self.cur if site in CUR_MASK_SITES else None
    if m is None:
      return None
    if pos is not None:  # tensor rows sit at absolute positions ``pos`` of the sequence
      m = m[:, jnp.clip(pos, 0, m.shape[1] - 1)]
    return m

  def act(self, site, x, pos=None):
    """Fake-quantized activation at ``site`` (float, x's dtype); x itself when off.

    ``pos`` [n]: absolute positions of x's axis-1 rows (for the adaptive masks of
    tensors that are slices of the sequence, e.g. a segment's keys).
    """
    self.record(site, x)
    spec = site_spec(self.quant, site)
    if spec is None:
      return x
    spec = high_spec(self.quant, site, spec)
    mask = self._mask(site, pos)
    if mask is None:
      return self._fq(site, spec, x)
    lo = low_spec(self.quant, spec)
    return losses.mixed_fake_quant(x, mask, spec, lo, quant_hi=lambda v: self._fq(site, spec, v),
                                   quant_lo=lambda v: self._fq(site + "_lo", lo, v))

  def _fq(self, name, spec, x):
    scales = self.quant.activation_scales
    if name == "memory":  # a running sum: always dynamic
      return qz.fake_quant(x, spec, ste=self.quant.ste)
    if scales == "dynamic":
      if name.startswith("attn_probs"):
        return qz.fake_quant(x, spec, *_unit_range(spec), ste=self.quant.ste)
      return qz.fake_quant(x, spec, ste=self.quant.ste)
    p = self.params[name]
    if scales == "learned":
      return lsq.lsq_fake_quant(x, p["scale"], p.get("zero_point"), spec)
    return qz.fake_quant(x, spec, p["scale"], p.get("zero_point", jnp.zeros((), jnp.float32)),
                         ste=self.quant.ste)

  def qint(self, site, x):
    """Integer mode: (integer values in the spec's dtype, scale f32, zero point f32).

    ``intsim.to_real`` of the result equals ``act(site, x)`` bit for bit (same
    division, rounding, clip, and, for learned sites, LSQ's ``round(x/s + z)``).
    """
    self.record(site, x)
    return self.codes(site, lambda s: qz.exact_div(x.astype(jnp.float32), s))

  def codes(self, site, quotient):
    """``qint`` of a value given by ``quotient(s)`` = value / s (s: the site's float32
    scale), so a caller may form the quotient more precisely than float32 allows."""
    spec = site_spec(self.quant, site)
    p = self.params[site]
    s = jnp.asarray(p["scale"], jnp.float32)
    z = jnp.asarray(p.get("zero_point", 0.0), jnp.float32)
    if self.quant.activation_scales == "learned":
      z = qz.round_int(z, spec.rounding)
      v = quotient(s) + z
      q = qz.round_int(jnp.clip(v, spec.qmin, spec.qmax), spec.rounding)
    else:
      q = qz.round_int(quotient(s), spec.rounding) + z
      q = jnp.clip(q, spec.qmin, spec.qmax)
    return q.astype(spec.int_dtype), s, z

  def memory(self, mem):
    """EdgeInfinite memory after a write: M fake-quantized when ``memory_state`` is set."""
    if site_spec(self.quant, "memory") is None:
      return mem
    # Not recorded: M is written inside the segment scan, outside any capture dict's scope.
    return mem._replace(M=self._replace(cap=None).act("memory", mem.M))

  def kv_write(self, which, x, dtype, store_int):
    """K or V as the cache stores them: fake-quantized floats, or (``store_int``, integer
    mode) the integer values themselves."""
    site = f"kv_cache_{which}"
    self.record(site, x)
    if site_spec(self.quant, site) is None:
      return x
    if self.integer:
      q, s, z = self.qint(site, x)
      return q if store_int else intsim.to_real(q, s, z, dtype)
    return self.act(site, x)

  def kv_read(self, which, x, dtype):
    """Cache entries back to floats (identity unless the cache holds integers)."""
    if not jnp.issubdtype(x.dtype, jnp.integer):
      return x
    p = self.params[f"kv_cache_{which}"]
    return intsim.to_real(x, p["scale"], p.get("zero_point", 0.0), dtype)


def _unit_range(spec):
  # Softmax output lies in [0, 1]; a fixed grid keeps dynamic-scale probabilities causal.
  s, z = qz.qparams_from_range(0.0, 1.0, spec)
  return s, z


# ----------------------------------------------------------------------------- weights
def _flat_kernel(kernel, n_contract):
  k = int(np.prod(kernel.shape[:n_contract]))
  return kernel.reshape(k, -1)


def weight_spec(spec: QuantSpec, table: bool) -> QuantSpec:
  return ptq.resolve_weight_spec(spec, table=table)


def fake_weight(quant, spec, kernel, n_contract, learned_scale=None):
  """The kernel as fake_quant mode sees it (float, original shape).

  ``kernel``: float array (quantized here: min/max per forward with an STE, or
  LSQ with ``learned_scale``) or a PTQ ``QuantizedTensor`` (dequantized).
  ``n_contract=None``: an embedding table.
  """
  if isinstance(kernel, ptq.QuantizedTensor):
    return kernel.dequantize()
  table = n_contract is None
  w2 = kernel if table else _flat_kernel(kernel, n_contract)
  spec = weight_spec(spec, table)
  if learned_scale is not None:
    s = learned_scale.reshape((1, -1) if spec.granularity == "per_channel" else ())
    return lsq.lsq_fake_quant(w2, s, None, spec).reshape(kernel.shape)
  return qz.fake_quant(w2, spec, ste=quant.ste).reshape(kernel.shape)


def integer_weight(spec, kernel, n_contract, learned_scale=None):
  """(int8 values [K, N], scale () or [N]) for integer mode."""
  if isinstance(kernel, ptq.QuantizedTensor):
    scale = kernel.scale
    return kernel.values, scale.reshape(-1) if scale.ndim else scale
  w2 = lax.stop_gradient(_flat_kernel(kernel, n_contract)).astype(jnp.float32)
  spec = weight_spec(spec, False)
  if learned_scale is not None:
    s = learned_scale.reshape((1, -1) if spec.granularity == "per_channel" else ())
  else:
    s, _ = qz.compute_qparams(w2, spec)
  q = qz._quantize(w2, s, jnp.zeros((), jnp.float32), spec)
  return q, s.reshape(-1) if s.ndim else s


def project(qx: LayerQuant, site_in, site_out, x, kernel, *, equation, n_in, n_contract,
            placement="linear_weights", bias=None, learned_scale=None, dtype=jnp.float32):
  """One quantized linear map ``einsum(equation, x, kernel) (+ bias)``.

  fake_quant: fake-quantized input and weight, float einsum, fake-quantized output.
  integer (projections whose input is quantized): ``intsim.qlinear_matmul`` on the
  flattened [..., K] x [K, N] layout, requantized to ``linear_outputs``, then
  dequantized for the float op that follows. A projection whose input placement
  is off (lm_head; o_proj with ``quantize_o_input=False``) runs the fake_quant way. ``n_in``: trailing axes of x that
  are contracted; ``n_contract``: leading axes of the kernel that are.
  """
  spec = getattr(qx.quant, placement) if qx.active else None
  if qx.code_dots and spec is not None and site_spec(qx.quant, site_in) is not None:
    return _integer_project(qx, site_in, site_out, x, kernel, spec, n_in, n_contract, bias,
                            learned_scale, dtype)
  xh = qx.act(site_in, x) if site_in else x
  if spec is None:
    w = kernel.dequantize() if isinstance(kernel, ptq.QuantizedTensor) else kernel
  else:
    w = fake_weight(qx.quant, spec, kernel, n_contract, learned_scale)
  y = jnp.einsum(_explicit(equation, xh.ndim), xh.astype(dtype), w.astype(dtype))
  if bias is not None:
    y = y + bias.astype(dtype)
  return qx.act(site_out, y) if site_out else y


def _integer_project(qx, site_in, site_out, x, kernel, spec, n_in, n_contract, bias,
                     learned_scale, dtype):
  """The projection over integer codes: fixed-point requantization in integer mode; with
  fake_quant_dots='exact', the output grid's code of the exact real value (one rounding
  of a float64 quotient), dequantized as fake quantization would."""
  lead = x.shape[:x.ndim - n_in]
  out_shape = lead + tuple(kernel.shape[n_contract:])
  x_q, sx, zx = qx.qint(site_in, x.reshape(lead + (-1,)))
  w_q, sw = integer_weight(spec, kernel, n_contract, learned_scale)
  if not qx.integer:
    with jax.enable_x64(True):  # int64 accumulators (16-bit codes); the float64 rescaling
      acc = code_acc("...k,kn->...n", (x_q, sx, zx), (w_q, sw, 0))
      y = acc.astype(jnp.float32) * (sx * sw)  # code_dot's float32 rescaling
      if bias is not None:
        y = y + bias.reshape(-1).astype(jnp.float32)
      y = y.astype(dtype).reshape(out_shape)
      if not site_out or site_spec(qx.quant, site_out) is None:
        return y
      # The output code of acc·s_x·s_w (+ bias) over s_y, rounded once: the quotient is
      # formed in float64. Fake-quantizing the float32 ``y`` would round three times
      # (s_x·s_w, the product, the division) and move the codes that lie within ~2^-24
      # (relative) of a rounding boundary, a few per thousand at an int16 grid: which ones
      # depends on the last bits of weights and scales, and so on XLA's compile options
      # and the machine, and the reference would stop being the quantized function.
      qx.record(site_out, y)
      f64 = lambda v: jnp.asarray(v, jnp.float64)
      real = acc.astype(jnp.float64) * (f64(sx) * f64(sw))
      if bias is not None:
        real = real + bias.reshape(-1).astype(jnp.float64)
      q, s, z = qx.codes(site_out, lambda s: qz.exact_div(real, f64(s)))
    return intsim.to_real(q, s, z, dtype).reshape(out_shape)
  out_spec = site_spec(qx.quant, site_out)
  p = qx.params[site_out]
  sy, zy = p["scale"], p.get("zero_point", jnp.zeros((), jnp.float32))
  bias_q = None
  if bias is not None:  # TFLite: bias on the s_x·s_w grid, zero point 0, int32
    b = bias.reshape(-1).astype(jnp.float32)
    bias_q = jnp.clip(jnp.round(b / (sx * sw)), -intsim.I32_MAX, intsim.I32_MAX).astype(jnp.int32)
  y_q = intsim.qlinear_matmul(x_q, sx, zx.astype(jnp.int32), w_q, sw, 0, sy,
                              zy.astype(jnp.int32), out_spec.int_dtype, qx.quant.requant_mode,
                              bias_q=bias_q)
  y = intsim.to_real(y_q, jnp.asarray(sy, jnp.float32), jnp.asarray(zy, jnp.float32), dtype)
  return y.reshape(out_shape)


def _explicit(equation, ndim):
  """``equation`` with its ``...`` spelled out as letters for ``ndim``-rank x.

  The same dot for XLA. For jax2onnx (0.17.1) it is not: it lowers ``...k,kn->...n``
  by broadcasting the kernel to [B, T, K, N] (Expand) before the Einsum, and ONNX
  Runtime constant-folds that into a copy of every weight per token, 40 GB for
  SmolLM2's prefill graph, at session creation.
  """
  if "..." not in equation:
    return equation
  spare = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in equation]
  lead = "".join(spare[:ndim - (len(equation.split(",")[0]) - 3)])
  return equation.replace("...", lead)


def code_dot(equation, a, b):
  """``einsum(equation)`` of two quantized operands given as (codes, scale, zero point)
  (``LayerQuant.qint``): Σ (a - z_a)(b - z_b) accumulated exactly, in int32, or int64
  (x64 enabled locally, as intsim does) when either holds 16-bit codes; then rescaled
  by s_a·s_b in float32."""
  if _wide(a, b):
    with jax.enable_x64(True):
      total = code_acc(equation, a, b).astype(jnp.float32)
  else:
    total = code_acc(equation, a, b).astype(jnp.float32)
  return total * (a[1] * b[1])


def _wide(a, b) -> bool:
  return max(jnp.iinfo(a[0].dtype).bits, jnp.iinfo(b[0].dtype).bits) > 8


def code_acc(equation, a, b):
  """The integer accumulator of ``code_dot``: int32, or int64 when either operand holds
  16-bit codes (int64 needs x64: call it inside ``jax.enable_x64``).

  8-bit codes meet in an int8 x int8 -> int32 dot, with the zero points folded in after
  it, Σ(a-z_a)(b-z_b) = Σab - z_b Σa - z_a Σb + K z_a z_b: the dot that edge runtimes and
  NPUs have (LiteRT has no int32 x int32 matmul). int32 arithmetic wraps, and the true
  result fits (``check_depth``), so the sum is exact.
  """
  (a_q, _, a_zp), (b_q, _, b_zp) = a, b
  if _wide(a, b) or "..." in equation:
    dtype = jnp.int64 if _wide(a, b) else jnp.int32
    x = a_q.astype(dtype) - jnp.asarray(a_zp).astype(dtype)
    y = b_q.astype(dtype) - jnp.asarray(b_zp).astype(dtype)
    return jnp.einsum(equation, x, y, preferred_element_type=dtype)
  i32 = lambda v: jnp.asarray(v).astype(jnp.int32)
  (a_q, a_zp), (b_q, b_zp) = _signed(a_q, a_zp), _signed(b_q, b_zp)
  acc = jnp.einsum(equation, a_q, b_q, preferred_element_type=jnp.int32)
  inputs, out = equation.split("->")
  la, lb = inputs.split(",")
  sizes = dict(zip(la, a_q.shape)) | dict(zip(lb, b_q.shape))
  depth = int(np.prod([sizes[c] for c in set(la) & set(lb) if c not in out]))
  return (acc - i32(b_zp) * _sum_into(a_q, la, lb, out, sizes)
          - i32(a_zp) * _sum_into(b_q, lb, la, out, sizes) + depth * i32(a_zp) * i32(b_zp))


def _signed(q, zp):
  """uint8 codes as int8 with the zero point moved by 128 (the same real values): runtimes
  multiply int8 by int8, not uint8 by int8."""
  if q.dtype != jnp.uint8:
    return q, zp
  return (q.astype(jnp.int32) - 128).astype(jnp.int8), jnp.asarray(zp).astype(jnp.int32) - 128


def _sum_into(x, labels, other, out, sizes):
  """``einsum(labels,other->out)`` of ``x`` with an all-ones other operand, without the
  dot: ``x`` summed over its labels not in ``out`` (int32), times the size of the other
  operand's summed-out labels, broadcast into the ``out`` layout."""
  keep = [c for c in labels if c in out]
  s = jnp.sum(x, axis=tuple(i for i, c in enumerate(labels) if c not in out), dtype=jnp.int32)
  s = jnp.transpose(s, [keep.index(c) for c in out if c in keep])
  s = s.reshape([sizes[c] if c in keep else 1 for c in out])
  extra = int(np.prod([sizes[c] for c in other if c not in out and c not in labels]))
  return jnp.broadcast_to(s, [sizes[c] for c in out]) * extra


# ----------------------------------------------------------------------------- checks
def _span(spec: QuantSpec) -> int:
  """max |q - zero_point| over the integer range (zero point anywhere in it)."""
  return spec.qmax - spec.qmin if not spec.symmetric else max(abs(spec.qmin), spec.qmax)


def check_depth(name: str, a: QuantSpec, b: QuantSpec, depth: int) -> None:
  """Raises if an integer dot of ``depth`` products could overflow its accumulator."""
  limit, kind = intsim.accumulator_limit(a.bits > 8 or b.bits > 8)
  worst = _span(a) * _span(b) * depth
  if worst > limit:
    raise QuantConfigError(
        f"{name}: depth {depth} gives a worst-case accumulator |a-z_a|max*|b-z_b|max*depth = "
        f"{worst} > the {kind} limit {limit} "
        f"({a.bits}-bit x {b.bits}-bit); the NPU would wrap. Use fewer bits or a smaller "
        "dimension")


def check_model(config) -> None:
  """Static rules of (model config, quant config); raises before anything is traced.

  Group sizes must divide the dimension they split; integer mode's projection
  accumulators must not overflow for their depths (the attention dots are
  checked by ``check_attention_depth`` once the number of keys is known).
  """
  quant = getattr(config, "quant", None)
  if not active(quant):
    return
  c = config
  kernels = {"q_proj/k_proj/v_proj (hidden_size)": (c.hidden_size, c.num_heads * c.head_dim),
             "o_proj (num_heads*head_dim)": (c.num_heads * c.head_dim, c.hidden_size),
             "gate_proj/up_proj (hidden_size)": (c.hidden_size, c.intermediate_size),
             "down_proj (intermediate_size)": (c.intermediate_size, c.hidden_size)}
  w = quant.linear_weights
  for name, (k, _) in kernels.items():
    if w is not None and w.granularity == "per_group" and k % w.group_size:
      raise QuantConfigError(f"quant.linear_weights.group_size={w.group_size}: does not divide "
                             f"the input dimension {k} of {name}")
  for key in ("embeddings", "lm_head"):
    s = getattr(quant, key)
    if s is not None and s.granularity == "per_group" and c.hidden_size % s.group_size:
      raise QuantConfigError(f"quant.{key}.group_size={s.group_size}: does not divide "
                             f"hidden_size={c.hidden_size}")
  if quant.mode == "integer":
    for name, (k, _) in kernels.items():
      check_depth(f"integer {name}", quant.linear_inputs, w, k)
    if quant.q is not None:
      check_depth("integer QK^T (head_dim)", quant.q, quant.k, c.head_dim)


def check_attention_depth(config, n_keys: int) -> None:
  """Integer PV over ``n_keys`` keys must fit its accumulator (raises otherwise)."""
  quant = getattr(config, "quant", None)
  if active(quant) and quant.mode == "integer" and quant.q is not None:
    check_depth(f"integer PV ({n_keys} keys)", quant.attn_probs, quant.v, n_keys)


def check_params(config, params) -> None:
  """Host-side checks of the static scales in ``params`` (before any compilation):
  every scale finite and > 0, every zero point integer-valued and in its range
  (learned zero points are rounded first; fake_quant lets them drift)."""
  quant = getattr(config, "quant", None)
  if not active(quant) or quant.activation_scales == "dynamic":
    return
  flat = traverse_util.flatten_dict(dict(params.get("params", params)))
  specs = {}
  for sites in (ATTN_SITES, MLP_SITES):
    specs.update(dict(static_sites(quant, sites)))
  for path, v in flat.items():
    if len(path) < 3 or "quant" not in (path[-3], path[-2]):
      continue
    name = "/".join(path)
    if isinstance(v, jax.core.Tracer):
      continue
    if path[-1] == "scale":
      qz.check_scale(v, name)
    elif path[-1] == "zero_point" and path[-2] in specs:
      z = np.asarray(v)
      spec = specs[path[-2]]
      if quant.activation_scales == "learned":
        if quant.mode != "integer":
          continue
        z = np.asarray(qz.round_int(jnp.asarray(z), spec.rounding))
      qz.check_zero_point(z, spec, name)
