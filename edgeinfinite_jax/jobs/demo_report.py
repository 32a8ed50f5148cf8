"""The demo job's results: one function per table of ``results.md``, and the plots.

Each table function reads only the metrics record (``metrics.json``), so a
finished run's tables can be rebuilt from its record without rerunning anything.
"""

from __future__ import annotations

import os

import numpy as np

from edgeinfinite_jax.eval import longctx, plots


def _pct(x):
  return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.0f}%"


def passkey_table(ev) -> list[str]:
  lengths, sft_len = ev["lengths"], ev["sft_len"]
  head = "| method | " + " | ".join(f"{n} ({n / sft_len:g}×)" for n in lengths) + " | mean |"
  lines = ["## Passkey retrieval (key outside window + segment; accuracy over depths)", "",
           f"S-SFT length {sft_len} tokens; local reach {ev['reach']} tokens; depths "
           f"{', '.join(f'{d:.0%}' for d in ev['depths'])}.", "", head,
           "|" + "---|" * (len(lengths) + 2)]
  for method, g in ev["passkey"].items():
    lines.append(f"| {method} | " + " | ".join(_pct(a) for a in g["by_length"])
                 + f" | {_pct(g['mean'])} |")
  return lines


def beyond_table(ev) -> list[str]:
  beyond = ev.get("beyond") or {}
  if not beyond:
    return []
  lengths = ev["beyond_lengths"]
  return ["## Beyond the evaluation grid (one depth)", "",
          f"Depth {ev['beyond_depth']:.0%}; same key rule.", "",
          "| method | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
          "|" + "---|" * (len(lengths) + 1)] + [
      f"| {method} | " + " | ".join(_pct(a) for a in g["by_length"]) + " |"
      for method, g in beyond.items()]


def _seconds(t):
  return f"{1000 * t:.0f} ms" if t < 1 else f"{t:.1f} s"


def cost_table(cost) -> list[str]:
  lengths = cost[next(iter(cost))]["lengths"]
  lines = ["## Cost (batch 1, this machine; TTFT = prefill, median over the evaluated prompts)",
           "", "| method | " + " | ".join(f"TTFT {n}" for n in lengths)
           + " | KV + memory bytes (first → last) |", "|" + "---|" * (len(lengths) + 2)]
  for method, c in cost.items():
    lines.append(f"| {method} | " + " | ".join(_seconds(t) for t in c["ttft_s"])
                 + f" | {c['kv_bytes'][0]:,} → {c['kv_bytes'][-1]:,} |")
  return lines


def sft_table(sft) -> list[str]:
  lines = ["## S-SFT runs (answer loss: training samples first → last step; held-out: the "
           "held-out S-SFT samples)", "",
           "| trainable set | trainable params (share) | steps | first → final answer loss | "
           "held-out answer loss | gate bias (mean) | wall |", "|---|---|---|---|---|---|---|"]
  for run, s in sft.items():
    share = f"{s.get('trainable', 0):,} ({100 * s.get('trainable_share', 0):.3g}%)"
    gb = s.get("gate_bias_mean")
    steps = f"{s.get('final_step', 0):.0f}" if "final_step" in s else "—"
    loss = (f"{s['first_loss']:.3f} → {s['loss']:.3f}" if "first_loss" in s else "—")
    held = f"{s['eval_loss']:.3f}" if "eval_loss" in s else "—"
    wall = f"{s['wall_s']:.0f} s" if "wall_s" in s else "—"
    if s.get("loaded_from"):
      steps = f"{steps}, loaded from `{s['loaded_from']}`"
    lines.append(f"| {run} | {share} | {steps} | {loss} | {held} | "
                 f"{'—' if gb is None else f'{gb:.2f}'} | {wall} |")
  return lines


def quant_table(q) -> list[str]:
  lines = ["## Post-training quantization (weight-only, dequantized; fine_grained: per-group "
           "scales, rtn_per_tensor: one round-to-nearest scale per tensor)", "",
           "| weights | bits | held-out loss | held-out ppl | passkey @8× |", "|---|---|---|---|---|"]
  for name, p in q["presets"].items():
    lines.append(f"| {name} | {p['weight_bits']} | {p['heldout_loss']:.4f} | "
                 f"{p['heldout_ppl']:.2f} | {_pct(p['passkey_8x'])} |")
  return lines + [""] + integer_table(q.get("integer_path", {}))


def integer_table(ip) -> list[str]:
  if ip.get("status") != "ok":
    return [f"Integer path: {ip.get('status', 'not run')}."]
  some = next(iter(ip["modes"].values()))
  lines = [f"### Integer path vs fake-quant ({ip['recipe']}, base model, "
           f"{some['int_positions']:,} held-out positions, int16 linear outputs)", "",
           "| requantization | greedy agreement | max logit diff (output steps) | "
           "agreement vs float-dot fake-quant | floor: float-dot vs exact fake-quant | "
           "integer held-out loss |", "|---|---|---|---|---|---|"]
  for mode, m in ip["modes"].items():
    floor = m.get("float_dots_vs_exact_greedy_agree_pct")
    lines.append(f"| {mode} | {m['int_greedy_agree_pct']:.2f}% | {m['int_max_diff_steps']:.2f} | "
                 f"{m['int_vs_float_dots_greedy_agree_pct']:.2f}% | "
                 f"{'—' if floor is None else f'{floor:.2f}%'} | {m['int_eval_loss']:.4f} |")
  return lines


def suite_table(suite) -> list[str]:
  if not suite:
    return []
  c = suite["config"]
  kept = ", ".join(f"{m} keeps {i['n_kept']}" for m, i in c.get("methods", {}).items()
                   if "n_kept" in i)
  return ["## Long-context suite (every method at the first trained set's state bytes)", "",
          f"Held-out standard-library text ({c['split']}); {c['n']} samples per RULER length "
          f"and LCC bin, {len(c['nll_docs'])} NLL documents of {c['nll_length']} tokens; "
          f"local reach {c['reach']} tokens. Scores x100, mean ± standard error over "
          "samples; NLL in nats per token past local reach, with the paired difference to "
          f"streaming over the same documents. Per-head kept tokens: {kept or '—'}. "
          "h2o and snapkv evict segment by segment (`model/eviction.py`).", "",
          longctx.markdown_table(suite)]


def results_table(record) -> str:
  """Every table of a (possibly partial) record, as markdown: the suite first."""
  ev = record["eval"]
  beyond = beyond_table(ev)
  suite = suite_table(record.get("suite"))
  lines = (suite + ([""] if suite else []) + passkey_table(ev) + [""] + beyond
           + ([""] if beyond else []) + cost_table(ev["cost"]))
  if record.get("sft"):
    lines += [""] + sft_table(record["sft"])
  if record.get("quant"):
    lines += [""] + quant_table(record["quant"])
  pre = record.get("pretrain", {})
  if "eval_loss" in pre:
    lines += ["", f"Pretraining: {pre.get('final_step', 0):.0f} steps, held-out loss "
              f"{pre['eval_loss']:.3f} (ppl {pre.get('eval_ppl', 0):.2f})."]
  return "\n".join(lines) + "\n"


def write_results(workdir: str, record) -> str:
  """Plots and ``results.md`` in ``workdir`` (names recorded in ``record["plots"]``)."""
  ev = record["eval"]
  files = []
  for method, g in ev["passkey"].items():
    safe = method.replace("[", "_").replace("]", "").replace("+", "_")
    files.append(plots.passkey_heatmap(g, os.path.join(workdir, f"passkey_heatmap_{safe}.png"),
                                       title=f"passkey accuracy: {method}"))
  files.append(plots.ttft_memory(ev["cost"], os.path.join(workdir, "ttft_memory.png")))
  suite = record.get("suite")
  if suite:
    files.append(plots.scores_by_length(suite["table"], os.path.join(workdir, "suite_scores.png")))
    curves = {m: e["nll"] for m, e in suite["methods"].items() if e.get("nll")}
    if curves:
      files.append(plots.nll_curves(curves, os.path.join(workdir, "nll_position.png")))
  record["plots"] = [os.path.basename(f) for f in files]
  table = results_table(record)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("# EdgeInfinite demo results\n\n" + table + "\n"
            + "".join(f"![{os.path.basename(p)}]({os.path.basename(p)})\n" for p in files))
  return table
