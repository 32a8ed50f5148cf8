"""``BENCHMARKS.md`` from a run's results: one function per section, table and plot.

``results`` is what ``suite.run`` collects (and writes to ``benchmarks/results.json``):
``meta``, ``machine``, ``prefill`` and ``decode`` rows, ``qat`` and ``targets``.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from edgeinfinite_jax.bench.plan import REFERENCE, fmt_len  # noqa: E402

MIB = 1024 * 1024

TARGETS = (
    "edgeinfinite TTFT grows linearly: TTFT(32k) / TTFT(4k) <= 9",
    "streaming / edgeinfinite state bytes identical at every length",
    "edgeinfinite TTFT at 32k >= 5x faster than the transformers reference",
    "edgeinfinite decode latency at 32k <= 1.2x that at 1k",
    "generate of N tokens (one compiled loop) <= prefill + N-1 single decode calls",
)
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
def _row(rows, method, n):
  return next((r for r in rows if r["method"] == method and r["length"] == n), None)


def _timed(r) -> bool:
  return r is not None and r.get("ttft_s") is not None


def _linear_ttft_target(rows) -> dict:
  a, b = _row(rows, "edgeinfinite", 4096), _row(rows, "edgeinfinite", 32768)
  if not (_timed(a) and _timed(b)):
    return dict(target=TARGETS[0], measured="needs 4k and 32k edgeinfinite rows",
                status="not measured")
  ratio = b["ttft_s"] / a["ttft_s"]
  return dict(target=TARGETS[0], measured=f"{ratio:.2f} ({fmt_s(b['ttft_s'])} s / "
              f"{fmt_s(a['ttft_s'])} s)", status="pass" if ratio <= 9 else "FAIL")


def _state_target(results) -> dict:
  parts, status = [], "not measured"
  for m in ("streaming", "edgeinfinite"):
    sizes = {r["state_bytes"] for r in results["prefill"] + results["decode"]
             if r["method"] == m and r.get("state_bytes")}
    if sizes:
      parts.append(f"{m}: " + ", ".join(f"{s:,}" for s in sorted(sizes)) + " B")
      status = ("FAIL" if len(sizes) > 1 or status == "FAIL" else "pass")
  return dict(target=TARGETS[1], measured="; ".join(parts) or "—", status=status)


def _reference_target(rows) -> dict:
  b, ref = _row(rows, "edgeinfinite", 32768), _row(rows, REFERENCE, 32768)
  if _timed(b) and _timed(ref):
    speed = ref["ttft_s"] / b["ttft_s"]
    return dict(target=TARGETS[2], measured=f"{speed:.2f}x ({fmt_s(ref['ttft_s'])} s vs "
                f"{fmt_s(b['ttft_s'])} s)", status="pass" if speed >= 5 else "FAIL")
  if _timed(b) and ref is not None and ref.get("estimate_s") is not None:
    speed = ref["estimate_s"] / b["ttft_s"]
    return dict(target=TARGETS[2], measured=f"~{speed:.1f}x against the reference's "
                f"extrapolated {ref['estimate_s']:.0f} s (not measured)", status="not measured")
  return dict(target=TARGETS[2], measured="needs 32k edgeinfinite and transformers rows",
              status="not measured")


def _decode_target(decode_rows, decode_lengths) -> dict:
  dec = {r["decode_context"]: r for r in decode_rows
         if r["method"] == "edgeinfinite" and r.get("decode_ms_median") is not None}
  short, long_ = min(decode_lengths), max(decode_lengths)
  paired = dec.get(long_, {}).get("paired")
  tgt = TARGETS[3]
  if (short, long_) != (1024, 32768):
    tgt += f" (here {fmt_len(long_)} vs {fmt_len(short)})"
  if paired and paired["context"] == short:
    ratio = paired["ratio"]
    return dict(target=tgt, measured=f"{ratio:.2f} (median of paired steps, alternating "
                f"in one process: {paired['long_ms']:.2f} ms / {paired['short_ms']:.2f} ms)",
                status="pass" if ratio <= 1.2 else "FAIL")
  if short in dec and long_ in dec and short != long_:
    ratio = dec[long_]["decode_ms_median"] / dec[short]["decode_ms_median"]
    return dict(target=tgt, measured=f"{ratio:.2f} ({dec[long_]['decode_ms_median']:.2f} ms"
                f" / {dec[short]['decode_ms_median']:.2f} ms, separate runs)",
                status="pass" if ratio <= 1.2 else "FAIL")
  return dict(target=TARGETS[3], measured="needs two decode contexts", status="not measured")


def _generate_target(decode_rows) -> dict:
  rows = [r for r in decode_rows if r.get("generate")]
  if not rows:
    return dict(target=TARGETS[4], measured="needs a decode row with its prefill",
                status="not measured")
  parts = [f"{r['method']} {r['generate']['ratio']:.2f} ({fmt_s(r['generate']['generate_s'])}"
           f" s / {fmt_s(r['generate']['steps_s'])} s)" for r in rows]
  g = rows[0]["generate"]
  return dict(target=TARGETS[4], measured=f"{'; '.join(parts)}: {g['tokens']} tokens after "
              f"{fmt_len(g['context'])}, median of {g['repeats']} alternating pairs",
              status="pass" if all(r["generate"]["ratio"] <= 1.0 for r in rows) else "FAIL")


def evaluate_targets(results: dict, lengths, decode_lengths) -> list[dict]:
  """The issues' targets, each with what was measured and pass / fail / n/a."""
  return [_linear_ttft_target(results["prefill"]), _state_target(results),
          _reference_target(results["prefill"]),
          _decode_target(results["decode"], decode_lengths),
          _generate_target(results["decode"])]


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
           "Long-context prefill and decode on CPU, float32, batch 1 (issue #3). "
           "Generated by `python -m edgeinfinite_jax.bench`; do not edit by hand.", ""]
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


def _scenario_section(meta: dict) -> list[str]:
  return [
      "## Model and scenario", "",
      f"- Model: {meta['model_desc']}; {meta['n_params']:,} parameters, random weights "
      "(timing does not depend on them), float32.",
      f"- Engine scenario: segment_len={meta['scenario']['segment_len']}, "
      f"n_sink={meta['scenario']['n_sink']}, n_window={meta['scenario']['n_window']}, "
      "batch 1, short_threshold=0 (every prompt takes the long route, i.e. the method "
      "under test); `full` gets a ring cache of exactly the context (rounded up to a "
      "segment, plus the decode steps).",
      f"- Reference: the same weights as a `transformers` `LlamaForCausalLM` "
      "(`save_hf` + `from_pretrained`, `attn_implementation=\"sdpa\"`), "
      "`model(input_ids, use_cache=True, logits_to_keep=1)` under "
      f"`torch.inference_mode()`, `torch.set_num_threads({meta['threads']})`, "
      f"`OMP_WAIT_POLICY={meta.get('omp_wait_policy', 'PASSIVE')}` (with the default "
      "spinning policy, any other load on the cores makes torch's threads stall each "
      "other). Decoding feeds one token at a time with the returned `past_key_values`.",
      f"- A length is skipped when its time, extrapolated from the shorter lengths of the "
      f"same method, exceeds --max-seconds={meta['max_seconds']:.0f} s.", ""]


def _targets_table(targets: list[dict]) -> list[str]:
  lines = ["## Targets", "", "| target | measured | status |", "|---|---|---|"]
  return lines + [f"| {t['target']} | {t['measured']} | {t['status']} |" for t in targets]


def _prefill_row_cells(r: dict) -> list[str]:
  ttft = r.get("ttft_s")
  return [r["method"], str(r["length"]), ttft_cell(r),
          f"{ttft / r['length'] * 1e3:.3f}" if ttft is not None else "—",
          fmt_s(r.get("compile_s")),
          f"{r['peak_delta_mib']:.0f}" if r.get("peak_delta_mib") is not None else "—",
          f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") is not None else "—",
          fmt_bytes(r.get("state_bytes")),
          str(r["compile_count"]) if r.get("compile_count") is not None else "—"]


def _prefill_table(meta: dict, rows: list[dict]) -> list[str]:
  lines = ["", "## Time to first token and memory", ""]
  if meta.get("plot"):
    lines += [f"![TTFT and memory]({meta['plot']})", ""]
  lines += ["TTFT: wall time of the whole prefill, from the token array to the last token's "
            "logits on the host side, after a warm-up that compiled the step functions; the "
            f"fastest of {meta.get('repeats', 1)} prefill(s) of the same prompt (the first "
            "also measures the memory), for every method alike. "
            "Compile: XLA tracing + compilation time of the warm-up (prefill-segment and decode "
            "functions). Δ peak RSS: the process's peak resident memory during the prefill minus "
            "its RSS just before it (the working memory of the prefill; weights and runtime "
            "excluded). Peak RSS: the whole process's peak (weights, runtime, compiler "
            "included). State: `state_nbytes` of the engine state after the prefill; for "
            "transformers, the bytes of its KV cache.", "",
            "| method | context | TTFT (s) | ms / prompt token | compile (s) | Δ peak RSS (MiB) "
            "| peak RSS (MiB) | state bytes | compilations |",
            "|---|---|---|---|---|---|---|---|---|"]
  return lines + ["| " + " | ".join(_prefill_row_cells(r)) + " |" for r in rows]


def _decode_table(meta: dict, rows: list[dict]) -> list[str]:
  lines = ["", "## Decode latency", "",
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
  return lines


def _qat_section(q: dict | None) -> list[str]:
  lines = ["", "## QAT step cost", ""]
  if not q or q.get("skipped"):
    return lines + [f"Skipped: {q.get('reason') if q else 'not run'}."]
  if q.get("error"):
    return lines + [f"`edgeinfinite_jax.bench.qat_step.qat_step_cost` failed: {q['error']}."]
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
                  f"({'pass' if ratio <= 1.5 else 'FAIL'}: target <= 1.5) |"]


def _errors_section(results: dict) -> list[str]:
  errors = [r for r in results["prefill"] + results["decode"] if r.get("error")]
  if not errors:
    return []
  return ["", "## Errors", ""] + [
      f"- {r['method']} @ {r.get('length', r.get('decode_context'))}: {r['error']}"
      for r in errors]


def render_markdown(results: dict) -> str:
  meta = results["meta"]
  lines = (_header(meta) + _machine_table(meta, results["machine"]) + _scenario_section(meta)
           + _targets_table(results["targets"]) + _prefill_table(meta, results["prefill"])
           + _decode_table(meta, results["decode"]) + _qat_section(results.get("qat"))
           + _errors_section(results))
  lines += ["", f"Raw results: [{meta['results_json']}]({meta['results_json']}).", ""]
  return "\n".join(lines)


def write(results: dict, out_path: str, json_path: str, plot_path: str | None):
  """The plot (unless ``plot_path`` is None), the raw JSON and the markdown report."""
  out_dir = os.path.dirname(out_path)
  os.makedirs(os.path.dirname(json_path), exist_ok=True)
  if plot_path is not None and plot(results, results["meta"]["methods"], plot_path):
    results["meta"]["plot"] = os.path.relpath(plot_path, out_dir)
  with open(json_path, "w") as f:
    json.dump(results, f, indent=2, default=str)
  with open(out_path, "w") as f:
    f.write(render_markdown(results))
