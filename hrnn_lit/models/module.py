"""The LightningModule that trains and evaluates any network of the model API
(``hrnn_lit.models.api``): the built-in session RNN, RNN Concat and HRNN variants
(``RecurrentCore``) or a user's own ``model.net``.

One Lightning batch is a chunk of T time steps of the user-parallel plan ([T, B] tensors).
Each time step is one optimiser update (no back-propagation through time, docs/design.md
§2): states are carried from step to step detached, and across chunks on the module. Two
engines make the update:
- ``autograd``: the network's forward (``start``, ``step``, ``score``), the loss, and
  ``manual_backward``; item tables get row-sparse gradients. Any network.
- ``manual``: the built-in networks' update written by hand (``models/update.py``, with C
  kernels on CPU) and, with ``cuda_graph=True`` on one GPU, replayed as one captured CUDA
  graph (``models/graph_step.py``); evaluation replays only the rows that matter and ranks
  the catalogue in blocks without the score matrix. Both are tested against the autograd
  engine and the network's own forward.
``engine="auto"`` picks ``manual`` for the built-in networks and ``autograd`` otherwise.
Evaluation replays each user's history, then ranks every scored target against the whole
catalogue.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.strategies import SingleDeviceStrategy
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from hrnn_lit import distributed
from hrnn_lit.data.batching import Chunk
from hrnn_lit.errors import ConfigError, NumericalError
from hrnn_lit.evaluation.evaluator import Evaluation
from hrnn_lit.evaluation.ranking import catalogue_ranks, check_finite_catalogue
from hrnn_lit.evaluation.replay import replay_scored
from hrnn_lit.models import api, update
from hrnn_lit.models.core import ACTIVATIONS, RecurrentCore
from hrnn_lit.models.engine import build_net, resolve_engine
from hrnn_lit.models.graph_step import GraphStep, chunk_inputs, graph_features, graph_support
from hrnn_lit.models.losses import LOSSES, distinct_loss_and_grad, loss_and_grad
from hrnn_lit.models.optim import SparseRowOptimizer, clip_grad_norm_
from hrnn_lit.models.sampling import PopularitySampler

EVAL_BLOCK_SCORES = 4 << 20  # reference evaluation: scores per block of rows


def eval_gather():
    """How evaluation gathers per-event ranks: across data-parallel ranks, or not at all."""
    dist = torch.distributed
    parallel = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return distributed.gather_cat if parallel else None


def _at_least_float32(x: Tensor) -> Tensor:
    """Scores for the loss and the ranks: float32 where autocast made them half precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def log_val(module: pl.LightningModule, metrics: dict[str, float]) -> None:
    """Validation metrics to the loggers; recall and MRR at the largest K to the progress bar."""
    head = module.evaluation.headline(metrics)
    module.log_dict({k: v for k, v in metrics.items() if k not in head})
    module.log_dict(head, prog_bar=True)


def chunk_starts(batch: Chunk, t: int) -> api.Starts:
    """The session and user starts of time step t of a chunk."""
    lo, hi = batch.next_session_offsets[t], batch.next_session_offsets[t + 1]
    return api.Starts(
        batch.session_start[t], batch.user_start[t], batch.next_session_rows[lo:hi]
    )


def _cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (oneDNN's check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True  # unknown: no warning


def _bf16_mixed(plugin) -> bool:
    """Lightning's bf16-mixed precision (autocast, no gradient scaler)."""
    return isinstance(plugin, MixedPrecision) and plugin.precision == "bf16-mixed"


class RecurrentRecommender(pl.LightningModule):
    """A network of the model API trained with a ranking loss over in-batch + sampled
    negatives. ``net``: a custom network's config (``_target_`` and its arguments; it gets
    ``n_items``); None: the built-in ``RecurrentCore`` from the keys ``hidden_size`` ...
    ``dropout_init`` (session RNN: ``user_propagation="none"``; HRNN: ``init`` / ``all``,
    optionally ``user_to_output``)."""

    def __init__(
        self,
        n_items: int,
        item_counts: np.ndarray | list[int] | None = None,
        name: str = "hrnn_init",
        net: dict | None = None,
        engine: str = "auto",
        hidden_size: int = 100,
        user_hidden_size: int = 100,
        user_propagation: str = "init",
        user_to_output: bool = False,
        user_to_session_act: str = "tanh",
        reset_at: str = "session",
        final_act: str = "linear",
        dropout_session: float = 0.0,
        dropout_user: float = 0.0,
        dropout_init: float = 0.0,
        embedding: int = 0,
        constrained_embedding: bool = False,
        dropout_embed: float = 0.0,
        dropout_hidden: float = 0.0,
        logq: float = 0.0,
        loss: str = "top1",
        bpreg: float = 1.0,
        n_sample: int = 0,
        sample_alpha: float = 0.5,
        optimizer: str = "adagrad",
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        clip_grad_norm: float = 0.0,
        ks: list[int] | tuple[int, ...] = (5, 10, 20),
        ties: str = "conservative",
        eval_block: int = 1024,
        cuda_graph: bool = False,
    ):
        super().__init__()
        if net is not None and not isinstance(net, dict):
            net = OmegaConf.to_container(net, resolve=True)  # plain: checkpoints load safely
        self.save_hyperparameters(ignore=["item_counts"])
        self.automatic_optimization = False
        if loss not in LOSSES:
            raise ConfigError(f"model.loss must be one of {sorted(LOSSES)}, got {loss!r}")
        self.net = build_net(net, n_items) if net is not None else RecurrentCore(
            n_items,
            hidden_size=hidden_size,
            user_hidden_size=user_hidden_size,
            user_propagation=user_propagation,
            user_to_output=user_to_output,
            user_to_session_act=user_to_session_act,
            reset_at=reset_at,
            final_act=final_act,
            dropout_session=dropout_session,
            dropout_user=dropout_user,
            dropout_init=dropout_init,
            embedding=embedding,
            constrained_embedding=constrained_embedding,
            dropout_embed=dropout_embed,
            dropout_hidden=dropout_hidden,
        )  # fmt: skip
        self.engine = resolve_engine(engine, self.net, cuda_graph)
        # evaluation of the built-in network takes its fast path (``_eval_chunk``; the same
        # ranks as the reference path ``_eval_chunk_reference``), whichever engine trains
        self.fast_eval = isinstance(self.net, RecurrentCore)
        loss_kwargs = {"bpreg": bpreg} if loss == "bpr-max" else {}
        self.loss_fn = functools.partial(LOSSES[loss], **loss_kwargs)  # autograd engine
        self.loss_grad = loss_and_grad(loss, **loss_kwargs)
        # eager steps score each distinct candidate once where the loss allows it
        self.distinct_loss_grad = distinct_loss_and_grad(loss, **loss_kwargs)
        counts = np.ones(n_items, np.int64) if item_counts is None else np.asarray(item_counts)
        self.register_buffer("item_counts", torch.as_tensor(counts, dtype=torch.int64))
        self._sampler: PopularitySampler | None = None
        self._log_counts: Tensor | None = None
        self._graph: GraphStep | None = None
        self._train_state: api.State | None = None
        self._last_finite: tuple[int, Tensor] | None = None
        # chunks whose losses are not checked yet: (losses, epoch, batch, first update)
        self._unchecked: list[tuple[Tensor, int, int, int]] = []
        self._eval_state: api.State | None = None
        self.evaluation = Evaluation(ks, ties)

    @property
    def core(self) -> torch.nn.Module:
        """The network (``net``; the name the built-in engine's code uses)."""
        return self.net

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
        if self._mm_dtype is not None and self.device.type == "cpu" and not _cpu_bf16():
            rank_zero_warn(
                "trainer.precision=bf16-mixed on a CPU without native bfloat16 matrix "
                "products (AVX512-BF16/AMX): they are emulated, slower than float32"
            )

    def on_train_start(self) -> None:
        self._graph = None  # parameters or optimiser state may be new tensors (a resume)
        self._unchecked.clear()
        if self.hparams.cuda_graph:
            why = self._graph_blocker()
            if why is not None:
                raise ConfigError(f"model.cuda_graph=true: {why}")

    def _graph_blocker(self) -> str | None:
        """Why this run's update cannot be a CUDA graph (None: it can)."""
        if self.device.type != "cuda":
            return f"needs a CUDA device (trainer=gpu), the model is on {self.device.type}"
        if self._world_size > 1:
            return "needs one device (trainer.devices=1)"
        if self._progress_hooks() is None:
            return "needs trainer.precision 32-true or bf16-mixed on a single device"
        hp = self.hparams
        why = graph_support(hp.loss, hp.optimizer, hp.momentum, hp.clip_grad_norm)
        return why or graph_features(self.core, hp.logq)

    def on_train_epoch_start(self) -> None:
        self._train_state = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Besides weights and optimiser state: the slots' carried states and the RNG, so a
        run resumed from a mid-epoch checkpoint continues exactly where it stopped. Raises
        (and nothing is written) if a chunk not yet checked had a non-finite loss."""
        self._check_finite()
        checkpoint["hrnn_lit"] = {
            "train_state": self._train_state,
            "last_finite": self._last_finite,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("hrnn_lit")
        if not extra:
            return
        self._train_state = extra["train_state"]
        self._last_finite = extra["last_finite"]
        torch.set_rng_state(extra["torch_rng"])
        if extra["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(extra["cuda_rng"])

    def _progress_hooks(self):
        """(before, after): the LightningOptimizer's own progress hooks around a raw
        optimizer step, on one device at float32 or bf16-mixed; None elsewhere."""
        opt = self.optimizers()
        before = getattr(opt, "_on_before_step", None)
        after = getattr(opt, "_on_after_step", None)
        trainer = self.trainer
        plugin = trainer.precision_plugin
        plain = (
            before is not None
            and after is not None
            and (type(plugin) is Precision or _bf16_mixed(plugin))
            and isinstance(trainer.strategy, SingleDeviceStrategy)
        )
        return (before, after) if plain else None

    def _optimizer_step(self):
        """The per-update ``opt.step()``. On one device at float32 or bf16-mixed, Lightning's
        strategy -> precision -> callback dispatch around it is skipped (a sizeable share
        of a B=50 step; per-step ``on_before_optimizer_step`` hooks are not called): the raw
        optimizer steps between the LightningOptimizer's own progress hooks, so
        ``global_step`` still counts every update; without torch.optim's wrapper too where
        no optimizer step hooks are registered. Elsewhere: ``opt.step()``. Returns (step,
        direct): ``direct`` (else None) where the step can also take the gradients directly
        (``direct(update.gradients(...))``: no ``.grad`` tensors built)."""
        opt = self.optimizers()
        hooks = self._progress_hooks()
        if hooks is None:
            return opt.step, None
        before, after = hooks
        raw = opt.optimizer
        lean = isinstance(raw, SparseRowOptimizer) and not raw.has_step_hooks()
        update = raw.update if lean else raw.step  # (without torch.optim's wrapper)

        def step(grads=None) -> None:
            before()
            update() if grads is None else update(grads)
            after()

        return step, step if lean else None

    @property
    def _mm_dtype(self) -> torch.dtype | None:
        """bfloat16 under ``trainer.precision=bf16-mixed``: the dtype of the output layer's
        two backward products (``update.forward``); None: float32."""
        trainer = self._trainer
        bf16 = trainer is not None and _bf16_mixed(trainer.precision_plugin)
        return torch.bfloat16 if bf16 else None

    def training_step(self, batch: Chunk, batch_idx: int) -> None:
        if self.engine == "autograd":  # the network's own dtypes (autocast where asked)
            self._training_step(batch, batch_idx)
            return
        # the manual step chooses its own dtypes (mm_dtype); autocast would also cast the
        # GRU's products and the hand-written gradients would no longer match the parameters
        with torch.autocast(batch.input.device.type, enabled=False):
            self._training_step(batch, batch_idx)

    def _training_step(self, batch: Chunk, batch_idx: int) -> None:
        inp, tgt = batch.input, batch.target
        T, B = inp.shape
        state = self._train_state or self.net.initial_state(B, inp.device)
        n_sample = self.hparams.n_sample
        if n_sample > 0:
            if self._sampler is None:
                self._sampler = PopularitySampler(
                    self.item_counts.cpu().numpy(), self.hparams.sample_alpha
                ).to(inp.device)
            samples = self._sampler.draw((T, n_sample))
        cand = tgt if n_sample == 0 else torch.cat([tgt, samples], dim=1)  # [T, B + S]
        losses = torch.zeros(T, device=inp.device)
        logq = self._logq_bias(tgt, cand[:, B:])
        if self.engine == "autograd":
            state = self._autograd_chunk(batch, cand, state, losses, logq)
        elif self.hparams.cuda_graph:
            state = self._graph_chunk(batch, cand, *state, losses)
        else:
            state = self._eager_chunk(batch, cand, *state, losses, logq)
        self._unchecked.append((losses, self.current_epoch, batch_idx, self.global_step - T))
        self._check_finite(self._checks_behind())  # one host sync per chunk, not per step
        self._train_state = state
        n_valid = batch.valid.sum(1).to(losses.dtype)  # [T] events per time step
        loss = (losses * n_valid).sum() / n_valid.sum().clamp(min=1)  # per event, not step
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=batch.n_events)
        # the progress bar: the epoch's running loss (not the last chunk's, e.g. a tail of
        # steps with one user left, where in-batch-only losses are 0)
        self.log("loss", loss, on_step=False, on_epoch=True, prog_bar=True, logger=False,
                 batch_size=batch.n_events)  # fmt: skip

    def _sparse_rows(self, B: int, n_sample: int) -> int:
        """At most how many rows of one item table a step touches: its B + S candidates,
        plus the B input items where the input embedding is the output matrix (tied)."""
        tied = getattr(self.net, "input_mode", None) == "constrained"
        return 2 * B + n_sample if tied else B + n_sample

    def _logq_bias(self, targets: Tensor, samples: Tensor) -> Tensor | None:
        """The logQ correction of a chunk's candidate columns [T, B + S] (None where
        ``logq`` is 0), subtracted from their training scores: ``logq * log q(item)`` with q
        the column's drawing weight, as in the official GRU4Rec code: the slots' targets
        (in-batch negatives for the other slots) come from the data, q = count; the samples
        from the sampler, q = count ** sample_alpha (both unnormalised)."""
        logq = self.hparams.logq
        if not logq:
            return None
        if self._log_counts is None:
            self._log_counts = self.item_counts.to(torch.float32).clamp(min=1).log()
        log_c = self._log_counts.to(targets.device)
        alpha = self.hparams.sample_alpha
        return torch.cat([logq * log_c[targets], (logq * alpha) * log_c[samples]], dim=1)

    def _autograd_chunk(
        self, batch: Chunk, cand: Tensor, state: api.State, losses: Tensor,
        logq: Tensor | None = None,
    ):  # fmt: skip
        """The chunk's updates through the network's forward and autograd: per time step,
        the start rules, one step, the scores of the candidates, the loss (mean over valid
        slots), ``manual_backward`` of it times the share of valid slots (as the manual
        step: every slot weighs alike, an empty one as zero), and the optimiser step."""
        step, _ = self._optimizer_step()
        params = [p for p in self.parameters() if p.requires_grad]
        clip = self.hparams.clip_grad_norm
        inp, valid = batch.input, batch.valid
        B, n_sample = inp.shape[1], cand.shape[1] - inp.shape[1]
        net = self.net
        for t in range(inp.shape[0]):
            state = api.detach(state)
            if batch.any_start[t]:
                state = net.start(state, chunk_starts(batch, t))
            state = net.step(inp[t], state)
            scores = _at_least_float32(net.score(state, cand[t]))  # [B, B + S]
            if logq is not None:  # training scores only: the logQ correction
                scores = scores - logq[t].to(scores.dtype)
            loss = self.loss_fn(scores, valid[t])
            for p in params:  # = opt.zero_grad(set_to_none=True)
                p.grad = None
            self.manual_backward(loss * (valid[t].sum() / B))
            if self._world_size > 1:  # data-parallel: average gradients over ranks
                distributed.average_gradients(params, max_rows=self._sparse_rows(B, n_sample))
            if clip > 0:
                clip_grad_norm_(params, clip)
            step()
            losses[t] = loss.detach()
        return api.detach(state)

    def _graph_chunk(self, batch: Chunk, cand: Tensor, h: Tensor, c: Tensor, losses: Tensor):
        """The chunk's updates as replays of one captured CUDA graph (``GraphStep``)."""
        B, N = batch.input.shape[1], cand.shape[1]
        gs = self._graph
        if gs is None or (gs.B, gs.N) != (B, N):
            gs = self._graph = GraphStep(
                self.core, self.loss_grad, self.optimizers().optimizer, B, N, h.device,
                self._mm_dtype,
            )  # fmt: skip
        ids, flags = chunk_inputs(batch, cand)
        gs.set_state(h, c)
        before, after = self._progress_hooks()
        for t in range(ids.shape[0]):
            before()
            losses[t] = gs.step(ids[t], flags[t])
            after()
        return gs.state()

    def _eager_chunk(
        self, batch: Chunk, cand: Tensor, h: Tensor, c: Tensor, losses: Tensor,
        logq: Tensor | None = None,
    ):  # fmt: skip
        step, direct = self._optimizer_step()
        mm_dtype = self._mm_dtype
        clip = self.hparams.clip_grad_norm
        params = list(self.parameters())
        if self._world_size > 1 or clip > 0:
            direct = None  # they work on .grad
        if direct is not None:  # no .grad is set: drop any left from an earlier path
            for p in params:
                p.grad = None
        inp, valid = batch.input, batch.valid
        B, n_sample = inp.shape[1], cand.shape[1] - inp.shape[1]
        distinct = update.chunk_distinct(cand, inp, valid, self.core.out_w.num_embeddings)
        for t in range(inp.shape[0]):
            h, c, start = update.start_step(self.core, batch, t, h, c)
            h, loss, cache = update.forward(
                self.core, self.loss_grad, inp[t], h, c, cand[t], valid[t], start, mm_dtype,
                distinct[t], self.distinct_loss_grad,
                None if logq is None else logq[t].to(h.dtype),
            )  # fmt: skip
            if direct is not None:
                direct(update.gradients(self.core, cache))
                losses[t] = loss
                continue
            for p in params:  # = opt.zero_grad(set_to_none=True)
                p.grad = None
            update.backward(self.core, cache)
            if self._world_size > 1:  # data-parallel: average gradients over ranks
                distributed.average_gradients(params, max_rows=self._sparse_rows(B, n_sample))
            if clip > 0:
                clip_grad_norm_(params, clip)
            step()
            losses[t] = loss
        return h, c

    def _start_sessions(self, batch: Chunk, t: int, h: Tensor, c: Tensor):
        return self.net.start((h, c), chunk_starts(batch, t))

    def _checks_behind(self) -> int:
        """How many chunks' loss checks may wait: 1 on CUDA, where a chunk is checked once
        the next one's updates are queued, so that the host's work between chunks
        (Lightning's loop, the next batch) overlaps the device's instead of waiting for it;
        0 elsewhere. Every check is done before a checkpoint is written, before validation
        and at the end of each epoch."""
        return 1 if self.device.type == "cuda" else 0

    def on_train_epoch_end(self) -> None:
        self._check_finite()

    def on_validation_start(self) -> None:
        self._check_finite()

    def on_train_end(self) -> None:
        self._check_finite()

    def _check_finite(self, behind: int = 0) -> None:
        """Stop on the first NaN/inf loss of the unchecked chunks but the last ``behind``,
        naming the update and the last finite loss; raising before a checkpoint is written
        keeps checkpoints from taking the bad weights."""
        while len(self._unchecked) > behind:
            self._check_chunk(*self._unchecked.pop(0))

    def _check_chunk(self, losses: Tensor, epoch: int, batch_idx: int, first_update: int):
        """``_check_finite`` for one chunk (updates are counted per step, from first_update)."""
        finite = torch.isfinite(losses)
        if bool(finite.all()):
            self._last_finite = (first_update + losses.numel() - 1, losses[-1])
            return
        self._unchecked.clear()
        t = int((~finite).nonzero()[0])
        if t > 0:
            self._last_finite = (first_update + t - 1, losses[t - 1])
        last = (
            "none"
            if self._last_finite is None
            else (f"{float(self._last_finite[1]):.6g} at update {self._last_finite[0]}")
        )
        raise NumericalError(
            f"training loss is {float(losses[t])} at epoch {epoch}, batch "
            f"{batch_idx}, update {first_update + t} (time step {t} of the batch); last finite "
            f"loss: {last}. {self._kept_weights()}; lower model.lr or set model.clip_grad_norm"
        )

    def _kept_weights(self) -> str:
        """Where the last good weights are, for a stop message."""
        ckpt = self._trainer.checkpoint_callback if self._trainer is not None else None
        last = getattr(ckpt, "last_model_path", "") if ckpt is not None else ""
        if last and os.path.isfile(last):
            return f"{last} holds the last good weights"
        return "No checkpoint was written"

    # ----------------------------------------------------------- evaluation
    def on_validation_epoch_start(self) -> None:
        self._eval_begin()

    def validation_step(self, batch: Chunk, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        if len(self.evaluation.collector) or torch.distributed.is_initialized():
            log_val(self, self.evaluation.finish("val", eval_gather()))

    def on_test_epoch_start(self) -> None:
        self._eval_begin()

    def test_step(self, batch: Chunk, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.evaluation.finish("test", eval_gather()))

    def _eval_begin(self) -> None:
        self.evaluation.begin()
        self._eval_state = None
        if self.fast_eval:  # the reference path checks every score it ranks instead
            core = self.core
            user_w = core.out_u.weight if core.user_to_output else None
            check_finite_catalogue(core.out_w.weight, core.out_b.weight, user_w)

    def _eval_step(self, batch: Chunk) -> None:
        # ranks come from float32 scores under any trainer precision (bf16 scores would tie)
        with torch.autocast(batch.input.device.type, enabled=False):
            if self.fast_eval:
                self._eval_chunk(batch)
            else:
                self._eval_chunk_reference(batch)


    def replay(self, batch: Chunk, state: api.State | None = None) -> tuple[api.State, api.State]:
        """Run the network over a chunk without updates: the states of the scored entries
        (``batch.score`` order, step-major) and the final state."""
        inp, net = batch.input, self.net
        state = state or net.initial_state(inp.shape[1], inp.device)
        score = batch.score.cpu().numpy()
        scored = []
        for t in range(inp.shape[0]):
            if batch.any_start[t]:
                state = net.start(state, chunk_starts(batch, t))
            state = net.step(inp[t], state)
            if score[t].any():
                scored.append(api.select(state, torch.from_numpy(score[t]).to(inp.device)))
        return (api.cat(scored) if scored else api.select(state, [])), state

    def _eval_chunk_reference(self, batch: Chunk) -> None:
        """Any network: replay every row, score the whole catalogue ([rows, n_items] in
        blocks of rows), rank each target against it."""
        scored, self._eval_state = self.replay(batch, self._eval_state)
        if batch.n_scored == 0:
            return
        mask = batch.score
        targets, position, history = batch.target[mask], batch.position[mask], batch.history[mask]
        n_items = int(self.item_counts.numel())
        rows = max(1, min(self.hparams.eval_block, EVAL_BLOCK_SCORES // n_items))
        for lo in range(0, targets.numel(), rows):
            part = slice(lo, lo + rows)
            scores = _at_least_float32(self.net.score(api.select(scored, part)))  # [rows, n]
            self.evaluation.collector.add(scores, targets[part], position[part], history[part])

    def unroll(
        self, batch: Chunk, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """The built-in network over a chunk without updates: h [T, B, H], c [T, B, U]
        after each step, and the final state to carry into the next chunk."""
        inp = batch.input
        T, B = inp.shape
        h, c = state or self.core.initial_state(B, inp.device)
        hs, cs = [], []
        for t in range(T):
            if batch.any_start[t]:
                h, c = self._start_sessions(batch, t, h, c)
            h = self.core.session_step(inp[t], h, c)
            hs.append(h)
            cs.append(c)
        return torch.stack(hs), torch.stack(cs), (h, c)

    def _eval_chunk(self, batch: Chunk) -> None:
        """The built-in network: the replay on the rows that can matter (CPU) and the
        catalogue ranked in blocks without the score matrix; equal to the reference."""
        core, inp = self.core, batch.input
        if inp.device.type == "cpu":  # the step on the rows that can matter only (same bits)
            h_sel, c_sel, self._eval_state = replay_scored(
                core.session_step,
                lambda t, h, c: self._start_sessions(batch, t, h, c),
                batch,
                self._eval_state or core.initial_state(inp.shape[1], inp.device),
                session_only=not core.hierarchical and core.reset_at == "session",
                start_rows=core.start_sessions,
            )
        else:
            (h_sel, c_sel), self._eval_state = self.replay(batch, self._eval_state)
        if batch.n_scored == 0:
            return
        mask = batch.score
        targets, position, history = batch.target[mask], batch.position[mask], batch.history[mask]
        user_w = core.out_u.weight if core.user_to_output else None
        collector = self.evaluation.collector
        # = target_ranks(core.score_all(h, c), ...) in row blocks of at most eval_block;
        # on CPU without materialising the score matrix
        ranks = catalogue_ranks(
            h_sel,
            targets,
            core.out_w.weight,
            core.out_b.weight,
            collector.ties,
            user=c_sel if user_w is not None else None,
            user_weight=user_w,
            act=self.hparams.final_act if core.final_act_name in ACTIVATIONS else "linear",
            max_rows=self.hparams.eval_block,
            rank_cap=collector.rank_cap,
        )
        collector.add_ranks(ranks, position, history, core.out_w.num_embeddings)
