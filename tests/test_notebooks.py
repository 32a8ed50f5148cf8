"""Every notebook in notebooks/ executes top to bottom in tiny mode, each within 3 minutes.

The notebooks run in a Jupyter kernel of *this* interpreter (so the virtual
environment that runs pytest, with this checkout installed): a kernelspec pointing
at ``sys.executable`` is written to a temporary ``JUPYTER_PATH``, so nothing has to
be registered beforehand (``ipykernel`` comes with the ``test`` extra). The
working directory is ``notebooks/``, as when a user opens them there;
``EDGEINFINITE_TINY=1`` selects tiny mode and ``EDGEINFINITE_WORKDIR`` keeps their
outputs in a temporary directory.
"""

import glob
import json
import os
import sys
import time

import pytest

import fast_compile

pytestmark = pytest.mark.slow  # end to end: minutes on a 2-core CPU

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
BUDGET_S = 180  # per notebook, the whole run
KERNEL = "edgeinfinite-test"


def test_there_are_notebooks():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {"quickstart.ipynb", "edgeinfinite_passkey.ipynb", "quantization.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_clean(path):
  """Stored without outputs; tiny-mode switch and get_config() instead of flags."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, \
          f"{os.path.basename(path)}: clear the outputs before committing"
  source = "\n".join(c.source for c in nb.cells)
  assert "EDGEINFINITE_TINY" in source and "TINY" in source and "get_config(" in source
  assert "DEFINE_config_file" not in source and "FLAGS" not in source


@pytest.fixture
def kernel(tmp_path, monkeypatch):
  """A kernelspec for this interpreter, found through JUPYTER_PATH."""
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "edgeinfinite_jax tests", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("EDGEINFINITE_TINY", "1")
  monkeypatch.setenv("EDGEINFINITE_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
  # XLA's cheap compiles (tests/fast_compile.py): a tiny-mode notebook compiles many small
  # programs and runs each for moments, so compiling dominates (quantization.ipynb
  # 68 s -> 50 s). The kernel is its own process: no cache is shared with this one.
  monkeypatch.setenv(fast_compile.ENV_VAR, "1")
  return KERNEL


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes_in_tiny_mode(path, kernel):
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, kernel_name=kernel, timeout=BUDGET_S, startup_timeout=120,
      resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  start = time.perf_counter()
  try:
    client.execute()  # raises CellExecutionError (with the traceback) on any error
  finally:
    elapsed = time.perf_counter() - start
    print(f"{os.path.basename(path)}: {elapsed:.1f}s")
  assert elapsed < BUDGET_S, f"{os.path.basename(path)} took {elapsed:.0f}s (> {BUDGET_S}s)"
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
  assert "tiny mode: True" in text
