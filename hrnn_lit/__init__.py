"""hrnn_lit: session-only and hierarchical RNN recommenders on Lightning + Hydra."""

__version__ = "0.1.0"
