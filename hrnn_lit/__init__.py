"""hrnn_lit: session-only and hierarchical RNN recommenders on Lightning + Hydra."""

import warnings as _warnings

__version__ = "0.1.0"

# conf/hydra/launcher/joblib.yaml has the name of the joblib plugin's structured config, so
# Hydra validates the file against it and warns that this schema matching is deprecated. The
# file is complete on its own (it works with or without the matching): silence that one
# warning, here so that it also holds in the launcher's worker processes.
_warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema"
)
