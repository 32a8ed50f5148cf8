"""Exported step functions: StableHLO files and a manifest per route.

``export(engine, directory)`` serialises, for each route, the jitted prefill and
decode steps exactly as the engine compiled them (``jax.export``), each taking
``(params, state, tokens [batch, chunk], n_valid)`` and returning
``(state, logits)``. ``manifest.json`` records the scenario once and, per route,
the model config that route runs (the Scenario's cache sizes applied), its cache
layout and its functions' input and output shapes, so a fresh process can call
them (``load_exported``). Runtimes other than JAX (LiteRT, ONNX) start here.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp


def export(engine, directory: str, routes=("short", "long")) -> dict:
  """Writes ``<route step>.stablehlo`` files and ``manifest.json``; returns the manifest."""
  os.makedirs(directory, exist_ok=True)
  sc = engine.scenario
  manifest = {"scenario": dataclasses.asdict(sc), "routes": {}, "functions": {}}
  params = jax.eval_shape(lambda: engine.params)
  for route in routes:
    manifest["routes"][route] = {"model_config": engine.route_configs[route].to_dict(),
                                 "n_sink": engine.n_sink[route],
                                 "ring_len": engine.ring_len[route]}
    state = jax.eval_shape(lambda r=route: engine.init_state(r))
    for kind, fn in engine.step_functions(route).items():
      c = sc.segment_len if kind == "prefill" else 1
      tokens = jax.ShapeDtypeStruct((sc.batch_size, c), jnp.int32)
      n_valid = jax.ShapeDtypeStruct((), jnp.int32)
      exported = jax.export.export(fn)(params, state, tokens, n_valid)
      name = f"{kind}_{route}"
      with open(os.path.join(directory, name + ".stablehlo"), "wb") as f:
        f.write(exported.serialize())
      manifest["functions"][name] = {
          "file": name + ".stablehlo",
          "route": route,
          "inputs": [str(a) for a in exported.in_avals],
          "outputs": [str(a) for a in exported.out_avals],
          "chunk_len": c,
      }
  with open(os.path.join(directory, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
  return manifest


def load_exported(directory: str, name: str):
  """Deserialises one exported step function; call it like the engine's."""
  with open(os.path.join(directory, name + ".stablehlo"), "rb") as f:
    return jax.export.deserialize(bytearray(f.read()))
