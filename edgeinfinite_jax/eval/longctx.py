"""Long-context tasks from real local text, by the published protocols, and their runner.

All text is what every Python installation ships: CPython's standard library
sources and its ``.txt``/``.rst`` files (``corpus.stdlib_files``), and only the files
the corpus's hash split holds out: ``corpus.is_heldout(relative path,
heldout_fraction)`` at ``corpus.HELDOUT_FRACTION`` (``data.heldout_fraction``'s
default), through ``corpus.heldout_sources``. So no file an S-SFT or training run on
the embedded corpus read (at the same fraction) is evaluated on. Everything is
deterministic by ``seed``; every sample's tokens come from the tokenizer passed in.

* **LCC** (LongBench's code completion; THUDM/LongBench ``config/dataset2prompt.json``,
  ``dataset2maxlen.json``, ``pred.py``, ``metrics.py``): the prompt ``LCC_TEMPLATE``
  around the code of a held-out ``.py`` file up to a cut line, no chat template,
  greedy, 64 new tokens, an over-long prompt keeps its first and last ``max_len // 2``
  tokens (``longbench.truncate_middle``); scored by ``metrics.code_sim_score``
  (rapidfuzz's ratio of the first non-comment predicted line to the answer). The cut
  points are drawn so that the prompt falls in each length bin (default 1-2k, 2-4k,
  4-8k tokens), round-robin over the files that have one; the answer is the next
  non-empty line (its indentation kept: it is what the model should write; lines with
  `` ` ``, ``#`` or ``//`` are never answers, as the scorer skips such predicted lines).
  ``long_range`` marks a sample whose answer uses an identifier (no keyword or
  builtin) seen in the context only more than ``reach`` tokens back: local attention
  cannot copy it, only a memory can.
* **Beyond-window NLL** (PG19 style): per-token NLL (``Engine.score``) over the first
  ``length`` tokens of held-out documents (``.py`` sources and ``.txt``/``.rst``
  files) with at least that many tokens; a curve over position buckets and the mean
  past local reach (targets at positions > ``reach``), each as mean and standard
  error over documents.
* **RULER** (``ruler.py``): niah x 8, vt, cwe, fwe.
* ``run_suite``: every engine (one per method) through the public Engine only
  (``generate``/``prefill`` via ``passkey.engine_predictor``, ``score``): a method x
  task table with per-sample scores, mean and standard error, time to first token
  and state bytes per length (``passkey.cost_curve``), NLL curves; ``write_json``.

Bad input raises ConfigError naming the value and the rule before any model runs: a
bin with fewer samples than asked (not enough source text), fewer documents of the
asked length than asked, ``n <= 0``, an unknown task, an engine that cannot generate
a task's tokens or hold its longest prompt. On this Python (3.11) at the default
fraction, 25 files are held out; in SmolLM2's tokenizer only 3 of them reach 8192
tokens, so 20 NLL documents of 8k need a larger held-out fraction (one the training
also used) or fewer/shorter documents: the error says which.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import keyword
import math
import re
from typing import Collection, Mapping, NamedTuple, Sequence

import numpy as np
from tqdm.auto import tqdm

from edgeinfinite_jax.data import corpus
from edgeinfinite_jax.engine.engine import Engine
from edgeinfinite_jax.eval import longbench, metrics, passkey, ruler
from edgeinfinite_jax.model.config import ConfigError, require

LCC_TEMPLATE = "Please complete the code given below. \n{context}Next line of code:\n"
LCC_MAX_NEW_TOKENS = 64
LCC_BINS = ((1024, 2048), (2048, 4096), (4096, 8192))
NLL = "nll"
LCC = "lcc"
TASK_NAMES = (*sorted(ruler.TASKS), LCC, NLL)
# Names an answer line shares with everything: not evidence of long-range recall.
_COMMON_NAMES = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(
    dir(builtins)) | {"self", "cls"}
_IDENT = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")
_NOT_ANSWER = ("`", "#", "//")  # code_sim_score skips predicted lines with these


def _positive_int(key: str, v) -> None:
  require(isinstance(v, int) and not isinstance(v, bool) and v > 0, key, v,
          "must be a positive int")


def bin_name(lo: int, hi: int) -> str:
  return f"{lo // 1024}-{hi // 1024}k" if lo % 1024 == 0 == hi % 1024 else f"{lo}-{hi}"


# ----------------------------------------------------------------------------- LCC


class LccSample(NamedTuple):
  path: str            # the held-out stdlib file
  line: int            # index of the answer line in the file
  length: int          # prompt tokens before truncation (what the bins count)
  tokens: np.ndarray   # int32 prompt (after truncation)
  answer: str
  long_range: bool     # the answer needs an identifier last seen > reach tokens back
  identifier: str      # that identifier ("" if none)
  distance: int        # its tokens back from the answer (0 if none)


def lcc_sample(source: str, line: int, tokenizer, reach: int, *, path: str = "",
               max_len: int | None = None) -> LccSample:
  """The LCC sample that cuts ``source`` before line ``line`` (the answer).

  An identifier's distance is ``prompt tokens - tokens up to the end of its last
  occurrence in the context`` (``tasks.key_distance``'s convention), measured in the
  final prompt: with truncation, an occurrence in the dropped middle does not count.
  """
  lines = source.split("\n")
  answer = lines[line].rstrip()
  context = "".join(x + "\n" for x in lines[:line])
  head, tail = LCC_TEMPLATE.split("{context}")
  full = tokenizer.encode(head + context + tail)
  ids = full if max_len is None else longbench.truncate_middle(full, max_len)
  kept_head = len(head + context) + len(tail)  # chars before which text is kept (no cut)
  kept_tail = 0
  if len(ids) < len(full):  # chars kept at each end, as the kept tokens decode
    kept_head = len(tokenizer.decode(full[:max_len // 2]))
    kept_tail = len(head + context + tail) - len(tokenizer.decode(full[-(max_len // 2):]))
  best = ("", 0)
  for name in dict.fromkeys(_IDENT.findall(answer)):
    if name in _COMMON_NAMES:
      continue
    ends = [len(head) + m.end() for m in re.finditer(rf"\b{re.escape(name)}\b", context)]
    ends = [e for e in ends if e <= kept_head or (kept_tail and e > kept_tail)]
    if not ends:
      continue
    before = len(tokenizer.encode((head + context)[:ends[-1]]))
    # Tokens after it: in the kept tail as many as before truncation; from the kept
    # head the dropped middle no longer counts.
    distance = (len(full) if kept_tail and ends[-1] > kept_tail else len(ids)) - before
    if distance > best[1]:
      best = (name, distance)
  return LccSample(path, line, len(full), np.asarray(ids, np.int32), answer, best[1] > reach,
                   *best)


def _answer_lines(source: str) -> list[int]:
  return [i for i, x in enumerate(source.split("\n"))
          if i > 0 and x.strip() and not any(m in x for m in _NOT_ANSWER)]


def lcc_samples(tokenizer, reach: int, *, bins: Sequence[tuple[int, int]] = LCC_BINS,
                n: int = 30, seed: int = 0, max_len: int | None = None,
                heldout_fraction: float = corpus.HELDOUT_FRACTION,
                exclude: Collection[str] = ()) -> dict[str, list]:
  """``n`` LCC samples per bin ``[lo, hi)`` of prompt tokens, from held-out ``.py`` files
  (but the relative paths in ``exclude``, as for ``nll_documents``).

  Cut points are drawn round-robin over the files with a cut in the bin (a seeded file
  order, a seeded line per turn), so one long file does not fill a bin alone. A
  candidate line's prompt length is first estimated from per-line token counts, then
  measured; ConfigError when a bin runs out of candidates before ``n``.
  """
  _positive_int("n", n)
  for lo, hi in bins:
    require(0 < lo < hi, "bins", list(bins), "each bin must be (lo, hi) with 0 < lo < hi")
  head, tail = LCC_TEMPLATE.split("{context}")
  frame = len(tokenizer.encode(head + tail))
  files = [(p, s) for p, s in corpus.heldout_sources(heldout_fraction)
           if p.endswith(".py") and p not in frozenset(exclude)]
  # Estimated prompt tokens when cutting before each line.
  estimates = []
  for path, source in files:
    per_line = [len(tokenizer.encode(x + "\n", add_bos=False)) for x in source.split("\n")]
    estimates.append(frame + np.concatenate([[0], np.cumsum(per_line)]))
  out = {}
  for b, (lo, hi) in enumerate(bins):
    rng = np.random.default_rng([seed, b, 17])
    pools = []
    for f, (path, source) in enumerate(files):
      # 5% slack on the estimate: the measured length decides.
      lines = [i for i in _answer_lines(source) if 0.95 * lo <= estimates[f][i] < 1.05 * hi]
      if lines:
        pools.append((f, list(rng.permutation(lines))))
    pools = [pools[i] for i in rng.permutation(len(pools))]
    got: list[LccSample] = []
    while len(got) < n and any(p for _, p in pools):
      for f, pool in pools:
        while pool and len(got) < n:
          path, source = files[f]
          s = lcc_sample(source, int(pool.pop()), tokenizer, reach, path=path, max_len=max_len)
          if lo <= s.length < hi:
            got.append(s)
            break
    if len(got) < n:
      raise ConfigError(
          f"lcc bin {bin_name(lo, hi)}: {len(got)} samples from the {len(files)} held-out "
          f".py files (heldout_fraction={heldout_fraction}), n={n} asked: not enough source "
          "text for this bin")
    out[bin_name(lo, hi)] = got
  return out


# ----------------------------------------------------------------------------- NLL


class NllDocument(NamedTuple):
  path: str
  tokens: np.ndarray  # int32 [length]: the document's first ``length`` tokens


def nll_documents(tokenizer, *, n_docs: int = 20, length: int = 8192, seed: int = 0,
                  heldout_fraction: float = corpus.HELDOUT_FRACTION,
                  exclude: Collection[str] = ()) -> list[NllDocument]:
  """``n_docs`` held-out documents (.py, .txt, .rst) of >= ``length`` tokens, their first
  ``length`` tokens each, drawn in a seeded order; ConfigError when fewer exist.
  ``exclude``: relative paths never to use (``corpus.embedded_paths`` of a run made at
  another held-out fraction: what it trained on)."""
  _positive_int("n_docs", n_docs)
  _positive_int("length", length)
  require(length >= 2, "length", length, "must be >= 2 (a next token to score)")
  exclude = frozenset(exclude)
  sources = [(p, t) for p, t in corpus.heldout_sources(heldout_fraction) if p not in exclude]
  docs = []
  for path, text in sources:
    ids = tokenizer.encode(text)
    if len(ids) >= length:
      docs.append(NllDocument(path, np.asarray(ids[:length], np.int32)))
  if len(docs) < n_docs:
    raise ConfigError(
        f"n_docs={n_docs}: only {len(docs)} of the {len(sources)} held-out documents "
        f"(heldout_fraction={heldout_fraction}"
        + (f", {len(exclude)} paths excluded" if exclude else "")
        + f") have >= {length} tokens; must ask for at "
        "most that many, or a shorter length")
  order = np.random.default_rng([seed, 23]).permutation(len(docs))[:n_docs]
  return [docs[i] for i in order]


def _mean_se(x) -> dict:
  x = np.asarray(x, np.float64)
  se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
  return {"mean": float(x.mean()), "stderr": se, "n": int(len(x))}


def nll_curve(nll: np.ndarray, reach: int, bucket: int = 512) -> dict:
  """Per-token NLL ``[docs, T-1]`` (``Engine.score``; entry t scores token t + 1) ->
  ``{"buckets": [[start, end)], "nll": [mean/stderr over docs per bucket],
  "past_reach": ..., "within_reach": ...}``; position = the scored token's index."""
  nll = np.asarray(nll, np.float64)
  pos = np.arange(1, nll.shape[1] + 1)
  edges = list(range(0, int(pos[-1]) + 1, bucket)) + [int(pos[-1]) + 1]
  edges = sorted(set(edges))
  buckets, curve = [], []
  for a, b in zip(edges[:-1], edges[1:]):
    m = (pos >= a) & (pos < b)
    if m.any():
      buckets.append([a, b])
      curve.append(_mean_se(nll[:, m].mean(1)))
  past = pos > reach
  return {"buckets": buckets, "nll": curve, "reach": int(reach),
          "past_reach": _mean_se(nll[:, past].mean(1)) if past.any() else None,
          # per document, for paired comparisons between methods on the same documents
          "past_reach_docs": nll[:, past].mean(1).tolist() if past.any() else None,
          "within_reach": _mean_se(nll[:, ~past].mean(1))}


def score_documents(engine, docs: Sequence[NllDocument]) -> np.ndarray:
  """``Engine.score`` of every document, ``Scenario.batch_size`` at a time (a short last
  batch padded with copies of its first row, which are dropped): ``[docs, T-1]``."""
  b = engine.scenario.batch_size
  tokens = np.stack([d.tokens for d in docs])
  out = []
  for i in range(0, len(tokens), b):
    chunk = tokens[i:i + b]
    pad = np.repeat(chunk[:1], b - len(chunk), 0)
    out.append(engine.score(np.concatenate([chunk, pad]))[:len(chunk)])
  return np.concatenate(out)


# ----------------------------------------------------------------------------- methods

BASELINES = ("full", "streaming", "h2o", "snapkv")


def kept_for_bytes(config, params, scenario, state_bytes: int) -> int:
  """The largest ``n_kept`` at which an evicting ``config``'s long-route state is at most
  ``state_bytes`` (its bytes grow linearly in ``n_kept``: keys, values, position, score)."""
  at = lambda n: Engine(config, params, dataclasses.replace(scenario, n_kept=n)).state_bytes()
  one, per = at(1), at(2) - at(1)
  require(state_bytes >= one, "state_bytes", state_bytes,
          f"must be >= {one:,}, the state of {config.memory.attention_type} at n_kept=1")
  return 1 + (state_bytes - one) // per


def method_engines(base_config, base_params, scenario, sets: Mapping[str, tuple], *,
                   baselines: Sequence[str] = BASELINES, state_bytes: int | None = None
                   ) -> tuple[dict, dict]:
  """The suite's methods at equal state bytes -> ``({method: Engine}, {method: info})``.

  ``sets``: label -> (model config, params) of trained ``edgeinfinite`` sets; those of
  one config share one Engine (``with_params``: one compilation). The baselines run
  the base model with the first set's memory settings (its RoPE positions; the
  Scenario gives segment, sink and window): ``full`` on a cache of
  ``scenario.max_context``, ``streaming`` with no memory, and ``h2o`` / ``snapkv``
  with the largest ``n_kept`` whose state is at most ``state_bytes`` (default: the
  first set's long-route state). ``info``: state bytes and, for evicting ones, n_kept.
  """
  for b in baselines:
    require(b in BASELINES, "baseline", b, f"must be one of {list(BASELINES)}")
  memory = (next(iter(sets.values()))[0] if sets else base_config).memory
  shared, engines = {}, {}
  for label, (mc, params) in sets.items():
    if mc not in shared:
      shared[mc] = Engine(mc, params, scenario)
    engines[label] = shared[mc].with_params(params)
  if state_bytes is None:
    require(bool(sets), "state_bytes", state_bytes,
            "must be given when no trained set fixes the budget")
    state_bytes = next(iter(engines.values())).state_bytes()
  info = {}
  for b in baselines:
    # n_kept 1 only satisfies the evicting types' config rule; the Scenario sets it.
    mc = base_config.replace(memory=dataclasses.replace(
        memory, attention_type=b, n_kept=1 if b in ("h2o", "snapkv") else memory.n_kept))
    sc = scenario
    if mc.memory.evicts:
      sc = dataclasses.replace(scenario, n_kept=kept_for_bytes(mc, base_params, scenario,
                                                               state_bytes))
      info[b] = {"n_kept": sc.n_kept}
    engines[b] = Engine(mc, base_params, sc)
  ordered = {b: engines[b] for b in baselines} | {k: engines[k] for k in sets}
  for method, engine in ordered.items():
    info.setdefault(method, {})["state_bytes"] = engine.state_bytes()
  return ordered, info


def paired_difference(values, reference) -> dict:
  """Per-sample ``values - reference`` (the same samples, in order): mean, standard error,
  and how many samples are worse (for NLL: higher)."""
  d = np.asarray(values, np.float64) - np.asarray(reference, np.float64)
  return {**_mean_se(d), "above": int((d > 0).sum()), "below": int((d < 0).sum())}


# ----------------------------------------------------------------------------- runner


class _Item(NamedTuple):
  cell: str            # "task@length" or "lcc@bin"
  tokens: np.ndarray
  max_new_tokens: int
  score: object        # prediction -> float in [0, 1]
  long_range: bool | None


def _items(tasks, tokenizer, lengths, n, seed, reach, heldout_fraction, lcc_bins, max_len,
           exclude):
  items = []
  for task in tasks:
    if task in ruler.TASKS:
      for length in lengths:
        for s in ruler.samples(task, tokenizer, int(length), n, seed,
                               heldout_fraction=heldout_fraction):
          items.append(_Item(f"{task}@{length}", s.tokens, s.max_new_tokens,
                             lambda p, a=s.answers: ruler.string_match_all(p, a), None))
    elif task == LCC:
      for name, group in lcc_samples(tokenizer, reach, bins=lcc_bins, n=n, seed=seed,
                                     max_len=max_len, heldout_fraction=heldout_fraction,
                                     exclude=exclude).items():
        for s in group:
          items.append(_Item(f"lcc@{name}", s.tokens, LCC_MAX_NEW_TOKENS,
                             lambda p, a=s.answer: metrics.code_sim_score(p, a),
                             s.long_range))
  return items


def _check_engine(method, engine, items, docs) -> None:
  """What would fail mid-run, refused before anything runs."""
  need = max((it.max_new_tokens for it in items), default=1)
  require(engine.scenario.max_new_tokens >= need, f"{method}: Scenario.max_new_tokens",
          engine.scenario.max_new_tokens, f"must be >= {need} (the tasks' tokens to generate)")
  for it in items:
    t = len(it.tokens)
    cap = engine.capacity(engine.route_for(t))
    require(cap is None or t + it.max_new_tokens - 1 <= cap, f"{method}: {it.cell} prompt", t,
            f"plus {it.max_new_tokens} new tokens must fit the cache capacity {cap}")
  for d in docs:
    cap = engine.capacity(engine.route_for(len(d.tokens)))
    require(cap is None or len(d.tokens) <= cap, f"{method}: nll document {d.path}",
            len(d.tokens), f"tokens must fit the cache capacity {cap}")


def run_suite(engines: Mapping[str, object], tokenizer, lengths: Sequence[int] = (2048, 4096,
              8192), n: int = 30, seed: int = 0, *, tasks: Sequence[str] = TASK_NAMES,
              reach: int | None = None, lcc_bins: Sequence[tuple[int, int]] = LCC_BINS,
              max_len: int | None = None, nll_docs: int = 20, nll_length: int = 8192,
              bucket: int = 512, heldout_fraction: float = corpus.HELDOUT_FRACTION,
              exclude: Collection[str] = (), out: str | None = None,
              progress: bool = True) -> dict:
  """Every task for every method (``engines``: method -> Engine).

  ``n`` samples per RULER (task, length) cell and per LCC bin; ``reach`` (default:
  ``passkey.local_reach`` of the first engine's Scenario) sets the LCC ``long_range``
  flag and the NLL split; ``exclude``: relative paths no LCC sample or NLL document
  comes from (what a set trained on at another held-out fraction). All samples and
  documents are built, and every engine checked against them, before any model runs.
  With a ``streaming`` method, every cell and the NLL past reach also get
  ``vs_streaming``, the paired difference on the same samples. Returns (and with
  ``out`` writes as JSON)::

    {"config": {...}, "table": {method: {cell: mean}},
     "methods": {method: {"cells": {cell: {"scores", "mean", "stderr", "n",
                                           "long_range" (lcc: the flagged subset),
                                           "vs_streaming"}},
                          "cost": passkey.cost_curve(...), "nll": nll_curve(...)}}}

  Scores are fractions in [0, 1] (LongBench and RULER report x100).
  """
  _positive_int("n", n)
  for t in tasks:
    require(t in TASK_NAMES, "task", t, f"must be one of {list(TASK_NAMES)}")
  require(len(engines) > 0, "engines", dict(engines), "must name at least one method")
  for length in lengths:
    _positive_int("length", length)
  first = next(iter(engines.values())).scenario
  reach = passkey.local_reach(first.segment_len, first.n_window) if reach is None else reach
  items = _items(tasks, tokenizer, lengths, n, seed, reach, heldout_fraction, lcc_bins, max_len,
                 exclude)
  docs = (nll_documents(tokenizer, n_docs=nll_docs, length=nll_length, seed=seed,
                        heldout_fraction=heldout_fraction, exclude=exclude)
          if NLL in tasks else [])
  for method, engine in engines.items():
    _check_engine(method, engine, items, docs)
  nominal = sorted({int(x) for x in lengths} | {hi for _, hi in lcc_bins})
  result = {"config": {"lengths": [int(x) for x in lengths], "n": n, "seed": seed,
                       "tasks": list(tasks), "reach": int(reach),
                       "split": f"corpus.is_heldout(stdlib path, {heldout_fraction})",
                       "excluded": len(frozenset(exclude)),
                       "lcc_bins": [list(b) for b in lcc_bins], "max_len": max_len,
                       "nll_docs": [d.path for d in docs], "nll_length": nll_length},
            "table": {}, "methods": {}}
  for method, engine in engines.items():
    b = engine.scenario.batch_size
    timings: dict = {}
    # Compile both routes' steps first, so no timed prefill counts a compilation.
    for t in (1, engine.scenario.short_threshold + 1):
      engine.generate(np.zeros((b, t), np.int32), 1)
    cells: dict[str, dict] = {}
    for it in tqdm(items, desc=method, disable=not progress, dynamic_ncols=True):
      predict = passkey.engine_predictor(engine, tokenizer, it.max_new_tokens, timings)
      pred = predict(np.repeat(it.tokens[None], b, 0))[0]  # copies fill the batch
      cell = cells.setdefault(it.cell, {"scores": [], "flags": []})
      cell["scores"].append(float(it.score(pred)))
      cell["flags"].append(it.long_range)
    summary = {}
    for name, cell in cells.items():
      summary[name] = {"scores": cell["scores"], **_mean_se(cell["scores"])}
      if cell["flags"][0] is not None:
        flagged = [s for s, f in zip(cell["scores"], cell["flags"]) if f]
        summary[name]["long_range"] = _mean_se(flagged) if flagged else None
    entry = {"cells": summary}
    if timings:
      entry["cost"] = passkey.cost_curve(timings, engine, nominal,
                                         grows_with_length=engine.capacity("long") is not None)
    if docs:
      entry["nll"] = nll_curve(score_documents(engine, docs), reach, bucket)
    result["methods"][method] = entry
    result["table"][method] = {k: v["mean"] for k, v in summary.items()}
  _pair_with(result["methods"], "streaming")
  if out is not None:
    write_json(result, out)
  return result


def _pair_with(methods: dict, ref: str) -> None:
  """Each method's paired difference to ``ref`` on the same samples (``"vs_<ref>"`` in
  every cell, and in the NLL past reach): what separates two methods, not their
  spreads over samples."""
  if ref not in methods:
    return
  base = methods[ref]
  for entry in methods.values():
    for name, cell in entry["cells"].items():
      cell[f"vs_{ref}"] = paired_difference(cell["scores"], base["cells"][name]["scores"])
    if entry.get("nll") and entry["nll"]["past_reach_docs"] is not None:
      entry["nll"][f"vs_{ref}"] = paired_difference(entry["nll"]["past_reach_docs"],
                                                    base["nll"]["past_reach_docs"])


def markdown_table(result: dict) -> str:
  """``run_suite``'s result as one method x task table: scores x100 (mean ± standard
  error over samples; LCC's long-range subset beside it), the NLL past reach with its
  paired difference to ``streaming``, state bytes (``full``: at the longest prompt) and
  the median time to first token at each length."""
  methods = result["methods"]
  cells = sorted({c for m in methods.values() for c in m["cells"]})
  lcc = [c for c in cells if c.startswith(f"{LCC}@")]
  has_nll = any(m.get("nll") for m in methods.values())
  some_cost = next((m["cost"] for m in methods.values() if m.get("cost")), None)
  lengths = some_cost["lengths"] if some_cost else []
  head = (["method"] + cells + [f"{c} long-range" for c in lcc]
          + (["NLL past reach (vs streaming)"] if has_nll else [])
          + ["state bytes"] + [f"TTFT {n}" for n in lengths])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  pct = lambda c: "—" if c is None else f"{100 * c['mean']:.1f} ± {100 * c['stderr']:.1f}"
  for method, m in methods.items():
    row = [method] + [pct(m["cells"].get(c)) for c in cells]
    row += [pct(m["cells"][c].get("long_range")) if c in m["cells"] else "—" for c in lcc]
    if has_nll:
      n = m.get("nll")
      d = (n or {}).get("vs_streaming")
      row.append("—" if not n else f"{n['past_reach']['mean']:.3f}" + (
          f" ({d['mean']:+.3f} ± {d['stderr']:.3f})" if d and method != "streaming" else ""))
    cost = m.get("cost") or {}
    row.append(f"{cost['kv_bytes'][-1]:,}" if cost else "—")
    row += [f"{t:.2f} s" for t in cost.get("ttft_s", [])] or ["—"] * len(lengths)
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
