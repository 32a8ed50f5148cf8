"""Long-context evaluation through the fixed-shape Engine.

* ``passkey_grid``: passkey retrieval accuracy on a grid of lengths x depths
  (reference §9). Every sample's key lies provably outside the local reach
  (sink + window + current segment: ``key_distance > n_window + segment_len``),
  so only the memory can find it; a cell whose key would be closer raises
  (pick smaller depths or longer lengths). The answer is a greedy
  ``Engine.generate`` of as many tokens as the answer has, scored by
  ``metrics.passkey_accuracy`` (exact: the first number equals the key).
* ``predictor``s are functions ``prompts [B, T] int32 -> list of B strings``;
  ``engine_predictor`` wraps an Engine, ``oracle_predictor`` reads the key out
  of the prompt text (a known-perfect reference: 100%) and
  ``constant_predictor`` always answers the same number (a guesser: ~0%).
* ``cost_curve``: time to first token and engine state bytes against prompt
  length, from the timed prefills of the evaluated prompts
  (``engine_predictor(..., timings=...)``).

Samples of one cell share one length (passkey pieces have fixed token counts
for the byte tokenizer, so only the key's depth differs), so a cell runs as
batches of ``Scenario.batch_size`` rows; a last short batch is padded with
copies of its first row and the copies are not scored.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from edgeinfinite_jax.eval import metrics
from edgeinfinite_jax.data import tasks
import jax.numpy as jnp
import jax
from edgeinfinite_jax.engine.engine import state_nbytes

Predictor = Callable[[np.ndarray], list]


# ----------------------------------------------------------------------------- predictors


def engine_predictor(engine, tokenizer, max_new_tokens: int, timings: dict | None = None
                     ) -> Predictor:
  """Greedy Engine.generate of up to ``max_new_tokens`` tokens, decoded to text up to the
  tokenizer's EOS (the loop stops once every row has produced it).

  With a ``timings`` dict, each call also records ``(seconds, state bytes)`` of its
  prefill under the prompt length: the prompt but its last token is read by a timed
  ``prefill`` and ``generate`` continues from that state (the same work and the
  same answer as one ``generate``, to within one token of prefill), so the cost
  curve comes from the evaluated prompts themselves (``cost_curve``). Compile the
  engine's steps before timing (one short ``generate``): a first call would count
  its compilation.
  """

  def predict(prompts):
    prompts = np.asarray(prompts, np.int32)
    if timings is None:
      out = engine.generate(prompts, max_new_tokens, eos_id=tokenizer.eos_id)
    else:
      t0 = time.perf_counter()
      state, logits = engine.prefill(prompts[:, :-1])
      jax.block_until_ready(logits)
      timings.setdefault(prompts.shape[1], []).append(
          (time.perf_counter() - t0, state_nbytes(state)))
      out = engine.generate(prompts[:, -1:], max_new_tokens, state=state,
                            eos_id=tokenizer.eos_id)  # stops once every row has ended
    texts = []
    for row in out:
      ids = [int(t) for t in row]
      if tokenizer.eos_id is not None and tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
      texts.append(tokenizer.decode(ids))
    return texts

  return predict


def oracle_predictor(tokenizer) -> Predictor:
  """Reads "The pass key is N." from the prompt itself: always right."""
  pattern = re.compile(r"The pass key is (\d+)\.")

  def predict(prompts):
    out = []
    for row in np.asarray(prompts):
      m = pattern.search(tokenizer.decode([int(t) for t in row]))
      out.append(" " + m.group(1) if m else "")
    return out

  return predict


def constant_predictor(answer: str = "12345") -> Predictor:
  """Always the same answer (what a model without access to the key can do at best)."""
  return lambda prompts: [" " + answer] * len(prompts)


# ----------------------------------------------------------------------------- passkey grid


def local_reach(segment_len: int, n_window: int) -> int:
  """Tokens before the answer that local attention can still see (sink aside)."""
  return n_window + segment_len


def passkey_cell(tokenizer, length: int, depth: float, n: int, seed: int, *, digits: int = 5,
                 reach: int | None = None, same_length: bool = True, first: int = 0) -> list:
  """``n`` passkey samples of one (length, depth) cell, sample indices ``first`` ..
  ``first + n - 1`` of ``seed`` (the index draws the key); asserts the key is out of
  reach and, with ``same_length`` (batched evaluation), that the prompts have one length."""
  samples = [tasks.passkey(tokenizer, length, depth, seed, first + i, digits=digits)
             for i in range(n)]
  if reach is not None:
    for s in samples:
      d = tasks.key_distance(s)
      if d <= reach:
        raise ValueError(
            f"passkey length={length} depth={depth}: the key ends {d} tokens before the "
            f"answer, inside the local reach of {reach} tokens (window + segment), so it "
            "would test local attention, not memory; use a smaller depth or a longer length")
  if same_length and len({s.prompt_len for s in samples}) != 1:
    raise ValueError(f"passkey length={length}: samples of one cell differ in prompt length "
                     f"({sorted({s.prompt_len for s in samples})}); the tokenizer is not "
                     "length-stable, evaluate with batch_size=1")
  return samples


def score_cell(predict: Predictor, samples, batch_size: int) -> tuple[float, list[str]]:
  """Mean passkey accuracy of ``predict`` over ``samples`` (batched), and the predictions."""
  preds = []
  for i in range(0, len(samples), batch_size):
    chunk = samples[i:i + batch_size]
    prompts = np.stack([s.tokens[:s.prompt_len] for s in chunk])
    if len(chunk) < batch_size:  # pad the batch with copies; they are not scored
      prompts = np.concatenate([prompts, np.repeat(prompts[:1], batch_size - len(chunk), 0)])
    preds += list(predict(prompts))[:len(chunk)]
  acc = [metrics.passkey_accuracy(p, s.answer) for p, s in zip(preds, samples)]
  return float(np.mean(acc)), preds


def passkey_grid(predict: Predictor, tokenizer, lengths: Sequence[int], depths: Sequence[float],
                 n_samples: int, *, seed: int = 1234, digits: int = 5, reach: int | None = None,
                 batch_size: int = 1, desc: str = "passkey", progress: bool = True) -> dict:
  """Accuracy per (length, depth) cell.

  Every cell draws its own keys (sample indices run on across cells): one key
  repeated over the grid would let a constant answer score.

  Returns ``{"lengths", "depths", "accuracy": [[len x depth]], "by_length": [...],
  "mean", "examples": {cell: (answer, prediction)}}``.
  """
  acc = np.zeros((len(lengths), len(depths)))
  examples = {}
  cells = [(i, j) for i in range(len(lengths)) for j in range(len(depths))]
  for i, j in tqdm(cells, desc=desc, disable=not progress, dynamic_ncols=True):
    samples = passkey_cell(tokenizer, int(lengths[i]), float(depths[j]), n_samples, seed,
                           digits=digits, reach=reach, same_length=batch_size > 1,
                           first=(i * len(depths) + j) * n_samples)
    acc[i, j], preds = score_cell(predict, samples, batch_size)
    examples[f"{lengths[i]}@{depths[j]}"] = [samples[0].answer, preds[0]]
  return {"lengths": [int(x) for x in lengths], "depths": [float(d) for d in depths],
          "accuracy": acc.tolist(), "by_length": acc.mean(1).tolist(),
          "mean": float(acc.mean()), "examples": examples}


# ----------------------------------------------------------------------------- cost


def kv_bytes_per_token(config) -> int:
  """Bytes one token occupies in a KV cache (all layers, K and V)."""
  item = jnp.dtype(config.dtype).itemsize
  return 2 * config.num_layers * config.num_kv_heads * config.head_dim * item


def nominal_length(n: int, lengths: Sequence[int]) -> int:
  """The first of ``lengths`` a prompt of ``n`` tokens does not exceed (the samples of a
  nominal length fall a few tokens short of it, by tokenizer)."""
  nominal = min((x for x in lengths if x >= n), default=None)
  if nominal is None:
    raise ValueError(f"a timed prompt of {n} tokens is longer than every "
                     f"length of {sorted(lengths)}")
  return nominal


def cost_curve(timings: dict, engine, lengths: Sequence[int], *,
               grows_with_length: bool = False) -> dict:
  """``engine_predictor``'s ``timings`` -> time to first token and state bytes per length.

  A prompt counts for the first of ``lengths`` it does not exceed (the samples of a
  nominal length fall a few tokens short of it, by tokenizer). ``ttft_s`` is the
  median over the prompts of a length (their spread in
  ``ttft_spread_s``: min, max); ``state_bytes`` is what the engine allocates (fixed by
  the Scenario); with ``grows_with_length`` (full attention), ``kv_bytes`` is the KV
  a cache holding exactly the prompt needs, which is what grows with length.
  """
  b = engine.scenario.batch_size
  per_token = kv_bytes_per_token(engine.route_configs["long"])
  out = {"lengths": [], "ttft_s": [], "ttft_spread_s": [], "state_bytes": [], "kv_bytes": [],
         "prompts": []}
  by_length = {}
  for n, runs in timings.items():
    by_length.setdefault(nominal_length(n, lengths), []).extend(runs)
  for n in sorted(by_length):
    times = [t for t, _ in by_length[n]]
    state = by_length[n][0][1]
    out["lengths"].append(int(n))
    out["ttft_s"].append(float(np.median(times)))
    out["ttft_spread_s"].append([float(min(times)), float(max(times))])
    out["state_bytes"].append(int(state))
    out["kv_bytes"].append(per_token * b * int(n) if grows_with_length else int(state))
    out["prompts"].append(len(times))
  return out
