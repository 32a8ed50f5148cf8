"""QuantConfig: where the model quantizes, with which QuantSpec, and EdgeQAT options.

Experiment files hold ``config.quant`` as an ``ml_collections.ConfigDict``;
``QuantConfig.from_dict`` turns it into this frozen, hashable dataclass (usable
as a static jit argument). A dict may start from a preset and override parts::

  {"preset": "fine_grained", "preset_args": {"base": "w4a8", "group_size": 64},
   "mode": "integer", "linear_weights": {"bits": 8}, "edgeqat": {"kd_weight": 0.5}}

A placement given as a dict is merged into the preset's spec (or builds a new
spec when the preset has none); ``None`` switches the placement off.

Placements (each a QuantSpec or None = stays float):
  linear_weights  kernels of q/k/v/o and gate/up/down (ptq.py resolves the axes)
  linear_inputs   inputs of those projections (o_proj's only if quantize_o_input)
  linear_outputs  outputs of those projections: the grid every int32 accumulator is
                  requantized to in integer mode (fixed point), fake-quantized the
                  same way in fake_quant mode; required by mode='integer'
  q, k, v         after RoPE (q, k) / after the projection (v), as used by attention
  attn_probs      softmax output
  kv_cache        cached K/V (sink + window ring), quantized on write (pre-RoPE,
                  as the cache holds them); the training path applies the same
  memory_state    EdgeInfinite compressive memory M, quantized after every write;
                  always dynamic (a running sum has no static range); off in every preset
  embeddings      embedding table (and the tied lm_head)
  lm_head         untied output projection

Activation scales: ``dynamic`` (from each tensor as it is quantized: per_token is
causal, per_tensor sees the whole sequence), ``calibrated`` (static per-tensor
scales from observers, ``train/calib.py``) or ``learned`` (LSQ+ parameters under
``.../quant/...``, trained by QAT). Softmax probabilities with dynamic scales use
their known range [0, 1] (TFLite fixes the softmax output scale the same way), so
they stay causal. ``weight_scales``: ``dynamic`` (min/max of the current weights,
or the scales of PTQ ``QuantizedTensor`` kernels) or ``learned`` (LSQ step size
per linear layer, EdgeQAT's LinearQ).

Integer mode (``mode="integer"``) runs every q/k/v/o/gate/up/down projection as
int8/int16 x int8/int4 with int32/int64 accumulation and fixed-point
requantization (``requant_mode``, one of ``intsim.REQUANT_MODES``), and QK^T and PV as
integer dots; see ``quant/apply.py`` for the exact list of integer and float ops.
It needs static per-tensor activation scales, per-tensor or per-channel weights
and a ``linear_outputs`` spec (``integer_mode()`` adds one).

``fake_quant_dots``: how fake_quant mode evaluates the projection and attention
dots. ``float`` (default; what QAT differentiates): a float32 einsum over the
dequantized operands. ``exact``: the same dots over the integer codes, accumulated
exactly (int32, or int64 with 16-bit codes). A projection's output code is then one
rounding of a float64 quotient of the exact accumulator (acc·s_x·s_w, plus bias,
over the output scale): the output grid's code of the exact value, as float64
single-rounding requantization (``litert_reference``) computes it. The attention
dots (QK^T, PV) are still rescaled by s_a·s_b in float32, then fake-quantized as
usual. Unlike ``float`` dots it has no float32 accumulation error, which moves some
int16 output codes by one step (about 1 in 2000 for a K = 128 projection). It is
for evaluation (no gradient reaches the codes) and needs integer mode's placements
and static scales; ``qat.integer_agreement`` uses it as the reference of the
integer path.
Every error names the key, its value and the rule it breaks.

(Over 400 lines on purpose: QuantConfig, its validation rules and the named presets, one place for what a quantization config may say.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from edgeinfinite_jax.quant.intsim import REQUANT_MODES
from edgeinfinite_jax.quant.quantizers import STE_MODES, QuantSpec
import ml_collections

PLACEMENTS = ("linear_weights", "linear_inputs", "linear_outputs", "q", "k", "v", "attn_probs",
              "kv_cache", "memory_state", "embeddings", "lm_head")
ACTIVATION_PLACEMENTS = ("linear_inputs", "linear_outputs", "q", "k", "v", "attn_probs",
                         "kv_cache", "memory_state")
MODES = ("float", "fake_quant", "integer")
ACTIVATION_SCALES = ("dynamic", "calibrated", "learned")
WEIGHT_SCALES = ("dynamic", "learned")
FAKE_QUANT_DOTS = ("float", "exact")


class QuantConfigError(ValueError):
  """A quantization setting breaks a rule; the message names key, value and rule."""


def _require(ok, key, value, rule):
  if not ok:
    raise QuantConfigError(f"quant.{key}={value!r}: {rule}")


@dataclasses.dataclass(frozen=True)
class EdgeQATOptions:
  """Loss weights and token-adaptive bits (edgeqat.md §4-7). Weights 0 = term off.

  entropy_weight: coefficient w in L_E = -w·log Σ(...) (code: 0.5).
  distribution_weight / published_sign: L_D weight; published_sign=True is the
    released code's +log Σcos (pushes away from the teacher), False pulls together.
  kd_weight, kd_temperature, ce_weight: loss = ce·CE + kd·T²·KL(teacher‖student).
  adaptive_fraction: share of least important tokens given adaptive_bits[1]
    (0 = off); adaptive_bits = (high, low); adaptive_per_sequence: per sequence
    selection, False = one selection shared by the batch (the released code).
  """
  entropy_weight: float = 0.0
  distribution_weight: float = 0.0
  published_sign: bool = False
  kd_weight: float = 0.0
  kd_temperature: float = 2.0
  ce_weight: float = 1.0
  adaptive_fraction: float = 0.0
  adaptive_bits: tuple = (8, 4)
  adaptive_per_sequence: bool = True

  def __post_init__(self):
    if isinstance(self.adaptive_bits, list):
      object.__setattr__(self, "adaptive_bits", tuple(self.adaptive_bits))


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  mode: str = "float"
  linear_weights: QuantSpec | None = None
  linear_inputs: QuantSpec | None = None
  linear_outputs: QuantSpec | None = None
  q: QuantSpec | None = None
  k: QuantSpec | None = None
  v: QuantSpec | None = None
  attn_probs: QuantSpec | None = None
  kv_cache: QuantSpec | None = None
  memory_state: QuantSpec | None = None
  embeddings: QuantSpec | None = None
  lm_head: QuantSpec | None = None
  quantize_o_input: bool = True  # False reproduces EdgeQAT (o_proj input stays float)
  activation_scales: str = "dynamic"  # computed per forward / observers (PTQ) / LSQ+
  weight_scales: str = "dynamic"  # min/max per forward (or PTQ kernels) / LSQ
  requant_mode: str = "tflite_optimized"  # integer mode: intsim requantization rounding
  fake_quant_dots: str = "float"  # "exact": fake_quant dots on the integer codes (see doc)
  ste: str = "plain"
  edgeqat: EdgeQATOptions = EdgeQATOptions()

  def __post_init__(self):
    validate(self)

  def replace(self, **changes) -> "QuantConfig":
    return dataclasses.replace(self, **changes)

  def specs(self) -> dict[str, QuantSpec]:
    """The enabled placements."""
    return {p: getattr(self, p) for p in PLACEMENTS if getattr(self, p) is not None}

  def adaptive_specs(self, placement: str) -> tuple[QuantSpec, QuantSpec]:
    """(high-bit, low-bit) specs of an activation placement for adaptive bits."""
    spec = getattr(self, placement)
    _require(spec is not None, placement, spec, "is off; adaptive bits need a spec")
    hi, lo = self.edgeqat.adaptive_bits
    return spec.replace(bits=hi), spec.replace(bits=lo)

  def to_dict(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for p in PLACEMENTS:
      d[p] = None if d[p] is None else d[p].to_dict()
    d["edgeqat"] = dataclasses.asdict(self.edgeqat)
    d["edgeqat"]["adaptive_bits"] = list(self.edgeqat.adaptive_bits)
    return d

  def to_config_dict(self):
    return ml_collections.ConfigDict(self.to_dict())

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
    """From a (possibly nested) mapping or ConfigDict, e.g. ``config.quant``."""
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    name = d.pop("preset", None)
    args = d.pop("preset_args", None) or {}
    args = dict(args.to_dict() if hasattr(args, "to_dict") else args)
    if name is None:
      _require(not args, "preset_args", args, "needs a preset")
    base = QuantConfig() if name is None else preset(name, **args)
    _reject_unknown(d, [f.name for f in dataclasses.fields(cls)], "quant")
    changes = {}
    for key, value in d.items():
      if key in PLACEMENTS:
        changes[key] = _spec(value, getattr(base, key), key)
      elif key == "edgeqat":
        value = dict(value or {})
        _reject_unknown(value, [f.name for f in dataclasses.fields(EdgeQATOptions)],
                        "quant.edgeqat")
        changes[key] = dataclasses.replace(base.edgeqat, **value)
      else:
        changes[key] = value
    return base.replace(**changes)


def _reject_unknown(d, known, where):
  unknown = sorted(set(d) - set(known))
  if unknown:
    raise QuantConfigError(f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                           f"valid keys: {', '.join(sorted(known))}")


def _spec(value, base, key):
  if value is None or isinstance(value, QuantSpec):
    return value
  value = dict(value)
  _reject_unknown(value, [f.name for f in dataclasses.fields(QuantSpec)], f"quant.{key}")
  try:
    if base is None:
      return QuantSpec(**value)
    return base.replace(**value)
  except (ValueError, TypeError) as e:
    raise QuantConfigError(f"quant.{key}: {e}") from None


def validate(c: QuantConfig) -> None:
  """Checks every rule of a quant config; raises QuantConfigError naming the key."""
  _require(c.mode in MODES, "mode", c.mode, f"must be one of {MODES}")
  _require(c.activation_scales in ACTIVATION_SCALES, "activation_scales", c.activation_scales,
           f"must be one of {ACTIVATION_SCALES}")
  _require(c.ste in STE_MODES, "ste", c.ste, f"must be one of {STE_MODES}")
  _require(c.weight_scales in WEIGHT_SCALES, "weight_scales", c.weight_scales,
           f"must be one of {WEIGHT_SCALES}")
  _require(c.requant_mode in REQUANT_MODES, "requant_mode", c.requant_mode,
           f"must be one of {REQUANT_MODES}")
  _require(c.fake_quant_dots in FAKE_QUANT_DOTS, "fake_quant_dots", c.fake_quant_dots,
           f"must be one of {FAKE_QUANT_DOTS}")
  _require(isinstance(c.quantize_o_input, bool), "quantize_o_input", c.quantize_o_input,
           "must be a bool")
  for p in PLACEMENTS:
    s = getattr(c, p)
    _require(s is None or isinstance(s, QuantSpec), p, s, "must be a QuantSpec or None")
  _check_granularities(c)
  if c.mode == "integer":
    for p in ("linear_weights", "embeddings", "lm_head"):
      s = getattr(c, p)
      _require(s is None or (s.symmetric and s.signed), f"{p}.symmetric", s and s.symmetric,
               "integer mode needs signed symmetric weights (zero point 0, the intsim and "
               "TFLite weight contract)")
    _check_integer(c)
  elif c.mode == "fake_quant" and c.fake_quant_dots == "exact":
    _check_integer(c, "fake_quant_dots='exact'")
  _check_edgeqat(c)


def _check_granularities(c: QuantConfig) -> None:
  """Which scale granularity each site may use, given how its scales are found."""
  for p in ("linear_weights", "embeddings", "lm_head"):
    s = getattr(c, p)
    _require(s is None or s.granularity != "per_token", f"{p}.granularity",
             s and s.granularity, "per_token is for activations; weights use per_tensor, "
             "per_channel or per_group")
  if c.activation_scales != "dynamic":
    for p in ACTIVATION_PLACEMENTS:
      s = getattr(c, p)
      _require(s is None or s.granularity != "per_token", f"{p}.granularity",
               s and s.granularity, f"per_token scales are dynamic; activation_scales="
               f"{c.activation_scales!r} needs per_tensor/per_channel (or set 'dynamic')")
    for p in ACTIVATION_PLACEMENTS:
      s = getattr(c, p)
      _require(s is None or p == "memory_state" or s.granularity == "per_tensor",
               f"{p}.granularity", s and s.granularity,
               f"the model holds one static scale per site; activation_scales="
               f"{c.activation_scales!r} needs per_tensor (or set 'dynamic')")
  elif c.kv_cache is not None:
    _require(c.kv_cache.granularity == "per_token", "kv_cache.granularity",
             c.kv_cache.granularity, "a dynamic per-tensor scale depends on the whole sequence, "
             "so cache entries could not be quantized once on write; use per_token or static "
             "(calibrated/learned) scales")
  w = c.linear_weights
  if c.weight_scales == "learned":
    _require(w is not None and w.granularity in ("per_tensor", "per_channel"),
             "linear_weights.granularity", w and w.granularity,
             "weight_scales='learned' learns one LSQ step size per tensor or per output "
             "channel; needs per_tensor or per_channel weights")


def _check_edgeqat(c: QuantConfig) -> None:
  """The EdgeQAT options: loss weights, token-adaptive bits."""
  e = c.edgeqat
  _require(isinstance(e, EdgeQATOptions), "edgeqat", e, "must be EdgeQATOptions")
  for key in ("entropy_weight", "distribution_weight", "kd_weight", "ce_weight"):
    v = getattr(e, key)
    _require(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
             and v >= 0, f"edgeqat.{key}", v, "must be a finite number >= 0")
  _require(isinstance(e.kd_temperature, (int, float)) and e.kd_temperature > 0,
           "edgeqat.kd_temperature", e.kd_temperature, "must be > 0")
  _require(isinstance(e.published_sign, bool), "edgeqat.published_sign", e.published_sign,
           "must be a bool")
  _require(isinstance(e.adaptive_per_sequence, bool), "edgeqat.adaptive_per_sequence",
           e.adaptive_per_sequence, "must be a bool")
  _require(isinstance(e.adaptive_fraction, (int, float)) and 0 <= e.adaptive_fraction < 1,
           "edgeqat.adaptive_fraction", e.adaptive_fraction, "must be in [0, 1) (0 = off)")
  b = e.adaptive_bits
  _require(isinstance(b, tuple) and len(b) == 2 and all(
      isinstance(x, int) and not isinstance(x, bool) and 2 <= x <= 16 for x in b) and b[0] > b[1],
           "edgeqat.adaptive_bits", b, "must be (high, low) integers in 2..16 with high > low")
  if e.adaptive_fraction > 0:
    _require(c.linear_inputs is not None, "edgeqat.adaptive_fraction", e.adaptive_fraction,
             "needs activation quantization (linear_inputs is None)")


def _check_integer(c: QuantConfig, rule: str = "integer mode") -> None:
  """Integer mode's rules; fake_quant with exact dots needs the same codes, but keeps
  float requantization (so no ``linear_outputs`` grid is required)."""
  w = c.linear_weights
  _require(w is not None, "linear_weights", w, f"{rule} runs the projections on integer weights; "
           "set a spec")
  _require(w.granularity in ("per_tensor", "per_channel"), "linear_weights.granularity",
           w.granularity, f"{rule} requantizes with one multiplier per output column; needs "
           "per_tensor or per_channel (per_group is fake_quant only)")
  _require(w.bits <= 8, "linear_weights.bits", w.bits, f"{rule} holds weights in int8 (2..8 bits)")
  _require(c.linear_inputs is not None, "linear_inputs", None,
           f"{rule} needs quantized projection inputs")
  _require(c.linear_outputs is not None or c.mode != "integer", "linear_outputs", None,
           f"{rule} requantizes every int32 accumulator to the linear_outputs grid; set a spec "
           "(qconfig.integer_mode() adds int16)")
  _require(c.activation_scales in ("calibrated", "learned"), "activation_scales",
           c.activation_scales, f"{rule} needs static scales (fixed-point multipliers are "
           "computed from them): 'calibrated' or 'learned'")
  _require(c.edgeqat.adaptive_fraction == 0, "edgeqat.adaptive_fraction",
           c.edgeqat.adaptive_fraction, f"{rule} has one integer grid per tensor; token-adaptive "
           "bits are fake_quant only")
  for p in ("q", "k", "v", "attn_probs"):
    s = getattr(c, p)
    _require((s is None) == (c.q is None), p, s, f"{rule} runs QK^T and PV as integer dots; q, "
             "k, v and attn_probs must be all set or all None")


def integer_mode(c: QuantConfig, output_bits: int = 16, requant_mode: str | None = None,
                 ) -> QuantConfig:
  """``c`` in integer mode with symmetric ``output_bits`` linear outputs (int16 by default,
  the NPU's 16-bit intermediate: its rounding is 2^-15 of the range)."""
  out = c.linear_outputs or QuantSpec(output_bits, symmetric=True)
  return c.replace(mode="integer", linear_outputs=out,
                   requant_mode=requant_mode or c.requant_mode)


# ----------------------------------------------------------------------------- presets
def _w(bits, granularity="per_channel", **kw):
  return QuantSpec(bits, symmetric=True, granularity=granularity, **kw)


def _a(bits):
  # 16-bit activations follow TFLite's 16x8 contract: symmetric, zero point 0.
  return QuantSpec(bits, symmetric=True) if bits == 16 else QuantSpec(bits, symmetric=False)


_PROBS8 = QuantSpec(8, symmetric=True, signed=False)  # softmax output in [0, 255], zp 0


def _wa(wbits, abits, probs=None):
  a = _a(abits)
  return QuantConfig(mode="fake_quant", linear_weights=_w(wbits), linear_inputs=a, q=a, k=a,
                     v=a, attn_probs=probs or (a if abits == 16 else _PROBS8), kv_cache=a,
                     activation_scales="calibrated")


def w8a8():
  return _wa(8, 8)


def w4a8():
  return _wa(4, 8)


def w4a4():
  return _wa(4, 4)  # probabilities stay 8-bit, as in EdgeQAT's LLaMA model


def a16w8():
  return _wa(8, 16)


def w4a16():
  """Weight-only: activations stay float (not NPU int16; that is a16w8)."""
  return QuantConfig(mode="fake_quant", linear_weights=_w(4))


def edgeqat():
  """The released EdgeQAT LLaMA recipe: W4 per-tensor [-8, 7] (not narrow), LSQ+
  A8 asymmetric activations and probabilities, o_proj input float, K/V quantized
  at use (cache float), L_E 0.5 + L_D 1.0 (intended sign) + 0.5 CE + 0.5 KD at T=2."""
  a = QuantSpec(8, symmetric=False)
  return QuantConfig(
      mode="fake_quant", linear_weights=_w(4, "per_tensor", narrow_range=False),
      linear_inputs=a, q=a, k=a, v=a, attn_probs=QuantSpec(8, symmetric=False, signed=False),
      quantize_o_input=False, activation_scales="learned", weight_scales="learned",
      edgeqat=EdgeQATOptions(entropy_weight=0.5, distribution_weight=1.0, kd_weight=0.5,
                             kd_temperature=2.0, ce_weight=0.5))


def fine_grained(base="w4a8", group_size=128, kv_bits=8):
  """``base`` with per-group weights (groups along the input axis), dynamic
  symmetric per-token activations and q/k/v, and a symmetric per-token KV cache."""
  c = preset(base)
  tok = lambda s: None if s is None else s.replace(granularity="per_token", symmetric=True)
  kv = c.kv_cache if kv_bits is None else QuantSpec(kv_bits, granularity="per_token")
  return c.replace(
      linear_weights=c.linear_weights.replace(granularity="per_group", group_size=group_size,
                                              axis=None),
      linear_inputs=tok(c.linear_inputs), q=tok(c.q), k=tok(c.k), v=tok(c.v), kv_cache=kv,
      activation_scales="dynamic")


def rtn_per_tensor(weight_bits=8, act_bits=None):
  """Round-to-nearest baseline: one min/max scale per tensor, no clipping search."""
  a = None if act_bits is None else QuantSpec(act_bits, symmetric=False)
  return QuantConfig(mode="fake_quant", linear_weights=_w(weight_bits, "per_tensor"),
                     linear_inputs=a, activation_scales="dynamic")


PRESETS = {"w8a8": w8a8, "w4a8": w4a8, "w4a16": w4a16, "a16w8": a16w8, "w4a4": w4a4,
           "edgeqat": edgeqat, "fine_grained": fine_grained, "rtn_per_tensor": rtn_per_tensor}


def preset(name: str, **kwargs) -> QuantConfig:
  """A named preset; kwargs go to the preset function (fine_grained, rtn_per_tensor)."""
  _require(name in PRESETS, "preset", name, f"unknown preset; valid presets: {sorted(PRESETS)}")
  try:
    return PRESETS[name](**kwargs)
  except TypeError as e:
    raise QuantConfigError(f"quant.preset_args={kwargs!r}: {e}") from None
