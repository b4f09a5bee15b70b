"""Recommending from a trained model (docs/design.md §13): ``Recommender`` (Python) and
``mode=recommend`` (``hrnn_lit.recommend.cli``)."""

from hrnn_lit.recommend.recommender import Observed, Recommender

__all__ = ["Observed", "Recommender"]
