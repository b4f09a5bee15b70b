"""The LightningModule that trains and evaluates any network of the model API
(``hrnn_lit.nets.api``): the built-in session RNN, RNN Concat and HRNN variants
(``RecurrentCore``) or a user's own ``model.net``.

A Lightning batch is a chunk of T time steps of the user-parallel plan ([T, B] tensors);
``training_step`` is the one training loop (docs/design.md §10): one optimiser update per
time step, states carried detached (no back-propagation through time, §2). Evaluation is
the component it holds (``evaluation.loop.EvalLoop``): each user's history replayed, every
scored target ranked against the whole catalogue (§6).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from hrnn_lit import distributed
from hrnn_lit.data.batching import Chunk
from hrnn_lit.errors import ConfigError
from hrnn_lit.evaluation.evaluator import Evaluation
from hrnn_lit.evaluation.loop import EvalLoop, starts_at
from hrnn_lit.models import precision
from hrnn_lit.models.engine import build_net, resolve_engine
from hrnn_lit.models.loss_checks import LossChecks, kept_weights
from hrnn_lit.nets import api
from hrnn_lit.nets.api import check_model
from hrnn_lit.nets.recurrent import RecurrentCore
from hrnn_lit.ops.activations import at_least_float32
from hrnn_lit.ops.candidates import CandidateSampler, chunk_candidates
from hrnn_lit.ops.losses import LOSSES
from hrnn_lit.ops.optim import SparseRowOptimizer, clip_grad_norm_
from hrnn_lit.ops.sampled_loss import distinct_ranking_loss, ranking_loss, sampled_loss


class RecurrentRecommender(pl.LightningModule):
    """A network of the model API trained with a ranking loss over in-batch + sampled
    negatives, one optimiser update per time step, and evaluated by full-catalogue ranking.

    ``net``: the network, an instance or a config (``_target_`` and its arguments; built with
    ``n_items``); None: the built-in ``RecurrentCore`` from ``network``, its keyword
    arguments (``hidden_size``, ``user_propagation``, ...: the flat ``model.*`` keys of
    conf/model). The other arguments are the training and evaluation keys. ``cuda_graph``:
    retired (true stops with one line); accepted for configs and checkpoints that name it."""

    def __init__(
        self,
        n_items: int,
        item_counts: np.ndarray | list[int] | None = None,
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
        self.automatic_optimization = False
        if loss not in LOSSES:
            raise ConfigError(f"model.loss must be one of {sorted(LOSSES)}, got {loss!r}")
        if net is not None and network:
            key = sorted(network)[0]
            raise ConfigError(
                f"model.{key}: a key of the built-in network, which model.net replaces (the "
                f"network takes its own arguments, e.g. +model.net.{key}=...)"
            )
        if instance:
            check_model(net)
            self.net = net
        elif net is not None:
            self.net = build_net(net, n_items)
        else:
            self.net = RecurrentCore(n_items, **network)
        engine = resolve_engine(engine, cuda_graph)
        # the fused op for networks whose scores are a linear form of their state; else the
        # network's score and the loss op; the plain reference (the loss in torch ops) with
        # engine=autograd. ``engine`` (recorded in results.json): fused | autograd
        self.fused = engine == "auto" and callable(getattr(self.net, "score_factors", None))
        # networks with ``score_distinct``: scores of the step's distinct candidates only
        distinct = callable(getattr(self.net, "score_distinct", None))
        self.distinct = engine == "auto" and not self.fused and distinct
        self.engine = "fused" if self.fused else "autograd"
        loss_kwargs = {"bpreg": bpreg} if loss == "bpr-max" else {}
        if engine == "autograd":
            self.loss_fn = functools.partial(LOSSES[loss], **loss_kwargs)
        else:  # hand-written gradients where the loss has them
            self.loss_fn = functools.partial(ranking_loss, loss=loss, bpreg=bpreg)
        counts = np.ones(n_items, np.int64) if item_counts is None else np.asarray(item_counts)
        self.register_buffer("item_counts", torch.as_tensor(counts, dtype=torch.int64))
        self.sampler = CandidateSampler(self.item_counts, n_sample, sample_alpha, logq)
        self._train_state: api.State | None = None
        self.checks = LossChecks()
        self.evaluation = Evaluation(ks, ties)
        self.eval_loop = EvalLoop(n_items, eval_block)

    @property
    def eval_metrics(self) -> dict[str, dict[str, float]]:
        return self.evaluation.metrics

    @property
    def eval_outputs(self) -> dict[str, dict[str, Tensor]]:
        return self.evaluation.outputs

    # ------------------------------------------------------------- training
    def configure_optimizers(self):
        hp = self.hparams
        return SparseRowOptimizer(
            self.parameters(),
            kind=hp.optimizer,
            lr=hp.lr,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
        )

    @property
    def _world_size(self) -> int:
        dist = torch.distributed
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def on_fit_start(self) -> None:
        precision.warn_if_emulated(self.trainer, self.device)

    def on_train_start(self) -> None:
        self.checks.unchecked.clear()

    def on_train_epoch_start(self) -> None:
        self._train_state = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Besides weights and optimiser state: the slots' carried states and the RNG, so a
        run resumed from a mid-epoch checkpoint continues exactly where it stopped. Raises
        (and nothing is written) if a chunk not yet checked had a non-finite loss."""
        self._check_finite()
        checkpoint["hrnn_lit"] = {
            "train_state": self._train_state,
            "last_finite": self.checks.last_finite,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("hrnn_lit")
        if not extra:
            return
        self._train_state = extra["train_state"]
        self.checks.last_finite = extra["last_finite"]
        torch.set_rng_state(extra["torch_rng"])
        if extra["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(extra["cuda_rng"])

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
                state = net.step(inp[t], state)
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
                    distributed.average_gradients(params, max_rows=self._sparse_rows(cand))
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
        # the progress bar: the epoch's running loss (not the last chunk's, e.g. a tail of
        # steps with one user left, where in-batch-only losses are 0)
        self.log("loss", loss, on_step=False, on_epoch=True, prog_bar=True, logger=False,
                 batch_size=batch.n_events)  # fmt: skip

    @functools.cached_property
    def _trained(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _sparse_rows(self, cand: Tensor) -> int:
        """At most how many rows of one item table a step touches: its B + S candidates,
        plus the B input items where the input embedding is the output matrix (tied)."""
        tied = getattr(self.net, "input_mode", None) == "constrained"
        return cand.shape[1] + (cand.shape[1] - self.hparams.n_sample if tied else 0)

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

    # ----------------------------------------------------------- evaluation
    # one pass per stage through the evaluation loop (hrnn_lit.evaluation.loop), whatever
    # the network: history replay on the slots that matter, ranks in row blocks
    def on_validation_epoch_start(self) -> None:
        self.eval_loop.begin(self.net, self.evaluation.begin())

    def validation_step(self, batch: Chunk, batch_idx: int) -> None:
        self.eval_loop.chunk(batch)

    def on_validation_epoch_end(self) -> None:
        if len(self.evaluation.collector) or torch.distributed.is_initialized():
            self.evaluation.log(self, "val", distributed.eval_gather())

    def on_test_epoch_start(self) -> None:
        self.eval_loop.begin(self.net, self.evaluation.begin())

    def test_step(self, batch: Chunk, batch_idx: int) -> None:
        self.eval_loop.chunk(batch)

    def on_test_epoch_end(self) -> None:
        self.evaluation.log(self, "test", distributed.eval_gather())
