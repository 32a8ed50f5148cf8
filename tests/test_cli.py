"""The command line refuses a mistyped ``--config.KEY`` in one line, before any work."""

import os
import subprocess
import sys

import pytest

from edgeinfinite_jax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "experiments/configs/pretrain_tiny.py:tiny"  # relative to ROOT, the subprocess's cwd
TINY_ABS = os.path.join(ROOT, TINY)


@pytest.mark.slow
def test_unknown_override_is_one_line_naming_the_nearest_key(tmp_path):
  """ml_collections used to print a 55-line traceback ending in AttributeError."""
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "edgeinfinite_jax.cli.main", f"--config={TINY}",
       f"--workdir={workdir}", "--config.optim.lrr=1e-3"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1] == (f"main: error: --config.optim.lrr: no such config key in {TINY}; "
                       "did you mean --config.optim.lr?"), proc.stderr
  assert not workdir.exists()  # nothing ran


def test_override_error_checks_every_form_of_the_flag():
  base = ["main", f"--config={TINY_ABS}", "--workdir=/tmp/unused"]
  assert main.override_error(base + ["--config.optim.lr=1e-3", "--config.train.steps", "3",
                                     "--noconfig.train.progress"]) is None
  assert main.override_error(base + ["--config.model.memory.gate=mlp"]) is None
  assert "did you mean --config.train.steps?" in main.override_error(
      base + ["--config.train.step", "3"])
  assert "did you mean --config.train.progress?" in main.override_error(
      base + ["--noconfig.train.progres"])
  assert "did you mean --config.optim.lr?" in main.override_error(
      ["main", "--config", TINY_ABS, "--config.optimm.lr=1"])
  assert main.override_error(base + ["--config.quantize.method=qat"]).startswith(
      "--config.quantize.method: no such config key in ")  # the section's old name:
  assert "('quantize' was renamed 'quant_job')" in main.override_error(  # told the new one
      base + ["--config.quantize.method=qat"])
  assert main.override_error(base + ["--config.zzzzzz=1"]).endswith(
      f"--config.zzzzzz: no such config key in {TINY_ABS}")  # nothing near: no guess
  # A config file that does not load is absl's to report (with its own message).
  assert main.override_error(["main", "--config=nope.py", "--config.optim.lrr=1"]) is None
