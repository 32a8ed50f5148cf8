"""Exported step functions: StableHLO for JAX, LiteRT and ONNX for edge runtimes.

``export(engine, directory, routes, formats)`` writes, for each route, the prefill
and decode steps exactly as the engine compiled them, and one ``manifest.json``.

* ``stablehlo`` (``<step>.stablehlo``, ``jax.export``): the engine's own signature
  ``(params, state, tokens [batch, chunk], n_valid) -> (state, logits)`` as pytrees;
  ``load_exported`` reloads it in a fresh JAX process.
* ``tflite`` (``<step>.tflite``, via ``litert-converter``, no TensorFlow) and
  ``onnx`` (``<step>.onnx``, via ``jax2onnx``): the graph an edge runtime runs. The
  parameters are baked in as constants (an NPU toolchain packs weights it can see;
  the file is all a runtime needs), and the inputs and outputs are flat, named
  arrays: one per non-empty state leaf, then ``tokens`` and ``n_valid`` in, the new
  state's leaves (``new_<name>``) and ``logits`` out. Empty leaves (the memory of a route without
  one) are neither: converters drop unused inputs and re-apply names by position,
  so every graph input must be used. ``manifest["functions"][step]["graph"]``
  maps each name to its leaf path, shape and dtype; ``edgeinfinite_jax.deploy``
  runs these files with nothing but the runtime and numpy.

Before converting, each graph is scanned for 64-bit types (``check_no_64bit``):
edge runtimes and NPU toolchains have no float64/int64 kernels, and the converters'
own failures name an MLIR pass, not the model's op.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

# load_exported in a fresh process: jax.export finds the state's tree types by name
from edgeinfinite_jax.engine import state as _registered  # noqa: F401

FORMATS = ("stablehlo", "tflite", "onnx")
STEPS = ("prefill", "decode")
# Element types no edge runtime has kernels for, as they appear in a tensor type.
_WIDE = re.compile(r"tensor<(?:[0-9?]+x)*((?:ui|i)64|f64|complex<f64>)>")


class ExportError(ValueError):
  """A graph that cannot be exported in a requested format; names the step and op."""


def export(engine, directory: str, routes=("short", "long"), formats=("stablehlo",),
           progress: bool = True) -> dict:
  """Writes every step of ``routes`` in each of ``formats`` and ``manifest.json``.

  Returns the manifest: the scenario, per route its model config, cache layout and
  token capacity (None: unbounded), and per step function its files, the flat graph
  signature and, for tflite/onnx, the op census of each file.
  """
  bad = [f for f in formats if f not in FORMATS]
  if bad or not formats:
    raise ValueError(f"formats={tuple(formats)!r}: each must be one of {FORMATS}")
  bad = [r for r in routes if r not in engine.route_configs]
  if bad or not routes:
    raise ValueError(f"routes={tuple(routes)!r}: each must be one of "
                     f"{tuple(engine.route_configs)}")
  os.makedirs(directory, exist_ok=True)
  sc = engine.scenario
  manifest = {"scenario": dataclasses.asdict(sc), "formats": list(formats), "routes": {},
              "functions": {}}
  jobs = [(route, kind) for route in routes for kind in STEPS]
  for route, kind in tqdm(jobs, desc="export", disable=not progress, dynamic_ncols=True):
    if route not in manifest["routes"]:
      manifest["routes"][route] = _route_entry(engine, route,
                                               deployed={"tflite", "onnx"} & set(formats))
    name = f"{kind}_{route}"
    entry = manifest["functions"][name] = {"route": route, "kind": kind,
                                           "chunk_len": sc.segment_len if kind == "prefill"
                                           else 1, "files": {}, "ops": {}}
    if "stablehlo" in formats:
      entry.update(_write_stablehlo(engine, route, kind, entry["chunk_len"], directory, name))
      entry["files"]["stablehlo"] = entry["file"]
    if {"tflite", "onnx"} & set(formats):
      graph = GraphStep(engine, route, kind)
      exported = graph.export()
      entry["graph"] = graph.signature(exported.out_avals)
      check_no_64bit(exported, name)
      for fmt in ("tflite", "onnx"):
        if fmt in formats:
          path = os.path.join(directory, f"{name}.{fmt}")
          ops = graph.write(path, fmt, exported)
          entry["files"][fmt] = os.path.basename(path)
          entry["ops"][fmt] = dict(sorted(ops.items()))
  with open(os.path.join(directory, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
  return manifest


def _route_entry(engine, route, deployed):
  if deployed and any(np.any(np.asarray(x)) for x in jax.tree.leaves(engine.init_state(route))):
    # deploy.load starts every state from zeros of the manifest's shapes
    raise ExportError(f"route {route!r}: init_state is not all zeros; export would need "
                      "to write it")
  return {"model_config": engine.route_configs[route].to_dict(),
          "n_sink": engine.n_sink[route], "ring_len": engine.ring_len[route],
          "capacity": engine.capacity(route)}


def _write_stablehlo(engine, route, kind, chunk, directory, name):
  sc = engine.scenario
  params = jax.eval_shape(lambda: engine.params)
  state = jax.eval_shape(lambda: engine.init_state(route))
  tokens = jax.ShapeDtypeStruct((sc.batch_size, chunk), jnp.int32)
  exported = jax.export.export(engine.step_functions(route)[kind])(
      params, state, tokens, jax.ShapeDtypeStruct((), jnp.int32))
  with open(os.path.join(directory, name + ".stablehlo"), "wb") as f:
    f.write(exported.serialize())
  return {"file": name + ".stablehlo",
          "inputs": [str(a) for a in exported.in_avals],
          "outputs": [str(a) for a in exported.out_avals]}


def leaf_name(path) -> str:
  """``.caches[0].memory.M`` -> ``caches_0_memory_M``: a name every runtime accepts."""
  return re.sub(r"[^A-Za-z0-9]+", "_", jax.tree_util.keystr(path)).strip("_")


class Graph:
  """A function of flat, named arrays, as edge runtimes take it: ``fn(*inputs) ->
  tuple(outputs)`` over ``in_specs``, named ``input_names`` / ``output_names``."""

  def __init__(self, name, fn, in_specs, input_names, output_names):
    self.name, self.fn, self.in_specs = name, fn, list(in_specs)
    self.input_names, self.output_names = list(input_names), list(output_names)

  def export(self):
    return jax.export.export(jax.jit(self.fn))(*self.in_specs)

  def write(self, path, fmt: str, exported=None) -> dict:
    """Converts to ``fmt`` ("tflite" or "onnx") at ``path``; returns the op census."""
    if fmt == "tflite":
      return _write_tflite(self.export() if exported is None else exported, self, path)
    if fmt == "onnx":
      return _write_onnx(self, path)
    raise ValueError(f"fmt={fmt!r}: must be 'tflite' or 'onnx'")


class GraphStep(Graph):
  """One step function with the params baked in and flat, named array inputs.

  ``fn(*state_leaves, tokens, n_valid) -> (*state_leaves, logits)``, over the
  non-empty leaves of the route's state only (see the module doc).
  """

  def __init__(self, engine, route, kind):
    step = engine.step_functions(route, loops=False)[kind]  # LiteRT/ONNX take no traced loop
    paths, self._treedef = jax.tree_util.tree_flatten_with_path(
        jax.eval_shape(lambda: engine.init_state(route)))
    self._avals = [a for _, a in paths]
    self._keep = [i for i, a in enumerate(self._avals) if a.size > 0]
    self.leaf_paths = [jax.tree_util.keystr(paths[i][0]) for i in self._keep]
    self.state_names = [leaf_name(paths[i][0]) for i in self._keep]
    chunk = engine.scenario.segment_len if kind == "prefill" else 1
    params = engine.params

    def fn(*args):
      leaves = [jnp.zeros(a.shape, a.dtype) for a in self._avals]  # empty ones stay empty
      for i, x in zip(self._keep, args[:-2]):
        leaves[i] = x
      state = jax.tree_util.tree_unflatten(self._treedef, leaves)
      new, logits = step(params, state, args[-2], args[-1])
      new = jax.tree.leaves(new)
      return (*[new[i] for i in self._keep], logits)

    super().__init__(
        f"{kind}_{route}", fn,
        [self._avals[i] for i in self._keep]
        + [jax.ShapeDtypeStruct((engine.scenario.batch_size, chunk), jnp.int32),
           jax.ShapeDtypeStruct((), jnp.int32)],
        self.state_names + ["tokens", "n_valid"],
        # ONNX names every value once: a new state leaf cannot share its input's name
        ["new_" + n for n in self.state_names] + ["logits"])

  def signature(self, out_avals) -> dict:
    """Every input and output (``out_avals``: the exported function's) by name."""
    return {"inputs": [_spec(n, p, a) for n, p, a in
                       zip(self.input_names, self.leaf_paths + [None, None], self.in_specs)],
            "outputs": [_spec(n, p, a) for n, p, a in
                        zip(self.output_names, self.leaf_paths + [None], out_avals)]}


def _spec(name, path, aval):
  return {"name": name, "leaf": path, "shape": list(aval.shape), "dtype": str(aval.dtype)}


def check_no_64bit(exported, name: str) -> None:
  """ExportError naming the first op (a computation before a constant) with a 64-bit
  operand or result, if any."""
  hits = [(line, m.group(1)) for line in exported.mlir_module().splitlines()
          for m in [_WIDE.search(line)] if m]
  if not hits:
    return
  line, wide = next((h for h in hits if "stablehlo.constant" not in h[0]), hits[0])
  op = re.search(r"\b((?:stablehlo|chlo|func|mhlo)\.[a-z_]+)", line)
  raise ExportError(
      f"{name}: op {op.group(1) if op else '?'} uses {wide} ({line.strip()[:160]}); edge "
      "runtimes and NPU toolchains have no 64-bit kernels. In integer mode the fixed-point "
      "requantization (requant_mode gemmlowp / tflite_optimized / litert_reference) "
      "multiplies in int64 and forms its multiplier in float64, and 16-bit codes "
      "accumulate in int64: use requant_mode='onnx' or 'xnnpack' (float32 multiply-and-"
      "round) with 8-bit activations to export to every format, else stablehlo only")


@contextlib.contextmanager
def _quiet(*loggers):
  """Converters log per-op chatter (onnx_ir: one warning per untyped constant)."""
  saved = [(lg, lg.level) for lg in map(logging.getLogger, loggers)]
  for lg, _ in saved:
    lg.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for lg, level in saved:
      lg.setLevel(level)


def _write_tflite(exported, graph: Graph, path) -> dict:
  import litert_converter.converter_api_ext as api  # optional: the deploy-export tools
  from litert_converter.mlir import ir, passmanager  # optional: bundled with the converter
  from litert_converter.mlir.dialects import stablehlo  # optional: as above

  with ir.Context() as ctx:
    api.prepare_mlir_context(ctx)
    module = stablehlo.deserialize_portable_artifact(ctx, exported.mlir_module_serialized)
    api.set_signature(module.operation, signature_name=graph.name,
                      input_names=graph.input_names, output_names=graph.output_names)
    config = api.ConvertToTFLConfig()
    config.model_origin_framework = "JAX"
    api.run_convert_to_tfl_passes(module, passmanager.PassManager(), config)
    blob = bytes(api.export_flatbuffer_to_bytes(module.operation))
  names, ops = _tflite_census(blob, graph.name)
  for kind, want in (("inputs", graph.input_names), ("outputs", graph.output_names)):
    if sorted(names[kind]) != sorted(want):
      raise ExportError(f"{graph.name}: the converted tflite {kind} are {sorted(names[kind])}, "
                        f"not {sorted(want)} (did the converter drop an unused input?)")
  with open(path, "wb") as f:
    f.write(blob)
  return ops


def _tflite_census(blob, signature):
  from litert_converter import schema_py_generated as schema  # optional: as above

  model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(blob, 0))
  codes = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
  ops = collections.Counter()
  for sub in model.subgraphs:
    for op in sub.operators or []:
      code = model.operatorCodes[op.opcodeIndex]
      ops[codes.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")] += 1
  sig = next(s for s in model.signatureDefs if s.signatureKey.decode() == signature)
  names = {"inputs": [t.name.decode() for t in sig.inputs],
           "outputs": [t.name.decode() for t in sig.outputs]}
  return names, dict(ops)


def _write_onnx(graph: Graph, path) -> dict:
  import jax2onnx  # optional: the deploy-export tools
  import onnx  # optional: as above

  with _quiet("onnx_ir", "onnx_ir.serde", "jax2onnx"), _linear_jax2onnx():
    model = jax2onnx.to_onnx(graph.fn, inputs=graph.in_specs, model_name=graph.name,
                             input_names=graph.input_names, output_names=graph.output_names)
  for kind, got, want in (("inputs", model.graph.input, graph.input_names),
                          ("outputs", model.graph.output, graph.output_names)):
    if [v.name for v in got] != want:
      raise ExportError(f"{graph.name}: the onnx graph's {kind} are {[v.name for v in got]}, "
                        f"not {want}")
  model = _integer_dots(model)
  # protobuf stops at 2 GB: larger weights go to a sidecar file next to the graph
  external = model.ByteSize() > 1 << 30
  onnx.save_model(model, path, save_as_external_data=external,
                  location=os.path.basename(path) + ".data" if external else None)
  ops = collections.Counter()

  def count(g):
    for node in g.node:
      ops[node.op_type] += 1
      for sub in _subgraphs(node):
        count(sub)

  count(model.graph)
  return dict(ops)


@contextlib.contextmanager
def _linear_jax2onnx():
  """jax2onnx 0.17.1 with its three graph lookups made O(1), for the conversion's length.

  Each answers "is this value in the graph" / "which of these nodes consume or produce
  it" by scanning every node (or building a set of every node) per call, so a
  conversion is quadratic in the graph: 3.7 s for one SmolLM2 layer's decode step,
  38 s for 8 layers, SmolLM2's 30 unrolled layers out of reach. The IR already links
  each value to its producer and consumers; these versions ask it first and fall back
  to the library's scan when it does not answer, so the result is the library's own.
  (``_consumer_nodes`` / ``_producer_node`` get node lists the optimizer never
  mutates, so the id set is cached per list object.) The Makefile pins the version
  these names come from.
  """
  import onnx_ir as ir  # optional: the deploy-export tools
  from jax2onnx.converter import conv_transpose_bias_folding  # optional: as above
  from jax2onnx.converter import ir_optimizations, optimizer_graph_utils, output_binding

  connected, consumers, producer = (output_binding._value_is_graph_connected,
                                    optimizer_graph_utils._consumer_nodes,
                                    optimizer_graph_utils._producer_node)
  cache = {"nodes": None, "ids": frozenset()}

  def ids(nodes):
    if cache["nodes"] is not nodes:  # the list is held, so its id is never reused
      cache.update(nodes=nodes, ids={id(n) for n in nodes})
    return cache["ids"]

  def fast_connected(ctx, value):
    node = value.producer()
    return (node is not None and node.graph is ctx.builder.nodes) or connected(ctx, value)

  def fast_consumers(nodes, value):
    if isinstance(value, ir.Value) and isinstance(nodes, list):
      found = [c for c in value.consumers() if id(c) in ids(nodes)]
      if found:
        return found
    return consumers(nodes, value)

  def fast_producer(nodes, value):
    if isinstance(value, ir.Value) and isinstance(nodes, list):
      node = value.producer()
      if node is not None and id(node) in ids(nodes):
        return node
    return producer(nodes, value)

  patches = [(output_binding, "_value_is_graph_connected", fast_connected)] + [
      (module, name, fn)
      for module in (optimizer_graph_utils, ir_optimizations, conv_transpose_bias_folding)
      for name, fn in (("_consumer_nodes", fast_consumers), ("_producer_node", fast_producer))
      if hasattr(module, name)]
  saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
  try:
    for module, name, fn in patches:
      setattr(module, name, fn)
    yield
  finally:
    for module, name, fn in saved:
      setattr(module, name, fn)


def _subgraphs(node):
  """The graphs an ONNX node holds in its attributes (If branches, Loop bodies)."""
  for attr in node.attribute:
    yield from ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)


def _integer_dots(model):
  """Integer dots as ONNX has them. jax2onnx writes an int8 x int8 -> int32 dot (what
  an integer engine's graph holds) as MatMul or Einsum typed int8, and ONNX's MatMul
  has no int8 kernel: a MatMul over int8 becomes MatMulInteger (int8 x int8 -> int32,
  the kernel ONNX Runtime and its NPU providers have), an Einsum over int8 reads int32
  casts of its operands (the same sums); then the intermediate types are inferred
  again from the ops. Graphs without int8 dots are returned unchanged."""
  import onnx  # optional: the deploy-export tools

  int8, int32 = onnx.TensorProto.INT8, onnx.TensorProto.INT32
  changed = []

  def fix(g, outer):
    types = dict(outer)
    types.update({v.name: v.type.tensor_type.elem_type
                  for v in list(g.input) + list(g.value_info) + list(g.output)})
    types.update({t.name: t.data_type for t in g.initializer})
    nodes = []
    for node in g.node:
      for sub in _subgraphs(node):
        fix(sub, types)
      if node.op_type in ("MatMul", "Einsum") and all(types.get(i) == int8
                                                      for i in node.input):
        if node.op_type == "MatMul":
          node.op_type = "MatMulInteger"
        else:
          for k, name in enumerate(node.input):
            cast = f"{node.name}_int32_{k}"
            nodes.append(onnx.helper.make_node("Cast", [name], [cast], to=int32,
                                               name=cast + "_cast"))
            node.input[k] = cast
        changed.append(node.name)
      nodes.append(node)
    if changed:
      del g.node[:]
      g.node.extend(nodes)

  fix(model.graph, {})
  if not changed:
    return model
  def clear(g):  # every intermediate type, so that inference starts from the ops
    del g.value_info[:]
    for node in g.node:
      for sub in _subgraphs(node):
        clear(sub)
  clear(model.graph)
  return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def load_exported(directory: str, name: str):
  """Deserialises one exported StableHLO step function; call it like the engine's."""
  with open(os.path.join(directory, name + ".stablehlo"), "rb") as f:
    return jax.export.deserialize(bytearray(f.read()))
