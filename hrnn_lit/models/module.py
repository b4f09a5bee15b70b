"""The LightningModule that trains and evaluates any network of the model API
(``hrnn_lit.nets.api``): the built-in ``RecurrentCore`` or a user's own ``model.net``.
``training_step`` is the one training loop (docs/design.md §10) over a chunk of T time steps
of the user-parallel plan; evaluation is the component it holds (``EvalLoop``, §6)."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn

from hrnn_lit import distributed
from hrnn_lit.data.batching import Chunk
from hrnn_lit.errors import ConfigError
from hrnn_lit.evaluation.evaluator import Evaluation
from hrnn_lit.evaluation.hooks import EvaluationHooks
from hrnn_lit.evaluation.loop import EvalLoop, context_at, starts_at
from hrnn_lit.models import precision, run_state
from hrnn_lit.models.engine import make_net, resolve_engine, takes
from hrnn_lit.models.loss_checks import LossChecks, kept_weights
from hrnn_lit.nets import api
from hrnn_lit.ops.activations import at_least_float32
from hrnn_lit.ops.candidates import CandidateSampler, chunk_candidates
from hrnn_lit.ops.losses import LOSSES
from hrnn_lit.ops.optim import ADAGRAD_EPS, SparseRowOptimizer, clip_grad_norm_
from hrnn_lit.ops.sampled_loss import distinct_ranking_loss, loss_function, sampled_loss


class RecurrentRecommender(EvaluationHooks, pl.LightningModule):
    """A network of the model API trained with a ranking loss over in-batch + sampled
    negatives, one optimiser update per time step, and evaluated by full-catalogue ranking.

    ``net``: the network, an instance or a config (``_target_`` and its arguments; built with
    ``n_items``); None: the built-in ``RecurrentCore`` from ``network``, its keyword
    arguments (``hidden_size``, ``user_propagation``, ...: the flat ``model.*`` keys of
    conf/model). The other arguments are the training and evaluation keys (``cuda_graph``:
    retired, named by older configs and checkpoints)."""

    def __init__(
        self,
        n_items: int,
        item_counts: np.ndarray | list[int] | None = None,
        n_users: int | None = None,
        name: str = "hrnn_init",
        net: nn.Module | dict | None = None,
        engine: str = "auto",
        loss: str = "top1",
        bpreg: float = 1.0,
        n_sample: int = 0,
        sample_alpha: float = 0.5,
        logq: float = 0.0,
        optimizer: str = "adagrad",
        lr: float = 0.1,
        momentum: float = 0.0,
        adagrad_eps: str = "outside",
        weight_decay: float = 0.0,
        clip_grad_norm: float = 0.0,
        ks: list[int] | tuple[int, ...] = (5, 10, 20),
        ties: str = "conservative",
        eval_block: int = 1024,
        cuda_graph: bool = False,
        **network: Any,
    ):
        super().__init__()
        if net is not None and not isinstance(net, (dict, nn.Module)):
            net = OmegaConf.to_container(net, resolve=True)  # plain: checkpoints load safely
        instance = isinstance(net, nn.Module)  # (its arguments are not this module's)
        self.save_hyperparameters(ignore=["item_counts", *(["net"] if instance else [])])
        if n_users is None or not isinstance(net, dict) or not takes(net["_target_"], "n_users"):
            self.hparams.pop("n_users", None)  # (kept for a network that takes it)
        self.automatic_optimization = False
        for key, value, allowed in (("loss", loss, LOSSES), ("adagrad_eps", adagrad_eps,
                                                             ADAGRAD_EPS)):  # fmt: skip
            if value not in allowed:
                raise ConfigError(f"model.{key} must be one of {sorted(allowed)}, got {value!r}")
        self.net = make_net(net, network, n_items, n_users)
        engine = resolve_engine(engine, cuda_graph)
        # the fused op for networks whose scores are a linear form of their state; else the
        # network's score and the loss op; the plain reference (the loss in torch ops) with
        # engine=autograd. ``engine`` (recorded in results.json): fused | autograd
        self.fused = engine == "auto" and callable(getattr(self.net, "score_factors", None))
        # networks with ``score_distinct``: scores of the step's distinct candidates only
        distinct = callable(getattr(self.net, "score_distinct", None))
        self.distinct = engine == "auto" and not self.fused and distinct
        self.engine = "fused" if self.fused else "autograd"
        self.loss_fn = loss_function(loss, bpreg, reference=engine == "autograd")
        counts = np.ones(n_items, np.int64) if item_counts is None else np.asarray(item_counts)
        self.register_buffer("item_counts", torch.as_tensor(counts, dtype=torch.int64))
        self.sampler = CandidateSampler(self.item_counts, n_sample, sample_alpha, logq)
        self._train_state: api.State | None = None
        self.checks = LossChecks()
        self.evaluation = Evaluation(ks, ties)
        self.eval_loop = EvalLoop(n_items, eval_block)

    def configure_optimizers(self):
        hp = self.hparams
        return SparseRowOptimizer(
            self.parameters(), kind=hp.optimizer, lr=hp.lr, momentum=hp.momentum,
            weight_decay=hp.weight_decay, eps_in_sqrt=hp.get("adagrad_eps") == "inside",
        )  # fmt: skip

    @property
    def _world_size(self) -> int:
        return torch.distributed.get_world_size() if distributed.initialized() else 1

    def on_fit_start(self) -> None:
        precision.warn_if_emulated(self.trainer, self.device)

    def on_train_start(self) -> None:
        self.checks.unchecked.clear()

    def on_train_epoch_start(self) -> None:
        self._train_state = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Raises (and nothing is written) if a chunk not yet checked had a NaN loss."""
        self._check_finite()
        run_state.save(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        run_state.load(self, checkpoint)

    def training_step(self, batch: Chunk, batch_idx: int) -> None:
        """One update per time step (no back-propagation through time): the start rules,
        one step, the loss of the candidates' scores, ``manual_backward`` of the loss times
        the share of valid slots (every slot weighs alike, an empty one as zero), gradients
        averaged over data-parallel ranks, clipping, and the optimiser step on the rows the
        step touched. States are carried detached, across chunks on the module."""
        net, hp = self.net, self.hparams
        inp, valid = batch.input, batch.valid
        T, B = inp.shape
        cand = self.sampler.draw(batch.target)  # [T, B + S]
        logq = self.sampler.logq_bias(cand, B, self.dtype)
        if self.fused or self.distinct:
            steps = chunk_candidates(cand, valid, self.item_counts.numel())
        if self.fused:  # the fused op picks its own dtypes (mm_dtype)
            dtypes = torch.autocast(inp.device.type, enabled=False)
            mm_dtype = precision.product_dtype(self.trainer)
        else:  # the network's own dtypes (autocast where asked)
            dtypes = contextlib.nullcontext()
        opt = self.optimizers()
        params = self._trained
        losses = torch.zeros(T, device=inp.device)
        shares = valid.sum(1).to(losses.dtype) / B  # [T] share of valid slots
        state = self._train_state or net.initial_state(B, inp.device)
        with dtypes:
            for t in range(T):
                state = api.detach(state)
                if batch.any_start[t]:
                    state = net.start(state, starts_at(batch, t))
                extra = (context_at(batch, t),) if self._context else ()
                state = net.step(inp[t], state, *extra)
                bias = None if logq is None else logq[t]
                if self.fused:
                    loss = sampled_loss(
                        net.score_factors(state), steps[t], valid[t], hp.loss, hp.bpreg, bias,
                        mm_dtype,
                    )  # fmt: skip
                elif self.distinct:
                    c = steps[t]
                    scores = at_least_float32(net.score_distinct(state, c.uniq, c.inverse))
                    loss = distinct_ranking_loss(scores, c, valid[t], hp.loss, hp.bpreg, bias)
                else:
                    scores = at_least_float32(net.score(state, cand[t]))  # [B, B + S]
                    if bias is not None:  # training scores only: the logQ correction
                        scores = scores - bias.to(scores.dtype)
                    loss = self.loss_fn(scores, valid[t])
                for p in params:  # = opt.zero_grad(set_to_none=True)
                    p.grad = None
                self.manual_backward(loss, gradient=shares[t])  # d/d weights of loss x share
                if self._world_size > 1:  # data-parallel: average gradients over ranks
                    distributed.average_gradients(params, distributed.max_rows(net, cand, B))
                if hp.clip_grad_norm > 0:
                    clip_grad_norm_(params, hp.clip_grad_norm)
                opt.step()
                losses[t] = loss.detach()
        self._train_state = api.detach(state)
        self.checks.add(losses, self.current_epoch, batch_idx, self.global_step - T)
        self._check_finite(self._checks_behind())  # one host sync per chunk, not per step
        n_valid = valid.sum(1).to(losses.dtype)  # [T] events per time step
        loss = (losses * n_valid).sum() / n_valid.sum().clamp(min=1)  # per event, not step
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=batch.n_events)
        # the progress bar: the epoch's running loss (a tail chunk's can be 0)
        self.log("loss", loss, on_step=False, on_epoch=True, prog_bar=True, logger=False,
                 batch_size=batch.n_events)  # fmt: skip

    @functools.cached_property
    def _context(self) -> bool:
        return api.takes_context(self.net)

    @functools.cached_property
    def _trained(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _checks_behind(self) -> int:
        """How many chunks' loss checks may wait: 1 on CUDA (``LossChecks``), else 0."""
        return 1 if self.device.type == "cuda" else 0

    def on_train_epoch_end(self) -> None:
        self._check_finite()

    def on_validation_start(self) -> None:
        self._check_finite()

    def on_train_end(self) -> None:
        self._check_finite()

    def _check_finite(self, behind: int = 0) -> None:
        self.checks.check(lambda: kept_weights(self._trainer), behind)
