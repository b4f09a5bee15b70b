"""hrnn_lit: session-only and hierarchical RNN recommenders on Lightning + Hydra."""

import os as _os
import warnings as _warnings

# Idle OpenMP threads sleep instead of spinning (GNU OpenMP spins by default): on cores
# shared with other jobs a spinning thread takes CPU time that the jobs' working threads
# need. OpenMP reads this once, when torch loads it: so here, before anything imports
# torch. An explicit OMP_WAIT_POLICY=ACTIVE in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# conf/hydra/launcher/joblib.yaml has the name of the joblib plugin's structured config, so
# Hydra validates the file against it and warns that this schema matching is deprecated. The
# file is complete on its own (it works with or without the matching): silence that one
# warning, here so that it also holds in the launcher's worker processes.
_warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema"
)
