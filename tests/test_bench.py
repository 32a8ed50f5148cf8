"""The benchmark command runs end to end (--quick) and writes a well-formed report.

No timing assertions: performance is measured by the benchmark, never by a test.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from edgeinfinite_jax.bench import plan, probes, suite
from edgeinfinite_jax.bench import report as report_lib  # `report` is the fixture below
from fast_compile import fast_env

pytestmark = pytest.mark.slow  # end to end: minutes on a 2-core CPU

LENGTHS = (64, 128)


def _table(md: str, header_start: str) -> list[list[str]]:
  """Rows (cells) of the markdown table whose header begins with header_start."""
  lines = md.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith(header_start))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([c.strip() for c in line.strip().strip("|").split("|")])
  return rows


def _number(cell: str) -> float:
  return float(cell.split()[0].replace(",", ""))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
  # --no-qat: the QAT step-cost row compiles two training steps (tens of seconds); its
  # rendering is checked below on a hand-made result. --repeats 2: every prompt read
  # twice, as a full run does. --jobs 4: the four methods run side by side (the
  # timings of a smoke run mean nothing anyway).
  args = ["--quick", "--lengths", ",".join(map(str, LENGTHS)), "--no-qat", "--jobs", "4",
          "--repeats", "2", "--out", str(out)]
  # XLA's cheap compiles (tests/fast_compile.py): five processes compile their own
  # engines for prompts of a few hundred tokens, so compiling is most of the run.
  proc = subprocess.run([sys.executable, "-m", "edgeinfinite_jax.bench", *args],
                        capture_output=True, text=True, timeout=300,
                        env=fast_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, out.read_text(), args


def test_report_has_machine_description_and_command(report):
  out, md, args = report
  assert "python -m edgeinfinite_jax.bench " + " ".join(args) in md
  assert "## Tiny random-weight model (smoke run) (`quick`)" in md
  machine = dict(r[:2] for r in _table(md, "| | |"))
  for key in ("cpu", "cores", "memory", "jax", "torch", "transformers", "date"):
    assert machine.get(key) and machine[key] != "unknown", key


def test_prefill_table_has_a_parsable_row_per_method_and_length(report):
  _, md, _ = report
  assert "## Errors" not in md, md[md.find("## Errors"):]
  rows = _table(md, "| method | context | TTFT")
  got = {(r[0], int(r[1])) for r in rows}
  assert got == {(m, n) for m in plan.METHODS for n in LENGTHS}
  for method, length, ttft, reads, per_tok, compile_s, delta, peak, state, compiles in rows:
    assert _number(ttft) > 0 and _number(per_tok) > 0 and _number(peak) > 0
    # --repeats 2: both reads listed, the TTFT is the faster
    assert _number(ttft) == min(float(x) for x in reads.split(" / "))
    assert _number(delta) >= 0 and _number(state) > 0
    if method in plan.ENGINE_METHODS:
      assert _number(compile_s) > 0
      # one prefill-segment and one decode function on the long route; the job that
      # also times generate (the shortest decode context) compiles its loop as well
      generated = int(length) == min(LENGTHS)  # --quick decodes at min and max length
      assert compiles == ("3" if generated else "2"), (method, length)


def test_decode_table_and_targets(report):
  _, md, _ = report
  rows = _table(md, "| method | context | median")
  assert {(r[0], int(r[1])) for r in rows} == {(m, n) for m in plan.METHODS for n in LENGTHS}
  for r in rows:
    assert _number(r[2]) > 0 and _number(r[3]) > 0
  targets = {t[1].split(" (here")[0]: t[2:] for t in _table(md, "| section | target |")}
  # The quick plan evaluates every group: every target has a row.
  assert list(targets) == list(report_lib.TARGETS)
  assert all(status in ("pass", "FAIL", "not measured") for _, status in targets.values())
  T = report_lib.TARGETS
  # The state-size target is checkable at any scale, and must hold.
  assert targets[T[1]][1] == "pass"
  assert "median of paired steps, alternating in one process" in targets[T[3]][0]
  assert "alternating pairs" in targets[T[10]][0] and targets[T[10]][1] in ("pass", "FAIL")
  # Measured at the quick lengths: the long route's FLOP rate against the peak, the
  # forward against transformers' and the full route's decode against transformers'.
  for t in (T[4], T[6], T[8], T[11]):
    assert targets[t][1] in ("pass", "FAIL"), (t, targets[t])
  assert "GFLOP/s" in targets[T[4]][0]


def test_forward_peak_and_profile_sections(report):
  out, md, _ = report
  rows = _table(md, "| runtime | tokens |")
  assert {(r[0], int(r[1])) for r in rows} == {("JAX forward", LENGTHS[0]),
                                               ("transformers", LENGTHS[0])}
  for r in rows:
    assert _number(r[2]) > 0 and _number(r[5]) > 0
  peak = re.search(r"= \*\*([0-9.]+) GFLOP/s\*\*", md)
  assert peak and float(peak.group(1)) > 0
  prof = _table(md, "| profiled |")
  assert [r[0] for r in prof] == [f"forward @ {LENGTHS[0]}"]
  # The forward's matmuls and softmax are found in XLA's HLO and take time.
  section, = json.loads((out.parent / "benchmarks/results.json").read_text())["sections"]
  cats = section["profiles"][0]["categories"]
  assert cats["matmul"] > 0 and cats["attention"] > 0, cats


def test_plot_and_raw_results_are_written_and_linked(report):
  out, md, _ = report
  links = re.findall(r"\]\(([^)]+)\)", md)
  assert "benchmarks/quick_ttft_memory.png" in links and "benchmarks/results.json" in links
  for link in links:
    assert os.path.getsize(out.parent / link) > 0
  results = json.loads((out.parent / "benchmarks/results.json").read_text())
  section, = results["sections"]
  assert {r["method"] for r in section["prefill"]} == set(plan.METHODS)
  for r in section["prefill"]:  # --repeats 2: the fastest of two reads
    assert len(r["ttft_runs_s"]) == 2 and r["ttft_s"] == min(r["ttft_runs_s"])
  assert "### QAT step cost\n\nSkipped: --no-qat." in md


def test_skipping_follows_the_trend_of_shorter_lengths():
  assert probes.estimate([], 1024) is None
  assert probes.estimate([(1024, 2.0)], 4096) == pytest.approx(8.0)
  # Quadratic trend: 4x per doubling.
  assert probes.estimate([(1024, 1.0), (2048, 4.0)], 8192) == pytest.approx(64.0)
  # Never extrapolates sub-linearly.
  assert probes.estimate([(1024, 1.0), (2048, 1.0)], 4096) == pytest.approx(2.0)


def test_length_and_method_flags_are_validated():
  assert suite.parse_lengths("1k,4096, 2k") == [1024, 2048, 4096]
  with pytest.raises(Exception):
    suite.parse_methods("full,bogus")
  assert suite.parse_methods("transformers,full") == ["full", "transformers"]


def test_qat_section_renders_what_qat_step_cost_returned(report):
  out, _, _ = report
  results = json.loads((out.parent / "benchmarks/results.json").read_text())
  section = results["sections"][0]
  raw = {"fp_step_ms": 10.0, "qat_step_ms": 12.5, "ratio": 1.25, "method": "edgeqat_ed", "n": 3}
  section["qat"] = {"raw": raw}
  md = report_lib.render_markdown(results)
  assert "| qat_step_ms | 12.5 |" in md
  assert "| QAT / full-precision step time | 1.25 (pass: target <= 1.5) |" in md
  assert dict((t["target"], t["status"]) for t in report_lib.evaluate_targets(section))[
      report_lib.TARGETS[12]] == "pass"
  section["qat"] = {"raw": {**raw, "ratio": 1.6}}
  assert "| QAT / full-precision step time | 1.60 (FAIL: target <= 1.5) |" in (
      report_lib.render_markdown(results))
  assert dict((t["target"], t["status"]) for t in report_lib.evaluate_targets(section))[
      report_lib.TARGETS[12]] == "FAIL"


def test_lengths_past_the_time_budget_or_a_failure_are_skipped_and_said_so(tmp_path,
                                                                           monkeypatch):
  """Planning only: probes.run_job is replaced by a model of the costs, no subprocess runs."""
  calls = []

  def fake_run_job(job, timeout):
    if job["kind"] not in ("engine", "torch"):  # forward, peak, profile: not planned here
      return {"error": "not run in this test"}
    calls.append((job["method"], job["length"], job["prefill"]))
    n = job["length"]
    if job["method"] == "streaming" and n >= 128:
      return {"error": "worker exited with -9 without a result"}
    out = {"method": job["method"], "length": n, "state_bytes": 1000,
           "decode_ms_median": 1.0, "decode_ms_min": 1.0, "decode_ms_p90": 1.0}
    if job["prefill"]:
      out["ttft_s"] = (n / 64) ** 2  # quadratic: 1, 4, then 16 (est.) > 10
    return out

  monkeypatch.setattr(probes, "run_job", fake_run_job)
  out = tmp_path / "B.md"
  argv = ["--quick", "--lengths", "64,128,256", "--methods", "full,streaming",
          "--max-seconds", "10", "--no-qat", "--no-plot", "--out", str(out)]
  suite.run(suite.build_parser().parse_args(argv), argv)
  md = out.read_text()
  rows = {(r[0], int(r[1])): r[2] for r in _table(md, "| method | context | TTFT")}
  assert rows[("full", 64)] == "1.000" and rows[("full", 128)] == "4.000"
  assert rows[("full", 256)] == "skipped (est. 16 s)"
  assert rows[("streaming", 128)] == "error"
  assert rows[("streaming", 256)] == "skipped (128 failed)"
  # Decode at the longest context comes from a synthetic state where its prefill did not run.
  assert ("full", 256, False) in calls and ("streaming", 256, False) in calls
  assert ("full", 256, True) not in calls and ("streaming", 256, True) not in calls
  decode = _table(md, "| method | context | median")
  assert {(r[0], int(r[1])) for r in decode} == {("full", 64), ("full", 256),
                                                 ("streaming", 64), ("streaming", 256)}
  # Interleaved: every method at a length before the next length.
  assert [(m, n) for m, n, _ in calls] == [("full", 64), ("streaming", 64), ("full", 128),
                                           ("streaming", 128), ("full", 256),
                                           ("streaming", 256)]
