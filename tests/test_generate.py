"""The generate command as a newcomer meets it: trained sets with their settings, one-line
errors instead of tracebacks or silent wrong answers, sampling, stdin, --json, --chat.

Each refusal here used to be a traceback or an answer to nonsense (issue #25); the model
is a tiny GGUF file with a tokenizer (``gguf_fixtures``), so nothing is downloaded.
"""

import io
import json
import os
import sys

import jax
import numpy as np
import pytest

import gguf_fixtures
from edgeinfinite_jax.cli import generate, main as main_cli
from edgeinfinite_jax.engine.engine import Scenario
from edgeinfinite_jax.model import gate as gate_lib
from edgeinfinite_jax.model import lora
from edgeinfinite_jax.model.config import ConfigError

SEG = dict(segment_len=32, n_sink=4, n_window=32)


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen")
  return gguf_fixtures.write_gguf(gguf_fixtures.hf_model("llama", seed=1), root / "tok.gguf",
                                  "Q8_0", tokenizer=True)


def _nudge(params, part):
  """``params`` with the leaves whose path names ``part`` moved off their initial value."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.01 if part in jax.tree_util.keystr(path) else x, params)


@pytest.fixture(scope="module")
def trained(tok_file, tmp_path_factory):
  """A gate set and a gate + LoRA set saved with their settings (absolute positions,
  segment/window 32) -> {name: path}."""
  from edgeinfinite_jax.checkpoints import models
  config, params, _ = models.load(tok_file)
  root = tmp_path_factory.mktemp("sets")
  mem = dict(SEG, gate="mlp", gate_mlp_hidden=4, rope_positions="absolute")
  g_cfg, g_params = gate_lib.with_memory(config, params, rng=jax.random.key(1), **mem)
  g_params = _nudge(g_params, "memory_gate")  # not the initial gate
  out = {"gate": str(root / "gate.npz"), "lora": str(root / "lora.npz")}
  gate_lib.save_gate(g_params, out["gate"], g_cfg)
  l_cfg, l_params = lora.with_lora(g_cfg, g_params, rank=2, rng=jax.random.key(2))
  l_params = _nudge(l_params, "lora_")
  pattern = f"(?:{gate_lib.PATTERN})|(?:{lora.PATTERN})"
  lora.save_subset(l_params, out["lora"], pattern, "gate+lora", l_cfg)
  out["lora_model"] = lora.merge(l_cfg, l_params)
  return out


@pytest.fixture
def doc(tmp_path):
  path = tmp_path / "doc.txt"
  path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
  return str(path)


def _fails(argv, capsys, message):
  """``generate`` exits 2 with one line on stderr that contains ``message``."""
  with pytest.raises(SystemExit) as e:
    generate.cli(argv)
  assert e.value.code == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("generate: error: ") and message in err[0], err
  return err[0]


def test_bad_documents_are_refused_in_one_line(tok_file, tmp_path, capsys):
  m = f"--model={tok_file}"
  (tmp_path / "empty.txt").write_text("  \n\n ")
  (tmp_path / "bin.dat").write_bytes(b"ELF\x02\x01\x00\x00binary")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  _fails([m, f"--file={tmp_path}/empty.txt", "--prompt=q"], capsys, "the document is empty")
  _fails([m, f"--file={tmp_path}/bin.dat", "--prompt=q"], capsys,
         "not a text file (a NUL byte at offset 5)")
  _fails([m, f"--file={tmp_path}/latin1.txt", "--prompt=q"], capsys,
         "not UTF-8 text (byte 0xe9 at offset 3)")
  _fails([m, "--file=/nonexistent.txt", "--prompt=q"], capsys, "--file=/nonexistent.txt: no such")
  _fails([m, f"--file={tmp_path}", "--prompt=q"], capsys, "not a file")


def test_edgeinfinite_needs_a_trained_set_unless_asked(tok_file, doc, capsys):
  """It used to run the initial gate silently (an answer like streaming's)."""
  _fails([f"--model={tok_file}", f"--file={doc}", "--prompt=q"], capsys,
         "--attention=edgeinfinite needs a trained set: --gate=FILE")
  _fails([f"--model={tok_file}", f"--file={doc}", "--prompt=q", "--attention=streaming",
          "--gate=x.npz"], capsys, "a trained set is only for --attention=edgeinfinite")


def test_damaged_trained_sets_are_refused_naming_the_file(tok_file, doc, trained, tmp_path,
                                                          capsys):
  with np.load(trained["gate"]) as f:
    leaves = {k: f[k] for k in f.files}
  key = next(k for k in leaves if k.endswith("/bias"))
  nan = str(tmp_path / "nan.npz")
  np.savez(nan, **{**leaves, key: np.full_like(leaves[key], np.nan)})
  truncated = str(tmp_path / "cut.npz")
  with open(trained["gate"], "rb") as f, open(truncated, "wb") as g:
    g.write(f.read()[:200])
  base = [f"--model={tok_file}", f"--file={doc}", "--prompt=q"]
  _fails(base + [f"--gate={nan}"], capsys, f"{key} holds")  # it decoded to an empty string
  _fails(base + [f"--gate={truncated}"], capsys, "not a readable .npz")  # was BadZipFile
  _fails(base + ["--gate=/no/such.npz"], capsys, "trained set file '/no/such.npz': no such file")


def test_a_trained_set_is_served_with_its_recorded_settings(trained):
  """The committed gate was trained with window 128 and absolute positions and served
  with the qa scenario's 1024 and cache-relative ones: it answered with 0 tokens."""
  scenario, rope = generate.serving_scenario(Scenario.preset("qa"), trained["gate"], {})
  assert (scenario.segment_len, scenario.n_sink, scenario.n_window, rope) == (32, 4, 32,
                                                                              "absolute")
  with pytest.raises(ConfigError, match=r"--window=64: the trained set .*gate.npz was trained "
                                        r"with n_window=32"):
    generate.serving_scenario(Scenario.preset("qa"), trained["gate"], {"n_window": 64})
  with pytest.raises(ConfigError, match="--rope-positions='cache_relative'"):
    generate.serving_scenario(Scenario.preset("qa"), trained["gate"],
                              {"rope_positions": "cache_relative"})


def test_the_gate_plus_lora_set_loads_from_the_cli(tok_file, trained):
  """build_engine (generate and deploy_check) takes the gate + LoRA file: adapters are
  built, loaded and merged, and the engine equals the merged trained model."""
  from edgeinfinite_jax.checkpoints import models
  from edgeinfinite_jax.engine.engine import Engine
  config, params, _ = models.load(tok_file)
  scenario = Scenario(**SEG, short_threshold=8, max_new_tokens=4)
  engine = generate.build_engine(config, params, "edgeinfinite", scenario,
                                 gate_path=trained["lora"], rope_positions="absolute")
  want_cfg, want_params = trained["lora_model"]
  ref = Engine(want_cfg, want_params, scenario)
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (1, 100)).astype(np.int32)
  np.testing.assert_allclose(np.asarray(engine.prefill(tokens)[1]),
                             np.asarray(ref.prefill(tokens)[1]), atol=1e-5)
  assert gate_lib.trained_set(trained["lora"]).lora_rank == 2


def test_sizes_that_would_not_fit_are_refused_with_their_cost(tok_file, capsys):
  """A short prompt's cache grows with --max-new-tokens: 10^9 was a 768 GB allocation."""
  msg = _fails([f"--model={tok_file}", "--prompt=hello", "--attention=full",
                "--max-new-tokens=1000000000"], capsys, "--max-new-tokens=1000000000: the short "
               "route's state would take")
  assert "GiB budget" in msg
  assert generate.warn_positions(gguf_config(tok_file), "full", "absolute", 10**6).startswith(
      "warning: 1000000 tokens (prompt + new) exceed the model's trained context")
  assert generate.warn_positions(gguf_config(tok_file), "streaming", "cache_relative",
                                 10**6) is None


def test_a_long_answer_keeps_the_streaming_state_constant(tok_file, capsys):
  """--max-new-tokens=100000 on a short prompt made the short route's full cache hold all
  of them (4.6 GB on SmolLM2): streaming now serves it on the long route."""
  base = Scenario.preset("qa")
  assert generate.constant_state(base, 64) == base  # a usual answer: the short route stays
  long = generate.constant_state(base, 100_000)
  assert long.short_threshold == 0 and long.n_window == base.n_window
  from edgeinfinite_jax.checkpoints import models
  config, params, _ = models.load(tok_file)
  n_new = 100_000
  sizes = dict(SEG, short_threshold=16, max_new_tokens=n_new, max_context=n_new + 64)
  before = generate.build_engine(config, params, "streaming", Scenario(**sizes))
  after = generate.build_engine(config, params, "streaming",
                                generate.constant_state(Scenario(**sizes), n_new))
  assert before.route_for(10) == "short" and after.route_for(10) == "long"
  grown = generate.state_estimate(before, "short")
  kept = generate.state_estimate(after, "long")
  assert kept < grown / 50, (kept, grown)  # the buffer of new tokens is most of `kept`


def gguf_config(path):
  from edgeinfinite_jax.checkpoints import models
  return models.load(path, tokenizer=False)[0]


@pytest.mark.slow
def test_prompt_from_stdin_sampling_json_and_chat(tok_file, monkeypatch, capsys):
  """--prompt or stdin, --system, a seeded sampled answer that repeats with its seed,
  --json stats on stdout, and --chat turns read by a continued prefill."""
  base = [f"--model={tok_file}", "--attention=full", "--max-new-tokens=6", "--system=Be brief."]
  monkeypatch.setattr(sys, "stdin", io.StringIO("Tell me about foxes."))
  first = generate.main(base + ["--json", "--temperature=1.0", "--top-p=0.9", "--seed=3"])
  out = capsys.readouterr().out
  assert json.loads(out)["answer"] == first["answer"] and first["compile_s"] > 0
  again = generate.main(base + ["--prompt=Tell me about foxes.", "--json", "--temperature=1.0",
                                "--top-p=0.9", "--seed=3"])
  assert again["answer"] == first["answer"]
  monkeypatch.setattr(sys, "stdin", io.StringIO("And dogs?\nAnd cats?\n\n"))
  chat = generate.main(base + ["--prompt=Hi", "--chat"])
  assert len(chat["turns"]) == 3 and all(t["new_tokens"] >= 1 for t in chat["turns"])


def test_help_exits_zero_and_main_errors_are_one_line(tmp_path, capsys):
  for cli in (generate.cli, main_cli.cli):
    with pytest.raises(SystemExit) as e:
      cli(["--help"])
    assert e.value.code == 0
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    main_cli.cli(["--config=nope.py", f"--workdir={tmp_path}"])
  assert e.value.code == 2  # was a 36-line double traceback
  assert capsys.readouterr().err.strip() == "main: error: --config=nope.py: no such config " \
                                            "file 'nope.py'"
  afile = tmp_path / "afile"
  afile.write_text("")
  config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "configs", "pretrain_tiny.py")
  with pytest.raises(SystemExit) as e:
    main_cli.cli([f"--config={config}:tiny", f"--workdir={afile}"])
  assert e.value.code == 2
  assert f"--workdir={afile}: exists and is not a directory" in capsys.readouterr().err


def test_the_readme_import_of_models_works():
  from edgeinfinite_jax import models
  assert "smollm2" in models.MODELS


def test_params_without_the_gate_are_named_before_tracing(tok_file):
  # A base model's weights under an EdgeInfinite config used to fail deep in Flax's
  # apply with ScopeParamNotFoundError; now the missing leaf is named first.
  from edgeinfinite_jax.checkpoints import models
  from edgeinfinite_jax.engine.engine import Engine
  from edgeinfinite_jax.model.transformer import forward
  config, params, _ = models.load(tok_file)
  mem_config, _ = gate_lib.with_memory(config, params, rng=jax.random.key(0), **SEG)
  tokens = np.zeros((1, 8), np.int32)
  for build in (lambda: Engine(mem_config, params, Scenario(segment_len=32, n_window=32,
                                                             max_context=64)),
                lambda: forward(mem_config, params, tokens)):
    with pytest.raises(ValueError, match=r"\['memory_gate'\].* is missing; "
                       r"attention_type='edgeinfinite' needs it \(the memory gate"):
      build()
  with pytest.raises(ValueError, match=r"has shape \(8,\); this config needs"):
    bad = jax.tree_util.tree_map_with_path(
        lambda p, x: np.zeros(8, x.dtype) if "final_norm" in jax.tree_util.keystr(p) else x,
        params)
    forward(config, bad, tokens)


def test_eviction_baselines_need_a_budget_and_keep_their_state(tok_file, capsys):
  _fails([f"--model={tok_file}", "--prompt=hi", "--attention=h2o"], capsys,
         "--attention=h2o needs --kept=N, a positive number of tokens kept per KV head")
  _fails([f"--model={tok_file}", "--prompt=hi", "--attention=snapkv", "--kept=0"], capsys,
         "got --kept=0")
  _fails([f"--model={tok_file}", "--prompt=hi", "--attention=streaming", "--kept=8"], capsys,
         "--kept=8: only for --attention=h2o or snapkv (got --attention=streaming)")
  from edgeinfinite_jax.checkpoints import models
  config, params, _ = models.load(tok_file)
  sc = Scenario(**SEG, short_threshold=0, max_new_tokens=4, max_context=256)
  states = {}
  for kept in (4, 8):
    engine = generate.build_engine(config, params, "snapkv", sc, n_kept=kept)
    assert engine.route_configs["long"].memory.n_kept == kept
    states[kept] = engine.state_bytes()
  assert states[4] < states[8]  # the budget is the state
