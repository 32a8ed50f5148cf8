"""Long-context tasks from local text: LCC, beyond-window NLL, RULER, the suite runner,
and ``Engine.score`` (teacher-forced per-token NLL) underneath them."""

import collections
import dataclasses
import json
import re

import jax
import numpy as np
import pytest
from rapidfuzz import fuzz

from edgeinfinite_jax import ConfigError, Engine, Scenario, with_memory
from edgeinfinite_jax.checkpoints.tokenizer import ByteTokenizer
from edgeinfinite_jax.data import corpus
from edgeinfinite_jax.engine.state import state_nbytes
from edgeinfinite_jax.eval import longctx, metrics, ruler
from edgeinfinite_jax.model import transformer as model
from edgeinfinite_jax.model.config import ModelConfig
from fast_compile import fast_compiles

TOK = ByteTokenizer()
L = 8


@pytest.fixture(scope="module", autouse=True)
def _fast():
  with fast_compiles():
    yield


def _model(attention_type, vocab=64):
  base = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2)
  params = model.init_params(base, jax.random.key(0))
  if attention_type == "full":
    return base, params
  return with_memory(base, params, rng=jax.random.key(1), attention_type=attention_type,
                     gate="mlp", gate_init_bias=0.0)


def _scenario(**kw):
  return Scenario(**{**dict(segment_len=L, n_sink=2, n_window=16, batch_size=2,
                            max_new_tokens=8, short_threshold=4, max_context=128), **kw})


# ----------------------------------------------------------------------------- Engine.score


@pytest.mark.parametrize("attention_type", ["full", "streaming", "edgeinfinite"])
def test_score_equals_teacher_forcing_and_compiles_once(attention_type):
  cfg, params = _model(attention_type)
  engine = Engine(cfg, params, _scenario())
  tokens = np.random.RandomState(0).randint(0, 64, (2, 45)).astype(np.int32)
  logits = np.asarray(model.forward(engine.route_configs["long"], params, tokens))
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  want = -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)[..., 0]
  got = engine.score(tokens)  # 45 tokens: 5 full segments + a padded one
  assert got.shape == (2, 44) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-4)
  engine.score(tokens[:, :37])  # another length, another padding: no new compilation
  assert engine.compile_counts() == {"score_long": 1}


def test_score_refuses_a_single_token_and_an_overlong_full_text():
  cfg, params = _model("full")
  engine = Engine(cfg, params, _scenario(batch_size=1, max_context=32))
  with pytest.raises(ValueError, match=r"score tokens: time=1; must be >= 2"):
    engine.score(np.zeros((1, 1), np.int32))
  with pytest.raises(ValueError, match="exceeds the long route's cache capacity 32"):
    engine.score(np.zeros((1, 33), np.int32))
  assert engine.compile_count() == 0


# ----------------------------------------------------------------------------- RULER

RULER_LENGTH = 2048  # vt's one-shot example and template need ~1.1k bytes


def test_ruler_samples_fit_the_length_and_put_the_answers_where_ruler_does():
  for task in sorted(ruler.TASKS):
    samples = ruler.samples(task, TOK, RULER_LENGTH, 2, seed=3)
    again = ruler.samples(task, TOK, RULER_LENGTH, 2, seed=3)
    other = ruler.samples(task, TOK, RULER_LENGTH, 2, seed=4)
    assert [s.prompt for s in samples] == [s.prompt for s in again], task
    assert samples[0].prompt != other[0].prompt, task
    assert samples[0].prompt != samples[1].prompt, task
    for s in samples:
      gen = ruler.TOKENS_TO_GENERATE[ruler.TASKS[task][0]]
      assert s.max_new_tokens == gen
      assert list(s.tokens) == TOK.encode(s.prompt)
      # As long as fits: the haystack grows until prompt + answer budget is the length.
      assert 0.9 * RULER_LENGTH <= len(s.tokens) + gen <= RULER_LENGTH, (task, len(s.tokens))
      kind, args = ruler.TASKS[task]
      if kind == "niah":
        plural = args["type_needle_v"]
        for a in s.answers:
          assert re.search(rf"One of the special magic {plural} for \S+ is: {re.escape(a)}\.",
                           s.prompt), (task, a)
        assert s.prompt.endswith(" mentioned in the provided text "
                                 + ("is" if len(s.answers) == 1 else "are"))
        assert len(s.answers) == args["num_needle_v"] * args["num_needle_q"]
      elif kind == "vt":
        assert len(s.answers) == 5 and f"VAR {s.answers[1]} = VAR {s.answers[0]} " in s.prompt
        value = re.search(rf"VAR {s.answers[0]} = (\d+)", s.prompt).group(1)
        assert s.prompt.endswith(f"5 variables are assgined the value {value}, they are: ")
      elif kind == "cwe":
        # The second list (after the one-shot example): common words 6 times each below
        # 4096 tokens (30 from 4096 on), the others once.
        main = s.prompt.split("appear most often.\n")[-1].split("\nQuestion")[0]
        counts = collections.Counter(re.findall(r"\d+\. (\w+)", main))
        assert len(s.answers) == 10 and all(counts[w] == 6 for w in s.answers)
        assert {c for w, c in counts.items() if w not in s.answers} == {1}
      else:
        words = s.prompt.split("coded words. ")[1].split("\nQuestion")[0].split()
        top = [w for w, _ in collections.Counter(words).most_common(4)]
        assert top[0] == "..." and top[1:] == s.answers


def test_ruler_niah_single_1_is_the_repeat_haystack_and_the_essay_is_heldout_prose():
  s = ruler.samples("niah_single_1", TOK, 1024, 1)[0]
  assert s.prompt.startswith("A special magic number is hidden within the following text.")
  body = s.prompt.split("\n")[1:-1]
  assert {x for x in body if not x.startswith("One of")} == {ruler.REPEAT}
  essay = ruler.samples("niah_single_2", TOK, 1024, 1)[0].prompt
  context = essay.split("afterwards.\n")[1].split("\nWhat is")[0]
  prose = " ".join(ruler.heldout_prose(corpus.HELDOUT_FRACTION).split())
  for piece in re.split(r"One of the special magic numbers for \S+ is: \d+\.", context):
    assert " ".join(piece.split()) in prose


def test_string_match_all_is_the_fraction_found_case_insensitively():
  assert ruler.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == 2 / 3
  assert ruler.string_match_all(" ABC-Def\x00", ["abc-dEF"]) == 1.0
  assert ruler.string_match_all("no", ["yes"]) == 0.0
  with pytest.raises(ConfigError, match=r"references=\[\]: must name at least one"):
    ruler.string_match_all("x", [])


# ----------------------------------------------------------------------------- held-out split


def test_every_text_comes_from_the_heldout_split():
  sources = corpus.heldout_sources(corpus.HELDOUT_FRACTION)
  want = [p for p in corpus.stdlib_files() if corpus.is_heldout(p, corpus.HELDOUT_FRACTION)]
  assert [p for p, _ in sources] == want and want
  lcc = longctx.lcc_samples(TOK, 100, bins=((1024, 2048),), n=5)["1-2k"]
  docs = longctx.nll_documents(TOK, n_docs=3, length=4096)
  for path in [s.path for s in lcc] + [d.path for d in docs]:
    assert corpus.is_heldout(path, corpus.HELDOUT_FRACTION), path
  # At a larger fraction, what a run at the default fraction read is left out on request.
  seen = corpus.embedded_paths(3_000_000, corpus.HELDOUT_FRACTION)[0]
  wider = longctx.nll_documents(TOK, n_docs=5, length=4096, heldout_fraction=0.25,
                                exclude=seen)
  assert all(corpus.is_heldout(d.path, 0.25) and d.path not in seen for d in wider)
  with pytest.raises(ConfigError, match=r"\(heldout_fraction=0.25, \d+ paths excluded\)"):
    longctx.nll_documents(TOK, n_docs=500, length=4096, heldout_fraction=0.25, exclude=seen)


# ----------------------------------------------------------------------------- LCC


def test_lcc_samples_fall_in_their_bins_with_the_next_line_as_answer():
  bins = ((1024, 2048), (2048, 4096))
  got = longctx.lcc_samples(TOK, 100, bins=bins, n=4, seed=1)
  assert list(got) == ["1-2k", "2-4k"]
  assert [s.line for s in got["1-2k"]] == [
      s.line for s in longctx.lcc_samples(TOK, 100, bins=bins, n=4, seed=1)["1-2k"]]
  sources = dict(corpus.heldout_sources(corpus.HELDOUT_FRACTION))
  for (lo, hi), group in zip(bins, got.values()):
    assert len(group) == 4 and len({(s.path, s.line) for s in group}) == 4
    for s in group:
      assert lo <= s.length == len(s.tokens) < hi
      lines = sources[s.path].split("\n")
      text = TOK.decode(s.tokens)
      assert text == longctx.LCC_TEMPLATE.format(context="".join(x + "\n" for x in lines[:s.line]))
      assert s.answer == lines[s.line].rstrip() and s.answer.strip()


def _far_source(filler: int):
  return "\n".join(["def far_away_helper(x):", "  return x", ""]
                   + [f"v{i} = {i}" for i in range(filler)]
                   + [f"print(far_away_helper(v{filler - 1}))"])


def test_lcc_long_range_flag_on_a_constructed_example():
  source = _far_source(200)  # ~1.4k bytes between the definition and the answer
  line = len(source.split("\n")) - 1
  s = longctx.lcc_sample(source, line, TOK, 500)
  assert s.long_range and s.identifier == "far_away_helper"
  # Distance: prompt tokens after the end of "far_away_helper" in its definition line.
  prompt = TOK.encode(longctx.LCC_TEMPLATE.format(
      context="".join(x + "\n" for x in source.split("\n")[:line])))
  head = "Please complete the code given below. \ndef far_away_helper"
  assert s.distance == len(prompt) - len(TOK.encode(head))
  assert not longctx.lcc_sample(source, line, TOK, s.distance).long_range  # within reach
  near = source.replace("v198 = 198", "v198 = far_away_helper")
  assert not longctx.lcc_sample(near, line, TOK, 500).long_range  # seen again nearby
  # print is a builtin and v199 is near: the helper is the farthest identifier.
  trunc = longctx.lcc_sample(source, line, TOK, 0, max_len=400)
  assert len(trunc.tokens) == 400 and trunc.length == len(prompt)
  assert trunc.identifier == "far_away_helper" and trunc.distance == 400 - len(TOK.encode(head))
  dropped = _far_source(200).replace("def far_away_helper", "# " + "x" * 300 + "\ndef far_away_helper")
  s = longctx.lcc_sample(dropped, line + 1, TOK, 100, max_len=400)
  assert s.identifier == "v199" and not s.long_range  # the helper is in the dropped middle


def test_lcc_scores_are_rapidfuzz_ratios():
  # "    return tot" vs "    return total": LCS 14 of 14 + 16 characters -> 93.33 -> 93.
  assert fuzz.ratio("    return tot", "    return total") == pytest.approx(93.333, abs=1e-3)
  assert metrics.code_sim_score("\n    return tot\n", "    return total") == 0.93
  assert metrics.code_sim_score("# a comment\n    return total", "    return total") == 1.0


# ----------------------------------------------------------------------------- NLL


def test_nll_curve_buckets_and_the_mean_past_reach():
  nll = np.tile(np.arange(1, 11, dtype=np.float32), (2, 1))  # entry t scores token t + 1
  nll[1] += 1
  curve = longctx.nll_curve(nll, reach=4, bucket=4)
  assert curve["buckets"] == [[0, 4], [4, 8], [8, 11]]
  # Tokens 1-3 score 1, 2, 3 (doc 0) and 2, 3, 4 (doc 1): means 2 and 3.
  assert curve["nll"][0]["mean"] == pytest.approx(2.5)
  assert curve["nll"][0]["stderr"] == pytest.approx(0.5)
  assert curve["past_reach"]["mean"] == pytest.approx((7.5 + 8.5) / 2)  # tokens 5..10
  assert curve["within_reach"]["mean"] == pytest.approx((2.5 + 3.5) / 2)  # tokens 1..4
  assert curve["past_reach_docs"] == pytest.approx([7.5, 8.5])


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_before_any_model_runs():
  with pytest.raises(ConfigError, match=r"lcc bin 4-8k: \d+ samples .* n=100000 asked: not "
                     "enough source text"):
    longctx.lcc_samples(TOK, 100, bins=((4096, 8192),), n=100_000)
  with pytest.raises(ConfigError, match=r"n_docs=20: only \d+ of the \d+ held-out documents "
                     r"\(heldout_fraction=0.05\) have >= 8192 tokens"):
    longctx.nll_documents(TOK, n_docs=20, length=8192)
  with pytest.raises(ConfigError, match="n=0: must be a positive int"):
    ruler.samples("vt", TOK, 2048, 0)
  with pytest.raises(ConfigError, match="length=512: vt's smallest prompt"):
    ruler.samples("vt", TOK, 512, 1)
  cfg, params = _model("edgeinfinite", vocab=TOK.vocab_size)
  engine = Engine(cfg, params, _scenario(batch_size=1))
  with pytest.raises(ConfigError, match=r"task='niah': must be one of \["):
    longctx.run_suite({"m": engine}, TOK, tasks=["niah"])
  with pytest.raises(ConfigError, match="n=-1: must be a positive int"):
    longctx.run_suite({"m": engine}, TOK, n=-1)
  with pytest.raises(ConfigError, match=r"m: Scenario.max_new_tokens=8: must be >= 128"):
    longctx.run_suite({"m": engine}, TOK, lengths=(1024,), n=1, tasks=["niah_single_1"])
  assert engine.compile_count() == 0


# ----------------------------------------------------------------------------- runner


@pytest.mark.slow
def test_run_suite_table_costs_and_nll_curves(tmp_path):
  cfg, params = _model("edgeinfinite", vocab=TOK.vocab_size)
  scen = _scenario(batch_size=1, segment_len=64, n_window=64, max_new_tokens=128,
                   short_threshold=64, max_context=1152)
  engines = {"edgeinfinite": Engine(cfg, params, scen),
             "full": Engine(*_model("full", vocab=TOK.vocab_size), scen)}
  out = tmp_path / "suite.json"
  res = longctx.run_suite(engines, TOK, lengths=(1024,), n=2, seed=0,
                          tasks=["niah_single_1", "lcc", "nll"], lcc_bins=((512, 1024),),
                          nll_docs=2, nll_length=600, bucket=256, out=str(out), progress=False)
  assert json.loads(out.read_text()) == json.loads(json.dumps(res))
  assert res["config"]["reach"] == 128
  for method, engine in engines.items():
    cells = res["methods"][method]["cells"]
    assert set(cells) == {"niah_single_1@1024", "lcc@512-1024"}
    for cell in cells.values():
      assert len(cell["scores"]) == cell["n"] == 2
      assert all(0 <= x <= 1 for x in cell["scores"])
      assert cell["mean"] == pytest.approx(np.mean(cell["scores"]))
    assert res["table"][method] == {k: v["mean"] for k, v in cells.items()}
    cost = res["methods"][method]["cost"]
    assert cost["lengths"] == [1024] and cost["prompts"] == [4] and cost["ttft_s"][0] > 0
    nll = res["methods"][method]["nll"]
    assert nll["buckets"] == [[0, 256], [256, 512], [512, 600]]
    assert nll["past_reach"]["n"] == 2 and np.isfinite(nll["past_reach"]["mean"])
    # Compiled once per step function, whatever the prompt lengths.
    assert max(engine.compile_counts().values()) == 1
  assert res["methods"]["full"]["cost"]["state_bytes"] != \
      res["methods"]["edgeinfinite"]["cost"]["state_bytes"]


# ----------------------------------------------------------------------------- methods


def test_method_engines_spend_the_sets_state_on_kept_tokens():
  # head_dim 32: a memory of 32 x 33 floats per KV head buys several kept tokens (at
  # _model's head_dim 8 the window's eviction scores alone cost more than the memory).
  base = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2,
                     num_heads=2, num_kv_heads=1, head_dim=32)
  base_params = model.init_params(base, jax.random.key(0))
  cfg, params = with_memory(base, base_params, rng=jax.random.key(1),
                            attention_type="edgeinfinite", gate="mlp", gate_init_bias=0.0)
  other = jax.tree.map(lambda x: x * 0.5, params)
  scen = _scenario(batch_size=1, segment_len=32, n_window=32)  # snapkv votes with 32 queries
  engines, info = longctx.method_engines(base, base_params, scen,
                                         {"edgeinfinite": (cfg, params), "half": (cfg, other)})
  assert list(engines) == ["full", "streaming", "h2o", "snapkv", "edgeinfinite", "half"]
  budget = engines["edgeinfinite"].state_bytes()
  assert info["half"]["state_bytes"] == budget
  assert info["streaming"]["state_bytes"] < budget
  for b in ("h2o", "snapkv"):
    n = info[b]["n_kept"]
    assert n >= 2 and engines[b].scenario.n_kept == n
    assert info[b]["state_bytes"] <= budget
    wider = Engine(engines[b].route_configs["long"], base_params,
                   dataclasses.replace(scen, n_kept=n + 1))
    assert wider.state_bytes() > budget  # the largest budget that fits
  # state_bytes counts what init_state allocates.
  assert engines["h2o"].state_bytes() == state_nbytes(engines["h2o"].init_state("long"))
  # The two sets share one Engine's compiled steps.
  tokens = np.zeros((1, 96), np.int32)
  engines["edgeinfinite"].score(tokens)
  engines["half"].score(tokens)
  assert engines["half"].compile_counts() == engines["edgeinfinite"].compile_counts()
  assert max(engines["half"].compile_counts().values()) == 1


def test_method_engines_refuse_a_budget_below_one_kept_token():
  base, base_params = _model("full")
  with pytest.raises(ConfigError, match=r"state_bytes=100: must be >= [\d,]+, the state of h2o"):
    longctx.method_engines(base, base_params, _scenario(), {}, baselines=["h2o"],
                           state_bytes=100)
  with pytest.raises(ConfigError, match="state_bytes=None: must be given"):
    longctx.method_engines(base, base_params, _scenario(), {}, baselines=["h2o"])
  with pytest.raises(ConfigError, match="baseline='lru': must be one of"):
    longctx.method_engines(base, base_params, _scenario(), {}, baselines=["lru"])


def test_paired_difference_and_the_table_against_streaming():
  d = longctx.paired_difference([1.0, 2.0, 4.0], [1.5, 1.0, 3.0])
  assert d["mean"] == pytest.approx(0.5) and (d["above"], d["below"], d["n"]) == (2, 1, 3)
  assert d["stderr"] == pytest.approx(np.std([-0.5, 1.0, 1.0], ddof=1) / np.sqrt(3))
  base, base_params = _model("full", vocab=TOK.vocab_size)
  cfg, params = _model("edgeinfinite", vocab=TOK.vocab_size)
  scen = _scenario(batch_size=1, segment_len=64, n_window=64, max_new_tokens=64,
                   short_threshold=0, max_context=1152)
  engines, _ = longctx.method_engines(base, base_params, scen, {"edgeinfinite": (cfg, params)},
                                      baselines=["streaming"])
  res = longctx.run_suite(engines, TOK, lengths=(1024,), n=2, tasks=["lcc", "nll"],
                          lcc_bins=((512, 1024),), nll_docs=2, nll_length=600, bucket=256,
                          progress=False)
  ei, st = res["methods"]["edgeinfinite"], res["methods"]["streaming"]
  want = longctx.paired_difference(ei["nll"]["past_reach_docs"], st["nll"]["past_reach_docs"])
  assert ei["nll"]["vs_streaming"] == want
  assert st["nll"]["vs_streaming"]["mean"] == 0.0
  cell = ei["cells"]["lcc@512-1024"]
  assert cell["vs_streaming"] == longctx.paired_difference(
      cell["scores"], st["cells"]["lcc@512-1024"]["scores"])
  table = longctx.markdown_table(res).splitlines()
  assert table[0].startswith("| method | lcc@512-1024 | lcc@512-1024 long-range | NLL past")
  row = next(r for r in table if r.startswith("| edgeinfinite |"))
  assert f"{ei['nll']['past_reach']['mean']:.3f} ({want['mean']:+.3f}" in row
  assert f"{ei['cost']['kv_bytes'][-1]:,}" in row


def test_the_suite_plots_read_every_cell_name(tmp_path):
  """LCC bins are named "1-2k" at multiples of 1024 (``bin_name``): the score plot read
  only "lo-hi" and crashed the demo's report stage on SmolLM2's bins."""
  from edgeinfinite_jax.eval import plots
  assert [plots._upper(x) for x in ("2048", "256-512", longctx.bin_name(1024, 2048).split("@")[-1],
                                    longctx.bin_name(4096, 8192))] == [2048, 512, 2048, 8192]
  table = {"full": {"lcc@1-2k": 0.5, "lcc@2-4k": 0.4, "niah_single_1@2048": 1.0},
           "streaming": {"lcc@1-2k": 0.3, "lcc@2-4k": 0.2, "niah_single_1@2048": 0.0}}
  path = plots.scores_by_length(table, str(tmp_path / "s.png"))
  assert (tmp_path / "s.png").stat().st_size > 0 and path.endswith("s.png")
