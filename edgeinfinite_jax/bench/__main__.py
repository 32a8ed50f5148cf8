"""``python -m edgeinfinite_jax.bench``: see ``bench/suite.py``."""

import sys

from edgeinfinite_jax.bench import suite

sys.exit(suite.main())
