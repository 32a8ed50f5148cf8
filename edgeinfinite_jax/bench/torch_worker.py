"""The external reference: the benchmark's weights as a ``transformers`` PyTorch model.

One process per (context length, prefill or not), like the engine's
(``workers.py``): ``AutoModelForCausalLM.from_pretrained(checkpoint,
attn_implementation="sdpa")`` in float32, warmed up on one segment, then
``model(input_ids, use_cache=True, logits_to_keep=1)`` -- what ``generate`` does
for its prefill -- timed and memory-measured, then single-token decode steps with
the returned ``past_key_values``.

The launcher (``probes.worker_command``) runs this file by path,
``python .../bench/torch_worker.py JOB_JSON``, not with ``-m``: the package's
``__init__`` imports JAX and Flax, which would count in this process's peak RSS.
So this module imports no JAX and nothing of the package but the stdlib-only
``measure``; torch and transformers are imported inside the functions that use
them (they are optional: the ``test`` extra).
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from typing import Any

import numpy as np

if __package__:  # imported as edgeinfinite_jax.bench.torch_worker
  from edgeinfinite_jax.bench import measure
else:  # run by file path (the launcher's way): the sibling module, without the package
  import measure


def _load(job: dict):
  """The model in float32 with SDPA attention, and the forward's keep-one-logit kwarg."""
  import torch  # optional (the test extra): only this worker's process needs it
  import transformers  # optional (the test extra), as torch
  torch.set_num_threads(job["threads"])
  major = int(transformers.__version__.split(".")[0])
  dtype_kw = "dtype" if major >= 5 else "torch_dtype"
  model = transformers.AutoModelForCausalLM.from_pretrained(
      job["checkpoint"], attn_implementation="sdpa", **{dtype_kw: torch.float32}).eval()
  fwd = inspect.signature(model.forward).parameters
  keep = ({"logits_to_keep": 1} if "logits_to_keep" in fwd else
          {"num_logits_to_keep": 1} if "num_logits_to_keep" in fwd else {})
  return model, keep


def _tokens(rng, vocab: int, shape):
  import torch  # optional (the test extra): only this worker's process needs it
  return torch.from_numpy(rng.integers(0, vocab, shape, dtype=np.int64))


def _cache_nbytes(cache) -> int:
  total = 0
  layers = getattr(cache, "layers", None)
  if layers is not None:
    for layer in layers:
      for name in ("keys", "values"):
        t = getattr(layer, name, None)
        if t is not None and hasattr(t, "nbytes"):
          total += t.nbytes
    return total
  for name in ("key_cache", "value_cache"):
    total += sum(t.nbytes for t in getattr(cache, name, []) if hasattr(t, "nbytes"))
  return total


def _synthetic_cache(model, length: int):
  """A KV cache of ``length`` random tokens: a decode step's cost does not depend on them."""
  import torch  # optional (the test extra): only this worker's process needs it
  import transformers  # optional (the test extra), as torch
  cfg = model.config
  kv = cfg.num_key_value_heads
  hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  try:
    cache = transformers.DynamicCache(config=cfg)
  except TypeError:
    cache = transformers.DynamicCache()
  for i in range(cfg.num_hidden_layers):
    cache.update(torch.randn(1, kv, length, hd), torch.randn(1, kv, length, hd), i)
  return cache


def _read_again(model, keep: dict, tokens) -> float:
  return measure.timed(lambda: float(model(tokens, use_cache=True, **keep).logits[:, -1].sum()))


def _prefill(model, keep: dict, tokens, repeats: int, repeat_below_s: float | None = None):
  """The first read, memory-measured, then the repeats: (row fields, cache, memory window)."""
  import torch  # optional (the test extra): only this worker's process needs it
  with measure.MemoryWindow() as mem:
    t0 = time.perf_counter()
    o = model(tokens, use_cache=True, **keep)
    logits = o.logits[:, -1]
    first = time.perf_counter() - t0
  out = mem.result()
  out["finite"] = bool(torch.isfinite(logits).all())
  cache = o.past_key_values
  del o
  out.update(measure.best_of(first, functools.partial(_read_again, model, keep, tokens),
                             repeats, repeat_below_s))
  return out, cache, mem


def _decode(model, cache, toks, warmup: int) -> dict:
  """Single-token steps on ``cache``; statistics of those after ``warmup``."""
  times = []
  for i in range(toks.shape[0]):
    t0 = time.perf_counter()
    o = model(toks[i], past_key_values=cache, use_cache=True)
    cache = o.past_key_values
    _ = o.logits[:, -1].float().sum().item()
    times.append(time.perf_counter() - t0)
  return measure.decode_stats(times[warmup:])


def forward_worker(job: dict) -> dict:
  """The reference for the training-path forward: ``model(input_ids, use_cache=False)``
  with every position's logits, read once untimed (as the JAX side compiles on the
  same shape), then ``repeats`` times, the first inside a memory window."""
  import torch  # optional (the test extra): only this worker's process needs it
  model, _ = _load(job)
  tokens = _tokens(np.random.default_rng(job["seed"]), model.config.vocab_size,
                   (1, job["length"]))

  def run():
    float(model(tokens, use_cache=False).logits[0, -1, 0])

  with torch.inference_mode():
    out = dict(method="transformers", length=job["length"], warmup_s=measure.timed(run),
               threads=torch.get_num_threads())
    out.update(measure.timed_reads(run, job["repeats"], job.get("repeat_below_s")))
  return out


def torch_worker(job: dict) -> dict:
  """One reference measurement (``job`` as ``probes.job_for`` builds it)."""
  import torch  # optional (the test extra): only this worker's process needs it
  model, keep = _load(job)
  length = job["length"]
  L = job["scenario"]["segment_len"]
  rng = np.random.default_rng(job["seed"])
  vocab = model.config.vocab_size
  out: dict[str, Any] = dict(method=job["method"], length=length, compile_s=None,
                             logits_to_keep=bool(keep), threads=torch.get_num_threads())
  mem = None
  with torch.inference_mode():
    warm = _tokens(rng, vocab, (1, min(L, length)))
    t0 = time.perf_counter()
    o = model(warm, use_cache=True, **keep)
    o = model(warm[:, :1], past_key_values=o.past_key_values, use_cache=True)
    out["warmup_s"] = time.perf_counter() - t0
    del o
    if job["prefill"]:
      prefill, cache, mem = _prefill(model, keep, _tokens(rng, vocab, (1, length)),
                                     job["repeats"], job.get("repeat_below_s"))
      out.update(prefill)
    else:
      cache = _synthetic_cache(model, length)
      out["synthetic_state"] = True
    out["state_bytes"] = _cache_nbytes(cache)
    if job["decode_steps"]:
      n_decode = job["decode_warmup"] + job["decode_steps"]
      out.update(_decode(model, cache, _tokens(rng, vocab, (n_decode, 1, 1)),
                         job["decode_warmup"]))
      out["decode_context"] = length
  out["peak_rss_mib"] = measure.process_peak_mib(mem)
  return out


if __name__ == "__main__":
  sys.exit(measure.serve(sys.argv[1], {"torch": torch_worker, "torch_forward": forward_worker}))
