"""Tiny GGUF files written here with the ``gguf`` package's writer (no downloads).

``write_gguf(torch_model, path, qtype)`` lays a tiny random Hugging Face Llama
or Qwen2 model out the way llama.cpp's ``convert_hf_to_gguf.py`` does: its
tensor names, its metadata keys, Llama's Q/K rows permuted for llama.cpp's
interleaved RoPE (Qwen2's are not), every 2-D weight in ``qtype`` (norms and
biases stay F32, as llama.cpp keeps 1-D tensors). ``kquant`` stores the
``ffn_down`` weights (rows of ``intermediate_size`` = 256) in a K-quant from
random blocks with sane scales: the writer cannot quantize K-quants, but both
loaders must dequantize them.
"""

from __future__ import annotations

import os

import gguf
import numpy as np

# Rows of 256 (intermediate_size) so that K-quant blocks fit ffn_down.
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            rms_norm_eps=1e-5)


def hf_model(arch: str = "llama", seed: int = 0, **overrides):
  """A random float32 tiny ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (eager attention)."""
  import torch
  import transformers
  import hf_fixtures
  torch.manual_seed(seed)
  cls_cfg, cls = ((transformers.Qwen2Config, transformers.Qwen2ForCausalLM) if arch == "qwen2"
                  else (transformers.LlamaConfig, transformers.LlamaForCausalLM))
  rope = dict(rope_type="default", rope_theta=1e6 if arch == "qwen2" else 10000.0)
  config = cls_cfg(**{**TINY, "rope_parameters": rope, **overrides}, attn_implementation="eager")
  model = cls(config).to(torch.float32).eval()
  hf_fixtures.randomize_(model, seed)
  return model


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's permutation of Llama's Q/K rows (what the loader must undo)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
  if hf in _NAMES:
    return _NAMES[hf]
  _, _, i, rest = hf.split(".", 3)
  return f"blk.{i}.{_LAYER[rest]}"


def random_kquant(shape, qtype, seed: int = 0) -> np.ndarray:
  """Random K-quant blocks (bytes) of a [rows, cols] tensor whose f16 scales are small and finite."""
  block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  rows, cols = shape
  rng = np.random.default_rng(seed)
  raw = rng.integers(0, 256, (rows, cols // block, type_size), dtype=np.uint8)
  scale = rng.uniform(1e-3, 4e-3, (rows, cols // block)).astype(np.float16).view(np.uint8)
  scale = scale.reshape(rows, cols // block, 2)
  if qtype == gguf.GGMLQuantizationType.Q6_K:  # ql, qh, scales (int8), then d
    raw[..., -2:] = scale
    raw[..., 192:208] = rng.integers(-8, 8, (rows, cols // block, 16)).astype(np.int8).view(
        np.uint8)
  else:  # Q2_K: scales, qs, d, dmin; Q4_K/Q5_K: d, dmin, scales, ...
    at = 16 + 64 if qtype == gguf.GGMLQuantizationType.Q2_K else 0
    raw[..., at:at + 2] = scale
    raw[..., at + 2:at + 4] = scale
  return raw.reshape(rows, -1)


def write_gguf(model, path, qtype: str = "F32", *, kquant: str | None = None,
               extra_metadata: dict | None = None, drop: tuple = (),
               override: dict | None = None, tokenizer: bool = False) -> str:
  """Writes ``model`` as a GGUF file at ``path``; returns the path.

  ``extra_metadata``: more keys (``{key: value}``, ints as uint32, floats as
  float32, str), e.g. to make a file the loader must refuse. ``drop``: GGUF
  tensor names left out. ``override``: GGUF tensor name -> array (F32) in place
  of the model's. ``tokenizer``: add a byte-level BPE tokenizer with a ChatML
  template (``add_byte_tokenizer``).
  """
  c = model.config
  arch = "qwen2" if c.model_type == "qwen2" else "llama"
  qtype = gguf.GGMLQuantizationType[qtype]
  w = gguf.GGUFWriter(os.fspath(path), arch)
  w.add_name(f"tiny-{arch}")
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
  w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
  w.add_vocab_size(c.vocab_size)
  w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
  w.add_file_type(int(qtype))
  if tokenizer:
    add_byte_tokenizer(w, c.vocab_size, CHATML)
  for key, value in (extra_metadata or {}).items():
    if isinstance(value, bool):
      w.add_bool(key, value)
    elif isinstance(value, int):
      w.add_uint32(key, value)
    elif isinstance(value, float):
      w.add_float32(key, value)
    else:
      w.add_string(key, value)
  state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  if c.tie_word_embeddings:
    state.pop("lm_head.weight", None)
  heads, kv = c.num_attention_heads, c.num_key_value_heads
  for hf, t in sorted(state.items()):
    name = gguf_name(hf)
    if name in drop:
      continue
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
      t = permute_qk(t, heads if ".attn_q." in name else kv)
    if override and name in override:
      w.add_tensor(name, np.asarray(override[name], np.float32))
    elif kquant and name.endswith("ffn_down.weight"):
      kq = gguf.GGMLQuantizationType[kquant]
      w.add_tensor(name, random_kquant(t.shape, kq, seed=len(name)), raw_dtype=kq)
    elif t.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
      data = t.astype(np.float16) if qtype == gguf.GGMLQuantizationType.F16 else (
          gguf.quants.quantize(t, qtype))
      w.add_tensor(name, data, raw_dtype=qtype)
    else:
      w.add_tensor(name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return os.fspath(path)


def _byte_symbols() -> list[str]:
  """GPT-2's byte -> printable-unicode table (what byte-level BPE vocabularies spell)."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  extra = iter(range(256, 512))
  table = {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}
  return [table[b] for b in range(256)]


def add_byte_tokenizer(writer, vocab_size: int, chat_template: str | None = None) -> None:
  """A byte-level BPE tokenizer in GGUF metadata: 256 byte tokens, a few merges, specials.

  Ids 256.. are ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, then merged
  tokens (" t", "he", " the") and padding entries up to ``vocab_size``.
  """
  tokens = _byte_symbols() + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  merges = ["Ġ t", "h e", "Ġt he"]
  tokens += ["Ġt", "he", "Ġthe"]
  tokens += [f"<|extra_{i}|>" for i in range(vocab_size - len(tokens))]
  types = [1] * 256 + [3, 3, 3] + [1] * 3 + [4] * (vocab_size - 262)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  writer.add_bos_token_id(257)
  writer.add_eos_token_id(258)
  writer.add_pad_token_id(256)
  writer.add_add_bos_token(False)
  if chat_template:
    writer.add_chat_template(chat_template)


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
