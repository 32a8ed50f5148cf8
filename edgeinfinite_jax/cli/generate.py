"""Ask a question about a long text file, from the command line, through the ``Engine``.

    python -m edgeinfinite_jax.cli.generate --model=smollm2 --attention=edgeinfinite \\
        --gate=experiments/gates/smollm2_gate.npz --file=long.txt --question="Who wrote it?"

(``edgeinfinite-generate`` is the same command as a console script.) The document
(``--file PATH``, ``--file -`` for stdin) and the question (``--question``/``--prompt``)
go into the model's chat template as one user turn, after ``--system`` if given (the
raw text if the tokenizer has no template); with neither ``--file`` nor ``--prompt``
the prompt is read from stdin. The answer streams token by token; then time to first
token, decode speed and the engine state's bytes are printed (``--json``: one JSON
object on stdout instead). ``--chat`` keeps the conversation going: each further line
on stdin is a user turn, read into the same state by a continued prefill.

``--attention``:

* ``full``: the base model over an ordinary KV cache sized to the prompt (the
  reference; its state grows with the prompt, and past the model's trained
  context, 8192 for SmolLM2, it degrades: a warning says so);
* ``streaming``: sink + window of the scenario, nothing else (constant state);
* ``edgeinfinite``: sink + window + the compressive memory and gate (constant state).
  It needs a trained set, ``--gate FILE`` (the gate alone, or the gate + LoRA
  adapters: an ``.npz`` that S-SFT wrote, e.g. ``experiments/gates/``). The set's
  recorded settings (segment, window, sink, RoPE positions, update rule, gate form)
  are applied; a ``--segment``/``--window``/``--sink``/``--rope-positions`` that
  contradicts them is refused, naming both values. ``--untrained-gate`` runs the
  initial gate instead (memory nearly off: it answers like ``streaming``).
* ``h2o`` / ``snapkv``: sink + window + ``--kept N`` exact tokens per KV head and
  layer, chosen by accumulated attention (H2O) or an observation window's vote
  (SnapKV) as blocks leave the window (``model/eviction.py``; constant state).

``--rope-positions`` (segmented kinds, default: the trained set's, else
``cache_relative``): ``cache_relative`` (as in StreamingLLM) numbers the visible cache
[sink; window; segment] from 0, so a long document never shows the model a position
beyond its trained context; ``absolute`` keeps token indices (past 8192 SmolLM2 sees
positions it was never trained on: a warning says so).

Sampling: greedy by default; ``--temperature`` > 0 samples (with ``--top-k``,
``--top-p``, ``--seed``), by ``Engine.sample``: the same rules as ``Engine.generate``.

The step functions are compiled on a short warm-up prompt first, so the reported
time to first token is the prefill of the real prompt, not XLA's compile time
(reported separately). Bad input (a missing, empty or binary file, a damaged or
mismatched trained set, a ``--max-new-tokens`` whose state would not fit) is one
line on stderr and exit status 2, before the model is compiled (``--debug``: the
traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Sequence, TextIO

import jax
import numpy as np

from edgeinfinite_jax.checkpoints import models
from edgeinfinite_jax.cli import errors
from edgeinfinite_jax.engine import engine as engine_lib
from edgeinfinite_jax.model import gate as gate_lib
from edgeinfinite_jax.model.config import ATTENTION_TYPES, ROPE_POSITIONS

SCENARIOS = tuple(sorted(engine_lib.SCENARIOS))
# Command-line names of the serving settings a trained set records (``lora.SERVING_KEYS``).
SIZE_FLAGS = {"segment_len": "--segment", "n_sink": "--sink", "n_window": "--window",
              "rope_positions": "--rope-positions"}
# Room for the conversation to grow in --chat with full attention (its cache is sized
# once, at construction).
CHAT_ROOM = 4096


def read_document(path: str) -> str:
  """The UTF-8 text of ``path`` (``-``: stdin). An empty or whitespace-only document, or
  one that is not text (NUL bytes, invalid UTF-8), is a ValueError naming the path and
  the first offending byte: the model would otherwise answer it as if it were text."""
  data = sys.stdin.buffer.read() if path == "-" else _read_bytes(path)
  where = "--file=-" if path == "-" else f"--file={path}"
  if b"\0" in data:
    raise ValueError(f"{where}: not a text file (a NUL byte at offset {data.index(0)})")
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                     f"{e.start}); convert it to UTF-8 first") from None
  if not text.strip():
    raise ValueError(f"{where}: the document is empty ({len(data)} bytes, no text)")
  return text


def _read_bytes(path: str) -> bytes:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--file={path}: no such file" if not os.path.exists(path)
                            else f"--file={path}: not a file")
  with open(path, "rb") as f:
    return f.read()


def user_turn(document: str | None, question: str | None) -> str:
  """The user's message: the document, then the question."""
  return "\n\n".join(x.strip() for x in (document, question) if x and x.strip())


def prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
  """``messages`` ([{"role", "content"}]) in the model's chat format, ending with the
  assistant's turn; without a chat template, the contents and ``Answer:``."""
  if getattr(tokenizer, "chat_template", None):
    return tokenizer.apply_chat_template(list(messages))
  return tokenizer.encode("\n\n".join(m["content"] for m in messages) + "\nAnswer:")


def serving_scenario(base: engine_lib.Scenario, gate_path: str | None,
                     explicit: dict) -> tuple[engine_lib.Scenario, str]:
  """(scenario, rope positions) to serve with: ``base`` with the trained set's recorded
  sizes and positions (``lora.SERVING_KEYS``), then ``explicit`` (the command line's
  ``{segment_len, n_sink, n_window, rope_positions}`` that were given), which must agree
  with what the set recorded (ConfigError naming both values)."""
  recorded = {}
  if gate_path:
    info = gate_lib.check_trained_settings(gate_path, explicit, "", flags=SIZE_FLAGS)
    recorded = {k: info.memory[k] for k in SIZE_FLAGS if k in info.memory}
  chosen = {**recorded, **explicit}
  rope_positions = chosen.pop("rope_positions", "cache_relative")
  return dataclasses.replace(base, **chosen), rope_positions


def check_gate_choice(attention: str, gate_path: str | None, untrained_gate: bool) -> None:
  """A trained set goes with ``edgeinfinite`` only, and ``edgeinfinite`` needs one unless
  the initial gate is asked for (it used to run silently, answering like streaming)."""
  if gate_path and attention != "edgeinfinite":
    raise ValueError(f"--gate={gate_path}: a trained set is only for --attention=edgeinfinite "
                     f"(got --attention={attention})")
  if attention == "edgeinfinite" and not gate_path and not untrained_gate:
    raise ValueError("--attention=edgeinfinite needs a trained set: --gate=FILE (e.g. "
                     "experiments/gates/smollm2_gate.npz); --untrained-gate runs the initial "
                     "gate, whose memory is nearly off (it answers like streaming)")


def build_engine(config, params, attention: str, scenario: engine_lib.Scenario, *,
                 gate_path: str | None = None, untrained_gate: bool = False,
                 rope_positions: str = "cache_relative", n_kept: int | None = None,
                 quant=None) -> engine_lib.Engine:
  """An Engine for ``attention`` on a base model. ``edgeinfinite`` loads the trained set
  at ``gate_path`` (its recorded settings, with the Scenario's sizes: see
  ``serving_scenario``), or keeps the initial gate only if ``untrained_gate``;
  ``n_kept``: the eviction budget of ``h2o`` / ``snapkv``; ``quant``: a QuantConfig to
  run it in (its scales in ``params``)."""
  check_gate_choice(attention, gate_path, untrained_gate)
  if attention != "full":
    sizes = dict(segment_len=scenario.segment_len, n_sink=scenario.n_sink,
                 n_window=scenario.n_window, rope_positions=rope_positions)
    rng = jax.random.key(0)
    if gate_path:
      config, params, _ = gate_lib.load_trained_set(config, params, gate_path, rng=rng,
                                                    where="Scenario", **sizes)
    else:
      kept = {"n_kept": n_kept} if n_kept is not None else {}
      config, params = gate_lib.with_memory(config, params, rng=rng, attention_type=attention,
                                            **sizes, **kept)
  return engine_lib.Engine(config, params, scenario, quant=quant)


def state_estimate(engine: engine_lib.Engine, route: str) -> int:
  """Bytes of ``route``'s state and of the generated tokens' buffer, from shapes only
  (nothing is allocated)."""
  state = jax.eval_shape(lambda: engine.init_state(route))
  tokens = engine.scenario.batch_size * engine.scenario.max_new_tokens * 4
  return engine_lib.state_nbytes(state) + tokens


def memory_budget() -> int:
  """Half of this machine's physical memory: what a state may take before it is refused."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
  except (ValueError, OSError):  # no sysconf: be permissive rather than refuse
    return 1 << 62


def constant_state(scenario: engine_lib.Scenario, n_new: int) -> engine_lib.Scenario:
  """``scenario`` with every prompt on the long route once the short route's full cache
  (``short_threshold`` + the new tokens) would outgrow the long route's (sink + window +
  segment): --attention=streaming/edgeinfinite promises a state that does not grow with
  the answer, and ``--max-new-tokens=100000`` on a short prompt silently made a 4.6 GB
  one."""
  keeps = scenario.n_sink + scenario.n_window + scenario.segment_len
  if scenario.short_threshold + n_new > keeps:
    return dataclasses.replace(scenario, short_threshold=0)
  return scenario


def check_fits(engine: engine_lib.Engine, route: str, n_new: int, budget: int) -> int:
  """The state's bytes; a ValueError saying what ``--max-new-tokens`` costs when they
  exceed ``budget`` (a short prompt's cache and a full cache grow with it)."""
  need = state_estimate(engine, route)
  if need > budget:
    raise ValueError(f"--max-new-tokens={n_new}: the {route} route's state would take "
                     f"{need / 2**30:.1f} GiB, over the {budget / 2**30:.1f} GiB budget (half "
                     "of this machine's memory); ask for fewer new tokens")
  return need


def warn_positions(config, attention: str, rope_positions: str, n_tokens: int) -> str | None:
  """A warning when the model would see positions past its trained context."""
  limit = config.max_position_embeddings
  if n_tokens <= limit or (attention != "full" and rope_positions == "cache_relative"):
    return None
  how = ("full attention" if attention == "full"
         else f"{attention} with --rope-positions=absolute")
  return (f"warning: {n_tokens} tokens (prompt + new) exceed the model's trained context "
          f"({limit}, max_position_embeddings); {how} shows it positions it never saw, and "
          "its answers degrade (streaming/edgeinfinite with cache_relative positions do not)")


class Sampling:
  """The sampling settings of a run; ``next`` draws token i with ``fold_in(key, i)``."""

  def __init__(self, temperature: float, top_k: int, top_p: float, seed: int):
    self.kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    self.key = jax.random.key(seed)
    self.i = 0

  def next(self, engine: engine_lib.Engine, logits) -> np.ndarray:
    rng = jax.random.fold_in(self.key, self.i)
    self.i += 1
    return np.asarray(engine.sample(logits, rng=rng, **self.kwargs), np.int32)


def stream(engine: engine_lib.Engine, tokenizer, ids: Sequence[int], max_new_tokens: int, *,
           out: TextIO | None = None, sampling: Sampling | None = None,
           state: engine_lib.EngineState | None = None) -> dict:
  """The answer to ``ids`` (read into ``state`` when given: a continued prefill), written
  to ``out`` as it is decoded; returns the timings, the answer and the final state.

  Stops at the tokenizer's EOS. The first call compiles (see module doc), so
  warm up with ``warm_up`` before timing. A ``full`` engine's cache must hold the
  prompt plus ``max_new_tokens`` (``main`` sizes ``Scenario.max_context`` so).
  """
  out = sys.stdout if out is None else out  # looked up per call: callers may redirect it
  sampling = sampling or Sampling(0.0, 0, 1.0, 0)
  tokens = np.asarray([ids], np.int32)
  t0 = time.perf_counter()
  state, logits = engine.prefill(tokens, state=state)
  token = sampling.next(engine, logits)
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
    state, logits = engine.decode(state, token)  # the state has read every token it gave
    if i + 1 == max_new_tokens:
      break
    token = sampling.next(engine, logits)
  decode_s = time.perf_counter() - t1
  out.write("\n")
  return {"prompt_tokens": len(ids), "new_tokens": len(new), "route": state.route,
          "ttft_s": ttft, "decode_s": decode_s,
          "tokens_per_s": (len(new) - 1) / decode_s if len(new) > 1 and decode_s > 0 else 0.0,
          "state_bytes": engine_lib.state_nbytes(state), "answer": tokenizer.decode(new),
          "answer_ids": new, "state": state}


def warm_up(engine: engine_lib.Engine, prompt_len: int) -> float:
  """Compiles the prefill, decode and sample steps of ``prompt_len``'s route; returns seconds."""
  t0 = time.perf_counter()
  route = engine.route_for(prompt_len)
  n = engine.scenario.short_threshold + 1 if route == "long" else 1
  state, logits = engine.prefill(np.zeros((engine.scenario.batch_size, n), np.int32))
  engine.sample(logits, temperature=1.0, rng=jax.random.key(0))  # greedy too: one trace
  _, logits = engine.decode(state, np.zeros((engine.scenario.batch_size,), np.int32))
  jax.block_until_ready(logits)
  return time.perf_counter() - t0


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m edgeinfinite_jax.cli.generate",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="smollm2",
                 help=f"a named model ({', '.join(models.MODELS)}), a .gguf file or an HF "
                      "checkpoint directory (default: smollm2)")
  p.add_argument("--attention", default="edgeinfinite", choices=ATTENTION_TYPES)
  p.add_argument("--kept", type=int, default=None,
                 help="h2o / snapkv: tokens kept per KV head and layer beside sink and window")
  p.add_argument("--file", default=None, help="the long text to read ('-': stdin)")
  p.add_argument("--question", "--prompt", dest="question", default=None,
                 help="what to ask (after the document, if any); neither this nor --file: "
                      "the prompt is read from stdin")
  p.add_argument("--system", default=None, help="a system message before the user's turn")
  p.add_argument("--chat", action="store_true",
                 help="after the answer, read further user turns from stdin, one per line "
                      "(an empty line or end of input stops)")
  p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=None,
                 help="default: the scenario's")
  p.add_argument("--scenario", default="qa", choices=SCENARIOS)
  p.add_argument("--segment", type=int, default=None, help="segment length (default: the "
                 "trained set's, else the scenario's)")
  p.add_argument("--window", type=int, default=None, help="window in tokens (likewise)")
  p.add_argument("--sink", type=int, default=None, help="sink tokens (likewise)")
  p.add_argument("--gate", default=None,
                 help="a trained set (.npz: the gate, or the gate + LoRA), edgeinfinite only")
  p.add_argument("--untrained-gate", action="store_true",
                 help="edgeinfinite without a trained set (the initial gate: memory nearly off)")
  p.add_argument("--rope-positions", "--rope_positions", default=None, choices=ROPE_POSITIONS,
                 help="streaming/edgeinfinite: see the module doc (default: the trained "
                      "set's, else cache_relative)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
  p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0: all)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--json", action="store_true",
                 help="print one JSON object (answer, TTFT, tokens/s, state bytes, compile "
                      "time) on stdout instead of streaming the text")
  p.add_argument(errors.DEBUG_FLAG, action="store_true",
                 help="tracebacks instead of one-line errors (taken by errors.run)")
  return p


def _check_args(args) -> None:
  """Every rule that needs no model, before the model is loaded."""
  if args.max_new_tokens is not None and args.max_new_tokens <= 0:
    raise ValueError(f"--max-new-tokens={args.max_new_tokens}: must be a positive integer")
  engine_lib.check_sampling(args.temperature, args.top_k, args.top_p, jax.random.key(0))
  evicting = args.attention in ("h2o", "snapkv")
  if args.kept is not None and not evicting:
    raise ValueError(f"--kept={args.kept}: only for --attention=h2o or snapkv "
                     f"(got --attention={args.attention})")
  if evicting and (args.kept is None or args.kept <= 0):
    raise ValueError(f"--attention={args.attention} needs --kept=N, a positive number of "
                     "tokens kept per KV head beside sink and window (its eviction budget)"
                     + ("" if args.kept is None else f"; got --kept={args.kept}"))
  if args.chat and args.file == "-":
    raise ValueError("--chat reads the turns from stdin: give the document with --file=PATH")
  for key, flag in SIZE_FLAGS.items():
    if key != "rope_positions" and getattr(args, flag[2:]) is not None and args.attention == "full":
      raise ValueError(f"{flag}: only for the segmented kinds (not --attention=full)")


def _read_input(args) -> tuple[str | None, str | None]:
  document = read_document(args.file) if args.file else None
  question = args.question
  if document is None and question is None:
    if sys.stdin.isatty():
      raise ValueError("nothing to ask: give --file=PATH and/or --prompt=TEXT, or pipe the "
                       "prompt on stdin")
    question = sys.stdin.read()
    if not question.strip():
      raise ValueError("stdin: the prompt is empty")
  return document, question


def run(args, out: TextIO) -> dict:
  _check_args(args)
  document, question = _read_input(args)
  check_gate_choice(args.attention, args.gate, args.untrained_gate)  # before the model loads
  info = print if not args.json else (lambda *a, **k: None)
  t0 = time.perf_counter()
  config, params, tokenizer = models.load(args.model)
  load_s = time.perf_counter() - t0
  messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
      {"role": "user", "content": user_turn(document, question)}]
  ids = prompt_ids(tokenizer, messages)
  explicit = {k: getattr(args, f[2:].replace("-", "_")) for k, f in SIZE_FLAGS.items()}
  explicit = {k: v for k, v in explicit.items() if v is not None}
  base = engine_lib.Scenario.preset(args.scenario)
  n_new = base.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
  scenario, rope_positions = serving_scenario(base, args.gate, explicit)
  room = CHAT_ROOM if args.chat else 0
  if args.attention != "full":
    scenario = constant_state(scenario, n_new + room)
  scenario = dataclasses.replace(scenario, max_new_tokens=n_new,
                                 max_context=scenario.capacity(len(ids) + n_new + room))
  engine = build_engine(config, params, args.attention, scenario, gate_path=args.gate,
                        untrained_gate=args.untrained_gate, rope_positions=rope_positions,
                        n_kept=args.kept)
  route = engine.route_for(len(ids))
  state_bytes = check_fits(engine, route, n_new, memory_budget())
  warning = warn_positions(config, args.attention, rope_positions, len(ids) + n_new)
  if warning:
    print(warning, file=sys.stderr)
  info(f"{args.model}: {config.num_layers} layers, hidden {config.hidden_size}, loaded in "
       f"{load_s:.1f} s; {args.file or 'prompt'}: {len(ids)} prompt tokens; "
       f"attention={args.attention}"
       + (f" (trained set {args.gate})" if args.gate else "")
       + f", scenario {args.scenario} (segment {scenario.segment_len}, sink {scenario.n_sink}, "
       f"window {scenario.n_window}"
       + (f", {rope_positions} positions)" if args.attention != "full" else ")")
       + f"; state {state_bytes:,} bytes", file=sys.stderr)
  compile_s = warm_up(engine, len(ids))
  info(f"compiled in {compile_s:.1f} s\n", file=sys.stderr)
  sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
  sink = open(os.devnull, "w") if args.json else out
  try:
    stats = stream(engine, tokenizer, ids, n_new, out=sink, sampling=sampling)
    turns = [stats]
    if args.chat:
      turns += chat(engine, tokenizer, messages, ids, stats, n_new, sink, sampling)
  finally:
    if args.json:
      sink.close()
  for s in turns:
    s.pop("state", None)
    s.pop("answer_ids", None)
  stats = {**turns[0], "compile_s": compile_s, "load_s": load_s, "attention": args.attention,
           "gate": args.gate, "scenario": dataclasses.asdict(scenario),
           "rope_positions": rope_positions}
  if args.chat:
    stats["turns"] = turns
  if args.json:
    out.write(json.dumps(stats, indent=1) + "\n")
  else:
    info(f"\n[{stats['prompt_tokens']} prompt tokens, {stats['route']} route] time to first "
         f"token {stats['ttft_s']:.2f} s; {stats['new_tokens']} new tokens at "
         f"{stats['tokens_per_s']:.1f} tokens/s; engine state {stats['state_bytes']:,} bytes",
         file=sys.stderr)
  return stats


def chat(engine, tokenizer, messages, ids, stats, n_new, out, sampling) -> list[dict]:
  """Further user turns from stdin, each read into the same state (a continued prefill
  of the tokens the conversation adds) -> one stats dict per turn."""
  messages = list(messages)
  fed = list(ids) + stats["answer_ids"]  # what the state has read
  state, turns = stats["state"], []
  while True:
    if sys.stdin.isatty():
      print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line.strip():
      return turns
    messages += [{"role": "assistant", "content": (turns[-1] if turns else stats)["answer"]},
                 {"role": "user", "content": line.strip()}]
    full = prompt_ids(tokenizer, messages)
    if full[:len(fed)] != fed:  # the answer's text re-tokenizes otherwise: read it all afresh
      state, fed = None, []
    new_ids = full[len(fed):]
    turn = stream(engine, tokenizer, new_ids, n_new, out=out, sampling=sampling, state=state)
    state = turn["state"]
    fed = fed + list(new_ids) + turn["answer_ids"]
    turns.append(turn)


def main(argv: Sequence[str] | None = None) -> dict:
  return run(_parser().parse_args(argv), sys.stdout)


def cli(argv: Sequence[str] | None = None) -> None:
  """The console script ``edgeinfinite-generate``: user errors as one line (``errors.run``)."""
  errors.run(main, "generate", argv)


if __name__ == "__main__":
  cli()
