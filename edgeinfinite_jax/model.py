"""Llama-family decoder in Flax linen, pure-functional.

Parameters are an explicit pytree (``{"params": ...}``) made by ``init`` and read
by ``apply``; no module keeps mutable state. The attention family and its
engine cache live in ``attention.py``; this file is the backbone: RMSNorm, RoPE
(Hugging Face ``rotate_half`` convention), MHA/GQA/MQA projections, SwiGLU,
tied or untied embeddings, optional q/k/v bias (Qwen2).

Parameter layout (the HF key map in ``convert.py`` is written against it)::

  embed/embedding                      [vocab, hidden]
  layers_{i}/attn_norm/scale           [hidden]
  layers_{i}/attn/{q,k,v}_proj/kernel  [hidden, heads|kv_heads, head_dim]
  layers_{i}/attn/{q,k,v}_proj/bias    [heads|kv_heads, head_dim]   (attention_bias)
  layers_{i}/attn/o_proj/kernel        [heads, head_dim, hidden]
  layers_{i}/attn/gate/...             (edgeinfinite only, see gate.py)
  layers_{i}/mlp_norm/scale            [hidden]
  layers_{i}/mlp/{gate,up}_proj/kernel [hidden, intermediate]
  layers_{i}/mlp/down_proj/kernel      [intermediate, hidden]
  final_norm/scale                     [hidden]
  lm_head/kernel                       [hidden, vocab]               (untied only)

Every parameter and the main activations carry logical axis names; the rules
table that maps them onto a device mesh is in ``sharding.py``.

Quantization: ``quantized(config, quant)`` returns a ``QuantModelConfig`` (a
``ModelConfig`` that also carries a frozen ``QuantConfig``; still hashable, so it
is the static jit argument everywhere a ModelConfig is: ``forward``, ``Engine``,
``train``). With quant None or mode ``float`` the model runs the float modules
below unchanged; otherwise ``Block`` / ``Transformer`` use the quantized twins
in ``quant/modules.py`` (same parameter paths, plus ``.../quant/...`` scales).
Capturing activations (``apply(..., mutable=["intermediates"])``) also takes
the twins: they sow ``layers_i/{attn,mlp}/{site}`` (see ``quant/apply.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edgeinfinite_jax import attention
from edgeinfinite_jax.config import ConfigError, ModelConfig

Params = Any


@dataclasses.dataclass(frozen=True)
class QuantModelConfig(ModelConfig):
  """A ModelConfig plus the ``QuantConfig`` the model runs with (None = float).

  Validated on construction: the quant config's own rules, then the rules that
  need the model's sizes (group sizes dividing dimensions, integer accumulator
  depths), so bad settings raise before anything is traced.
  """
  quant: Any = None

  def __post_init__(self):
    super().__post_init__()
    from edgeinfinite_jax.quant import apply as qapply
    from edgeinfinite_jax.quant.qconfig import QuantConfig
    q = self.quant
    if q is not None and not isinstance(q, QuantConfig):
      if not hasattr(q, "keys"):
        raise ConfigError(f"model.quant={q!r}: must be a QuantConfig, a mapping or None")
      object.__setattr__(self, "quant", QuantConfig.from_dict(q))
    qapply.check_model(self)

  @classmethod
  def from_dict(cls, d) -> "QuantModelConfig":
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    quant = d.pop("quant", None)
    base = ModelConfig.from_dict(d)
    return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(ModelConfig)},
               quant=quant)


def quantized(config: ModelConfig, quant) -> ModelConfig:
  """``config`` running with ``quant`` (a QuantConfig or its dict); None -> plain ModelConfig."""
  fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**fields) if quant is None else QuantModelConfig(**fields, quant=quant)


def quant_of(config):
  """The QuantConfig a model config carries, or None."""
  return getattr(config, "quant", None)


def _quant_active(config) -> bool:
  q = quant_of(config)
  return q is not None and q.mode != "float"


def compute_dtype(config: ModelConfig):
  return jnp.dtype(config.dtype)


def _init(axes, scale=0.02):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=scale), axes)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.float32)
    # Like HF: normalise in float32, cast back, then multiply by the weight.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies, float32, with linear or Llama-3 scaling applied."""
  d = config.head_dim
  inv = (1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d)))
  inv = inv.astype(np.float32)
  r = config.rope_scaling
  if r.rope_type == "linear":
    inv = inv / r.factor
  elif r.rope_type == "llama3":
    old = r.original_max_position_embeddings
    low_wavelen, high_wavelen = old / r.low_freq_factor, old / r.high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / r.factor, inv)
    smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def apply_rope(x, positions, inv_freq):
  """Rotates ``x[..., T, N, D]`` by ``positions[..., T]`` (HF rotate_half layout)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class Projection(nn.Module):
  """A linear map written as one einsum over a kernel of its true rank.

  Flax's DenseGeneral initialises a flattened kernel, which breaks logical
  partitioning of [hidden, heads, head_dim] kernels; owning the shape avoids it.
  The bias, if any, covers every output axis of the kernel but the first.
  """
  equation: str
  shape: tuple
  axes: tuple
  use_bias: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _init(self.axes), self.shape, jnp.float32)
    y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                        self.shape[1:], jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class Mlp(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    c, dt = self.config, compute_dtype(self.config)
    dense = lambda n, f, axes: nn.Dense(f, use_bias=False, dtype=dt, param_dtype=jnp.float32,
                                        kernel_init=_init(axes), name=n)
    gate = dense("gate_proj", c.intermediate_size, ("embed", "mlp"))(x)
    up = dense("up_proj", c.intermediate_size, ("embed", "mlp"))(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return dense("down_proj", c.hidden_size, ("mlp", "embed"))(h)


class Attention(nn.Module):
  """Projections + one of the attention family (see attention.py).

  Called with ``cache=None`` it runs over a whole sequence starting at position 0
  (training / teacher forcing). Called with a layer cache it processes one chunk
  (a prefill segment or a decode token) and returns the updated cache.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, cache=None, chunk=None):
    c, dt = self.config, compute_dtype(self.config)

    def proj(name, heads, heads_axis):
      return Projection("btd,dhk->bthk", (c.hidden_size, heads, c.head_dim),
                        ("embed", heads_axis, "head_dim"), c.attention_bias, dt, name=name)(x)

    q = proj("q_proj", c.num_heads, "q_heads")
    k = proj("k_proj", c.num_kv_heads, "kv_heads")
    v = proj("v_proj", c.num_kv_heads, "kv_heads")
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "head_dim"))
    gate_params = None
    if c.memory.uses_memory:
      from edgeinfinite_jax import gate  # local: gate imports nothing from here
      gate_params = gate.declare_params(self, c)
    inv_freq = rope_inv_freq(c)
    if cache is None:
      out = attention.sequence_attention(c, q, k, v, positions, inv_freq, gate_params)
      new_cache = None
    else:
      out, new_cache = attention.cached_attention(c, cache, chunk, q, k, v, inv_freq,
                                                  gate_params)
    out = Projection("bthk,hkd->btd", (c.num_heads, c.head_dim, c.hidden_size),
                     ("q_heads", "head_dim", "embed"), False, dt, name="o_proj")(out.astype(dt))
    return out, new_cache


class Block(nn.Module):
  """One layer. ``low``: the previous layer's low-bit tokens (token-adaptive bits);
  returns (x, cache, this layer's low-bit tokens)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, cache=None, chunk=None, low=None):
    c, dt = self.config, compute_dtype(self.config)
    if _quant_active(c) or self.is_mutable_collection("intermediates"):
      from edgeinfinite_jax.quant import modules as qm  # imports this module
      h, cache, low = qm.QAttention(c, name="attn")(
          RMSNorm(c.rms_norm_eps, dt, name="attn_norm")(x), positions, cache, chunk, low)
      x = x + h
      x = x + qm.QMlp(c, name="mlp")(RMSNorm(c.rms_norm_eps, dt, name="mlp_norm")(x), low)
    else:
      h, cache = Attention(c, name="attn")(RMSNorm(c.rms_norm_eps, dt, name="attn_norm")(x),
                                           positions, cache, chunk)
      x = x + h
      x = x + Mlp(c, name="mlp")(RMSNorm(c.rms_norm_eps, dt, name="mlp_norm")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), cache, low


class Transformer(nn.Module):
  """tokens [B, T] int32 -> logits [B, T, vocab] float32.

  ``caches`` (one per layer) and ``chunk`` select the engine path; see
  ``attention.cached_attention``. With ``return_hidden`` the final-normed hidden
  states are returned instead of logits, so the engine can project only the
  token it needs.
  """
  config: ModelConfig

  def setup(self):
    c = self.config
    quant = quant_of(c) if _quant_active(c) else None
    if quant is not None and quant.embeddings is not None:
      from edgeinfinite_jax.quant import modules as qm
      self.embed = qm.QEmbed(c.vocab_size, c.hidden_size, compute_dtype(c), quant, name="embed")
    else:
      self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=compute_dtype(c),
                            param_dtype=jnp.float32,
                            embedding_init=_init(("vocab", "embed")), name="embed")
    self.layers = [Block(c, name=f"layers_{i}") for i in range(c.num_layers)]
    self.final_norm = RMSNorm(c.rms_norm_eps, compute_dtype(c), name="final_norm")
    if not c.tie_word_embeddings:
      if quant is not None and quant.lm_head is not None:
        from edgeinfinite_jax.quant import modules as qm
        self.lm_head = qm.head(c, compute_dtype(c))
      else:
        self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=compute_dtype(c),
                                param_dtype=jnp.float32, kernel_init=_init(("embed", "vocab")),
                                name="lm_head")

  def __call__(self, tokens, positions=None, caches=None, chunk=None, return_hidden=False):
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = nn.with_logical_constraint(self.embed(tokens), ("batch", "length", "act_embed"))
    new_caches, low = [], None
    for i, layer in enumerate(self.layers):
      x, cache, low = layer(x, positions, None if caches is None else caches[i], chunk, low)
      new_caches.append(cache)
    x = self.final_norm(x)
    out = x if return_hidden else self.logits(x)
    return out if caches is None else (out, new_caches)

  def logits(self, hidden):
    if self.config.tie_word_embeddings:
      out = self.embed.attend(hidden)
    elif isinstance(self.lm_head, nn.Dense):
      out = self.lm_head(hidden)
    else:  # the weight-quantized head (quant/modules.head)
      from edgeinfinite_jax.quant import apply as qapply
      out = self.lm_head(hidden, qapply.LayerQuant(quant_of(self.config)))
    return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "act_vocab"))


def init_params(config: ModelConfig, rng) -> Params:
  """Random parameters, unboxed (plain arrays), as ``{"params": ...}``."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return nn.unbox(Transformer(config).init(rng, tokens))


def abstract_params(config: ModelConfig) -> Params:
  """Shapes and dtypes of the parameters, without allocating them."""
  return jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))


def logical_axes(config: ModelConfig) -> Params:
  """The logical axis names of every parameter (same tree as the params)."""
  boxed = jax.eval_shape(lambda r: Transformer(config).init(r, jnp.zeros((1, 1), jnp.int32)),
                         jax.random.key(0))
  return nn.get_partition_spec(boxed)


def forward(config: ModelConfig, params: Params, tokens, quant=None) -> jax.Array:
  """Logits float32 ``[batch, time, vocab]`` for int32 ``tokens[batch, time]``.

  The sequence starts at position 0. A base model (``attention_type="full"``,
  what ``load_hf`` returns) uses full causal attention; a model made by
  ``with_memory`` runs its training path (segmented, with memory). ``quant`` (a
  QuantConfig) runs it quantized (same as passing ``quantized(config, quant)``);
  scales in ``params`` and accumulator depths are checked before compiling.
  """
  if quant is not None:
    config = quantized(config, quant)
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens: expected an int array [batch, time], got {tokens.dtype}"
                     f"{list(tokens.shape)}")
  if _quant_active(config):
    from edgeinfinite_jax.quant import apply as qapply
    qapply.check_params(config, params)
    m = config.memory
    n_keys = m.n_sink + m.n_window + m.segment_len if m.segmented else tokens.shape[1]
    qapply.check_attention_depth(config, n_keys)
  return _forward_jit(config, params, tokens.astype(jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(config, params, tokens):
  return Transformer(config).apply(params, tokens)
