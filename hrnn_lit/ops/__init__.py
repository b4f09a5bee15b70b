"""Training ops with their own backward (docs/design.md §10): the pieces every network's
``start``/``step``/``score`` and the training loop are built from, so that speed comes from
fused ops and not from a second copy of a model.

- ``gru``: the GRU cell (C kernel forward and backward on CPU float32, torch elsewhere);
- ``tables``: rows of an item table with a coalesced row-sparse gradient (one row per
  distinct item, no per-occurrence rows to sort);
- ``candidates``: a chunk's distinct candidates and input items, computed once per chunk;
- ``sampled_loss``: the scores of a step's candidates and the ranking loss in one op,
  for networks whose scores are a linear form of their state (``score_factors``);
- ``activations``: the final activations and their derivatives.
Each op is tested against plain autograd in float64 (tests/test_ops.py).
"""
