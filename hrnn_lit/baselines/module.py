"""Non-neural baselines (docs/design.md §2): POP, user popularity, Item-KNN and V-SkNN, as
the LightningModules the configs name (``conf/model/{pop,user_pop,item_knn,vsknn}.yaml``).

Each holds its network (``models/popularity.py``, ``models/knn.py``: the model API, no
trainable parameters) and the evaluation every network gets (``hrnn_lit.evaluation.loop``:
history replay, then the targets ranked against the whole catalogue). It is *fitted* from
the fit split's ``Steps`` with no gradient step (``trainable = False``: ``run.py`` calls
``fit_data`` and then only ``trainer.validate`` / ``trainer.test``).
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
from torch import nn

from hrnn_lit.baselines.knn import ItemKNNNet, VSKNNNet, check_int
from hrnn_lit.baselines.popularity import PopNet, UserPopNet
from hrnn_lit.data.batching import Steps
from hrnn_lit.evaluation.evaluator import Evaluation
from hrnn_lit.evaluation.hooks import EvaluationHooks
from hrnn_lit.evaluation.loop import EvalLoop

Counts = np.ndarray | list[int] | None
KS = (5, 10, 20)


class BaselineRecommender(EvaluationHooks, pl.LightningModule):
    """A baseline network fitted from data (``fit_data``) and evaluated by the loop."""

    trainable = False

    def __init__(self, net: nn.Module, ks=KS, ties: str = "conservative", eval_block=1024):
        super().__init__()
        check_int("eval_block", eval_block, 1)
        self.net = net
        self.evaluation = Evaluation(ks, ties)
        self.eval_loop = EvalLoop(net.n_items, eval_block)

    def fit_data(self, steps: Steps, **kwargs) -> None:
        """The network's tables from the fit split (``kwargs``: e.g. V-SkNN's step_time)."""
        self.net.fit(steps, **kwargs)


class Pop(BaselineRecommender):
    """POP (``PopNet``): items by their number of events in the fit split."""

    def __init__(self, n_items: int, item_counts: Counts = None, name: str = "pop", ks=KS,
                 ties: str = "conservative", eval_block: int = 1024):  # fmt: skip
        super().__init__(PopNet(n_items, item_counts), ks, ties, eval_block)
        self.save_hyperparameters(ignore=["item_counts"])


class UserPop(BaselineRecommender):
    """User popularity (``UserPopNet``): the user's own counts, then global popularity."""

    def __init__(self, n_items: int, item_counts: Counts = None, name: str = "user_pop",
                 ks=KS, ties: str = "conservative", eval_block: int = 1024):  # fmt: skip
        super().__init__(UserPopNet(n_items, item_counts), ks, ties, eval_block)
        self.save_hyperparameters(ignore=["item_counts"])


class ItemKNN(BaselineRecommender):
    """Item-KNN (``ItemKNNNet``): cosine similarity of the input's session co-occurrence."""

    def __init__(self, n_items: int, item_counts: Counts = None, name: str = "item_knn",
                 ks=KS, ties: str = "conservative", eval_block: int = 1024,
                 k_neighbors: int = 100, pop_fallback: bool = True):  # fmt: skip
        net = ItemKNNNet(n_items, item_counts, k_neighbors, pop_fallback)
        super().__init__(net, ks, ties, eval_block)
        self.save_hyperparameters(ignore=["item_counts"])


class VSKNN(BaselineRecommender):
    """Session-aware V-SkNN (``VSKNNNet``, its parameters documented there)."""

    def __init__(self, n_items: int, item_counts: Counts = None, name: str = "vsknn", ks=KS,
                 ties: str = "conservative", eval_block: int = 1024, k: int = 100,
                 sample_size: int = 0, sampling: str = "random", weighting: str = "div",
                 weighting_score: str = "div", extend_length: int = 0,
                 pop_fallback: bool = True, seed: int = 0):  # fmt: skip
        net = VSKNNNet(n_items, item_counts, k, sample_size, sampling, weighting,
                       weighting_score, extend_length, pop_fallback, seed)  # fmt: skip
        super().__init__(net, ks, ties, eval_block)
        self.save_hyperparameters(ignore=["item_counts"])
