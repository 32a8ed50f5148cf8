"""Long-context benchmark (issues #3, #13): time to first token, memory, decode latency,
the training-path forward, against transformers on the same weights.

    python -m edgeinfinite_jax.bench                 # the full run, writes BENCHMARKS.md
    python -m edgeinfinite_jax.bench --sections=smollm2
    python -m edgeinfinite_jax.bench --quick         # tiny model, short lengths (smoke test)

The report has one section per plan (``plan.SECTIONS``): SmolLM2-135M-Instruct
(``plan.smollm2_plan``: the real model from its GGUF file, segments of 512,
with the forward, the matmul peak and per-fusion profiles) and a 55M
random-weight model (``plan.full_plan``: 8 layers, hidden 512, GQA 8/2 heads,
intermediate 1408, vocab 32000, float32, with the QAT step cost). Each is run
through

* our ``Engine`` with ``full`` (ring cache sized to the context), ``streaming``
  (sink + window) and ``edgeinfinite`` (sink + window + memory), always on the
  long route (``short_threshold=0``) -- ``workers.engine_worker`` -- and
* the same weights as a Hugging Face ``transformers`` PyTorch model (written by
  ``save_hf`` and loaded with ``attn_implementation="sdpa"``), as the external
  full-attention reference: ``model(input_ids, use_cache=True,
  logits_to_keep=1)``, which is what ``generate`` does for its prefill --
  ``torch_worker.torch_worker``.

Every (method, context length) measurement runs in a fresh subprocess
(``probes``) so that its peak memory is its own: the process warms up
(compiles) on a one-segment prompt, resets its RSS high-water mark
(``/proc/self/clear_refs``), reads the whole prompt, and reports the peak RSS
during the prefill minus the RSS just before it, next to the process's absolute
peak (``VmHWM``; ``measure``); it then reads the prompt again (``--repeats``, 2
in all, unless one read took more than a quarter of ``--max-seconds``), and the time
to first token is the fastest read (other load on a shared machine only ever
adds time); the report shows every read's time, so the spread is visible. At
each length every method runs before the next length starts. Lengths whose
time, extrapolated from the shorter ones of the same method, exceeds
``--max-seconds`` are skipped and reported as such. Decode latency is the median over ``--decode-steps``
single-token steps after warm-up, at the contexts of ``--decode-lengths``;
where that context's prefill was skipped, decoding runs from a synthetic state
holding that many tokens (the cost of a decode step does not depend on the
values in the cache), and the table says so. The decode target is paired: in
the edgeinfinite job at the longest context, the same compiled step alternates
between that state and one holding the shortest context, and the target is the
median of the per-pair time ratios (separate jobs run minutes apart, under
whatever else the machine is doing then).

The SmolLM2 section adds the training-path ``forward`` (full logits) against
transformers' forward at ``forward_lengths``, the CPU's float32 matmul rate
(a large ``jnp.dot``, timed in the same run) against which the long route's
prefill FLOPs (XLA's count) per second are reported, and per-fusion profiles
(``xla_profile``) that explain where the time of the forward and the prefills goes.
The 55M section times one QAT training step against a full-precision one
(``edgeinfinite_jax.bench.qat_step.qat_step_cost``; target <= 1.5x; ``--no-qat``
skips it).

The timings are wall-clock on whatever else the machine is doing: the report
(``report``) records the load average before and after the run. ``--jobs N``
runs methods side by side, for smoke runs only.

This module is the command line: ``build_parser``, ``plans_from_args`` (the
flags as ``plan.Plan`` s), ``run_section``, ``run`` and ``main``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import sys
import tempfile
import time

from edgeinfinite_jax.bench import plan as plan_lib
from edgeinfinite_jax.bench import probes, report, workers
from edgeinfinite_jax.bench.plan import METHODS, fmt_len


def parse_lengths(s: str) -> list[int]:
  out = []
  for part in s.split(","):
    part = part.strip().lower()
    if not part:
      continue
    mult = 1024 if part.endswith("k") else 1
    n = int(part[:-1] if part.endswith("k") else part) * mult
    if n <= 0:
      raise argparse.ArgumentTypeError(f"length {part!r} must be positive")
    out.append(n)
  return sorted(set(out))


def parse_methods(s: str) -> list[str]:
  out = [m.strip() for m in s.split(",") if m.strip()]
  bad = [m for m in out if m not in METHODS]
  if bad:
    raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
  return [m for m in METHODS if m in out]


def parse_sections(s: str) -> list[str]:
  out = [x.strip() for x in s.split(",") if x.strip()]
  bad = [x for x in out if x not in plan_lib.SECTIONS]
  if bad or not out:
    raise argparse.ArgumentTypeError(
        f"section(s) {bad or s!r}: choose from {list(plan_lib.SECTIONS)}")
  return [x for x in plan_lib.SECTIONS if x in out]


def build_parser() -> argparse.ArgumentParser:
  full, quick = plan_lib.full_plan(), plan_lib.quick_plan()
  p = argparse.ArgumentParser(
      prog="python -m edgeinfinite_jax.bench",
      description="TTFT, peak memory and decode latency of full / streaming / edgeinfinite "
                  "against a transformers reference; writes BENCHMARKS.md and a plot.")
  p.add_argument("--lengths", type=parse_lengths, default=None,
                 help="comma-separated context lengths, e.g. 1k,4k,32768 "
                      f"(default {','.join(fmt_len(n) for n in full.lengths)}; "
                      f"--quick: {','.join(map(str, quick.lengths))})")
  p.add_argument("--methods", type=parse_methods, default=list(METHODS),
                 help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
  p.add_argument("--decode-lengths", type=parse_lengths, default=None,
                 help="contexts for the decode latency (default "
                      f"{','.join(fmt_len(n) for n in full.decode_lengths)}; --quick: the "
                      "smallest and largest of --lengths)")
  p.add_argument("--decode-steps", type=int, default=None,
                 help=f"timed decode steps ({full.decode_steps})")
  p.add_argument("--decode-warmup", type=int, default=None,
                 help=f"untimed decode steps ({full.decode_warmup})")
  p.add_argument("--out", default="BENCHMARKS.md",
                 help="markdown report; the plot and raw JSON go to benchmarks/ beside it")
  p.add_argument("--quick", action="store_true",
                 help="tiny model and short lengths: a smoke run of a few seconds per job")
  p.add_argument("--sections", type=parse_sections, default=list(plan_lib.SECTIONS),
                 help="comma-separated subset of the report's sections "
                      f"({','.join(plan_lib.SECTIONS)}; default: all; ignored with --quick)")
  p.add_argument("--max-seconds", type=float, default=None,
                 help="skip a measurement whose extrapolated time exceeds this (default: "
                      "each section's, " + ", ".join(
                          f"{k} {make().max_seconds:.0f}" for k, make in
                          plan_lib.SECTIONS.items()) + ")")
  p.add_argument("--segment-len", type=int, default=None)
  p.add_argument("--window", type=int, default=None, help="n_window in tokens")
  p.add_argument("--sink", type=int, default=None, help="n_sink")
  p.add_argument("--threads", type=int, default=None,
                 help="torch threads (default: the usable cores; JAX uses them all)")
  p.add_argument("--repeats", type=int, default=None,
                 help="prefills per length; TTFT is the fastest "
                      f"({full.repeats}; --quick: {quick.repeats})")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--jobs", type=int, default=1,
                 help="measurements run at a time (one per method); >1 only for smoke runs: "
                      "concurrent runs share the CPU, so their timings mean nothing")
  p.add_argument("--no-qat", action="store_true", help="skip the optional QAT step-cost row")
  p.add_argument("--no-plot", action="store_true")
  return p


def plans_from_args(args) -> list[plan_lib.Plan]:
  """The ``--quick`` plan or the chosen sections' plans, with the command line's changes."""
  makers = [plan_lib.quick_plan] if args.quick else [plan_lib.SECTIONS[s] for s in args.sections]
  return [plan_from_args(args, make) for make in makers]


def plan_from_args(args, make) -> plan_lib.Plan:
  """A section's plan (``make``: a ``plan`` constructor) with the command line's changes."""
  if args.repeats is not None and args.repeats < 1:
    raise SystemExit(f"--repeats={args.repeats}: must be >= 1")
  if args.jobs < 1:
    raise SystemExit("--jobs must be >= 1")
  changes = {k: v for k, v in dict(
      lengths=args.lengths, decode_lengths=args.decode_lengths, decode_steps=args.decode_steps,
      decode_warmup=args.decode_warmup, repeats=args.repeats,
      max_seconds=args.max_seconds).items() if v is not None}
  plan = make(**changes)
  scenario = {k: v for k, v in (("segment_len", args.segment_len), ("n_window", args.window),
                                ("n_sink", args.sink)) if v is not None}
  return dataclasses.replace(
      plan, scenario={**plan.scenario, **scenario}, methods=tuple(args.methods),
      seed=args.seed, jobs=args.jobs,
      threads=args.threads or plan_lib.usable_cores(), qat=None if args.no_qat else plan.qat)


def _meta(plans: list[plan_lib.Plan], argv: list[str], t_start: float, load_start,
          results_json: str) -> dict:
  """The run's settings and circumstances, as the report's header shows them."""
  load = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
  return dict(
      command="python -m edgeinfinite_jax.bench" + (" " + shlex.join(argv) if argv else ""),
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      load_start=load(load_start), load_end=load(os.getloadavg()),
      wall_s=time.perf_counter() - t_start, quick=any(p.quick for p in plans),
      jobs=max(p.jobs for p in plans), threads=plans[0].threads,
      omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), results_json=results_json)


def _section_meta(plan: plan_lib.Plan, config, n_params: int, wall_s: float) -> dict:
  """One section's settings, as its part of the report shows them."""
  return dict(
      name=plan.name, title=plan.title, source=plan.source, model=dict(plan.model),
      model_desc=report.model_description(config), n_params=n_params,
      scenario=dict(plan.scenario), lengths=list(plan.lengths), methods=list(plan.methods),
      decode_lengths=list(plan.decode_lengths), decode_steps=plan.decode_steps,
      decode_warmup=plan.decode_warmup, repeats=plan.repeats, threads=plan.threads,
      max_seconds=plan.max_seconds, jobs=plan.jobs, targets=list(plan.targets),
      generate_tokens=plan.generate_n, wall_s=wall_s)


def run_section(plan: plan_lib.Plan, progress: probes.Progress) -> dict:
  """Every measurement of one section, each in its own subprocess."""
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="edgeinfinite_bench_") as tmp:
    ckpt = os.path.join(tmp, "model")
    progress.step(f"{plan.name}: writing the checkpoint")
    config, n_params = workers.write_checkpoint(plan.source, dict(plan.model),
                                                dict(plan.scenario), plan.seed, ckpt)
    prefill_rows, decode_rows = probes.measure_methods(plan, ckpt, progress)
    forward_rows = probes.measure_forward(plan, ckpt, progress)
    peak = probes.measure_peak(plan, progress)
    profiles = probes.measure_profiles(plan, ckpt, progress)
  qat = probes.measure_qat(plan, progress)
  section = dict(meta=_section_meta(plan, config, n_params, time.perf_counter() - t0),
                 prefill=prefill_rows, decode=decode_rows, forward=forward_rows, peak=peak,
                 profiles=profiles, qat=qat)
  section["targets"] = report.evaluate_targets(section)
  return section


def run(args, argv: list[str]) -> dict:
  """Plans, runs every measurement in a subprocess, writes the report; returns the results."""
  t_start, load_start = time.perf_counter(), os.getloadavg()
  plans = plans_from_args(args)
  out_path = os.path.abspath(args.out)
  aux_dir = os.path.join(os.path.dirname(out_path), "benchmarks")
  json_path = os.path.join(aux_dir, "results.json")
  progress = probes.Progress(sum(p.job_count() for p in plans))
  sections = [run_section(p, progress) for p in plans]
  progress.close()
  results = dict(meta=_meta(plans, argv, t_start, load_start,
                            os.path.relpath(json_path, os.path.dirname(out_path))),
                 machine=probes.machine_description(plans[0].threads), sections=sections)
  report.write(results, out_path, json_path, None if args.no_plot else aux_dir)
  print(f"[bench] wrote {out_path} ({results['meta']['wall_s']:.0f} s)", file=sys.stderr)
  for s in sections:
    for t in s["targets"]:
      print(f"[bench] {s['meta']['name']}: {t['status']:>12}: {t['target']} -- {t['measured']}",
            file=sys.stderr)
  return results


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  run(build_parser().parse_args(argv), argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
