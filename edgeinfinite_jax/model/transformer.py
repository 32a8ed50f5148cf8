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
  layers_{i}/attn/memory_gate/...      (edgeinfinite only, see gate.py)
  layers_{i}/attn/{q,k,v}_proj/lora_{a,b}  (lora_rank > 0 only, see lora.py)
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
``train``). Every layer takes its quantizers from a ``quant.apply.LayerQuant``;
with quant None or mode ``float`` each of them is the identity, so the modules
below are the float model unchanged. Quantized, they add static scales under
``.../quant/...`` (``quant/modules.py``). Capturing activations
(``apply(..., mutable=["intermediates"])``) sows ``layers_i/{attn,mlp}/{site}``
(see ``quant/apply.py``).

(Just over 400 lines: the decoder's modules and forward; RoPE, attention, the cache and the gate are their own files.)
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edgeinfinite_jax.model import attention
from edgeinfinite_jax.model.config import ModelConfig, quant_of, quantized
from edgeinfinite_jax.model.rope import rope_inv_freq
from edgeinfinite_jax.quant import layer_quant as qapply
from edgeinfinite_jax.quant import params as qm
from edgeinfinite_jax.quant import ptq
from edgeinfinite_jax.model import kv_cache as cache_lib
from edgeinfinite_jax.model import gate
from edgeinfinite_jax.model import lora
from edgeinfinite_jax.model import tokens as tokens_lib
from jax.experimental import checkify

Params = Any


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


class Projection(nn.Module):
  """A linear map written as one einsum over a kernel of its true rank.

  Flax's DenseGeneral initialises a flattened kernel, which breaks logical
  partitioning of [hidden, heads, head_dim] kernels; owning the shape avoids it.
  The bias, if any, covers every output axis of the kernel but the first; the
  first ``n_contract`` kernel axes are contracted with as many trailing axes of x.
  ``qx`` (the layer's ``LayerQuant``) quantizes input, weight and output at the
  named sites (``quant.apply.project``); with quantization off it is the einsum.
  The kernel may be a PTQ ``QuantizedTensor``.
  """
  equation: str
  shape: tuple
  axes: tuple
  use_bias: bool
  dtype: Any
  n_contract: int = 1
  site_in: str | None = None
  site_out: str | None = None
  placement: str = "linear_weights"
  lora_rank: int = 0  # > 0: a trainable low-rank term, see ``model.lora``

  @nn.compact
  def __call__(self, x, qx):
    kernel = qm.kernel(self, "kernel", _init(self.axes), self.shape)
    if self.lora_rank:
      kernel = lora.adapted_kernel(self, kernel, self.n_contract, self.lora_rank)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                        self.shape[1:], jnp.float32)
    n_out = int(np.prod(self.shape[self.n_contract:]))
    learned = qm.learned_weight_scale(self, qx.quant, self.placement, n_out)
    return qapply.project(qx, self.site_in, self.site_out, x, kernel, equation=self.equation,
                          n_in=self.n_contract, n_contract=self.n_contract,
                          placement=self.placement, bias=bias, learned_scale=learned,
                          dtype=self.dtype)


def _dense(features, in_features, axes, dtype, site_in, site_out, name,
           placement="linear_weights"):
  """A ``Projection`` with ``nn.Dense``'s parameters ([in, out] kernel, no bias)."""
  return Projection("...k,kn->...n", (in_features, features), axes, False, dtype, 1, site_in,
                    site_out, placement, name=name)


def _layer_quant(module, config, sites, prev=None, cur=None):
  """The layer's quantizer context: its static scales (declared under ``quant``) and,
  when the apply captures ``intermediates``, a dict that collects what it sees."""
  quant = quant_of(config)
  scales = qm.QuantParams(qapply.static_sites(quant, sites), name="quant")()
  capture = {} if module.is_mutable_collection("intermediates") else None
  return qapply.LayerQuant(quant, scales, prev, cur, capture)


def _sow_captured(module, qx):
  for name, value in (qx.cap or {}).items():
    module.sow("intermediates", name, value)


class Mlp(nn.Module):
  """SwiGLU. ``low``: this layer's low-bit tokens (token-adaptive bits) or None."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, low=None):
    c, dt = self.config, compute_dtype(self.config)
    qx = _layer_quant(self, c, qapply.MLP_SITES, cur=low)
    gate = _dense(c.intermediate_size, c.hidden_size, ("embed", "mlp"), dt, "mlp_input",
                  "gate_out", "gate_proj")(x, qx)
    up = _dense(c.intermediate_size, c.hidden_size, ("embed", "mlp"), dt, "mlp_input", "up_out",
                "up_proj")(x, qx)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    out = _dense(c.hidden_size, c.intermediate_size, ("mlp", "embed"), dt, "down_input",
                 "down_out", "down_proj")(h, qx)
    _sow_captured(self, qx)
    return out


class Attention(nn.Module):
  """Projections + one of the attention family (see attention.py).

  Called with ``cache=None`` it runs over a whole sequence starting at position 0
  (training / teacher forcing). Called with a layer cache it processes one chunk
  (a prefill segment or a decode token) and returns the updated cache. ``prev``:
  the previous layer's low-bit tokens (token-adaptive bits). Returns (out,
  new_cache, this layer's low-bit tokens or None).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, cache=None, chunk=None, prev=None):
    c, dt = self.config, compute_dtype(self.config)
    qx = _layer_quant(self, c, qapply.ATTN_SITES, prev=prev)

    def proj(name, heads, heads_axis):
      return Projection("btd,dhk->bthk", (c.hidden_size, heads, c.head_dim),
                        ("embed", heads_axis, "head_dim"), c.attention_bias, dt, 1, "attn_input",
                        f"{name[0]}_out", lora_rank=c.lora_rank, name=name)(x, qx)

    q = proj("q_proj", c.num_heads, "q_heads")
    k = proj("k_proj", c.num_kv_heads, "kv_heads")
    v = proj("v_proj", c.num_kv_heads, "kv_heads")
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "head_dim"))
    gate_params = None
    if c.memory.uses_memory:
      gate_params = gate.declare_params(self, c)
    inv_freq = rope_inv_freq(c)
    store_int = cache is not None and jnp.issubdtype(cache.ring_k.dtype, jnp.integer)
    k = qx.kv_write("k", k, dt, store_int)
    v = qx.kv_write("v", v, dt, store_int)
    if qapply.adaptive(qx.quant):
      if cache is not None:
        raise ValueError("token-adaptive bits rank the tokens of a whole sequence; the "
                         "engine's chunked path cannot (quant.edgeqat.adaptive_fraction > 0)")
      qx = qx._replace(cur=attention.adaptive_mask(c, qx, q, k, positions, inv_freq))
      qx.record("low_bits", qx.cur)
    if cache is None:
      out, captured = attention.sequence_attention(c, q, k, v, positions, inv_freq, gate_params,
                                                   qx)
      new_cache = None
    else:
      out, new_cache = cache_lib.cached_attention(c, cache, chunk, q, k, v, inv_freq,
                                                  gate_params, qx)
      captured = {}
    if qx.cap is not None:
      qx.cap.update(captured)
    out = Projection("bthk,hkd->btd", (c.num_heads, c.head_dim, c.hidden_size),
                     ("q_heads", "head_dim", "embed"), False, dt, 2, "o_input", "o_out",
                     name="o_proj")(out.astype(dt), qx)
    _sow_captured(self, qx)
    return out, new_cache, qx.cur


class Block(nn.Module):
  """One layer. ``low``: the previous layer's low-bit tokens (token-adaptive bits);
  returns (x, cache, this layer's low-bit tokens)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, cache=None, chunk=None, low=None):
    c, dt = self.config, compute_dtype(self.config)
    h, cache, low = Attention(c, name="attn")(
        RMSNorm(c.rms_norm_eps, dt, name="attn_norm")(x), positions, cache, chunk, low)
    x = x + h
    x = x + Mlp(c, name="mlp")(RMSNorm(c.rms_norm_eps, dt, name="mlp_norm")(x), low)
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), cache, low


class QuantEmbed(nn.Module):
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


class Transformer(nn.Module):
  """tokens [B, T] int32 -> logits [B, T, vocab] float32.

  ``caches`` (one per layer) and ``chunk`` select the engine path; see
  ``cache_lib.cached_attention``. With ``return_hidden`` the final-normed hidden
  states are returned instead of logits, so the engine can project only the
  token it needs.
  """
  config: ModelConfig

  def setup(self):
    c = self.config
    quant = quant_of(c) if _quant_active(c) else None
    if quant is not None and quant.embeddings is not None:
      self.embed = QuantEmbed(c.vocab_size, c.hidden_size, compute_dtype(c), quant, name="embed")
    else:
      self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=compute_dtype(c),
                            param_dtype=jnp.float32,
                            embedding_init=_init(("vocab", "embed")), name="embed")
    self.layers = [Block(c, name=f"layers_{i}") for i in range(c.num_layers)]
    self.final_norm = RMSNorm(c.rms_norm_eps, compute_dtype(c), name="final_norm")
    if not c.tie_word_embeddings:
      if quant is not None and quant.lm_head is not None:  # weight-quantized
        self.lm_head = _dense(c.vocab_size, c.hidden_size, ("embed", "vocab"), compute_dtype(c),
                              None, None, "lm_head", placement="lm_head")
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
    else:  # the weight-quantized head
      out = self.lm_head(hidden, qapply.LayerQuant(quant_of(self.config)))
    return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "act_vocab"))


def init_params(config: ModelConfig, rng) -> Params:
  """Random parameters, unboxed (plain arrays), as ``{"params": ...}``."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return nn.unbox(Transformer(config).init(rng, tokens))


def abstract_params(config: ModelConfig) -> Params:
  """Shapes and dtypes of the parameters, without allocating them.

  Cached per config (configs are frozen; the leaves are immutable ``ShapeDtypeStruct``
  and each call gets its own containers): tracing a quantized model's init takes
  ~0.4 s, and a sweep's validation asks for the same config's shapes once per point.
  """
  return jax.tree.map(lambda x: x, _abstract_params(config))


@functools.lru_cache(maxsize=64)
def _abstract_params(config: ModelConfig) -> Params:
  return jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))


def check_param_tree(config: ModelConfig, params: Params, what: str = "params") -> None:
  """Every parameter ``config``'s model reads is in ``params`` with its shape, else a
  ValueError naming the first missing or misshapen leaf: caught here, before tracing,
  instead of as Flax's ScopeParamNotFoundError deep in ``apply``. Leaves the model does
  not read (a LoRA set) are allowed. Quantization scales are ``qapply.check_params``'s
  (a PTQ run adds them later), so the float model's tree is the one compared. The common
  case is a base model's weights under an EdgeInfinite config: the memory gate is missing."""
  # A leaf is anything with a shape: an array, or a QuantizedTensor (the integer
  # path's int8 kernel, a pytree of its own whose ``shape`` is the float tensor's).
  has_shape = lambda x: not isinstance(x, dict) and hasattr(x, "shape")
  have = {jax.tree_util.keystr(k): v
          for k, v in jax.tree_util.tree_flatten_with_path(params, is_leaf=has_shape)[0]}
  float_config = quantized(config, None)
  for key, want in jax.tree_util.tree_flatten_with_path(abstract_params(float_config))[0]:
    name = jax.tree_util.keystr(key)
    if name not in have:
      hint = (" (the memory gate: build the params with gate.with_memory, or load a trained "
              "set with gate.load_trained_set)" if "gate" in name else "")
      raise ValueError(f"{what}: {name} is missing; attention_type="
                       f"{config.memory.attention_type!r} needs it{hint}")
    got = getattr(have[name], "shape", None)
    if got is not None and tuple(got) != tuple(want.shape):
      raise ValueError(f"{what}: {name} has shape {tuple(got)}; this config needs "
                       f"{tuple(want.shape)}")


def logical_axes(config: ModelConfig) -> Params:
  """The logical axis names of every parameter (same tree as the params)."""
  boxed = jax.eval_shape(lambda r: Transformer(config).init(r, jnp.zeros((1, 1), jnp.int32)),
                         jax.random.key(0))
  return nn.get_partition_spec(boxed)


def check_tokens(tokens, vocab_size: int, what: str = "tokens", ndim: int = 2):
  """Token ids as int32, checked: the one rule for ``forward`` and the ``Engine``.

  ``tokens`` must be an integer array of rank ``ndim`` (``[batch, time]``; ``[batch]``
  for a decode step) with no empty axis. Concrete ids must lie in ``[0, vocab_size)``:
  past the end the embedding gather returns NaN, and a negative id counts from the end
  (-1 is ``vocab_size - 1``), both silently. Traced tokens (inside the caller's
  ``jax.jit``) get the shape and dtype checks only; ``check_token_range`` checks their
  values under ``checkify``. Returns a numpy array, or the tracer, cast to int32.
  """
  if not isinstance(tokens, jax.core.Tracer):
    return tokens_lib.check_token_ids(tokens, vocab_size, what, ndim)
  tokens_lib.check_token_layout(tokens, what, ndim)
  return tokens.astype(jnp.int32)


def check_token_range(tokens, vocab_size: int, what: str = "tokens") -> None:
  """In-graph ``check_tokens`` range rule: a ``jax.experimental.checkify`` check, so the
  function that calls it must be wrapped in ``checkify.checkify`` (JAX refuses to stage
  the check otherwise, saying so)."""
  checkify.check(jnp.all((tokens >= 0) & (tokens < vocab_size)),
                 f"{what}: ids must lie in [0, {vocab_size}), got [{{lo}}, {{hi}}]",
                 lo=jnp.min(tokens), hi=jnp.max(tokens))


def forward(config: ModelConfig, params: Params, tokens, quant=None, *,
            checked: bool = False) -> jax.Array:
  """Logits float32 ``[batch, time, vocab]`` for integer ``tokens[batch, time]``.

  The sequence starts at position 0. A base model (``attention_type="full"``,
  what ``load_hf`` returns) uses full causal attention; a model made by
  ``with_memory`` runs its training path (segmented, with memory). ``quant`` (a
  QuantConfig) runs it quantized (same as passing ``quantized(config, quant)``);
  scales in ``params`` and accumulator depths are checked before compiling.

  Inputs (``check_tokens``, the rule the ``Engine`` applies too): ``tokens`` must be
  an integer array of rank 2 with at least one row and one token, else ValueError.
  Concrete ids outside ``[0, vocab_size)`` raise ValueError. Under the caller's
  ``jax.jit`` the ids are tracers: shape and dtype are still checked, the values
  cannot be, and an id past the vocabulary gives NaN logits while a negative one
  counts from the end. ``checked=True`` adds the range check to the computation as a
  ``jax.experimental.checkify`` check; wrap the jitted function in
  ``checkify.checkify`` and throw its error::

    f = jax.jit(checkify.checkify(lambda p, t: forward(config, p, t, checked=True)))
    err, logits = f(params, tokens)
    err.throw()  # JaxRuntimeError (a ValueError) naming the bad id range
  """
  if quant is not None:
    config = quantized(config, quant)
  tokens = check_tokens(tokens, config.vocab_size)
  if checked and isinstance(tokens, jax.core.Tracer):
    check_token_range(tokens, config.vocab_size)
  check_param_tree(config, params)
  if _quant_active(config):
    qapply.check_params(config, params)
    m = config.memory
    n_keys = m.n_sink + m.n_window + m.segment_len if m.segmented else tokens.shape[1]
    qapply.check_attention_depth(config, n_keys)
  return _forward_jit(config, params, tokens)


@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(config, params, tokens):
  return Transformer(config).apply(params, tokens)
