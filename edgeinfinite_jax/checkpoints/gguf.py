"""GGUF files (llama.cpp's format) in, without torch.

``load_gguf(path) -> (config, {"params": ...})`` reads a ``.gguf`` file, maps its
metadata to a ``ModelConfig`` and dequantizes every tensor to float32 with
``gguf.quants`` (the numpy reference maintained with llama.cpp), then hands the
tensors to the Hugging Face name table of ``convert.py``, so GGUF and
safetensors share one mapping onto our parameter tree.

Why the shape of this module:

* **Header first, tensors last.** ``read_header`` parses the key-value metadata
  and the tensor directory only; ``config_from_gguf`` and the tensor checks
  (names, shapes, types, file extent) run on it, so every refusal (another
  architecture, a sliding window, MoE, an unknown rope type, an unsupported
  tensor type, a wrong shape, a truncated file) happens before any tensor byte
  is read and before anything compiles, and names the file, the key and the
  value.
* **Our own header parser.** ``gguf.GGUFReader`` builds a numpy view per string
  of the vocabulary: 12-20 s of CPU for SmolLM2's 98k tokenizer strings. The
  format's header is a few fixed little-endian records, so ``read_header``
  parses it with ``struct`` in well under a second; tests check it against
  ``GGUFReader`` field by field. The tensor data is memory-mapped and
  dequantized by ``gguf.quants``.
* **llama.cpp's Q/K row order.** llama.cpp's converter permutes the rows of
  Llama's Q and K projections for its interleaved RoPE; ``unpermute_qk`` undoes
  it exactly as transformers' GGUF loader does. ``qwen2`` files are written
  unpermuted (llama.cpp runs them with NeoX RoPE).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
from typing import Any, Mapping

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from edgeinfinite_jax.checkpoints import hf as convert
from edgeinfinite_jax.model import transformer as model_lib
from edgeinfinite_jax.model.config import ConfigError, ModelConfig, RopeScaling

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_MAGIC = b"GGUF"
# GGUF value types -> struct format of one scalar (8 = string, 9 = array).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFError(convert.CheckpointError):
  """A GGUF file cannot be loaded; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  shape: tuple[int, ...]   # numpy order (GGUF stores dims innermost first)
  qtype: gguf.GGMLQuantizationType
  offset: int              # absolute byte offset in the file
  nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
  path: str
  version: int
  metadata: Mapping[str, Any]
  tensors: Mapping[str, TensorInfo]
  file_size: int


# ------------------------------------------------------------------ header


class _Cursor:
  """Little-endian reads from a bytes-like object, with bounds named in errors."""

  def __init__(self, buf, path):
    self.buf, self.pos, self.path = buf, 0, path

  def take(self, fmt: str):
    size = struct.calcsize("<" + fmt)
    if self.pos + size > len(self.buf):
      raise GGUFError(f"{self.path}: truncated header (needed {size} bytes at offset "
                      f"{self.pos}, file has {len(self.buf)})")
    out = struct.unpack_from("<" + fmt, self.buf, self.pos)
    self.pos += size
    return out[0] if len(out) == 1 else out

  def string(self) -> str:
    n = self.take("Q")
    if self.pos + n > len(self.buf):
      raise GGUFError(f"{self.path}: truncated header (a {n}-byte string at offset "
                      f"{self.pos}, file has {len(self.buf)})")
    s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
    self.pos += n
    return s

  def value(self, vtype: int, key: str):
    if vtype == _STRING:
      return self.string()
    if vtype == _ARRAY:
      etype, n = self.take("I"), self.take("Q")
      if etype == _STRING:
        return [self.string() for _ in range(n)]
      if etype not in _SCALAR:
        raise GGUFError(f"{self.path}: metadata {key!r}: array of unknown value type {etype}")
      fmt = _SCALAR[etype]
      size = struct.calcsize("<" + fmt) * n
      if self.pos + size > len(self.buf):
        raise GGUFError(f"{self.path}: truncated header (array {key!r} of {n} items)")
      out = np.frombuffer(self.buf, np.dtype("<" + fmt), n, self.pos).tolist()
      self.pos += size
      return out
    if vtype not in _SCALAR:
      raise GGUFError(f"{self.path}: metadata {key!r}: unknown value type {vtype}")
    return self.take(_SCALAR[vtype])


def read_header(path: str) -> GGUFHeader:
  """Metadata and tensor directory of a GGUF v2/v3 file; reads no tensor data.

  Raises GGUFError naming the file for a missing file, a bad magic, an
  unsupported version, a truncated header, a tensor of an unknown type, or
  tensor data extending past the end of the file (a truncated download).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise GGUFError(f"{path}: no such file")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    buf = np.memmap(f, np.uint8, "r") if size else b""
  c = _Cursor(buf, path)
  if bytes(buf[:4]) != _MAGIC:
    raise GGUFError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected {_MAGIC!r})")
  c.pos = 4
  version = c.take("I")
  if version not in (2, 3):
    raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3; a big-endian "
                    "file reads as a huge version)")
  n_tensors, n_kv = c.take("Q"), c.take("Q")
  metadata = {}
  for _ in range(n_kv):
    key = c.string()
    metadata[key] = c.value(c.take("I"), key)
  infos = []
  for _ in range(n_tensors):
    name = c.string()
    dims = [c.take("Q") for _ in range(c.take("I"))]
    raw_type, offset = c.take("I"), c.take("Q")
    try:
      qtype = gguf.GGMLQuantizationType(raw_type)
    except ValueError:
      raise GGUFError(f"{path}: tensor {name!r}: unknown tensor type {raw_type}") from None
    infos.append((name, tuple(reversed(dims)), qtype, offset))
  align = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
  if align <= 0 or align & (align - 1):
    raise GGUFError(f"{path}: general.alignment={align}: must be a power of two")
  data_start = -(-c.pos // align) * align
  tensors = {}
  for name, shape, qtype, offset in infos:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape)) if shape else 1
    if shape and shape[-1] % block:
      raise GGUFError(f"{path}: tensor {name!r}: row length {shape[-1]} is not a multiple of "
                      f"{qtype.name}'s block of {block}")
    info = TensorInfo(name, shape, qtype, data_start + offset, n // block * type_size)
    if info.offset + info.nbytes > size:
      raise GGUFError(f"{path}: truncated: tensor {name!r} ({qtype.name} {list(shape)}) needs "
                      f"bytes {info.offset}..{info.offset + info.nbytes}, the file has {size}")
    tensors[name] = info
  return GGUFHeader(path, version, metadata, tensors, size)


# ------------------------------------------------------------------ config

# Keys under "{arch}." that this module reads. Any other key under the
# architecture's namespace may change the numerics and is refused by name.
_ARCH_KEYS = frozenset({
    "block_count", "context_length", "embedding_length", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.freq_base",
    "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.original_context_length", "vocab_size", "expert_count",
    "expert_used_count", "tensor_data_layout",
})
_REQUIRED = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.layer_norm_rms_epsilon")


def config_from_gguf(header: GGUFHeader, dtype: Any = jnp.float32) -> ModelConfig:
  """A ``ModelConfig`` from a GGUF header; GGUFError names every unsupported key."""
  md, path, errors = header.metadata, header.path, []
  arch = md.get("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise GGUFError(f"{path}: general.architecture={arch!r}: not implemented; supported: "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")
  a = {k[len(arch) + 1:]: v for k, v in md.items() if k.startswith(arch + ".")}
  for k in sorted(set(a) - _ARCH_KEYS):
    why = ("sliding-window attention is not implemented" if "sliding_window" in k else
           "unknown key; refusing rather than ignoring it")
    errors.append(f"{arch}.{k}={a[k]!r}: {why}")
  for k in _REQUIRED:
    if k not in a:
      errors.append(f"{arch}.{k}: missing (required)")
  for k in ("expert_count", "expert_used_count"):
    if a.get(k):
      errors.append(f"{arch}.{k}={a[k]!r}: mixture-of-experts is not implemented")
  scaling = RopeScaling()
  rope_type = a.get("rope.scaling.type", "none")
  if rope_type == "linear":
    scaling = RopeScaling("linear", factor=float(a.get("rope.scaling.factor", 1.0)))
  elif rope_type != "none":
    errors.append(f"{arch}.rope.scaling.type={rope_type!r}: not implemented; supported: none, "
                  "linear")
  if "rope_freqs.weight" in header.tensors:
    errors.append("tensor 'rope_freqs.weight': per-frequency RoPE factors (llama3 rope "
                  "scaling in GGUF) are not implemented")
  if errors:
    raise GGUFError(f"{path}: unsupported GGUF model:\n  " + "\n  ".join(errors))
  heads = int(a["attention.head_count"])
  head_dim = int(a.get("attention.key_length", a["embedding_length"] // heads))
  for k in ("attention.value_length", "rope.dimension_count"):
    if k in a and int(a[k]) != head_dim:
      errors.append(f"{arch}.{k}={a[k]!r}: must equal the head dim {head_dim} (partial rotary "
                    "and distinct value heads are not implemented)")
  embed = header.tensors.get("token_embd.weight")
  vocab = a.get("vocab_size") or (len(md["tokenizer.ggml.tokens"])
                                  if "tokenizer.ggml.tokens" in md else None)
  if vocab is None and embed is not None:
    vocab = embed.shape[0]
  if vocab is None:
    errors.append(f"{arch}.vocab_size: missing, and no tokenizer.ggml.tokens or token_embd")
  if errors:
    raise GGUFError(f"{path}: unsupported GGUF model:\n  " + "\n  ".join(errors))
  try:
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=int(a["embedding_length"]),
        intermediate_size=int(a["feed_forward_length"]), num_layers=int(a["block_count"]),
        num_heads=heads, num_kv_heads=int(a.get("attention.head_count_kv", heads)),
        head_dim=head_dim, rms_norm_eps=float(a["attention.layer_norm_rms_epsilon"]),
        rope_theta=float(a.get("rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=int(a.get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in header.tensors,
        attention_bias="blk.0.attn_q.bias" in header.tensors, dtype=jnp.dtype(dtype).name)
  except ConfigError as e:
    raise GGUFError(f"{path}: {e}") from None


# ------------------------------------------------------------------ tensors

_GGUF_TO_HF = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
)
_TO_HF = [(convert.template_re(g), h) for g, h in _GGUF_TO_HF]


def hf_name(gguf_name: str) -> str | None:
  """The Hugging Face tensor name of a GGUF tensor name (None if unknown)."""
  for pattern, target in _TO_HF:
    m = pattern.match(gguf_name)
    if m:
      return target.replace("{i}", m.group(1)) if m.groups() else target
  return None


@functools.cache
def dequantizable_types() -> frozenset:
  """Tensor types ``gguf.quants.dequantize`` implements in this install (probed once)."""
  ok = set()
  for qtype, (block, type_size) in gguf.GGML_QUANT_SIZES.items():
    try:
      out = gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
      continue
    if out.dtype.kind == "f" and out.shape[-1] == block:
      ok.add(qtype)
  return frozenset(ok)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation on an ``[out, in]`` weight (or ``[out]`` bias)."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _plan(header: GGUFHeader, config: ModelConfig):
  """(GGUF name -> (our path, kind, HF name)) for every tensor; GGUFError lists all problems."""
  expected = {k: tuple(v.shape) for k, v in
              convert.flatten(model_lib.abstract_params(config)["params"]).items()}
  supported, plan, errors = dequantizable_types(), {}, []
  for name, info in header.tensors.items():
    hf = hf_name(name)
    ours, kind = convert.hf_to_ours(hf) if hf else (None, None)
    if ours is None or ours not in expected:
      errors.append(f"tensor {name!r}: unexpected (no parameter of this config reads it)")
      continue
    if info.qtype not in supported:
      errors.append(f"tensor {name!r}: type {info.qtype.name} is not supported (gguf.quants "
                    f"dequantizes {', '.join(sorted(t.name for t in supported))})")
    want = convert.hf_shape(kind, expected[ours])
    if info.shape != want:
      errors.append(f"tensor {name!r}: shape {list(info.shape)}, expected {list(want)} "
                    f"(for {ours})")
    plan[name] = (ours, kind, hf)
  found = {ours for ours, _, _ in plan.values()}
  for ours in sorted(set(expected) - found):
    errors.append(f"missing tensor for {ours} (shape {list(expected[ours])})")
  if errors:
    raise GGUFError(f"{header.path}: {len(errors)} bad tensor(s):\n  " + "\n  ".join(errors))
  return plan, expected


def _dequantize(info: TensorInfo, buf) -> np.ndarray:
  rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
  raw = np.asarray(buf[info.offset:info.offset + info.nbytes]).reshape(rows, -1)
  return gguf.quants.dequantize(raw, info.qtype).astype(np.float32).reshape(info.shape)


def load_gguf(path: str, dtype: Any = jnp.float32, *, allow_non_finite: bool = False):
  """``(config, {"params": ...})`` from a ``.gguf`` file, every tensor dequantized to float32.

  ``dtype`` is the compute dtype recorded in ``config.dtype``; parameters are
  float32. Everything is checked on the header first (architecture and
  metadata, tensor names, shapes, types and extent; see module docstring);
  tensors with NaN/inf values are refused by name after dequantization unless
  ``allow_non_finite``.
  """
  header = read_header(path)
  config = config_from_gguf(header, dtype)
  plan, expected = _plan(header, config)
  arch = header.metadata["general.architecture"]
  flat = {}
  with open(header.path, "rb") as f:
    buf = np.memmap(f, np.uint8, "r")
    for name, (ours, kind, _) in plan.items():
      w = _dequantize(header.tensors[name], buf)
      if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        w = unpermute_qk(w, config.num_heads if ".attn_q." in name else config.num_kv_heads)
      flat[ours] = convert.to_ours(kind, w, expected[ours])
    del buf
  convert.check_finite(flat, header.path, allow_non_finite)
  return config, {"params": jax.tree.map(jnp.asarray, convert.unflatten(flat))}
