"""Tiny random Hugging Face models and tokenizers, built locally (no downloads).

Reusable by any test that needs a torch reference: ``make_hf_model(kind, dir)``
returns ``(torch_model, path)`` with the model saved as safetensors at ``path``;
``torch_logits`` runs it. Weights are re-randomised after construction (HF
zero-inits biases and one-inits norms, which would hide mapping mistakes).
"""

from __future__ import annotations

import os

import numpy as np

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            rms_norm_eps=1e-5)

# kind -> (architecture, overrides of TINY)
KINDS = {
    "mha": ("llama", dict(num_key_value_heads=4)),
    "gqa": ("llama", dict(num_hidden_layers=3, vocab_size=300)),
    "mqa": ("llama", dict(num_key_value_heads=1)),
    "tied": ("llama", dict(tie_word_embeddings=True)),
    "head_dim": ("llama", dict(head_dim=32)),
    "llama3": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=64))),
    "linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                  factor=4.0))),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True,
                            rope_parameters=dict(rope_type="default", rope_theta=1e6))),
}


def hf_config(kind: str):
  import transformers
  arch, over = KINDS[kind]
  cls = transformers.Qwen2Config if arch == "qwen2" else transformers.LlamaConfig
  return cls(**{**TINY, **over}, attn_implementation="eager")


def randomize_(model, seed: int = 0, std: float = 0.05) -> None:
  """Every weight random: norms around 1, biases and matrices around 0."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
      p.copy_(1.0 + 0.1 * noise if "norm" in name else (0.1 if name.endswith("bias") else std)
              * noise)


def make_hf_model(kind: str, tmpdir, seed: int = 0):
  """A random float32 tiny model of ``kind`` (see KINDS), saved under ``tmpdir/kind``."""
  import torch
  import transformers
  torch.manual_seed(seed)
  config = hf_config(kind)
  cls = (transformers.Qwen2ForCausalLM if KINDS[kind][0] == "qwen2"
         else transformers.LlamaForCausalLM)
  model = cls(config).to(torch.float32).eval()
  randomize_(model, seed)
  path = os.path.join(os.fspath(tmpdir), kind)
  model.save_pretrained(path, safe_serialization=True)
  return model, path


def long_prompt(vocab_size: int, batch: int = 2, length: int = 520, seed: int = 0):
  """Random int32 tokens [batch, length]; long, so RoPE bugs cannot hide."""
  return np.random.default_rng(seed).integers(0, vocab_size, (batch, length)).astype(np.int32)


def torch_logits(model, tokens) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def make_hf_tokenizer(path) -> str:
  """A tiny word-level tokenizer saved with ``PreTrainedTokenizerFast`` at ``path``."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  words = ["<pad>", "<s>", "</s>", "<unk>", "hello", "world", "jax", "flax", "memory", "!"]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                 eos_token="</s>", unk_token="<unk>")
  fast.save_pretrained(os.fspath(path))
  return os.fspath(path)
