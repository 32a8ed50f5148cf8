"""Passkey retrieval of a real pretrained model through the ``Engine``.

    .venv/bin/python experiments/passkey_smollm2.py --attention=full \\
        --lengths=1024,2048,4096 --depths=0.1,0.5,0.9 --samples=4

Infini-attention's raw passkey format (preamble, filler, "The pass key is N.
Remember it. N is the pass key.", filler, "What is the pass key? The pass key
is"), a 5-digit key, greedy decoding of ``--new-tokens`` tokens, exact match of
the whole key (``metrics.passkey_accuracy``). Prints a markdown table (length x
depth) and writes the numbers to ``--out`` (JSON).

``full`` gets one engine per length whose KV cache holds exactly that prompt
plus the new tokens (its fixed-shape cache is attended in full every step, so a
cache sized for the longest prompt would slow the short ones). ``streaming`` and
``edgeinfinite`` use the sink/window/segment flags and one engine for all
lengths; for them ``--min-distance`` (default: window + segment) asserts per
sample that the key lies outside what local attention can see.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from edgeinfinite_jax.engine import engine as engine_lib
from edgeinfinite_jax.eval import passkey as evaluate
from edgeinfinite_jax.cli import generate
from edgeinfinite_jax.checkpoints import models


def _floats(s):
  return [float(x) for x in s.split(",")]


def _ints(s):
  return [int(x) for x in s.split(",")]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="smollm2")
  p.add_argument("--attention", default="full", choices=("full", "streaming", "edgeinfinite"))
  p.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096])
  p.add_argument("--depths", type=_floats, default=[0.1, 0.5, 0.9])
  p.add_argument("--samples", type=int, default=4, help="prompts per (length, depth) cell")
  p.add_argument("--new-tokens", type=int, default=8, help="digits are single tokens: 5 + slack")
  p.add_argument("--segment", type=int, default=256)
  p.add_argument("--window", type=int, default=256)
  p.add_argument("--sink", type=int, default=4)
  p.add_argument("--gate", default=None, help="trained gate (.npz), edgeinfinite only")
  p.add_argument("--rope-positions", default="cache_relative",
                 choices=("cache_relative", "absolute"))
  p.add_argument("--min-distance", type=int, default=None)
  p.add_argument("--seed", type=int, default=1234)
  p.add_argument("--out", default=None, help="JSON file for the results")
  a = p.parse_args(argv)

  t0 = time.perf_counter()
  config, params, tokenizer = models.load(a.model)

  def scenario(max_context):
    return engine_lib.Scenario(segment_len=a.segment, n_sink=a.sink, n_window=a.window,
                               batch_size=1, max_new_tokens=a.new_tokens,
                               short_threshold=a.segment, max_context=max_context)

  rows = []
  if a.attention == "full":
    for n in a.lengths:
      sc = scenario(-(-(n + a.new_tokens) // a.segment) * a.segment)
      eng = generate.build_engine(config, params, "full", sc)
      rows.append(evaluate.passkey_grid(evaluate.engine_predictor(eng, tokenizer, a.new_tokens),
                                        tokenizer, [n], a.depths, a.samples, seed=a.seed,
                                        desc=f"full {n}"))
  else:
    eng = generate.build_engine(config, params, a.attention, scenario(8192),  # (unused)
                                gate_path=a.gate, rope_positions=a.rope_positions)
    reach = a.min_distance if a.min_distance is not None else evaluate.local_reach(
        a.segment, a.window)
    predict = evaluate.engine_predictor(eng, tokenizer, a.new_tokens)
    rows = [evaluate.passkey_grid(predict, tokenizer, [n], a.depths, a.samples, seed=a.seed,
                                  reach=reach, desc=f"{a.attention} {n}") for n in a.lengths]
  acc = [r["accuracy"][0] for r in rows]
  result = {"model": a.model, "attention": a.attention, "lengths": a.lengths,
            "depths": a.depths, "samples": a.samples, "accuracy": acc,
            "examples": {k: v for r in rows for k, v in r["examples"].items()},
            "segment": a.segment, "window": a.window, "sink": a.sink, "gate": a.gate,
            "rope_positions": a.rope_positions,
            "wall_s": time.perf_counter() - t0, "devices": str(jax.devices()[0])}
  head = "| length | " + " | ".join(f"depth {d:.0%}" for d in a.depths) + " | all |"
  lines = [head, "|---" * (len(a.depths) + 2) + "|"]
  for n, row in zip(a.lengths, acc):
    hits = [round(x * a.samples) for x in row]
    lines.append(f"| {n} | " + " | ".join(f"{h}/{a.samples}" for h in hits)
                 + f" | {sum(hits)}/{a.samples * len(row)} |")
  print("\n".join(lines))
  print(f"{a.attention}, {a.samples} prompts per cell, wall {result['wall_s']:.0f} s")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
