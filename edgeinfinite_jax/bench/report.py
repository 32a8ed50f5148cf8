"""``BENCHMARKS.md`` from a run's results: one function per section, table and plot.

``results`` is what ``suite.run`` collects (and writes to ``benchmarks/results.json``):
``meta``, ``machine`` and ``sections``, each with its ``meta``, ``prefill``,
``decode`` and ``forward`` rows, ``peak``, ``profiles``, ``qat`` and ``targets``
(``evaluate_targets``: the rules of its plan's target groups).
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from edgeinfinite_jax.bench.plan import (  # noqa: E402
    DECODE, FORWARD, FULL_MEMORY, FULL_ROUTE, LONG_ROUTE, QAT, REFERENCE, THROUGHPUT, fmt_len)
from edgeinfinite_jax.bench.xla_profile import CATEGORIES  # noqa: E402

MIB = 1024 * 1024

COLORS = dict(full="tab:red", streaming="tab:blue", edgeinfinite="tab:green",
              transformers="tab:gray")


# ----------------------------------------------------------------------------- cells
def fmt_s(x):
  if x is None:
    return "—"
  return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_bytes(n):
  if n is None:
    return "—"
  return f"{n:,} ({n / MIB:.1f} MiB)"


def ttft_cell(r: dict) -> str:
  if r.get("skipped"):
    if r.get("estimate_s") is None:
      return f"skipped ({r.get('reason', 'not run')})"
    return f"skipped (est. {r['estimate_s']:.0f} s)"
  if r.get("error"):
    return "timed out" if r.get("timed_out") else "error"
  return fmt_s(r.get("ttft_s"))


def model_description(config) -> str:
  return (f"{config.num_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_heads} heads / {config.num_kv_heads} KV heads "
          f"(head_dim {config.head_dim}), intermediate "
          f"{config.intermediate_size}, vocab {config.vocab_size}")


# ----------------------------------------------------------------------------- targets
# Issue #13's targets, by group (``plan.Plan.targets`` picks a section's groups). Each
# rule reads a section's rows and returns one row of the targets table.
FULL_MEMORY_MIB = 452  # half of the 904 MiB the full route's 16k prefill took before #13


def _row(rows, method, n):
  return next((r for r in rows if r["method"] == method and r["length"] == n), None)


def _timed(r) -> bool:
  return r is not None and r.get("ttft_s") is not None


def _target(target: str, measured: str, ok: bool | None) -> dict:
  status = "not measured" if ok is None else ("pass" if ok else "FAIL")
  return dict(target=target, measured=measured, status=status)


def _linear_ttft_target(s) -> dict:
  t = TARGETS[0]
  a, b = _row(s["prefill"], "edgeinfinite", 4096), _row(s["prefill"], "edgeinfinite", 32768)
  if not (_timed(a) and _timed(b)):
    return _target(t, "needs 4k and 32k edgeinfinite rows", None)
  ratio = b["ttft_s"] / a["ttft_s"]
  return _target(t, f"{ratio:.2f} ({fmt_s(b['ttft_s'])} s / {fmt_s(a['ttft_s'])} s)",
                 ratio <= 9)


def _state_target(s) -> dict:
  parts, ok = [], None
  for m in ("streaming", "edgeinfinite"):
    sizes = {r["state_bytes"] for r in s["prefill"] + s["decode"]
             if r["method"] == m and r.get("state_bytes")}
    if sizes:
      parts.append(f"{m}: " + ", ".join(f"{x:,}" for x in sorted(sizes)) + " B")
      ok = len(sizes) == 1 and ok is not False
  return _target(TARGETS[1], "; ".join(parts) or "—", ok)


def _reference_target(s) -> dict:
  t = TARGETS[2]
  b, ref = _row(s["prefill"], "edgeinfinite", 32768), _row(s["prefill"], REFERENCE, 32768)
  if _timed(b) and _timed(ref):
    speed = ref["ttft_s"] / b["ttft_s"]
    return _target(t, f"{speed:.2f}x ({fmt_s(ref['ttft_s'])} s vs {fmt_s(b['ttft_s'])} s)",
                   speed >= 5)
  if _timed(b) and ref is not None and ref.get("estimate_s") is not None:
    return _target(t, f"~{ref['estimate_s'] / b['ttft_s']:.1f}x against the reference's "
                   f"extrapolated {ref['estimate_s']:.0f} s (not measured)", None)
  return _target(t, "needs 32k edgeinfinite and transformers rows", None)


def _decode_target(s) -> dict:
  dec = {r["decode_context"]: r for r in s["decode"]
         if r["method"] == "edgeinfinite" and r.get("decode_ms_median") is not None}
  lengths = s["meta"]["decode_lengths"]
  short, long_ = min(lengths), max(lengths)
  paired = dec.get(long_, {}).get("paired")
  tgt = TARGETS[3]
  if (short, long_) != (1024, 32768):
    tgt += f" (here {fmt_len(long_)} vs {fmt_len(short)})"
  if paired and paired["context"] == short:
    ratio = paired["ratio"]
    return _target(tgt, f"{ratio:.2f} (median of paired steps, alternating in one process: "
                   f"{paired['long_ms']:.2f} ms / {paired['short_ms']:.2f} ms)", ratio <= 1.2)
  if short in dec and long_ in dec and short != long_:
    ratio = dec[long_]["decode_ms_median"] / dec[short]["decode_ms_median"]
    return _target(tgt, f"{ratio:.2f} ({dec[long_]['decode_ms_median']:.2f} ms / "
                   f"{dec[short]['decode_ms_median']:.2f} ms, separate runs)", ratio <= 1.2)
  return _target(TARGETS[3], "needs two decode contexts", None)


def _throughput_target(s) -> dict:
  t = TARGETS[4]
  peak = s.get("peak") or {}
  rows = [r for r in s["prefill"] if r["method"] == "edgeinfinite" and r.get("prefill_flops")
          and _timed(r)]
  if not rows or not peak.get("flops_per_s"):
    return _target(t, "needs the matmul peak and the longest edgeinfinite prefill", None)
  r = rows[-1]
  rate = r["prefill_flops"] / r["ttft_s"]
  frac = rate / peak["flops_per_s"]
  return _target(t, f"{100 * frac:.0f}% at {fmt_len(r['length'])} ({rate / 1e9:.1f} GFLOP/s of "
                 f"XLA-counted FLOPs vs {peak['flops_per_s'] / 1e9:.1f} GFLOP/s for a "
                 f"{peak['n']}x{peak['n']} jnp.dot)", frac >= 0.6)


def _full_ttft_target(s) -> dict:
  t = TARGETS[5]
  ratios = []
  for n in (1024, 2048, 4096, 8192, 16384):
    a, ref = _row(s["prefill"], "full", n), _row(s["prefill"], REFERENCE, n)
    if _timed(a) and _timed(ref):
      ratios.append((n, a["ttft_s"] / ref["ttft_s"]))
  if not ratios:
    return _target(t, "needs full and transformers rows at 1k-16k", None)
  cells = ", ".join(f"{fmt_len(n)} {r:.2f}" for n, r in ratios)
  return _target(t, f"full / transformers: {cells}", all(r <= 1.0 for _, r in ratios))


def _decode_vs_reference(s, method: str, n: int, target: str) -> dict:
  dec = {(r["method"], r["decode_context"]): r for r in s["decode"]
         if r.get("decode_ms_median") is not None}
  a, ref = dec.get((method, n)), dec.get((REFERENCE, n))
  if a is None or ref is None:
    return _target(target, f"needs {method} and transformers decode rows at {fmt_len(n)}", None)
  ratio = a["decode_ms_median"] / ref["decode_ms_median"]
  return _target(target, f"{ratio:.2f} ({a['decode_ms_median']:.2f} ms / "
                 f"{ref['decode_ms_median']:.2f} ms per token, medians)", ratio <= 1.0)


def _full_decode_target(s) -> dict:
  return _decode_vs_reference(s, "full", max(s["meta"]["decode_lengths"]), TARGETS[6])


def _full_memory_target(s) -> dict:
  r = _row(s["prefill"], "full", 16384)
  if not _timed(r) or r.get("peak_delta_mib") is None:
    return _target(TARGETS[7], "needs the 16k full row", None)
  return _target(TARGETS[7], f"{r['peak_delta_mib']:.0f} MiB", r["peak_delta_mib"]
                 <= FULL_MEMORY_MIB)


def _forward_rows(s):
  rows = {(r["method"], r["length"]): r for r in s.get("forward", []) if _timed(r)}
  return rows, sorted({n for _, n in rows})


def _forward_time_target(s) -> dict:
  rows, lengths = _forward_rows(s)
  ratios = [(n, rows[("forward", n)]["ttft_s"] / rows[(REFERENCE, n)]["ttft_s"])
            for n in lengths if ("forward", n) in rows and (REFERENCE, n) in rows]
  if not ratios:
    return _target(TARGETS[8], "needs forward rows of both", None)
  return _target(TARGETS[8], "forward / transformers: " + ", ".join(
      f"{fmt_len(n)} {r:.2f}" for n, r in ratios), all(r <= 1.0 for _, r in ratios))


def _forward_memory_target(s) -> dict:
  rows, _ = _forward_rows(s)
  r = rows.get(("forward", 4096))
  if r is None:
    return _target(TARGETS[9], "needs the 4k forward row", None)
  return _target(TARGETS[9], f"{r['peak_delta_mib']:.0f} MiB (transformers: "
                 f"{rows[(REFERENCE, 4096)]['peak_delta_mib']:.0f} MiB)"
                 if (REFERENCE, 4096) in rows else f"{r['peak_delta_mib']:.0f} MiB",
                 r["peak_delta_mib"] < 1024)


def _generate_target(s) -> dict:
  rows = [r for r in s["decode"] if r.get("generate")]
  if not rows:
    return _target(TARGETS[10], "needs a decode row with its prefill", None)
  parts = [f"{r['method']} {r['generate']['ratio']:.2f} ({fmt_s(r['generate']['generate_s'])}"
           f" s / {fmt_s(r['generate']['steps_s'])} s)" for r in rows]
  g = rows[0]["generate"]
  return _target(TARGETS[10], f"{'; '.join(parts)}: {g['tokens']} tokens after "
                 f"{fmt_len(g['context'])}, median of {g['repeats']} alternating pairs",
                 all(r["generate"]["ratio"] <= 1.0 for r in rows))


def _short_decode_target(s) -> dict:
  return _decode_vs_reference(s, "full", min(s["meta"]["decode_lengths"]), TARGETS[11])


def _qat_target(s) -> dict:
  q = s.get("qat") or {}
  if not q.get("raw"):
    return _target(TARGETS[12], q.get("reason") or q.get("error") or "not run", None)
  r = q["raw"]
  return _target(TARGETS[12], f"{r['ratio']:.2f} ({r['qat_step_ms']:.0f} ms / "
                 f"{r['fp_step_ms']:.0f} ms, median of {r['n']} alternating rounds)",
                 r["ratio"] <= 1.5)


TARGETS = (
    "edgeinfinite TTFT grows linearly: TTFT(32k) / TTFT(4k) <= 9",
    "streaming / edgeinfinite state bytes identical at every length",
    "edgeinfinite TTFT at 32k >= 5x faster than the transformers reference",
    "edgeinfinite decode latency at 32k <= 1.2x that at 1k",
    "long-route (edgeinfinite) prefill at its longest length >= 60% of the matmul peak",
    "full route TTFT <= transformers at every length 1k-16k",
    "full route decode at the longest context <= transformers",
    f"full route working memory (Δ peak RSS) at 16k <= {FULL_MEMORY_MIB} MiB",
    "forward (full logits) at 1k and 4k no slower than transformers' forward",
    "forward at 4k: working memory (Δ peak RSS) under 1 GiB",
    "generate of N tokens (one compiled loop) <= prefill + N-1 single decode calls",
    "full route decode at 1k no slower than transformers",
    "QAT training step <= 1.5x a full-precision step",
)
TARGET_GROUPS = {
    LONG_ROUTE: (_linear_ttft_target, _state_target, _reference_target, _decode_target),
    THROUGHPUT: (_throughput_target,),
    FULL_ROUTE: (_full_ttft_target, _full_decode_target),
    FULL_MEMORY: (_full_memory_target,),
    FORWARD: (_forward_time_target, _forward_memory_target),
    DECODE: (_generate_target, _short_decode_target),
    QAT: (_qat_target,),
}


def evaluate_targets(section: dict) -> list[dict]:
  """A section's targets (its plan's groups), each with what was measured and
  pass / FAIL / not measured."""
  return [rule(section) for group in section["meta"]["targets"]
          for rule in TARGET_GROUPS[group]]


# ----------------------------------------------------------------------------- plot
def _plot_prefill(axes, results: dict, methods):
  """TTFT (measured and extrapolated) and memory against the context length."""
  for m in methods:
    rows = sorted((r for r in results["prefill"] if r["method"] == m), key=lambda r: r["length"])
    meas = [(r["length"], r["ttft_s"]) for r in rows if r.get("ttft_s") is not None]
    est = [(r["length"], r["estimate_s"]) for r in rows
           if r.get("skipped") and r.get("estimate_s") is not None]
    c = COLORS.get(m)
    if meas:
      axes[0].plot(*zip(*meas), "o-", color=c, label=m)
    if est:
      axes[0].plot(*zip(*(meas[-1:] + est)), "o--", color=c, mfc="none",
                   label=f"{m} (skipped, est.)")
    mem = [(r["length"], r["peak_delta_mib"]) for r in rows if r.get("peak_delta_mib") is not None]
    if mem:
      axes[1].plot(*zip(*mem), "o-", color=c, label=f"{m}: peak RSS - RSS before prefill")
    st = [(r["length"], r["state_bytes"] / MIB) for r in rows if r.get("state_bytes")]
    if st:
      axes[1].plot(*zip(*st), "x:", color=c, label=f"{m}: state / KV cache")
  ticks = sorted({r["length"] for r in results["prefill"]})
  for ax, title, ylabel in ((axes[0], "time to first token", "seconds"),
                            (axes[1], "memory during prefill (solid) and state (dotted)", "MiB")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ticks, [fmt_len(n) for n in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=7)
  # One legend entry per method: the line style says which quantity.
  handles = [h for h in axes[1].get_lines() if ": peak RSS" in h.get_label()]
  axes[1].legend(handles, [h.get_label().split(":")[0] for h in handles], fontsize=7)


def _plot_decode(ax, results: dict, methods):
  """Median decode latency, one bar per method and decode context."""
  dec = [r for r in results["decode"] if r.get("decode_ms_median") is not None]
  ctxs = sorted({r["decode_context"] for r in dec})
  width = 0.8 / max(len(ctxs), 1)
  for j, ctx in enumerate(ctxs):
    vals = [next((r["decode_ms_median"] for r in dec
                  if r["method"] == m and r["decode_context"] == ctx), 0.0) for m in methods]
    bars = ax.bar([i + j * width for i in range(len(methods))], vals, width,
                  label=f"context {fmt_len(ctx)}")
    ax.bar_label(bars, [f"{v:.0f}" if v else "" for v in vals], fontsize=7)
  ax.set_xticks([i + width * (len(ctxs) - 1) / 2 for i in range(len(methods))])
  ax.set_xticklabels(methods)
  ax.set_yscale("log")
  ax.set_ylabel("ms / token (median)")
  ax.set_title("decode latency")
  ax.legend(fontsize=7)


def plot(results: dict, methods, path: str) -> str:
  """``benchmarks/ttft_memory.png``: TTFT, memory, decode latency side by side."""
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
  _plot_prefill(axes[:2], results, methods)
  _plot_decode(axes[2], results, methods)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- markdown
def _header(meta: dict) -> list[str]:
  lines = ["# Benchmarks", "",
           "Long-context prefill and decode, and the training-path forward, on CPU, float32, "
           "batch 1 (issues #3, #13), against transformers on the same weights. Generated by "
           "`python -m edgeinfinite_jax.bench` (`make bench`); do not edit by hand.", ""]
  if meta.get("quick"):
    lines += ["**Smoke run (`--quick`): a tiny model and short contexts; the numbers say "
              "nothing about performance.**", ""]
  if meta.get("jobs", 1) > 1:
    lines += [f"**{meta['jobs']} measurements ran at a time (`--jobs`): they shared the CPU, "
              "so these timings are not comparable.**", ""]
  return lines + ["Command:", "", "```", meta["command"], "```", ""]


def _machine_table(meta: dict, machine: dict) -> list[str]:
  lines = ["## Machine", "", "| | |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in machine.items()]
  return lines + [f"| date | {meta['date']} |",
                  f"| load average (1, 5, 15 min) at start | {meta['load_start']} |",
                  f"| load average at end | {meta['load_end']} |",
                  f"| wall time of the run | {meta['wall_s']:.0f} s |", ""]


def _llama_cpp(machine: dict) -> list[str]:
  """Issue #13's second outside reference, llama.cpp on the same GGUF file: skipped
  with a note unless ``llama-cpp-python`` is installed (no wheel is published; it
  builds from source with a C++ compiler and CMake)."""
  if machine.get("llama-cpp-python", "not installed") != "not installed":
    return ["llama.cpp: `llama-cpp-python` is installed but no section measures it yet.", ""]
  return ["llama.cpp (a second outside reference on the same GGUF file): not measured, "
          "`llama-cpp-python` is not installed (it publishes no wheel and builds from "
          "source).", ""]


def _noise(sections: list[dict]) -> list[str]:
  """How much repeated reads of the same prompt differed: the run's noise."""
  spreads = [max(r["ttft_runs_s"]) / min(r["ttft_runs_s"]) - 1
             for s in sections for r in s["prefill"] + s.get("forward", [])
             if len(r.get("ttft_runs_s") or []) > 1]
  if not spreads:
    return []
  spreads.sort()
  med = spreads[len(spreads) // 2]
  return [f"Noise: over the {len(spreads)} measurements read more than once, the slower read "
          f"was {100 * med:.0f}% slower than the faster at the median and "
          f"{100 * spreads[-1]:.0f}% at worst (every read is in the tables' `reads` column "
          "and in the raw results).", ""]


def _targets_table(sections: list[dict]) -> list[str]:
  lines = ["## Targets", "", "| section | target | measured | status |", "|---|---|---|---|"]
  return lines + [f"| {s['meta']['name']} | {t['target']} | {t['measured']} | {t['status']} |"
                  for s in sections for t in s["targets"]] + [""]


def _scenario_section(meta: dict, run_meta: dict) -> list[str]:
  weights = ("random weights (timing does not depend on them)" if meta["source"] == "random"
             else f"the `{meta['source']}` model's GGUF weights dequantized to float32 "
             "(`checkpoints.models`)")
  return [
      f"- Model: {meta['model_desc']}; {meta['n_params']:,} parameters, {weights}, float32.",
      f"- Engine scenario: segment_len={meta['scenario']['segment_len']}, "
      f"n_sink={meta['scenario']['n_sink']}, n_window={meta['scenario']['n_window']}, "
      "batch 1, short_threshold=0 (every prompt takes the long route, i.e. the method "
      "under test); `full` gets a ring cache of exactly the context (rounded up to a "
      "segment, plus the decode steps).",
      "- Reference: the same weights as a `transformers` `LlamaForCausalLM` "
      "(`save_hf` + `from_pretrained`, `attn_implementation=\"sdpa\"`), "
      "`model(input_ids, use_cache=True, logits_to_keep=1)` under "
      f"`torch.inference_mode()`, `torch.set_num_threads({meta['threads']})`, "
      f"`OMP_WAIT_POLICY={run_meta.get('omp_wait_policy', 'PASSIVE')}` (with the default "
      "spinning policy, any other load on the cores makes torch's threads stall each "
      "other). Decoding feeds one token at a time with the returned `past_key_values`.",
      f"- A length is skipped when its time, extrapolated from the shorter lengths of the "
      f"same method, exceeds --max-seconds={meta['max_seconds']:.0f} s; a read longer "
      f"than {meta['max_seconds'] / 4:.0f} s is not repeated. Section wall time: "
      f"{meta['wall_s']:.0f} s.", ""]


def _reads(r: dict) -> str:
  runs = r.get("ttft_runs_s") or []
  return " / ".join(fmt_s(x) for x in runs) if runs else "—"


def _prefill_row_cells(r: dict) -> list[str]:
  ttft = r.get("ttft_s")
  return [r["method"], str(r["length"]), ttft_cell(r), _reads(r),
          f"{ttft / r['length'] * 1e3:.3f}" if ttft is not None else "—",
          fmt_s(r.get("compile_s")),
          f"{r['peak_delta_mib']:.0f}" if r.get("peak_delta_mib") is not None else "—",
          f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") is not None else "—",
          fmt_bytes(r.get("state_bytes")),
          str(r["compile_count"]) if r.get("compile_count") is not None else "—"]


def _prefill_table(meta: dict, rows: list[dict]) -> list[str]:
  lines = ["### Time to first token and memory", ""]
  if meta.get("plot"):
    lines += [f"![TTFT and memory]({meta['plot']})", ""]
  lines += ["TTFT: wall time of the whole prefill, from the token array to the last token's "
            "logits on the host side, after a warm-up that compiled the step functions; the "
            f"fastest of up to {meta.get('repeats', 1)} prefill(s) of the same prompt (reads: "
            "each one's time; the first also measures the memory), for every method alike. "
            "Compile: XLA tracing + compilation time of the warm-up (prefill-segment and decode "
            "functions). Δ peak RSS: the process's peak resident memory during the prefill minus "
            "its RSS just before it (the working memory of the prefill; weights and runtime "
            "excluded). Peak RSS: the whole process's peak (weights, runtime, compiler "
            "included). State: `state_nbytes` of the engine state after the prefill; for "
            "transformers, the bytes of its KV cache.", "",
            "| method | context | TTFT (s) | reads (s) | ms / prompt token | compile (s) "
            "| Δ peak RSS (MiB) | peak RSS (MiB) | state bytes | compilations |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  return lines + ["| " + " | ".join(_prefill_row_cells(r)) + " |" for r in rows] + [""]


def _decode_table(meta: dict, rows: list[dict]) -> list[str]:
  lines = ["### Decode latency", "",
           f"Median over {meta['decode_steps']} single-token decode steps after "
           f"{meta['decode_warmup']} warm-up steps, starting from a state holding the context. "
           "`synthetic`: that context's prefill was skipped, so decoding started from a state "
           "of that length filled with placeholder values (a step's cost does not depend on "
           "them). The decode target is the median ratio of paired steps: the edgeinfinite "
           "job at the longest context alternates the same compiled step between its state "
           "and one holding the shortest context.", "",
           "| method | context | median (ms / token) | min (ms) | p90 (ms) | state |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("decode_ms_median") is None:
      cell = r.get("error", "not measured")
      lines.append(f"| {r['method']} | {r['decode_context']} | {cell} | — | — | — |")
      continue
    lines.append(f"| {r['method']} | {r['decode_context']} | {r['decode_ms_median']:.2f} | "
                 f"{r['decode_ms_min']:.2f} | {r['decode_ms_p90']:.2f} | "
                 f"{'synthetic' if r.get('synthetic_state') else 'after prefill'} |")
  return lines + [""]


def _forward_table(rows: list[dict]) -> list[str]:
  if not rows:
    return []
  lines = ["### Training-path forward", "",
           "`model.transformer.forward(config, params, tokens)` (float32 logits at every "
           "position, `[1, T, vocab]`) against transformers' `model(input_ids, "
           "use_cache=False).logits`, each in its own process, alternating per length: one "
           "untimed call (JAX compiles for the shape), then the reads (the first inside the "
           "memory window).", "",
           "| runtime | tokens | time (s) | reads (s) | Δ peak RSS (MiB) | peak RSS (MiB) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("ttft_s") is None:
      lines.append(f"| {r['method']} | {r['length']} | {r.get('error', 'not measured')} "
                   "| — | — | — |")
      continue
    lines.append(f"| {'JAX forward' if r['method'] == 'forward' else r['method']} | "
                 f"{r['length']} | {fmt_s(r['ttft_s'])} | {_reads(r)} | "
                 f"{r['peak_delta_mib']:.0f} | {r['peak_rss_mib']:.0f} |")
  return lines + [""]


def _peak_lines(peak: dict | None) -> list[str]:
  if not peak:
    return []
  if peak.get("error"):
    return ["### Matmul peak", "", f"Failed: {peak['error']}", ""]
  return ["### Matmul peak", "",
          f"`jnp.dot` of two {peak['n']}x{peak['n']} float32 matrices on all cores, fastest "
          f"of 10 in this run: {peak['seconds'] * 1e3:.1f} ms = "
          f"**{peak['flops_per_s'] / 1e9:.1f} GFLOP/s**, the rate the throughput target is "
          "measured against.", ""]


def _profile_table(rows: list[dict]) -> list[str]:
  if not rows:
    return []
  lines = ["### Where the time goes (XLA per-fusion profile)", "",
           "One call traced with `jax.profiler` after a warm-up (`bench/xla_profile.py`): the "
           "time of every executed HLO instruction, grouped by what XLA's optimized HLO says it "
           "computes (matmul: projections, MLP, logits; attention: score and mix products "
           "inside the blockwise loop and the softmax; rope: the rotation and its tables). An "
           "instruction's time is its wall time, including the part of its work XLA's thread "
           "pool ran on the other core; instructions that ran at the same time both count, so "
           "shares are of the sum over instructions, and `outside` is wall time in no "
           "instruction (dispatch, host).", "",
           "| profiled | wall (s) | sum over instructions (s) | " + " | ".join(CATEGORIES)
           + " | outside (s) | top instructions |",
           "|---|---|---|" + "---|" * len(CATEGORIES) + "---|---|"]
  for r in rows:
    name = f"{r['what']} @ {fmt_len(r['length'])}"
    if r.get("error") or not r.get("traced_s"):
      lines.append(f"| {name} | {r.get('error', 'not measured')} |" + " |" * (
          len(CATEGORIES) + 3))
      continue
    total = max(r["busy_s"], 1e-12)
    pct = lambda x: f"{x:.2f} ({100 * x / total:.0f}%)"
    top = "; ".join(f"{t['name']} ({t['category']}) {t['seconds']:.2f} s" for t in r["top"][:3])
    lines.append(f"| {name} | {fmt_s(r['traced_s'])} | {fmt_s(r['busy_s'])} | "
                 + " | ".join(pct(r["categories"][k]) for k in CATEGORIES)
                 + f" | {r['outside_s']:.2f} | {top} |")
  return lines + [""]


def _qat_section(q: dict | None) -> list[str]:
  if q is None:
    return []
  lines = ["### QAT step cost", ""]
  if q.get("skipped"):
    return lines + [f"Skipped: {q.get('reason')}.", ""]
  if q.get("error"):
    return lines + [f"`edgeinfinite_jax.bench.qat_step.qat_step_cost` failed: {q['error']}.", ""]
  raw = q["raw"]
  lines += ["`edgeinfinite_jax.bench.qat_step.qat_step_cost(config)` on the same model config: "
            "one training step (donated state, as `train.run` compiles it), full precision vs "
            "QAT (student forward and backward plus the frozen teacher's forward), "
            "alternating for n rounds after a compiling warm-up; `ratio` is the median of "
            "the per-round QAT / full-precision ratios. Target: at most 1.5.", "",
            "| quantity | value |", "|---|---|"]
  for k, v in raw.items():
    lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
  ratio = raw["ratio"]
  return lines + [f"| QAT / full-precision step time | {ratio:.2f} "
                  f"({'pass' if ratio <= 1.5 else 'FAIL'}: target <= 1.5) |", ""]


def _errors_section(s: dict) -> list[str]:
  errors = [r for r in s["prefill"] + s["decode"] + s.get("forward", []) + s.get("profiles", [])
            if r.get("error")]
  if not errors:
    return []
  return ["### Errors", ""] + [
      f"- {r.get('method', r.get('what'))} @ {r.get('length', r.get('decode_context'))}: "
      f"{r['error']}" for r in errors] + [""]


def render_section(s: dict, run_meta: dict) -> list[str]:
  meta = s["meta"]
  return ([f"## {meta['title']} (`{meta['name']}`)", ""] + _scenario_section(meta, run_meta)
          + _prefill_table(meta, s["prefill"]) + _decode_table(meta, s["decode"])
          + _forward_table(s.get("forward", [])) + _peak_lines(s.get("peak"))
          + _profile_table(s.get("profiles", [])) + _qat_section(s.get("qat"))
          + _errors_section(s))


def render_markdown(results: dict) -> str:
  meta, sections = results["meta"], results["sections"]
  lines = (_header(meta) + _machine_table(meta, results["machine"]) + _noise(sections)
           + _llama_cpp(results["machine"]) + _targets_table(sections))
  for s in sections:
    lines += render_section(s, meta)
  lines += [f"Raw results: [{meta['results_json']}]({meta['results_json']}).", ""]
  return "\n".join(lines)


def write(results: dict, out_path: str, json_path: str, plot_dir: str | None):
  """The plots (one per section, unless ``plot_dir`` is None), the raw JSON and the
  markdown report."""
  out_dir = os.path.dirname(out_path)
  os.makedirs(os.path.dirname(json_path), exist_ok=True)
  for s in results["sections"]:
    if plot_dir is not None:
      path = os.path.join(plot_dir, f"{s['meta']['name']}_ttft_memory.png")
      plot(s, s["meta"]["methods"], path)
      s["meta"]["plot"] = os.path.relpath(path, out_dir)
  with open(json_path, "w") as f:
    json.dump(results, f, indent=2, default=str)
  with open(out_path, "w") as f:
    f.write(render_markdown(results))
