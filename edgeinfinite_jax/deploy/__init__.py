"""Exported step graphs in edge runtimes (LiteRT, ONNX Runtime), with numpy only.

``load(directory, runtime)`` -> ``Deployed``, which has the Engine's ``prefill``,
``decode`` and ``generate``. Importing this package imports no JAX.
"""

from edgeinfinite_jax.deploy.runtime import RUNTIMES, Deployed, DeployedState, load

__all__ = ["RUNTIMES", "Deployed", "DeployedState", "load"]
