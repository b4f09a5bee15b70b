"""The LightningModule for the session RNN and every HRNN variant.

One Lightning batch is a chunk of T time steps of the user-parallel plan ([T, B] tensors).
Each time step is one optimiser update (no back-propagation through time, DESIGN §2), its
forward and backward written by hand in ``models/update.py``: hidden states are carried
from step to step without gradients, and across chunks on the module. With
``cuda_graph=True`` (one GPU) each update is a replay of one captured CUDA graph of the same
step (``models/graph_step.py``).
Evaluation replays each user's history, then ranks every scored target against the whole
catalogue; scored rows of a chunk are ranked together in blocks.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.strategies import SingleDeviceStrategy
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from hrnn_lit import distributed
from hrnn_lit.errors import ConfigError, NumericalError
from hrnn_lit.evaluation.evaluator import RankCollector
from hrnn_lit.evaluation.hooks import RankingEvalHooks
from hrnn_lit.evaluation.ranking import catalogue_ranks
from hrnn_lit.evaluation.replay import replay_scored
from hrnn_lit.models import update
from hrnn_lit.models.core import RecurrentCore
from hrnn_lit.models.graph_step import GraphStep, chunk_inputs, graph_support
from hrnn_lit.models.losses import distinct_loss_and_grad, loss_and_grad
from hrnn_lit.models.optim import SparseRowOptimizer, clip_grad_norm_
from hrnn_lit.models.sampling import PopularitySampler

OPTIMIZERS = ("adagrad", "adam")  # see hrnn_lit.models.optim


def _cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (oneDNN's check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True  # unknown: no warning


def _bf16_mixed(plugin) -> bool:
    """Lightning's bf16-mixed precision (autocast, no gradient scaler)."""
    return isinstance(plugin, MixedPrecision) and plugin.precision == "bf16-mixed"


class RecurrentRecommender(RankingEvalHooks, pl.LightningModule):
    """Session RNN (``user_propagation="none"``) or HRNN (``init`` / ``all``, optionally
    ``user_to_output``), trained with a ranking loss over in-batch + sampled negatives."""

    def __init__(
        self,
        n_items: int,
        item_counts: np.ndarray | list[int] | None = None,
        name: str = "hrnn_init",
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
        self.save_hyperparameters(ignore=["item_counts"])
        self.automatic_optimization = False
        self.core = RecurrentCore(
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
        )
        loss_kwargs = {"bpreg": bpreg} if loss == "bpr-max" else {}
        self.loss_grad = loss_and_grad(loss, **loss_kwargs)
        # eager steps score each distinct candidate once where the loss allows it
        self.distinct_loss_grad = distinct_loss_and_grad(loss, **loss_kwargs)
        counts = np.ones(n_items, np.int64) if item_counts is None else np.asarray(item_counts)
        self.register_buffer("item_counts", torch.as_tensor(counts, dtype=torch.int64))
        self._sampler: PopularitySampler | None = None
        self._graph: GraphStep | None = None
        self._train_state: tuple[Tensor, Tensor] | None = None
        self._last_finite: tuple[int, Tensor] | None = None
        # chunks whose losses are not checked yet: (losses, epoch, batch, first update)
        self._unchecked: list[tuple[Tensor, int, int, int]] = []
        self._eval_state: tuple[Tensor, Tensor] | None = None
        self._collector = RankCollector(ties)
        self.eval_outputs: dict[str, dict[str, Tensor]] = {}
        self.eval_metrics: dict[str, dict[str, float]] = {}

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
        return graph_support(hp.loss, hp.optimizer, hp.momentum, hp.clip_grad_norm)

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
        strategy -> precision -> callback dispatch around it is skipped (about 0.2 ms, 15%
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
        update = raw.update if lean else raw.step  # (torch.optim's wrapper: ~0.1 ms)

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

    def training_step(self, batch: dict, batch_idx: int) -> None:
        # the step chooses its own dtypes (mm_dtype); autocast would also cast the GRU's
        # products and the hand-written gradients would no longer match the parameters
        with torch.autocast(batch["input"].device.type, enabled=False):
            self._training_step(batch, batch_idx)

    def _training_step(self, batch: dict, batch_idx: int) -> None:
        inp, tgt = batch["input"], batch["target"]
        T, B = inp.shape
        h, c = self._train_state or self.core.initial_state(B, inp.device)
        n_sample = self.hparams.n_sample
        if n_sample > 0:
            if self._sampler is None:
                self._sampler = PopularitySampler(
                    self.item_counts.cpu().numpy(), self.hparams.sample_alpha
                ).to(inp.device)
            samples = self._sampler.draw((T, n_sample))
        cand = tgt if n_sample == 0 else torch.cat([tgt, samples], dim=1)  # [T, B + S]
        losses = torch.zeros(T, device=inp.device)
        if self.hparams.cuda_graph:
            h, c = self._graph_chunk(batch, cand, h, c, losses)
        else:
            h, c = self._eager_chunk(batch, cand, h, c, losses)
        self._unchecked.append((losses, self.current_epoch, batch_idx, self.global_step - T))
        self._check_finite(self._checks_behind())  # one host sync per chunk, not per step
        self._train_state = (h, c)
        self.log(
            "train/loss",
            losses.mean(),
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch["n_events"],
        )

    def _graph_chunk(self, batch: dict, cand: Tensor, h: Tensor, c: Tensor, losses: Tensor):
        """The chunk's updates as replays of one captured CUDA graph (``GraphStep``)."""
        B, N = batch["input"].shape[1], cand.shape[1]
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

    def _eager_chunk(self, batch: dict, cand: Tensor, h: Tensor, c: Tensor, losses: Tensor):
        step, direct = self._optimizer_step()
        mm_dtype = self._mm_dtype
        clip = self.hparams.clip_grad_norm
        params = list(self.parameters())
        if self._world_size > 1 or clip > 0:
            direct = None  # they work on .grad
        if direct is not None:  # no .grad is set: drop any left from an earlier path
            for p in params:
                p.grad = None
        inp, valid = batch["input"], batch["valid"]
        B, n_sample = inp.shape[1], cand.shape[1] - inp.shape[1]
        distinct = update.chunk_distinct(cand, inp, valid, self.core.out_w.num_embeddings)
        for t in range(inp.shape[0]):
            h, c, start = update.start_step(self.core, batch, t, h, c)
            h, loss, cache = update.forward(
                self.core, self.loss_grad, inp[t], h, c, cand[t], valid[t], start, mm_dtype,
                distinct[t], self.distinct_loss_grad,
            )  # fmt: skip
            if direct is not None:
                direct(update.gradients(self.core, cache))
                losses[t] = loss
                continue
            for p in params:  # = opt.zero_grad(set_to_none=True)
                p.grad = None
            update.backward(self.core, cache)
            if self._world_size > 1:  # data-parallel: average gradients over ranks
                distributed.average_gradients(params, max_rows=B + n_sample)
            if clip > 0:
                clip_grad_norm_(params, clip)
            step()
            losses[t] = loss
        return h, c

    def _start_sessions(self, batch: dict, t: int, h: Tensor, c: Tensor):
        lo, hi = batch["next_session_offsets"][t], batch["next_session_offsets"][t + 1]
        return self.core.start_sessions(
            h,
            c,
            batch["session_start"][t],
            batch["user_start"][t],
            batch["next_session_rows"][lo:hi],
        )

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
            f"loss: {last}. Checkpoints hold the last good weights; lower model.lr or set "
            "model.clip_grad_norm"
        )

    # ----------------------------------------------------------- evaluation
    @property
    def eval_ks(self) -> list[int]:
        return list(self.hparams.ks)

    @property
    def eval_ties(self) -> str:
        return self.hparams.ties

    def _eval_reset(self) -> None:
        self._eval_state = None

    def unroll(
        self, batch: dict, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Run the core over a chunk without updates: h [T, B, H], c [T, B, U] after each
        step, and the final state to carry into the next chunk."""
        inp = batch["input"]
        T, B = inp.shape
        h, c = state or self.core.initial_state(B, inp.device)
        hs, cs = [], []
        for t in range(T):
            if batch["any_start"][t]:
                h, c = self._start_sessions(batch, t, h, c)
            h = self.core.step(inp[t], h, c)
            hs.append(h)
            cs.append(c)
        return torch.stack(hs), torch.stack(cs), (h, c)

    def _eval_chunk(self, batch: dict) -> None:
        core, inp = self.core, batch["input"]
        if inp.device.type == "cpu":  # the step on the rows that can matter only (same bits)
            h_sel, c_sel, self._eval_state = replay_scored(
                core.step,
                lambda t, h, c: self._start_sessions(batch, t, h, c),
                batch,
                self._eval_state or core.initial_state(inp.shape[1], inp.device),
                session_only=not core.hierarchical and core.reset_at == "session",
                start_rows=core.start_sessions,
            )
        else:
            hs, cs, self._eval_state = self.unroll(batch, self._eval_state)
            h_sel, c_sel = hs[batch["score"]], cs[batch["score"]]
        if batch["n_scored"] == 0:
            return
        mask = batch["score"]
        targets, position, history = (batch[k][mask] for k in ("target", "position", "history"))
        user_w = core.out_u.weight if core.user_to_output else None
        # = target_ranks(core.score_all(h, c), ...) in row blocks of at most eval_block;
        # on CPU without materialising the score matrix
        ranks = catalogue_ranks(
            h_sel,
            targets,
            core.out_w.weight,
            core.out_b.weight,
            self._collector.ties,
            user=c_sel if user_w is not None else None,
            user_weight=user_w,
            act=self.hparams.final_act,
            max_rows=self.hparams.eval_block,
            rank_cap=self._collector.rank_cap,
        )
        self._collector.add_ranks(ranks, position, history, core.out_w.num_embeddings)
