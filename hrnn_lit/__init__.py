"""hrnn_lit: session-only and hierarchical RNN recommenders on Lightning + Hydra."""

import os as _os
import warnings as _warnings

# Idle OpenMP threads spin only briefly before they sleep (GNU OpenMP spins for 300,000
# iterations by default): on cores shared with other jobs a long-spinning thread takes CPU
# time that the jobs' working threads need, while sleeping at once (OMP_WAIT_POLICY=PASSIVE)
# makes every parallel op of a lone run wait for threads to wake (docs/benchmarks.md).
# OpenMP reads this once, when torch loads it: so here, before anything imports torch.
# GOMP_SPINCOUNT or OMP_WAIT_POLICY set in the environment win.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"

# conf/hydra/launcher/joblib.yaml has the name of the joblib plugin's structured config, so
# Hydra validates the file against it and warns that this schema matching is deprecated. The
# file is complete on its own (it works with or without the matching): silence that one
# warning, here so that it also holds in the launcher's worker processes.
_warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema"
)


def __getattr__(name: str):
    """``from hrnn_lit import Recommender`` (imported on first use: torch loads after the
    OpenMP setting above)."""
    if name == "Recommender":
        from hrnn_lit.recommend import Recommender

        return Recommender
    raise AttributeError(f"module 'hrnn_lit' has no attribute {name!r}")
