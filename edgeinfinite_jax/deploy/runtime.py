"""``Deployed``: the Engine's call contract over graphs that ``Engine.export`` wrote.

Everything here is numpy plus one runtime: ``ai_edge_litert`` runs the ``.tflite``
files, ``onnxruntime`` the ``.onnx`` ones. The runtime holds no state between calls;
a ``DeployedState`` is the engine state as named numpy arrays (the graph's input
names, ``manifest.json``), so a state can be inspected, saved or compared with the
JAX engine's leaf by leaf. Prompts are placed and cut exactly as the Engine does it
(``engine.placement``), the token ids checked by the model's rule (``model.tokens``).

Decoding is greedy here (the argmax of the graph's logits, as ``Engine.generate``
with ``temperature=0``); sampling stays with the JAX engine.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from edgeinfinite_jax.engine import placement
from edgeinfinite_jax.model.tokens import check_token_ids

RUNTIMES = {"litert": "tflite", "onnxruntime": "onnx"}  # runtime -> file format


@dataclasses.dataclass
class DeployedState:
  """One route's engine state: ``arrays[name]`` for every graph state input."""
  route: str
  arrays: dict

  @property
  def length(self) -> int:
    """Tokens read so far."""
    return int(self.arrays["length"])


def load(directory: str, runtime: str = "litert", *, num_threads: int | None = None):
  """Loads every exported step in ``directory`` into ``runtime`` (see ``RUNTIMES``).

  ValueError naming the runtime, or FileNotFoundError naming the missing file and the
  ``Engine.export`` call that writes it, before any graph is loaded.
  """
  if runtime not in RUNTIMES:
    raise ValueError(f"runtime={runtime!r}: must be one of {sorted(RUNTIMES)}")
  path = os.path.join(directory, "manifest.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no manifest; write one with engine.export({directory!r}, "
                            f"formats=({RUNTIMES[runtime]!r},))")
  with open(path) as f:
    manifest = json.load(f)
  fmt = RUNTIMES[runtime]
  for name, fn in manifest["functions"].items():
    if fmt not in fn.get("files", {}):
      raise FileNotFoundError(f"{directory}: step {name} was not exported as {fmt} "
                              f"(formats {manifest.get('formats')}); export with "
                              f"formats=({fmt!r},) to run it in {runtime}")
    file = os.path.join(directory, fn["files"][fmt])
    if not os.path.exists(file):
      raise FileNotFoundError(f"{file}: listed in the manifest but missing")
  return Deployed(directory, manifest, runtime, num_threads)


class Deployed:
  """``prefill`` / ``decode`` / ``generate`` over the exported graphs of one scenario.

  Same contract as ``Engine`` (see its docstring): tokens ``[batch, time]`` with
  ``batch == scenario["batch_size"]``; a prompt takes the short route up to
  ``short_threshold`` tokens, else the long one; a continued prefill appends to a
  state; capacity errors before any work. States are never consumed (numpy arrays,
  no donation).
  """

  def __init__(self, directory, manifest, runtime, num_threads=None):
    self.manifest, self.runtime = manifest, runtime
    self.scenario = manifest["scenario"]
    self.routes = manifest["routes"]
    self.vocab_size = next(iter(self.routes.values()))["model_config"]["vocab_size"]
    self._steps, self._renames = {}, {}
    for name, fn in manifest["functions"].items():
      leaves = {x["leaf"]: x["name"] for x in fn["graph"]["inputs"] if x["leaf"]}
      self._renames[name] = {x["name"]: leaves[x["leaf"]]  # new state leaf -> its input
                             for x in fn["graph"]["outputs"] if x["leaf"]}
      self._steps[name] = open_graph(os.path.join(directory, fn["files"][RUNTIMES[runtime]]),
                                     name, fn["graph"], runtime, num_threads)

  def _state_spec(self, route: str) -> dict:
    """``{name: (shape, dtype)}`` of the route's state arrays (the graphs' inputs
    before ``tokens`` and ``n_valid``); ValueError for a route that was not exported."""
    if route not in self.routes:
      raise ValueError(f"route {route!r} was not exported (routes: {sorted(self.routes)}); "
                       "export it with engine.export(..., routes=(...))")
    inputs = self.manifest["functions"][f"prefill_{route}"]["graph"]["inputs"][:-2]
    return {x["name"]: (tuple(x["shape"]), np.dtype(x["dtype"])) for x in inputs}

  def init_state(self, route: str) -> DeployedState:
    return DeployedState(route, {name: np.zeros(shape, dtype)
                                 for name, (shape, dtype) in self._state_spec(route).items()})

  def _check_tokens(self, tokens, ndim, what):
    tokens = check_token_ids(tokens, self.vocab_size, what, ndim)
    if tokens.shape[0] != self.scenario["batch_size"]:
      raise ValueError(f"{what}: batch {tokens.shape[0]} != the exported batch size "
                       f"{self.scenario['batch_size']}")
    return tokens

  def _check_state(self, state, what):
    if not isinstance(state, DeployedState) or state.route not in self.routes:
      raise ValueError(f"{what}: expected a DeployedState of an exported route "
                       f"{sorted(self.routes)}, got {type(state).__name__}")
    for name, (shape, dtype) in self._state_spec(state.route).items():
      x = state.arrays.get(name)
      if x is None or x.shape != shape or x.dtype != dtype:
        got = "missing" if x is None else f"{x.dtype}{list(x.shape)}"
        raise ValueError(f"{what}: {name} is {got}; the {state.route} graphs take "
                         f"{dtype}{list(shape)}")

  def prefill(self, tokens, state: DeployedState | None = None):
    """Reads ``tokens [batch, time]`` (appended to ``state`` if given); returns
    (state, float32 logits ``[batch, vocab]`` of the last token)."""
    tokens, route, start = self._placement(tokens, state)
    return self._read(tokens, route, start, state)

  def _placement(self, tokens, state, decoded=None):
    tokens = self._check_tokens(tokens, 2, "prefill tokens")
    if state is None:
      route, start = placement.route_for(tokens.shape[1], self.scenario["short_threshold"]), 0
      self._state_spec(route)  # names a route that was not exported
    else:
      self._check_state(state, "prefill state")
      route, start = state.route, state.length
    placement.check_capacity(route, start, tokens.shape[1], self.routes[route]["capacity"],
                            decoded)
    return tokens, route, start

  def _read(self, tokens, route, start, state):
    state = self.init_state(route) if state is None else state
    logits = None
    for chunk, n in placement.chunks(tokens, start, self.scenario["segment_len"]):
      state, logits = self._run(f"prefill_{route}", state, chunk, n)
    return state, logits

  def _run(self, step, state, tokens, n_valid):
    out = self._steps[step]({**state.arrays, "tokens": tokens,
                             "n_valid": np.asarray(n_valid, np.int32)})
    arrays = {inp: out[new] for new, inp in self._renames[step].items()}
    return DeployedState(state.route, arrays), out["logits"]

  def decode(self, state: DeployedState, token):
    """Reads one token per row ``[batch]``; returns (state, logits ``[batch, vocab]``)."""
    token = self._check_tokens(token, 1, "decode token")
    self._check_state(state, "decode state")
    placement.check_decode_room(state.route, state.length, self.routes[state.route]["capacity"])
    return self._run(f"decode_{state.route}", state, token[:, None], 1)

  def generate(self, tokens, max_new_tokens: int | None = None, *, eos_id: int | None = None,
               state: DeployedState | None = None):
    """Greedy continuation, int32 ``[batch, max_new_tokens]``: what ``Engine.generate``
    returns at temperature 0 (a row that produced ``eos_id`` repeats it)."""
    n = placement.new_tokens(max_new_tokens, self.scenario["max_new_tokens"])
    placement.check_eos_id(eos_id, self.vocab_size)
    tokens, route, start = self._placement(tokens, state, decoded=n - 1)
    state, logits = self._read(tokens, route, start, state)
    eos = -1 if eos_id is None else eos_id
    out = np.full((tokens.shape[0], n), max(eos, 0), np.int32)
    done = np.zeros(tokens.shape[0], bool)
    for i in range(n):
      tok = np.where(done, eos, np.argmax(logits, axis=-1)).astype(np.int32)
      out[:, i] = tok
      done |= tok == eos
      if done.all() or i + 1 == n:
        break
      state, logits = self._run(f"decode_{route}", state, tok[:, None], 1)
    return out


def open_graph(path, name, graph, runtime, num_threads=None):
  """One graph file (signature ``name``) in ``runtime``: a function from a dict of input
  arrays to a dict of output arrays, by name. ``graph``: the manifest's entry
  (``{"inputs": [{"name": ...}], "outputs": [...]}``), checked against the file."""
  if runtime not in RUNTIMES:
    raise ValueError(f"runtime={runtime!r}: must be one of {sorted(RUNTIMES)}")
  open_step = _litert_step if runtime == "litert" else _onnxruntime_step
  return open_step(path, name, graph, num_threads)


def _litert_step(path, name, graph, num_threads):
  from ai_edge_litert.interpreter import Interpreter  # optional: the litert runtime

  runner = Interpreter(model_path=path, num_threads=num_threads).get_signature_runner(name)
  _check_names(path, graph, runner.get_input_details(), runner.get_output_details())
  return lambda feeds: runner(**feeds)


def _onnxruntime_step(path, name, graph, num_threads):
  import onnxruntime as ort  # optional: the onnx runtime

  options = ort.SessionOptions()
  options.log_severity_level = 3  # errors only: not one warning per unused initializer
  if num_threads:
    options.intra_op_num_threads = num_threads
  session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  outputs = [o.name for o in session.get_outputs()]
  _check_names(path, graph, [i.name for i in session.get_inputs()], outputs)
  return lambda feeds: dict(zip(outputs, session.run(outputs, feeds)))


def _check_names(path, graph, inputs, outputs):
  """The file's inputs and outputs are the manifest's, by name (converters reorder)."""
  for kind, got in (("inputs", inputs), ("outputs", outputs)):
    want = sorted(x["name"] for x in graph[kind])
    if sorted(got) != want:
      raise ValueError(f"{path}: graph {kind} {sorted(got)} do not match the manifest's "
                       f"{want}; re-export the directory")
