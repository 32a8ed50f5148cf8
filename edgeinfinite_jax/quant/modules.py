"""Quantized twins of the model's modules (same parameter paths, plus ``.../quant/...``).

``model.Block`` and ``model.Transformer`` pick these when the model config
carries an active ``QuantConfig`` (or when activations are captured); the float
modules stay as they were. Parameter trees are compatible both ways: the twins
read ``kernel`` / ``embedding`` / ``bias`` at the float modules' paths (a kernel
may also be a PTQ ``QuantizedTensor``) and add only static scales under
``quant`` (see ``quant/apply.py``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from edgeinfinite_jax import attention
from edgeinfinite_jax.quant import apply as qapply
from edgeinfinite_jax.quant import losses
from edgeinfinite_jax.quant import ptq


def _init(axes, scale=0.02):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=scale), axes)


def _const(value):
  return nn.with_logical_partitioning(
      lambda key, shape, dtype=jnp.float32: jnp.full(shape, value, dtype), ())


class _Site(nn.Module):
  """One site's static scale (and zero point when asymmetric); placeholders until
  ``calib.calibrate`` writes data-dependent values."""
  symmetric: bool

  @nn.compact
  def __call__(self):
    p = {"scale": self.param("scale", _const(1.0), (), jnp.float32)}
    if not self.symmetric:
      p["zero_point"] = self.param("zero_point", _const(0.0), (), jnp.float32)
    return p


class QuantParams(nn.Module):
  """Static scales of a module's sites, as ``{site: {"scale", "zero_point"?}}``."""
  sites: tuple  # ((name, QuantSpec), ...)

  @nn.compact
  def __call__(self):
    return {name: _Site(spec.symmetric, name=name)() for name, spec in self.sites}


class _WeightScale(nn.Module):
  """LSQ step size of one kernel: () per tensor or [N] per output channel."""
  shape: tuple

  @nn.compact
  def __call__(self):
    return self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                            (None,) * len(self.shape)),
                      self.shape, jnp.float32)


def _kernel(module, name, init, shape):
  """The kernel from the params (a float array or a ``QuantizedTensor``, whose 2-D
  layout would fail flax's shape check in ``self.param``), or a fresh one at init."""
  if module.has_variable("params", name):
    return module.get_variable("params", name)
  return module.param(name, init, shape, jnp.float32)


def _learned_scale(module, quant, placement, n_out):
  if quant is None or quant.weight_scales != "learned" or placement != "linear_weights":
    return None
  spec = quant.linear_weights
  return _WeightScale((n_out,) if spec.granularity == "per_channel" else (),
                      name="quant")()


class QProjection(nn.Module):
  """``model.Projection`` with quantized input, weight and output (``apply.project``)."""
  equation: str
  shape: tuple
  axes: tuple
  use_bias: bool
  dtype: Any
  n_in: int
  n_contract: int
  site_in: str | None
  site_out: str | None
  placement: str = "linear_weights"

  @nn.compact
  def __call__(self, x, qx):
    kernel = _kernel(self, "kernel", _init(self.axes), self.shape)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                        self.shape[1:], jnp.float32)
    n_out = 1
    for s in self.shape[self.n_contract:]:
      n_out *= s
    learned = _learned_scale(self, qx.quant, self.placement, n_out)
    return qapply.project(qx, self.site_in, self.site_out, x, kernel, equation=self.equation,
                          n_in=self.n_in, n_contract=self.n_contract, placement=self.placement,
                          bias=bias, learned_scale=learned, dtype=self.dtype)


def dense(features, in_features, axes, dtype, site_in, site_out, name,
          placement="linear_weights"):
  """A ``QProjection`` with ``nn.Dense``'s parameters ([in, out] kernel, no bias)."""
  return QProjection("...k,kn->...n", (in_features, features), axes, False, dtype, 1, 1,
                     site_in, site_out, placement, name=name)


class QEmbed(nn.Module):
  """``nn.Embed`` over a fake-quantized table (``embeddings`` placement; also the tied
  head). The table may be a PTQ ``QuantizedTensor`` (its values have the table's shape)."""
  num_embeddings: int
  features: int
  dtype: Any
  quant: Any

  def setup(self):
    self.embedding = self.param("embedding", _init(("vocab", "embed")),
                                (self.num_embeddings, self.features), jnp.float32)

  def _table(self):
    table, spec = self.embedding, self.quant.embeddings
    if spec is None:
      table = table.dequantize() if isinstance(table, ptq.QuantizedTensor) else table
    else:
      table = qapply.fake_weight(self.quant, spec, table, None)
    return table.astype(self.dtype)

  def __call__(self, tokens):
    return jnp.take(self._table(), tokens, axis=0)

  def attend(self, query):
    return jnp.dot(query.astype(self.dtype), self._table().T)


def _sow_all(module, captured):
  for name, value in captured.items():
    module.sow("intermediates", name, value)


class QAttention(nn.Module):
  """``model.Attention`` with the config's quantizers (and capture hooks).

  Returns (out, new_cache, low): ``low`` [B, T] marks this layer's low-bit tokens
  (token-adaptive bits) for the next layer, or None.
  """
  config: Any

  @nn.compact
  def __call__(self, x, positions, cache=None, chunk=None, prev=None):
    from edgeinfinite_jax import model as model_lib  # model imports this module lazily
    c = self.config
    dt = model_lib.compute_dtype(c)
    quant = getattr(c, "quant", None)
    capture = self.is_mutable_collection("intermediates")
    sp = QuantParams(qapply.static_sites(quant, qapply.ATTN_SITES), name="quant")()
    qx = qapply.LayerQuant(quant, sp, prev, None, {} if capture else None)

    def proj(name, heads, heads_axis):
      return QProjection("btd,dhk->bthk", (c.hidden_size, heads, c.head_dim),
                         ("embed", heads_axis, "head_dim"), c.attention_bias, dt, 1, 1,
                         "attn_input", f"{name[0]}_out", name=name)(x, qx)

    q = proj("q_proj", c.num_heads, "q_heads")
    k = proj("k_proj", c.num_kv_heads, "kv_heads")
    v = proj("v_proj", c.num_kv_heads, "kv_heads")
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "head_dim"))
    gate_params = None
    if c.memory.uses_memory:
      from edgeinfinite_jax import gate
      gate_params = gate.declare_params(self, c)
    inv_freq = model_lib.rope_inv_freq(c)
    store_int = cache is not None and jnp.issubdtype(cache.ring_k.dtype, jnp.integer)
    k = qx.kv_write("k", k, dt, store_int)
    v = qx.kv_write("v", v, dt, store_int)
    if qapply._adaptive(quant):
      if cache is not None:
        raise ValueError("token-adaptive bits rank the tokens of a whole sequence; the "
                         "engine's chunked path cannot (quant.edgeqat.adaptive_fraction > 0)")
      qx = qx._replace(cur=_adaptive_mask(c, qx, q, k, positions, inv_freq))
      qx.record("low_bits", qx.cur)
    if cache is None:
      out, captured = attention.sequence_attention(c, q, k, v, positions, inv_freq, gate_params,
                                                   qx)
      new_cache = None
    else:
      out, new_cache = attention.cached_attention(c, cache, chunk, q, k, v, inv_freq,
                                                  gate_params, qx)
      captured = {}
    if qx.cap is not None:
      qx.cap.update(captured)
    out = QProjection("bthk,hkd->btd", (c.num_heads, c.head_dim, c.hidden_size),
                      ("q_heads", "head_dim", "embed"), False, dt, 2, 2, "o_input", "o_out",
                      name="o_proj")(out.astype(dt), qx)
    if qx.cap is not None:
      _sow_all(self, qx.cap)
    return out, new_cache, qx.cur


def _adaptive_mask(c, qx, q, k, positions, inv_freq):
  """This layer's low-bit tokens: the least important fraction by Q̂K̂ᵀ/√d against token 0.

  Q̂ is RoPE'd at each query's own local position (``attention.local_positions``)
  and quantized with the previous layer's mask, K̂_0 (RoPE at position 0 is the
  identity) likewise: the logits the attention itself computes for key 0.
  """
  m = c.memory
  quiet = qx._replace(cap=None)
  block = positions // m.segment_len
  rq = attention._rope(q, attention.local_positions(c, positions, block), inv_freq)
  q_hat = quiet.act("q", rq)
  k0 = quiet.act("k", k[:, :1], jnp.zeros((1,), jnp.int32))[:, 0]
  b, t, h, d = q_hat.shape
  kh = k0.shape[1]
  col = jnp.einsum("btkgd,bkd->bkgt", q_hat.reshape(b, t, kh, h // kh, d), k0,
                   preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
  e = qx.quant.edgeqat
  return losses.adaptive_bits_mask(losses.token_importance(col, key_index=None),
                                   e.adaptive_fraction, e.adaptive_per_sequence)


class QMlp(nn.Module):
  """``model.Mlp`` with quantized projections; ``low`` = this layer's low-bit tokens."""
  config: Any

  @nn.compact
  def __call__(self, x, low=None):
    from edgeinfinite_jax import model as model_lib
    c = self.config
    dt = model_lib.compute_dtype(c)
    quant = getattr(c, "quant", None)
    capture = self.is_mutable_collection("intermediates")
    sp = QuantParams(qapply.static_sites(quant, qapply.MLP_SITES), name="quant")()
    qx = qapply.LayerQuant(quant, sp, None, low, {} if capture else None)
    gate = dense(c.intermediate_size, c.hidden_size, ("embed", "mlp"), dt, "mlp_input",
                 "gate_out", "gate_proj")(x, qx)
    up = dense(c.intermediate_size, c.hidden_size, ("embed", "mlp"), dt, "mlp_input", "up_out",
               "up_proj")(x, qx)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    out = dense(c.hidden_size, c.intermediate_size, ("mlp", "embed"), dt, "down_input",
                "down_out", "down_proj")(h, qx)
    if qx.cap is not None:
      _sow_all(self, qx.cap)
    return out


def head(config, dtype):
  """The untied lm_head as a weight-quantized projection (``lm_head`` placement)."""
  return dense(config.vocab_size, config.hidden_size, ("embed", "vocab"), dtype, None, None,
               "lm_head", placement="lm_head")
