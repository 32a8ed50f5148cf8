"""One line per user error, for every command-line entry point.

A mistyped path, a config value that breaks a rule, a workdir that is a file or that
another run holds: the user needs the message, which names the value, the path or the
key and the rule, not forty lines of traceback around it. ``run(main, prog)`` prints
``PROG: error: MESSAGE`` on stderr and exits 2 for the errors below (the classes the
framework raises for bad input, and the OS's for paths); ``--debug`` anywhere on the
command line re-raises with the traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import sys
import zipfile
from typing import Callable, Sequence

from edgeinfinite_jax.train import workdir as workdir_lib

# ValueError covers ConfigError, the checkpoint/GGUF/quant-config/export errors and the
# engine's input checks; OSError the paths; KeyError an unknown model name.
USER_ERRORS = (ValueError, OSError, KeyError, zipfile.BadZipFile, workdir_lib.WorkdirError,
               workdir_lib.CheckpointError)
DEBUG_FLAG = "--debug"
EXIT_USAGE = 2


def message(e: BaseException) -> str:
  """The error's text on one line (a KeyError's str() would quote it)."""
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  text = " ".join(str(text).split())
  return text or type(e).__name__


def run(main: Callable[[Sequence[str]], object], prog: str,
        argv: Sequence[str] | None = None) -> object:
  """``main(argv)`` with the ``--debug`` flag taken out; a user error becomes one line
  on stderr and exit status 2 (with ``--debug``: the traceback)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = DEBUG_FLAG in argv
  argv = [a for a in argv if a != DEBUG_FLAG]
  try:
    return main(argv)
  except USER_ERRORS as e:
    if debug:
      raise
    print(f"{prog}: error: {message(e)} ({DEBUG_FLAG} shows the traceback)", file=sys.stderr)
    raise SystemExit(EXIT_USAGE) from None
