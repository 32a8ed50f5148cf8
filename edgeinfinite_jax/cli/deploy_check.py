"""Export an engine to LiteRT and ONNX, run it there, and check it against JAX.

    python -m edgeinfinite_jax.cli.deploy_check                       # tiny model, ~2 min
    python -m edgeinfinite_jax.cli.deploy_check --model=smollm2 --scenario=qa \\
        --runtimes=litert --modes=float                               # ~4 min, 1.1 GB of graphs

For every numerics mode (``float``; ``fake_quant`` and ``integer`` with w8a8 PTQ
scales calibrated on the prompt) and every runtime, the long route of an
EdgeInfinite engine is exported (``Engine.export``), loaded with
``edgeinfinite_jax.deploy.load`` and fed a prompt of at least ``--segments``
segments, long enough that two blocks pass into the memory (the last segment
padded), and ``--steps`` greedy decode steps, the runtime holding its own
state; the JAX engine reads the same tokens. Then each side generates ``--steps``
tokens greedily from the prompt on its own (``generate``: its own tokens fed back).
Printed: the largest logit difference (absolute, and relative to the largest
logit), whether every greedy token agreed, how many generated tokens are equal
(and, for a model with a tokenizer, the generated text), the share of the integer
state's entries (an integer engine's int8 KV cache) that are equal,
the largest difference over the final state's arrays (absolute, and relative to the
largest value of that array), the graphs' size, the export
time, and each runtime's prefill time per segment and decode time per token (median
and range over the steps; the first call is a warm-up) beside the JAX engine's, on
this machine's CPU threads (``--threads``). An export the runtimes cannot take
(integer mode today: 64-bit ops) is a row with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edgeinfinite_jax import deploy
from edgeinfinite_jax.deploy import runtime as runtime_lib
from edgeinfinite_jax.checkpoints import gguf, models
from edgeinfinite_jax.cli import errors
from edgeinfinite_jax.cli.generate import SCENARIOS, build_engine, serving_scenario
from edgeinfinite_jax.data import corpus
from edgeinfinite_jax.engine import engine as engine_lib
from edgeinfinite_jax.engine import export as export_lib
from edgeinfinite_jax.model import rope as rope_lib
from edgeinfinite_jax.model import transformer as model_lib
from edgeinfinite_jax.model.config import ModelConfig
from edgeinfinite_jax.quant import intsim
from edgeinfinite_jax.quant import qconfig as qc
from edgeinfinite_jax.train import calib

MODES = ("float", "fake_quant", "integer")


def tiny_model():
  """A random 2-layer Llama (vocab 300, hidden 64): numerics, not language."""
  config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2)
  return config, model_lib.init_params(config, jax.random.key(0))


def _prompt(args, scenario, vocab, tokenizer):
  L = scenario.segment_len
  n = max(L * (args.segments - 1),
          scenario.short_threshold,  # the long route
          scenario.n_sink + scenario.n_window + 2 * L)  # two blocks reach the memory
  n += L // 8 + 1  # the last segment padded
  if tokenizer is None:
    return np.random.RandomState(0).randint(0, vocab, (scenario.batch_size, n)).astype(np.int32)
  text = "\n".join(corpus.embedded_documents(64 * n)[0])
  ids = tokenizer.encode(text)[:n]
  if len(ids) < n:
    raise ValueError(f"the embedded corpus gave {len(ids)} tokens, the check needs {n}")
  return np.asarray([ids] * scenario.batch_size, np.int32)


def _engine(config, params, scenario, mode, prompt, gate_kwargs):
  """The EdgeInfinite engine in ``mode``; quantized modes with w8a8 scales calibrated
  (min-max) on ``prompt``."""
  if mode == "float":
    return build_engine(config, params, "edgeinfinite", scenario, **gate_kwargs)
  quant = (qc.integer_mode(qc.preset("w8a8"), requant_mode="onnx") if mode == "integer"
           else qc.preset("w8a8"))
  fake = build_engine(config, params, "edgeinfinite", scenario, **gate_kwargs,
                      quant=quant.replace(mode="fake_quant"))
  scaled = calib.calibrate(fake.route_configs["long"], fake.params, [prompt])
  return engine_lib.Engine(fake.route_configs["long"], scaled, scenario, quant=quant)


def _time(fn, repeats):
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out


def replay(engine, deployed, prompt, steps):
  """Prefill + ``steps`` greedy decode steps in both; agreement and timings."""
  state, logits = engine.prefill(prompt)
  dstate, dlogits = deployed.prefill(prompt)
  err, scale, same = [np.abs(np.asarray(logits) - dlogits).max()], [np.abs(logits).max()], 0
  jax_decode, rt_decode = [], []
  for _ in range(steps):
    token = np.argmax(np.asarray(logits), -1).astype(np.int32)
    same += int((np.argmax(dlogits, -1) == token).all())
    t0 = time.perf_counter()
    state, logits = engine.decode(state, token)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    dstate, dlogits = deployed.decode(dstate, token)
    rt_decode.append(time.perf_counter() - t1)
    jax_decode.append(t1 - t0)
    err.append(np.abs(np.asarray(logits) - dlogits).max())
    scale.append(np.abs(logits).max())
  leaves = {jax.tree_util.keystr(p): np.asarray(x, np.float64)
            for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
  graph = deployed.manifest["functions"]["decode_long"]["graph"]["inputs"]
  diffs = [(float(np.abs(leaves[x["leaf"]] - dstate.arrays[x["name"]]).max()),
            float(np.abs(leaves[x["leaf"]]).max())) for x in graph if x["leaf"]]
  # integer leaves (an integer engine's int8 KV cache): the share of entries equal
  codes = [(leaves[x["leaf"]] == dstate.arrays[x["name"]]).ravel() for x in graph
           if x["leaf"] and np.issubdtype(np.dtype(x["dtype"]), np.integer)
           and x["leaf"] != ".length"]
  # free-running: each side's generate from the prompt, its own tokens fed back
  want = np.asarray(engine.generate(prompt, max_new_tokens=steps))
  got = deployed.generate(prompt, max_new_tokens=steps)
  n_seg = -(-prompt.shape[1] // engine.scenario.segment_len)
  return {"generated_equal": f"{int((want == got).all(0).sum())}/{steps}",
          "generated": (want, got),
          "int_state_equal": float(np.concatenate(codes).mean()) if codes else None,
          "max_abs_logit_diff": float(max(err)),
          "max_rel_logit_diff": float(max(e / s for e, s in zip(err, scale))),
          "greedy_agree": f"{same}/{steps}", "max_state_diff": max(d for d, _ in diffs),
          "max_rel_state_diff": max(d / m for d, m in diffs if m > 0),
          "prefill_ms_per_segment": 1e3 * min(_time(lambda: deployed.prefill(prompt)[1], 2))
          / n_seg,
          "jax_prefill_ms_per_segment": 1e3 * min(_time(lambda: engine.prefill(prompt)[1], 2))
          / n_seg,
          "decode_ms": _spread(rt_decode[1:]), "jax_decode_ms": _spread(jax_decode[1:])}


def _spread(times):
  ms = [1e3 * t for t in times]
  return {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}


def check(args) -> list[dict]:
  if args.model == "tiny":
    (config, params), tokenizer = tiny_model(), None
  else:
    config, params, tokenizer = models.load(args.model)
  scenario = engine_lib.Scenario.preset(args.scenario, batch_size=1) if args.scenario \
      else engine_lib.Scenario(segment_len=32, n_sink=4, n_window=32, batch_size=1,
                               max_new_tokens=args.steps + 8, short_threshold=16)
  # A trained set is served with its recorded sizes and positions; without one, the
  # initial gate (this checks numerics across runtimes, not answers).
  scenario, rope_positions = serving_scenario(scenario, args.gate, {})
  gate_kwargs = dict(gate_path=args.gate, untrained_gate=not args.gate,
                     rope_positions=rope_positions)
  scenario = dataclasses.replace(scenario, max_new_tokens=max(scenario.max_new_tokens,
                                                              args.steps + 1))
  prompt = _prompt(args, scenario, config.vocab_size, tokenizer)
  rows = []
  for mode in args.modes:
    engine = _engine(config, params, scenario, mode, prompt, gate_kwargs)
    for runtime in args.runtimes:
      fmt = deploy.RUNTIMES[runtime]
      directory = os.path.join(args.workdir, f"{mode}_{fmt}")
      row = {"mode": mode, "runtime": runtime, "prompt_tokens": int(prompt.shape[1]),
             "steps": args.steps}
      t0 = time.perf_counter()
      try:
        manifest = engine.export(directory, routes=("long",), formats=(fmt,))
      except export_lib.ExportError as e:
        rows.append({**row, "refused": str(e)})
        print(f"{mode}/{runtime}: refused: {e}", flush=True)
        continue
      row["export_s"] = time.perf_counter() - t0
      row["graph_mb"] = sum(os.path.getsize(os.path.join(directory, f["files"][fmt]))
                            for f in manifest["functions"].values()) / 2**20
      deployed = deploy.load(directory, runtime, num_threads=args.threads)
      row.update(replay(engine, deployed, prompt, args.steps))
      want, got = row.pop("generated")
      if tokenizer is not None:  # what a user reads: the first row's continuation
        row["text"], row["jax_text"] = tokenizer.decode(got[0]), tokenizer.decode(want[0])
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def _float_op_cases():
  """The float ops an integer engine computes between its integer ops (``layer_quant``'s
  list), the model's own functions on SmolLM2's config and the ``qa`` scenario's shapes
  (one segment; a few outlier channels, as the model has), plus the quantizer's own
  division as a control."""
  c = gguf.config_from_gguf(gguf.read_header(models.gguf_path("smollm2")))
  sc = engine_lib.Scenario.preset("qa")
  rs = np.random.RandomState(0)
  scale = np.where(rs.rand(c.hidden_size) < 0.02, 30, 1)
  x = (rs.randn(1, sc.segment_len, c.hidden_size) * scale).astype(np.float32)
  keys = sc.n_sink + sc.n_window + sc.segment_len
  scores = (3 * rs.randn(1, c.num_heads, sc.segment_len, keys)).astype(np.float32)
  q = rs.randn(1, sc.segment_len, c.num_heads, c.head_dim).astype(np.float32)
  pos = np.arange(1000, 1000 + sc.segment_len, dtype=np.int32)[None]
  norm = model_lib.RMSNorm(c.rms_norm_eps)
  ones = {"params": {"scale": jnp.ones(c.hidden_size, jnp.float32)}}
  return {
      "rmsnorm": (lambda x: norm.apply(ones, x), x),
      "softmax": (lambda s: jax.nn.softmax(s, axis=-1), scores),
      "silu": (jax.nn.silu, x),
      "rope": (lambda q, p: rope_lib.apply_rope(q, p, rope_lib.rope_inv_freq(c)), q, pos),
      "x*a + x*x": (lambda x: x * 1.37 + x * x, x),
      "x / scale (the quantizer's exact_div)": (lambda x: intsim.exact_div(x, 0.0137), x),
  }


def float_ops(args) -> list[dict]:
  """Each op of ``_float_op_cases`` exported alone and run in each runtime: the share of
  outputs whose float32 bits differ from XLA's and the largest difference in ulps."""
  rows = []
  for name, (fn, *inputs) in _float_op_cases().items():
    want = np.asarray(jax.jit(fn)(*inputs))
    names = [f"x{i}" for i in range(len(inputs))]
    graph = export_lib.Graph("op", lambda *a, fn=fn: (fn(*a),),
                             [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs],
                             names, ["y"])
    sig = {"inputs": [{"name": n} for n in names], "outputs": [{"name": "y"}]}
    for runtime in args.runtimes:
      path = os.path.join(args.workdir, f"op.{deploy.RUNTIMES[runtime]}")
      graph.write(path, deploy.RUNTIMES[runtime])
      got = runtime_lib.open_graph(path, "op", sig, runtime, args.threads)(
          dict(zip(names, inputs)))["y"]
      ulps = np.abs(want.view(np.int32).astype(np.int64) - got.view(np.int32).astype(np.int64))
      rows.append({"op": name, "runtime": runtime, "differ": float(np.mean(ulps > 0)),
                   "max_ulp": int(ulps.max()), "size": int(want.size)})
      print(json.dumps(rows[-1]), flush=True)
  if "onnxruntime" in args.runtimes:
    rows.append(qdq_matmul(args))
    print(json.dumps(rows[-1]), flush=True)
  return rows


def qdq_matmul(args) -> dict:
  """A projection in ONNX's QDQ form (DequantizeLinear on int8 codes and per-channel int8
  weights, a float MatMul, QuantizeLinear to int16, as an NPU provider takes it) in ONNX
  Runtime, against the integer projection it stands for (``intsim.qlinear_matmul``,
  ``onnx`` mode): the share of output codes that differ and the largest difference.
  Equal codes would mean the runtime fused the pattern into an integer kernel."""
  import onnx  # optional: the deploy-export tools
  from onnx import helper, numpy_helper

  c = gguf.config_from_gguf(gguf.read_header(models.gguf_path("smollm2")))
  rs = np.random.RandomState(0)
  m, k, n = 512, c.hidden_size, c.intermediate_size  # 512 rows of SmolLM2's up_proj
  x = rs.randint(-128, 128, (1, m, k)).astype(np.int8)
  w = rs.randint(-127, 128, (k, n)).astype(np.int8)
  sx, zx = np.float32(0.0213), np.int8(-7)
  sw = (0.01 * rs.rand(n) + 1e-3).astype(np.float32)
  sy, zy = np.float32(0.0011), np.int16(3)
  want = np.asarray(intsim.qlinear_matmul(x, sx, int(zx), w, sw, 0, sy, int(zy), np.int16,
                                          "onnx"))
  consts = {"w": w, "sx": np.asarray(sx), "zx": np.asarray(zx), "sw": sw,
            "zw": np.zeros(n, np.int8), "sy": np.asarray(sy), "zy": np.asarray(zy)}
  graph = helper.make_graph(
      [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
       helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], axis=1),
       helper.make_node("MatMul", ["xf", "wf"], ["yf"]),
       helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["y"])], "qdq",
      [helper.make_tensor_value_info("x", onnx.TensorProto.INT8, x.shape)],
      [helper.make_tensor_value_info("y", onnx.TensorProto.INT16, want.shape)],
      [numpy_helper.from_array(v, name) for name, v in consts.items()])
  path = os.path.join(args.workdir, "qdq.onnx")
  onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
  sig = {"inputs": [{"name": "x"}], "outputs": [{"name": "y"}]}
  got = runtime_lib.open_graph(path, "qdq", sig, "onnxruntime", args.threads)({"x": x})["y"]
  diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
  return {"op": "QDQ MatMul, int16 codes vs intsim (onnx mode)", "runtime": "onnxruntime",
          "differ": float(np.mean(diff > 0)), "max_ulp": int(diff.max()), "size": int(diff.size)}


def float_ops_table(rows) -> str:
  out = ["| op | runtime | outputs | bits differ from XLA | max ulps (codes) |",
         "|---|---|---|---|---|"]
  out += [f"| {r['op']} | {r['runtime']} | {r['size']:,} | {r['differ']:.1%} | {r['max_ulp']} |"
          for r in rows]
  return "\n".join(out)


def table(rows) -> str:
  out = ["| mode | runtime | max abs Δlogits | rel. | greedy | generate | max Δstate (rel.) | "
         "int state equal | graphs MB | export s | prefill ms/seg (JAX) | "
         "decode ms/token median [min-max] (JAX median) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "refused" in r:
      out.append(f"| {r['mode']} | {r['runtime']} | refused: {r['refused'][:110]}... "
                 "| | | | | | | | | |")
      continue
    d, j = r["decode_ms"], r["jax_decode_ms"]
    codes = "" if r["int_state_equal"] is None else f"{r['int_state_equal']:.4%}"
    out.append(f"| {r['mode']} | {r['runtime']} | {r['max_abs_logit_diff']:.1e} | "
               f"{r['max_rel_logit_diff']:.1e} | {r['greedy_agree']} | {r['generated_equal']} | "
               f"{r['max_state_diff']:.1e} ({r['max_rel_state_diff']:.0e}) | "
               f"{codes} | "
               f"{r['graph_mb']:.3g} | "
               f"{r['export_s']:.0f} | "
               f"{r['prefill_ms_per_segment']:.1f} ({r['jax_prefill_ms_per_segment']:.1f}) | "
               f"{d['median']:.1f} [{d['min']:.1f}-{d['max']:.1f}] ({j['median']:.1f}) |")
  return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m edgeinfinite_jax.cli.deploy_check",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="tiny",
                 help=f"tiny (random, 2 layers), a named model ({', '.join(models.MODELS)}), "
                      "a .gguf file or an HF checkpoint directory")
  p.add_argument("--scenario", default=None, choices=SCENARIOS,
                 help="default: segment 32, sink 4, window 32 (sized for the tiny model)")
  p.add_argument("--modes", default="float,fake_quant,integer",
                 type=lambda s: _choices(s, MODES, "--modes"))
  p.add_argument("--runtimes", default="litert,onnxruntime",
                 type=lambda s: _choices(s, tuple(deploy.RUNTIMES), "--runtimes"))
  p.add_argument("--segments", type=int, default=4, help="prompt segments (the last padded)")
  p.add_argument("--steps", type=int, default=40, help="greedy decode steps")
  p.add_argument("--threads", type=int, default=2, help="runtime CPU threads")
  p.add_argument("--gate", default=None,
                 help="a trained set (.npz: the gate, or the gate + LoRA), served with its "
                      "recorded sizes (default: the initial gate)")
  p.add_argument("--workdir", default=None, help="where the graphs go (default: a temp dir)")
  p.add_argument("--out", default=None, help="write the rows as JSON here")
  p.add_argument("--float-ops", action="store_true",
                 help="instead: run each float op of the integer path (RMSNorm, softmax, SiLU, "
                      "RoPE, ...) alone in each runtime and count outputs whose bits differ "
                      "from XLA's")
  return p


def _choices(text, allowed, flag):
  items = tuple(x for x in text.split(",") if x)
  bad = [x for x in items if x not in allowed]
  if bad or not items:
    raise argparse.ArgumentTypeError(f"{flag}={text!r}: each must be one of {allowed}")
  return items


def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = _parser().parse_args(argv)
  if args.segments < 2 or args.steps < 2:
    raise SystemExit("--segments and --steps: at least 2")
  with tempfile.TemporaryDirectory() as tmp:
    args.workdir = args.workdir or tmp
    os.makedirs(args.workdir, exist_ok=True)
    rows = float_ops(args) if args.float_ops else check(args)
  print(float_ops_table(rows) if args.float_ops else table(rows))
  for r in rows:
    if "text" in r:
      same = "the same as JAX" if r["text"] == r["jax_text"] else f"JAX: {r['jax_text']!r}"
      print(f"{r['mode']}/{r['runtime']} generated: {r['text']!r} ({same})")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


def cli(argv: Sequence[str] | None = None) -> None:
  """The console script ``edgeinfinite-deploy-check``: user errors as one line."""
  errors.run(main, "deploy_check", argv)


if __name__ == "__main__":
  cli()
