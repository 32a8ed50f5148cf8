"""Hugging Face Llama-family checkpoints in and out, without torch.

``load_hf`` reads ``config.json`` and ``model.safetensors`` (or the shards listed
in ``model.safetensors.index.json``) with ``safetensors.safe_open(...,
framework="numpy")``; ``save_hf`` writes the same layout back, so that
``transformers.AutoModelForCausalLM.from_pretrained`` gives the same logits.

Why the shape of this module:

* One table (``_KEYS``) maps HF names to the parameter paths documented in
  ``model.py``, in both directions, so import and export cannot drift apart.
  Our RoPE uses HF's ``rotate_half`` layout, so q/k need no permutation: only
  transposes (torch ``Linear.weight`` is ``[out, in]``) and head reshapes.
* The expected tree comes from ``model.abstract_params``, so a checkpoint is
  checked against what the model will actually read. Every problem (missing,
  unexpected, mis-shaped tensor) is collected and raised together, each named.
* A config attribute we do not implement is an error naming it (penzai style),
  never a silently wrong model. Accepted: ``model_type`` llama, qwen2 (q/k/v
  bias) and mistral without a sliding window; RoPE ``default``, ``linear`` and
  ``llama3``; both the transformers v4 layout (top-level ``rope_theta`` and
  ``rope_scaling``) and the v5 one (``rope_parameters``).

(Over 400 lines on purpose: the Hugging Face key map and the load and save that read it, kept side by side so the two directions cannot drift.)
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy: safetensors' numpy backend needs it
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from edgeinfinite_jax.model import lora
from edgeinfinite_jax.model import transformer as model_lib
from edgeinfinite_jax.model.config import ConfigError, ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class CheckpointError(ValueError):
  """A checkpoint's tensors do not fit the model; the message lists every bad key."""


# HF name template, our path template, transform kind ({i} = layer index).
_KEYS = (
    ("model.embed_tokens.weight", "embed/embedding", "copy"),
    ("model.layers.{i}.input_layernorm.weight", "layers_{i}/attn_norm/scale", "copy"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers_{i}/mlp_norm/scale", "copy"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers_{i}/attn/q_proj/kernel", "in_heads"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers_{i}/attn/k_proj/kernel", "in_heads"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers_{i}/attn/v_proj/kernel", "in_heads"),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers_{i}/attn/q_proj/bias", "flat"),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers_{i}/attn/k_proj/bias", "flat"),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers_{i}/attn/v_proj/bias", "flat"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers_{i}/attn/o_proj/kernel", "heads_out"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers_{i}/mlp/gate_proj/kernel", "linear"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers_{i}/mlp/up_proj/kernel", "linear"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers_{i}/mlp/down_proj/kernel", "linear"),
    ("model.norm.weight", "final_norm/scale", "copy"),
    ("lm_head.weight", "lm_head/kernel", "linear"),
)
# Buffers some checkpoints carry that are recomputed from the config.
_IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def template_re(t: str) -> re.Pattern:
  """A name template with ``{i}`` (layer index) as an anchored regex."""
  return re.compile(re.escape(t).replace(re.escape("{i}"), r"(\d+)") + "$")


_HF_TO_OURS = [(template_re(h), o, k) for h, o, k in _KEYS]
_OURS_TO_HF = [(template_re(o), h, k) for h, o, k in _KEYS]


def _lookup(name, table):
  for pattern, target, kind in table:
    m = pattern.match(name)
    if m:
      return target.replace("{i}", m.group(1)) if m.groups() else target, kind
  return None, None


def hf_to_ours(name: str) -> tuple[str | None, str | None]:
  """(our parameter path, transform kind) of a Hugging Face tensor name; (None, None) if unknown."""
  return _lookup(name, _HF_TO_OURS)


def hf_shape(kind: str, ours: tuple) -> tuple:
  """The HF tensor shape that converts to our parameter shape ``ours``."""
  if kind == "copy":
    return tuple(ours)
  if kind == "linear":
    return tuple(ours[::-1])
  if kind == "in_heads":  # [hidden, heads, head_dim] <- [heads*head_dim, hidden]
    return (ours[1] * ours[2], ours[0])
  if kind == "heads_out":  # [heads, head_dim, hidden] <- [hidden, heads*head_dim]
    return (ours[2], ours[0] * ours[1])
  return (int(np.prod(ours)),)  # flat bias


def to_ours(kind: str, w: np.ndarray, ours: tuple) -> np.ndarray:
  w = np.asarray(w, np.float32)
  return np.ascontiguousarray((w if kind in ("copy", "flat") else w.T).reshape(ours))


def _to_hf(kind: str, w: np.ndarray) -> np.ndarray:
  w = np.asarray(w, np.float32)
  if kind == "in_heads":
    w = w.reshape(w.shape[0], -1).T
  elif kind == "heads_out":
    w = w.reshape(-1, w.shape[-1]).T
  elif kind == "linear":
    w = w.T
  elif kind == "flat":
    w = w.reshape(-1)
  return np.ascontiguousarray(w)


# --------------------------------------------------------------------- config

# Keys with no effect on the forward pass (ids, training-only knobs, metadata).
_HARMLESS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype",
    "dtype", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "initializer_range", "use_cache", "attention_dropout",
    "max_window_layers", "tokenizer_class", "id2label", "label2id", "problem_type",
    "output_attentions", "output_hidden_states", "return_dict", "use_return_dict",
    "torchscript", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "tie_encoder_decoder", "pruned_heads", "finetuning_task",
    "task_specific_params", "prefix", "tf_legacy_loss", "use_bfloat16",
    "_attn_implementation_autoset", "cross_attention_hidden_size",
    # metadata real checkpoints carry (SmolLM2, Llama, Qwen2, Mistral, TinyLlama configs)
    "_model_name_or_path", "unk_token_id", "is_llama_config", "transformers.js_config",
    "bad_words_ids", "begin_suppress_tokens", "suppress_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "output_scores",
})
# Keys this module reads (and checks) itself.
_HANDLED = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
    "max_position_embeddings", "tie_word_embeddings", "rope_theta", "rope_scaling",
    "rope_parameters", "hidden_act", "attention_bias", "mlp_bias", "pretraining_tp",
    "sliding_window", "use_sliding_window", "layer_types", "rope_interleaved",
})
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
_MOE_KEYS = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
             "shared_expert_intermediate_size", "n_routed_experts", "n_shared_experts",
             "router_aux_loss_coef", "output_router_logits", "decoder_sparse_step")
_ROPE_KEYS = {"default": {"rope_type", "rope_theta"},
              "linear": {"rope_type", "rope_theta", "factor"},
              "llama3": {"rope_type", "rope_theta", "factor", "low_freq_factor",
                         "high_freq_factor", "original_max_position_embeddings"}}


def _rope_from_hf(d: Mapping[str, Any], errors: list) -> tuple[float, RopeScaling]:
  """(rope_theta, RopeScaling) from either the v5 or the v4 layout."""
  if d.get("rope_parameters") is not None:
    where, rp = "rope_parameters", dict(d["rope_parameters"])
  else:
    where, rp = "rope_scaling", dict(d.get("rope_scaling") or {})
  if "type" in rp and "rope_type" not in rp:  # v4 spelling of older linear configs
    rp["rope_type"] = rp.pop("type")
  rtype = rp.get("rope_type", "default")
  theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
  if "rope_theta" in rp and "rope_theta" in d and float(d["rope_theta"]) != theta:
    errors.append(f"rope_theta={d['rope_theta']!r} disagrees with {where}.rope_theta={theta!r}")
  if rtype not in SUPPORTED_ROPE_TYPES:
    errors.append(f"{where}.rope_type={rtype!r}: not implemented; supported: "
                  f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    return theta, RopeScaling()
  for k in sorted(set(rp) - _ROPE_KEYS[rtype]):
    errors.append(f"{where}.{k}={rp[k]!r}: not implemented for rope_type {rtype!r} "
                  f"(accepted keys: {', '.join(sorted(_ROPE_KEYS[rtype]))})")
  if rtype == "default":
    return theta, RopeScaling()
  if rtype == "linear":
    return theta, RopeScaling("linear", factor=float(rp.get("factor", 1.0)))
  return theta, RopeScaling(
      "llama3", factor=float(rp.get("factor", 1.0)),
      low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
      high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=int(rp.get("original_max_position_embeddings",
                                                   d.get("max_position_embeddings", 8192))))


def config_from_hf(hf: Mapping[str, Any], dtype: Any = jnp.float32) -> ModelConfig:
  """A ``ModelConfig`` from an HF ``config.json`` dict; ConfigError names every unsupported key."""
  d, errors = dict(hf), []
  mtype = d.get("model_type", "llama")
  if mtype not in SUPPORTED_MODEL_TYPES:
    errors.append(f"model_type={mtype!r}: not implemented; supported: "
                  f"{', '.join(SUPPORTED_MODEL_TYPES)} (mistral only without sliding window)")
  for k in sorted(set(d) - _HARMLESS - _HANDLED):
    why = "mixture-of-experts is not implemented" if k in _MOE_KEYS else "unknown attribute"
    errors.append(f"{k}={d[k]!r}: {why}; refusing rather than ignoring it")
  if d.get("hidden_act", "silu") != "silu":
    errors.append(f"hidden_act={d['hidden_act']!r}: only 'silu' (SwiGLU) is implemented")
  if d.get("rope_interleaved", False):
    errors.append("rope_interleaved=True: only the rotate_half RoPE layout is implemented")
  if d.get("mlp_bias", False):
    errors.append("mlp_bias=True: MLP biases are not implemented")
  if (d.get("pretraining_tp") or 1) > 1:
    errors.append(f"pretraining_tp={d['pretraining_tp']!r}: must be 1 (sliced projections "
                  "are not implemented)")
  if d.get("attention_bias", False) and mtype != "qwen2":
    errors.append(f"attention_bias=True on model_type {mtype!r}: means q/k/v/o biases, but "
                  "only q/k/v biases (qwen2) are implemented")
  sliding = d.get("sliding_window")
  if mtype == "mistral" and sliding is not None:
    errors.append(f"sliding_window={sliding!r}: sliding-window attention is not implemented "
                  "(mistral is accepted only with sliding_window null)")
  elif d.get("use_sliding_window", False) and sliding is not None:
    errors.append(f"use_sliding_window=True (sliding_window={sliding!r}): sliding-window "
                  "attention is not implemented")
  bad_layers = sorted({t for t in d.get("layer_types") or () if t != "full_attention"})
  if bad_layers:
    errors.append(f"layer_types contains {bad_layers}: only 'full_attention' is implemented")
  for k in _REQUIRED:
    if d.get(k) is None:
      errors.append(f"{k}: missing (required)")
  theta, scaling = _rope_from_hf(d, errors)
  if errors:
    raise ConfigError("unsupported Hugging Face config:\n  " + "\n  ".join(errors))
  heads = d["num_attention_heads"]
  return ModelConfig(
      vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
      num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
      head_dim=d.get("head_dim") or 0, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      rope_theta=theta, rope_scaling=scaling,
      max_position_embeddings=d.get("max_position_embeddings", 4096),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      attention_bias=(mtype == "qwen2"), dtype=jnp.dtype(dtype).name)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """The v5 ``config.json`` dict: ``qwen2`` when q/k/v biased, else ``llama``.

  Only the backbone is described: the memory settings (``config.memory``) have
  no HF counterpart. Weights are saved float32, so ``dtype`` is ``float32``.
  """
  c, r = config, config.rope_scaling
  mtype = "qwen2" if c.attention_bias else "llama"
  rope = {"rope_type": r.rope_type, "rope_theta": float(c.rope_theta)}
  if r.rope_type in ("linear", "llama3"):
    rope["factor"] = float(r.factor)
  if r.rope_type == "llama3":
    rope.update(low_freq_factor=float(r.low_freq_factor),
                high_freq_factor=float(r.high_freq_factor),
                original_max_position_embeddings=int(r.original_max_position_embeddings))
  out = {
      "architectures": [_ARCH[mtype]], "model_type": mtype, "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
      "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
      "rope_parameters": rope, "tie_word_embeddings": c.tie_word_embeddings,
      "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
      "dtype": "float32",
  }
  if mtype == "llama":
    out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  else:
    out.update(use_sliding_window=False, sliding_window=None,
               max_window_layers=c.num_layers, layer_types=["full_attention"] * c.num_layers)
  return out


# ---------------------------------------------------------------- checkpoints

def _weight_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(path, f) for f in files]
  raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                          "(only safetensors checkpoints are supported)")


def flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, f"{prefix}{k}/") if isinstance(v, Mapping) else {prefix + k: v})
  return out


def unflatten(flat):
  tree = {}
  for path, v in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def check_finite(flat: Mapping[str, np.ndarray], where: str, allow_non_finite: bool) -> None:
  """Refuses NaN/inf weights by name (a corrupt or badly converted file), unless allowed."""
  bad = [f"{k} ({int(np.sum(~np.isfinite(v)))} of {v.size} values)" for k, v in flat.items()
         if not np.all(np.isfinite(v))]
  if bad and not allow_non_finite:
    raise CheckpointError(f"{where}: non-finite weights in {len(bad)} tensor(s): "
                          f"{', '.join(bad)} (pass allow_non_finite=True to load them anyway)")


def _plan_tensors(path: str, config: ModelConfig, expected: dict) -> list:
  """``[(file, hf name, our path or None for a tied lm_head, kind)]`` from the file
  headers alone; raises CheckpointError listing every bad or missing tensor."""
  plan, errors = [], []
  for file in _weight_files(path):
    try:
      with safe_open(file, framework="numpy") as f:
        names = {name: f.get_slice(name) for name in f.keys()}
        infos = {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in names.items()}
    except Exception as e:  # safetensors raises its own error types for a bad header
      raise CheckpointError(f"{file}: cannot read the safetensors header ({e}); a truncated "
                            "or corrupt file?") from None
    for name, (shape, dt) in infos.items():
      ours, kind = _lookup(name, _HF_TO_OURS)
      if name == "lm_head.weight" and config.tie_word_embeddings:
        plan.append((file, name, None, None))
        continue
      if ours is None or ours not in expected:
        if not _IGNORED_HF.match(name):
          errors.append(f"{name}: unexpected tensor (no parameter of this config reads it)")
        continue
      want = hf_shape(kind, expected[ours])
      if shape != want:
        errors.append(f"{name}: shape {list(shape)}, expected {list(want)} (for {ours})")
      elif dt not in _FLOAT_DTYPES:
        errors.append(f"{name}: dtype {dt}, expected a float type ({', '.join(_FLOAT_DTYPES)})")
      else:
        plan.append((file, name, ours, kind))
  planned = {ours for _, _, ours, _ in plan}
  for ours in sorted(set(expected) - planned):
    hf = _lookup(ours, _OURS_TO_HF)[0]
    if not any(e.startswith(f"{hf}:") for e in errors):
      errors.append(f"{hf}: missing tensor (needed for {ours}, shape "
                    f"{list(hf_shape(_lookup(ours, _OURS_TO_HF)[1], expected[ours]))})")
  if errors:
    raise CheckpointError(f"{path}: {len(errors)} bad tensor(s):\n  " + "\n  ".join(errors))
  return plan


def load_hf(path: str, dtype: Any = jnp.float32, *, allow_non_finite: bool = False):
  """``(config, {"params": ...})`` from an HF checkpoint directory.

  ``dtype`` is the compute dtype recorded in ``config.dtype``; parameters are
  always float32 (bf16/f16 tensors are upcast). Raises ConfigError for an
  unsupported config and CheckpointError listing every missing, unexpected,
  mis-shaped or non-float tensor (checked on the file headers, before any
  tensor is read), naming a weight file that cannot be read (truncated, not
  safetensors), and naming tensors with NaN/inf values unless
  ``allow_non_finite``.
  """
  with open(os.path.join(path, "config.json")) as f:
    config = config_from_hf(json.load(f), dtype)
  expected = {k: tuple(v.shape)
              for k, v in flatten(model_lib.abstract_params(config)["params"]).items()}
  plan = _plan_tensors(path, config, expected)
  lm_head = None
  flat = {}
  for file in sorted({p[0] for p in plan}):
    try:
      with safe_open(file, framework="numpy") as f:
        for _, name, ours, kind in (p for p in plan if p[0] == file):
          if ours is None:
            lm_head = f.get_tensor(name)
          else:
            flat[ours] = to_ours(kind, f.get_tensor(name), expected[ours])
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(f"{file}: cannot read tensor data ({e}); a truncated or corrupt "
                            "file?") from None
  check_finite(flat, path, allow_non_finite)
  if lm_head is not None and not np.array_equal(np.asarray(lm_head, np.float32),
                                                flat["embed/embedding"]):
    warnings.warn(f"{path}: lm_head.weight differs from model.embed_tokens.weight but "
                  "tie_word_embeddings is true; ignoring lm_head.weight as transformers does")
  params = jax.tree.map(jnp.asarray, unflatten(flat))
  return config, {"params": params}


def save_hf(config: ModelConfig, params, path: str, *, max_shard_bytes: int = 2 * 1024**3,
            drop_memory_gate: bool = True) -> None:
  """Writes ``config.json`` + float32 safetensors that transformers loads.

  Above ``max_shard_bytes`` the tensors are split over
  ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``.
  Stale weight files of either layout in ``path`` are removed first, so that
  transformers cannot pick up an old one.

  EdgeInfinite models: the memory gate (``.../attn/memory_gate/...``) and the
  ``config.memory`` settings have no HF counterpart, so only the backbone is
  saved (with a warning naming the dropped parameters); pass
  ``drop_memory_gate=False`` to raise instead. Low-rank adapters (``config.lora_rank``)
  are merged into their kernels first (``lora.merge``: the same function).
  """
  params = params if "params" in params else {"params": params}
  config, params = lora.merge(config, params)
  flat = flatten(params["params"])
  gate = sorted(k for k in flat if "memory_gate" in k)
  if gate and not drop_memory_gate:
    raise ValueError(f"save_hf: {len(gate)} memory-gate parameter(s) (e.g. {gate[0]}) have no "
                     "Hugging Face counterpart; pass drop_memory_gate=True to save the backbone")
  if gate:
    warnings.warn(f"save_hf: saving the backbone only; dropped {', '.join(gate)}")
  tensors, errors = {}, []
  for ours in sorted(set(flat) - set(gate)):
    hf, kind = _lookup(ours, _OURS_TO_HF)
    if hf is None:
      errors.append(f"{ours}: no Hugging Face name for this parameter")
    else:
      tensors[hf] = _to_hf(kind, jax.device_get(flat[ours]))
  if errors:
    raise CheckpointError("save_hf:\n  " + "\n  ".join(errors))
  os.makedirs(path, exist_ok=True)
  for f in os.listdir(path):
    if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", f):
      os.remove(os.path.join(path, f))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(config), f, indent=2, sort_keys=True)
  shards, size = [{}], 0
  for name in sorted(tensors):
    if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += tensors[name].nbytes
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
    weight_map.update({name: fname for name in shard})
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
           "weight_map": weight_map}
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
