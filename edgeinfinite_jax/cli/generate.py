"""Ask a question about a long text file, from the command line, through the ``Engine``.

    python -m edgeinfinite_jax.cli.generate --model=smollm2 --attention=edgeinfinite \\
        --file=long.txt --question="Who wrote it?" [--max-new-tokens 64] [--scenario qa]

The document and the question go into the model's chat template as one user
turn (the raw text if the tokenizer has no template); the answer streams token by
token; then time to first token, decode speed and the engine state's bytes are
printed. ``--attention``:

* ``full``: the base model over an ordinary KV cache sized to the prompt (the
  reference; its state grows with the prompt, and past the model's trained
  context, 8192 for SmolLM2, it degrades);
* ``streaming``: sink + window of the scenario, nothing else (constant state);
* ``edgeinfinite``: sink + window + the compressive memory and gate of
  ``with_memory`` (constant state). ``--gate`` loads gate parameters trained by
  S-SFT (an ``.npz`` written by ``save_gate``); without it the gate keeps its
  initialisation (memory nearly off), so it answers like ``streaming``.

``--rope-positions`` (segmented kinds): ``cache_relative`` (the default here, as
in StreamingLLM) numbers the visible cache [sink; window; segment] from 0, so a
30k-token document never shows the model a position beyond its trained context;
``absolute`` keeps token indices (past 8192 SmolLM2 then sees positions it was
never trained on, and answers with newlines).

The step functions are compiled on a short warm-up prompt first, so the reported
time to first token is the prefill of the real prompt, not XLA's compile time
(reported separately).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence, TextIO

import jax
import numpy as np

from edgeinfinite_jax.engine import engine as engine_lib
from edgeinfinite_jax.model import gate as gate_lib
from edgeinfinite_jax.checkpoints import models
from edgeinfinite_jax.model.config import ATTENTION_TYPES, ROPE_POSITIONS

SCENARIOS = tuple(sorted(engine_lib.SCENARIOS))


def prompt_ids(tokenizer, document: str, question: str) -> list[int]:
  """The document and question as one user turn in the model's chat format."""
  text = f"{document.strip()}\n\n{question.strip()}"
  if getattr(tokenizer, "chat_template", None):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}])
  return tokenizer.encode(text + "\nAnswer:")


def build_engine(config, params, attention: str, scenario: engine_lib.Scenario, *,
                 gate_path: str | None = None, rope_positions: str = "cache_relative",
                 quant=None) -> engine_lib.Engine:
  """An Engine for ``attention`` on a base model (``with_memory`` for the segmented
  kinds); ``quant``: a QuantConfig to run it in (its scales in ``params``)."""
  if attention != "full":
    form = gate_lib.saved_form(gate_path) if gate_path else {}  # the trained gate's form
    config, params = gate_lib.with_memory(
        config, params, rng=jax.random.key(0), attention_type=attention,
        segment_len=scenario.segment_len, n_sink=scenario.n_sink, n_window=scenario.n_window,
        rope_positions=rope_positions, **form)
    if gate_path:
      params = gate_lib.load_gate(params, gate_path)
  elif gate_path:
    raise ValueError("--gate: only for --attention=edgeinfinite")
  return engine_lib.Engine(config, params, scenario, quant=quant)


def stream(engine: engine_lib.Engine, tokenizer, ids: Sequence[int], max_new_tokens: int, *,
           out: TextIO | None = None) -> dict:
  """Greedy answer to ``ids``, written to ``out`` as it is decoded; returns the timings.

  Stops at the tokenizer's EOS. The first call compiles (see module doc), so
  warm up with ``warm_up`` before timing. A ``full`` engine's cache must hold the
  prompt plus ``max_new_tokens`` (``main`` sizes ``Scenario.max_context`` so).
  """
  out = sys.stdout if out is None else out  # looked up per call: callers may redirect it
  tokens = np.asarray([ids], np.int32)
  t0 = time.perf_counter()
  state, logits = engine.prefill(tokens)
  token = np.asarray(logits.argmax(-1), np.int32)
  ttft = time.perf_counter() - t0
  new, shown = [], ""
  t1 = time.perf_counter()
  for i in range(max_new_tokens):
    if tokenizer.eos_id is not None and int(token[0]) == tokenizer.eos_id:
      break
    new.append(int(token[0]))
    text = tokenizer.decode(new)
    if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
      out.write(text[len(shown):])
      out.flush()
      shown = text
    if i + 1 == max_new_tokens:
      break
    state, logits = engine.decode(state, token)
    token = np.asarray(logits.argmax(-1), np.int32)
  decode_s = time.perf_counter() - t1
  out.write("\n")
  return {"prompt_tokens": len(ids), "new_tokens": len(new), "route": state.route,
          "ttft_s": ttft, "decode_s": decode_s,
          "tokens_per_s": (len(new) - 1) / decode_s if len(new) > 1 and decode_s > 0 else 0.0,
          "state_bytes": engine_lib.state_nbytes(state), "answer": tokenizer.decode(new)}


def warm_up(engine: engine_lib.Engine, prompt_len: int) -> float:
  """Compiles the prefill and decode steps of ``prompt_len``'s route; returns seconds."""
  t0 = time.perf_counter()
  route = engine.route_for(prompt_len)
  n = engine.scenario.short_threshold + 1 if route == "long" else 1
  state, logits = engine.prefill(np.zeros((engine.scenario.batch_size, n), np.int32))
  engine.decode(state, np.zeros((engine.scenario.batch_size,), np.int32))
  jax.block_until_ready(logits)
  return time.perf_counter() - t0


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m edgeinfinite_jax.cli.generate",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="smollm2",
                 help=f"a named model ({', '.join(models.MODELS)}), a .gguf file or an HF "
                      "checkpoint directory (default: smollm2)")
  p.add_argument("--attention", default="edgeinfinite", choices=ATTENTION_TYPES)
  p.add_argument("--file", required=True, help="the long text to read")
  p.add_argument("--question", required=True)
  p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=None,
                 help="default: the scenario's")
  p.add_argument("--scenario", default="qa", choices=SCENARIOS)
  p.add_argument("--gate", default=None, help="trained gate parameters (.npz), edgeinfinite only")
  p.add_argument("--rope-positions", "--rope_positions", default="cache_relative",
                 choices=ROPE_POSITIONS, help="streaming/edgeinfinite: see the module doc")
  return p


def main(argv: Sequence[str] | None = None) -> dict:
  args = _parser().parse_args(argv)
  if not os.path.isfile(args.file):
    raise SystemExit(f"--file={args.file!r}: no such file")
  if args.max_new_tokens is not None and args.max_new_tokens <= 0:
    raise SystemExit(f"--max-new-tokens={args.max_new_tokens}: must be a positive integer")
  with open(args.file, encoding="utf-8", errors="replace") as f:
    document = f.read()
  t0 = time.perf_counter()
  try:
    config, params, tokenizer = models.load(args.model)
  except models.ModelNotInstalledError as e:
    raise SystemExit(str(e)) from None
  load_s = time.perf_counter() - t0
  ids = prompt_ids(tokenizer, document, args.question)
  base = engine_lib.Scenario.preset(args.scenario)
  n_new = base.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
  scenario = engine_lib.Scenario.preset(
      args.scenario, max_new_tokens=n_new,
      max_context=base.capacity(len(ids) + n_new))  # only the full route uses it
  engine = build_engine(config, params, args.attention, scenario, gate_path=args.gate,
                        rope_positions=args.rope_positions)
  print(f"{args.model}: {config.num_layers} layers, hidden {config.hidden_size}, loaded in "
        f"{load_s:.1f} s; {args.file}: {len(ids)} prompt tokens; attention={args.attention}, "
        f"scenario {args.scenario} (segment {scenario.segment_len}, sink {scenario.n_sink}, "
        f"window {scenario.n_window}"
        + (f", {args.rope_positions} positions)" if args.attention != "full" else ")"),
        file=sys.stderr)
  compile_s = warm_up(engine, len(ids))
  print(f"compiled in {compile_s:.1f} s\n", file=sys.stderr)
  stats = stream(engine, tokenizer, ids, n_new)
  print(f"\n[{stats['prompt_tokens']} prompt tokens, {stats['route']} route] time to first "
        f"token {stats['ttft_s']:.2f} s; {stats['new_tokens']} new tokens at "
        f"{stats['tokens_per_s']:.1f} tokens/s; engine state {stats['state_bytes']:,} bytes",
        file=sys.stderr)
  return stats


if __name__ == "__main__":
  main()
