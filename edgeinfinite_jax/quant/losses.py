"""EdgeQAT losses and token-adaptive bits, as pure functions (edgeqat.md §4-7).

Layouts are the model's: Q̂/K̂ are ``[..., head_dim]`` (the model's [B, T, H, D];
[B, H, T, D] works too: only the last axis is special); attention logits are
``[B, *heads, T, S]`` (the model's ``[B, K, G, T, S]``), pre-mask and pre-softmax;
masks are bool with True = keep and shape ``[B or 1, T, S]`` (the model's
``dot_attention`` mask) or the logits' full rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from edgeinfinite_jax.quant.quantizers import QuantSpec, fake_quant


def _layers(x):
  return list(x) if isinstance(x, (list, tuple)) else [x]


# ----------------------------------------------------------------------------- L_E
def entropy_term(q_hat, k_hat):
  """One layer's E_l = Σ log(1 + Var_d(Q̂)) + Σ log(1 + Var_d(K̂)).

  Var_d is the unbiased (N-1) variance over the last axis (head_dim), per token
  and head; the sums run over every other axis (batch, time, heads), unnormalised,
  as in the released code. float32 whatever the input dtype.
  """
  term = lambda x: jnp.sum(jnp.log1p(jnp.var(x.astype(jnp.float32), axis=-1, ddof=1)))
  return term(q_hat) + term(k_hat)


def entropy_loss(q_hat, k_hat, weight=0.5):
  """L_E = -weight · log(Σ_l E_l) (code form, weight 0.5 in the recipe).

  q_hat/k_hat: one layer's arrays or sequences of per-layer arrays; the layer sum
  is inside the log (so summing per-layer losses is NOT the same thing; in a
  layer scan, accumulate ``entropy_term`` and call ``entropy_loss_from_sum``).
  Minimising it raises the variance of quantized Q/K (maximises entropy).
  """
  qs, ks = _layers(q_hat), _layers(k_hat)
  if len(qs) != len(ks):
    raise ValueError(f"q_hat has {len(qs)} layers but k_hat has {len(ks)}")
  return entropy_loss_from_sum(sum(entropy_term(q, k) for q, k in zip(qs, ks)), weight)


def entropy_loss_from_sum(e_sum, weight=0.5):
  return -weight * jnp.log(e_sum)


# ----------------------------------------------------------------------------- L_D
def _full_mask(mask, shape):
  mask = jnp.asarray(mask, bool)
  if mask.ndim == 3 and len(shape) > 3:  # [B, T, S] -> [B, 1.., T, S]
    mask = mask.reshape(mask.shape[:1] + (1,) * (len(shape) - 3) + mask.shape[1:])
  return jnp.broadcast_to(mask, shape)


def attention_cosines(student_logits, teacher_logits, mask=None, eps=1e-6):
  """cos(S_student[b, h], S_teacher[b, h]) over the flattened [T, S] map -> [B, *heads].

  Entries where the mask is False, or either logit is non-finite (-inf masking),
  are dropped from the dot product and both norms. The teacher gets no gradient.
  """
  s = jnp.asarray(student_logits, jnp.float32)
  t = lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
  if s.shape != t.shape or s.ndim < 3:
    raise ValueError(f"student_logits {s.shape} and teacher_logits {t.shape} must have the "
                     "same shape [B, *heads, T, S]")
  valid = jnp.isfinite(s) & jnp.isfinite(t)
  if mask is not None:
    valid = valid & _full_mask(mask, s.shape)
  s, t = jnp.where(valid, s, 0.0), jnp.where(valid, t, 0.0)  # where: no -inf*0 = NaN
  dot = jnp.sum(s * t, axis=(-2, -1))
  norms = jnp.sqrt(jnp.sum(s * s, axis=(-2, -1)) * jnp.sum(t * t, axis=(-2, -1)))
  return dot / jnp.maximum(norms, eps)


def attention_distribution_loss(student_logits, teacher_logits, mask=None,
                                published_sign=False, weight=1.0, eps=1e-6, form="log"):
  """L_D from pre-softmax logits QKᵀ/√d of the quantized student and the FP teacher.

  C = Σ_{layers, b, heads} cos (summed, as in the code; pass per-layer lists for
  several layers). ``form="log"``: -weight·log C, pulling the student towards the
  teacher (the method's intent); ``published_sign=True`` gives +weight·log C, the
  released code's form, which pushes it away (edgeqat.md §5). log C is NaN when
  C <= 0 (anti-correlated maps; near B·H in practice for a quantized copy of the
  teacher), and for C < 0 its gradient points the wrong way: ``form="one_minus_cos"``
  (weight·mean(1 - cos)) is the bounded intent form without that hazard.
  """
  if form not in ("log", "one_minus_cos"):
    raise ValueError(f"form={form!r}: must be 'log' or 'one_minus_cos'")
  if published_sign and form != "log":
    raise ValueError(f"form={form!r}: published_sign reproduces +log Σcos; needs form='log'")
  ss, ts = _layers(student_logits), _layers(teacher_logits)
  if len(ss) != len(ts):
    raise ValueError(f"student has {len(ss)} layers but teacher has {len(ts)}")
  masks = mask if isinstance(mask, (list, tuple)) else [mask] * len(ss)
  cos = [attention_cosines(s, t, m, eps) for s, t, m in zip(ss, ts, masks)]
  if form == "one_minus_cos":
    return weight * sum(jnp.sum(1.0 - c) for c in cos) / sum(c.size for c in cos)
  return (1.0 if published_sign else -1.0) * weight * jnp.log(sum(jnp.sum(c) for c in cos))


# ----------------------------------------------------------------------------- KD
def kd_loss(student_logits, teacher_logits, temperature=2.0, mask=None, reduction="mean"):
  """T² · KL(teacher ‖ student) on temperature-softened distributions.

  teacher_logits: one array or a sequence (their logits are averaged, as EdgeQAT
  does with three teachers). mask [B, T] (True/1 = counted). reduction ``mean``:
  mean over counted tokens; ``batchmean``: sum over tokens / B (Hugging Face
  KLDivLoss batchmean, the released recipe's balance, ~T_len x larger).
  """
  if temperature <= 0:
    raise ValueError(f"temperature={temperature!r}: must be > 0")
  if reduction not in ("mean", "batchmean"):
    raise ValueError(f"reduction={reduction!r}: must be 'mean' or 'batchmean'")
  teachers = [jnp.asarray(t, jnp.float32) for t in _layers(teacher_logits)]
  t = lax.stop_gradient(sum(teachers) / len(teachers))
  s = jnp.asarray(student_logits, jnp.float32)
  if s.shape != t.shape:
    raise ValueError(f"student_logits {s.shape} and teacher_logits {t.shape} differ")
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  pt = jnp.exp(log_pt)
  kl = jnp.sum(jnp.where(pt > 0, pt * (log_pt - log_ps), 0.0), axis=-1)
  w = jnp.ones(kl.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  total = jnp.sum(kl * w)
  denom = jnp.maximum(jnp.sum(w), 1.0) if reduction == "mean" else kl.shape[0]
  return temperature ** 2 * total / denom


# ----------------------------------------------------------------------------- adaptive bits
def token_importance(attn_logits, key_index=0):
  """Per-sequence importance [B, T]: Σ_heads of each query's pre-softmax logit
  against key ``key_index`` (0 = the first / sink token).

  attn_logits: [B, *heads, T, S]; or, with ``key_index=None``, the already sliced
  first-key column [B, *heads, T]. The released code then averages over the batch
  (``adaptive_bits_mask(per_sequence=False)`` does that step).
  """
  a = jnp.asarray(attn_logits, jnp.float32)
  if key_index is not None:
    a = a[..., key_index]
  if a.ndim < 2:
    raise ValueError(f"attn_logits gives a column of shape {a.shape}; need [B, *heads, T]")
  return lax.stop_gradient(jnp.sum(a, axis=tuple(range(1, a.ndim - 1))))


def adaptive_bits_mask(importance, fraction, per_sequence=True, valid=None):
  """bool [B, T], True = low bit width, for the least important ``fraction`` of tokens.

  k = floor(n · fraction) with n the sequence length, or each sequence's count of
  ``valid`` tokens (padding never counts and is never selected). Batch-shared
  (``per_sequence=False``, the released code): scores are averaged over the
  (valid) sequences and one set of positions is used for every row. Ties go to the
  earlier position.
  """
  if not 0 <= fraction < 1:
    raise ValueError(f"fraction={fraction!r}: must be in [0, 1)")
  imp = lax.stop_gradient(jnp.asarray(importance, jnp.float32))
  if imp.ndim != 2:
    raise ValueError(f"importance has shape {imp.shape}; expected [B, T]")
  b, t = imp.shape
  v = jnp.ones((b, t), bool) if valid is None else jnp.broadcast_to(jnp.asarray(valid, bool),
                                                                    (b, t))
  if not per_sequence:
    w = v.astype(jnp.float32)
    imp = (jnp.sum(imp * w, 0) / jnp.maximum(jnp.sum(w, 0), 1.0))[None]
    v = jnp.any(v, axis=0, keepdims=True)
  score = jnp.where(v, imp, jnp.inf)
  rank = jnp.argsort(jnp.argsort(score, axis=-1, stable=True), axis=-1, stable=True)
  k = jnp.floor(jnp.sum(v, axis=-1, keepdims=True) * fraction)
  return jnp.broadcast_to((rank < k) & v, (b, t))


def mixed_fake_quant(x, mask, spec_hi: QuantSpec, spec_lo: QuantSpec, quant_hi=None,
                     quant_lo=None, ste="plain"):
  """Per-token bit widths: x [B, T, ...] takes the low-bit branch where mask [B, T].

  Both branches see the whole tensor (as in the released code), so a dynamic
  per-tensor scale is the whole tensor's. ``quant_hi``/``quant_lo`` override the
  branches (e.g. ``lambda x: lsq_fake_quant(x, s, z, spec)`` with learned qparams);
  by default each is a dynamic ``fake_quant``. Gradients flow through both, masked.
  """
  x = jnp.asarray(x)
  mask = jnp.asarray(mask, bool)
  if mask.shape != x.shape[:2]:
    raise ValueError(f"mask shape {mask.shape} must equal x's leading [B, T] {x.shape[:2]}")
  hi = quant_hi(x) if quant_hi is not None else fake_quant(x, spec_hi, ste=ste)
  lo = quant_lo(x) if quant_lo is not None else fake_quant(x, spec_lo, ste=ste)
  return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 2)), lo, hi)
