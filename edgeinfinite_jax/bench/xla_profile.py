"""Where a compiled JAX computation spends its time on the CPU, per XLA fusion.

``fusion_profile(run)`` traces one call of ``run`` with ``jax.profiler``, reads
the trace back with ``jax.profiler.ProfileData`` (no TensorBoard needed) and sums
the duration of every executed HLO instruction by what it computes, as read from
XLA's own optimized HLO (dumped by the worker: ``hlo_dump_flags``):

* ``matmul``: a fusion with a ``dot`` and no exponential (projections, MLP, logits);
* ``attention``: the softmax (any fusion with an ``exponential``, with or without
  the score ``dot``), and everything inside a ``while`` loop's body (the only loops
  in a forward or a prefill step are ``blockwise_attention``'s key blocks);
* ``rope``: sine/cosine tables and rotations;
* ``data movement``: copies, transposes, concatenations, slices, updates, gathers;
* ``elementwise``: everything else (norms, activations, masks, selects).

An instruction's time is its wall time on the thread that launched it, which
includes the part of its work that XLA's thread pool ran on other cores (a
2048x2048 matmul on 2 cores shows as one event of its wall time, not two).
Independent instructions may run at the same time on different threads, so the
sum over instructions can exceed the call's wall time; ``outside`` is the wall
time minus that sum when positive (dispatch, waiting on the host). This is the
profile that ``BENCHMARKS.md`` shows next to the targets it does not reach.

(Not ``profile.py``: the reference worker runs by file path with this folder first on
``sys.path``, where a ``profile`` module would shadow the standard library's, which
torch imports.)
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time
from typing import Callable

import jax
from jax.profiler import ProfileData

CATEGORIES = ("matmul", "attention", "rope", "data movement", "elementwise")
_MOVE = {"copy", "transpose", "concatenate", "slice", "dynamic-slice", "dynamic-update-slice",
         "gather", "scatter", "pad", "reshape", "bitcast", "broadcast", "iota", "parameter",
         "constant", "tuple", "get-tuple-element", "convert"}
_CONTROL = {"while", "conditional", "call"}  # their bodies' instructions are traced themselves
_LINE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_OPCODE = re.compile(r"\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def _instructions(body: str):
  """(name, opcode, called computation or None) of each instruction in ``body``."""
  for line in body.splitlines():
    m = _LINE.match(line)
    op = m and _OPCODE.search(m.group(2))
    if op:
      calls = _CALLS.search(m.group(2))
      yield m.group(1), op.group(1), calls.group(1) if calls else None


def hlo_dump_flags(directory: str) -> str:
  """``XLA_FLAGS`` that make XLA write every module's optimized HLO as text there."""
  return f"--xla_dump_to={directory} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$"


def _computations(text: str) -> dict[str, str]:
  """Computation name -> its body, for one HLO module's text."""
  out, name, body = {}, None, []
  for line in text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head and not line.startswith(" "):
      name, body = head.group(1), []
    elif line.startswith("}") and name is not None:
      out[name] = "\n".join(body)
      name = None
    elif name is not None:
      body.append(line)
  return out


def _ops(body: str) -> set[str]:
  return {op for _, op, _ in _instructions(body)}


def categorize(ops: set[str]) -> str:
  """A fusion's category from the HLO opcodes it contains (``CATEGORIES``)."""
  if "exponential" in ops:
    return "attention"
  if "dot" in ops or "convolution" in ops:
    return "matmul"
  if ops & {"sine", "cosine"}:
    return "rope"
  if ops <= _MOVE:
    return "data movement"
  return "elementwise"


def instruction_categories(dump_dir: str) -> dict[str, str | None]:
  """Every instruction of the optimized modules in ``dump_dir``: its category, or
  None for control flow (a loop's body is traced instruction by instruction)."""
  out: dict[str, str | None] = {}
  # Largest module first: where small helper modules reuse an instruction name, the
  # name of the big computation under test wins.
  for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")),
                     key=os.path.getsize, reverse=True):
    with open(path) as f:
      text = f.read()
    comps = _computations(text)
    loop_bodies = set(re.findall(r"\bbody=%?([\w.\-]+)", text))
    for comp, body in comps.items():
      for name, opcode, called in _instructions(body):
        if opcode in _CONTROL:
          kind = None
        elif comp in loop_bodies:
          kind = "attention"
        elif opcode == "fusion" and called in comps:
          kind = categorize(_ops(comps[called]))
        else:
          kind = categorize({opcode})
        out.setdefault(name, kind)
  return out


def fusion_profile(run: Callable[[], object], dump_dir: str, threads: int) -> dict:
  """One traced call of ``run`` (already compiled; its HLO dumped to ``dump_dir``):
  wall seconds (``traced_s``), instruction seconds per category (``busy_s`` their
  sum), ``outside_s`` (wall minus that sum, when positive) and the eight most
  expensive instruction kinds. Events the HLO does not name (the runtime's own
  waits and dispatch) are not counted as busy."""
  kinds = instruction_categories(dump_dir)
  with tempfile.TemporaryDirectory(prefix="edgeinfinite_profile_") as trace_dir:
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    data = ProfileData.from_file(path)
  busy = collections.Counter()
  top = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        kind = kinds.get(ev.name)
        if kind is None:
          continue
        busy[kind] += ev.duration_ns * 1e-9
        top[(re.sub(r"\.\d+$", "", ev.name), kind)] += ev.duration_ns * 1e-9
  total = sum(busy.values())
  return dict(traced_s=wall, threads=threads, busy_s=total, outside_s=max(wall - total, 0.0),
              categories={k: busy.get(k, 0.0) for k in CATEGORIES},
              top=[dict(name=n, category=k, seconds=s) for (n, k), s in top.most_common(8)])
