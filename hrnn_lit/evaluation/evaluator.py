"""Collects per-event ranks over the batches of one evaluation pass and turns them into
metrics and breakdowns. Models hand it scores; it knows no model class."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hrnn_lit.errors import NumericalError
from hrnn_lit.evaluation.metrics import metrics_from_ranks, target_ranks
from hrnn_lit.evaluation.ranking import cap_ranks
from hrnn_lit.evaluation.repeat_share import dense_repeat_counts

FIELDS = ("rank", "position", "history")
# per event, when the evaluation knows them (EvalLoop always does): whether the target is a
# repeat, and how many of the user's earlier items are in its top K for each K of ``ks``
REPEAT_FIELDS = ("repeat", "repeat_count")


class RankCollector:
    """Ranks of scored targets with their position in session and the user's history
    length (number of earlier sessions), for one stage (val or test).

    ``rank_cap`` (the largest K of the metrics): ranks above it are kept as rank_cap + 1,
    whichever path computed them; no metric at K <= rank_cap depends on them, and the
    ranking may skip resolving them (``ranking.catalogue_ranks``). None: exact ranks.
    ``ks``: the K of the repeat counts (default: the rank cap)."""

    def __init__(self, ties: str = "conservative", rank_cap: int | None = None, ks=None):
        self.ties = ties
        self.rank_cap = rank_cap
        self.ks = tuple(ks) if ks else ((rank_cap,) if rank_cap else (20,))
        self._parts: list[dict[str, Tensor]] = []

    def add(
        self,
        scores: Tensor,
        targets: Tensor,
        position: Tensor,
        history: Tensor,
        repeat: Tensor | None = None,
        seen: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Scores [N, n_items] for N scored events with their targets [N]; a non-finite
        score anywhere stops the run (one line). ``repeat`` [N] (the target is a repeat)
        and ``seen`` (pair rows [P], items [P]: each event's earlier items) give the
        repeat/explore metrics."""
        # NaN/inf anywhere makes the sum non-finite (one pass); only then count them (a
        # sum can also overflow from finite scores)
        if not bool(torch.isfinite(scores.sum())) and not bool(torch.isfinite(scores).all()):
            bad = int((~torch.isfinite(scores)).sum())
            raise NumericalError(
                f"evaluation: {bad} of {scores.numel()} scores are not finite (NaN/inf in the "
                "model's output); refusing to report metrics"
            )
        ranks = target_ranks(scores, targets, self.ties)
        count = None
        if repeat is not None and seen is not None:
            count = dense_repeat_counts(scores.detach(), *seen, self.ks, self.ties)
        self.add_ranks(ranks, position, history, scores.shape[1], repeat, count)

    def add_ranks(
        self,
        ranks: Tensor,
        position: Tensor,
        history: Tensor,
        n_items: int,
        repeat: Tensor | None = None,
        repeat_count: Tensor | None = None,
    ) -> None:
        """Ranks [N] already computed with this collector's ``ties`` (e.g. by
        ``ranking.catalogue_ranks``); a rank above ``n_items`` marks a non-finite score.
        ``repeat`` [N] bool (the repeat/explore metrics) and ``repeat_count`` [N, len(ks)]
        (``repeat_share.repeat_counts``: the repeat shares); each counts where every part has it."""
        part = {
            "rank": cap_ranks(ranks, self.rank_cap, n_items),
            "position": position,
            "history": history,
            "n_items": torch.full_like(ranks, n_items),
        }
        if repeat is not None:
            part["repeat"] = repeat.bool()
        if repeat is not None and repeat_count is not None:
            part["repeat_count"] = repeat_count.long()
        self._parts.append(part)

    def __len__(self) -> int:
        return sum(p["rank"].numel() for p in self._parts)

    def finish(
        self, stage: str, ks, gather: Callable[[Tensor], Tensor] | None = None
    ) -> tuple[dict[str, float], dict[str, Tensor]]:
        """Metrics named ``{stage}/recall@K`` etc. and the per-event tensors. ``gather``
        concatenates a tensor across processes (DDP) before the metrics are computed."""
        keys = (*FIELDS, "n_items")
        empty = torch.zeros(0, dtype=torch.long)
        out = {k: torch.cat([p[k] for p in self._parts]) if self._parts else empty for k in keys}
        # the repeat fields when every part has them (a rank with no part has them too)
        if all("repeat" in p for p in self._parts):
            out["repeat"] = torch.cat([p["repeat"] for p in self._parts]) if self._parts else (
                torch.zeros(0, dtype=torch.bool))  # fmt: skip
        if all("repeat_count" in p for p in self._parts):
            out["repeat_count"] = (
                torch.cat([p["repeat_count"] for p in self._parts])
                if self._parts
                else torch.zeros(0, len(self.ks), dtype=torch.long)
            )
        if gather is not None:  # every rank takes part, also one with nothing to evaluate
            out = {k: _gather(gather, v) for k, v in out.items()}
        out = {k: v.cpu() for k, v in out.items()}
        if out["rank"].numel() == 0:
            raise RuntimeError(f"{stage}: no scored event was evaluated")
        n_bad = int((out["rank"] > out["n_items"]).sum())
        if n_bad:
            raise NumericalError(
                f"{stage}: {n_bad} of {out['rank'].numel()} target scores are not finite "
                "(NaN/inf weights); refusing to report metrics"
            )
        del out["n_items"]
        metrics = metrics_from_ranks(out["rank"], ks, prefix=f"{stage}/")
        metrics[f"{stage}/n_events"] = float(out["rank"].numel())
        if "repeat" in out:
            metrics.update(repeat_metrics(out, ks, self.ks, stage))
        self._parts = []
        return metrics, out


def _gather(gather: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    """``gather`` (1-d) of a tensor of any shape along its first dimension; bools as bytes."""
    flat = t.reshape(-1).to(torch.uint8) if t.dtype == torch.bool else t.reshape(-1)
    out = gather(flat).view(-1, *t.shape[1:])
    return out.bool() if t.dtype == torch.bool else out


def repeat_metrics(outputs: dict[str, Tensor], ks, count_ks, stage: str) -> dict[str, float]:
    """The repeat/explore split (docs/design.md §6): ``{stage}_repeat/...`` and
    ``{stage}_explore/...`` (recall and MRR at every K, ``n_events``) over the events
    whose target the user had before, or not; ``{stage}/repeat_share@K``: the mean share of
    the top K that the user had before (``count_ks``: the K of ``repeat_count``'s columns)."""
    out: dict[str, float] = {}
    repeat = outputs["repeat"]
    for name, sel in (("repeat", repeat), ("explore", ~repeat)):
        prefix = f"{stage}_{name}/"
        split = metrics_from_ranks(outputs["rank"][sel], ks, prefix=prefix)
        out.update({k: v for k, v in split.items() if "/ndcg@" not in k})  # (fewer to log)
        out[f"{prefix}n_events"] = float(sel.sum())
    if "repeat_count" not in outputs:  # (a pass without the shares)
        return out
    count = outputs["repeat_count"].to(torch.float64)
    for k in ks:
        if k in count_ks:
            share = count[:, list(count_ks).index(k)] / k
            out[f"{stage}/repeat_share@{k}"] = share.sum().item() / max(share.numel(), 1)
    return out


def position_bucket(position: Tensor, cap: int = 10) -> Tensor:
    """Position in session 1..cap-1, and cap for cap and beyond."""
    return position.clamp(max=cap)


def history_bucket(history: Tensor) -> Tensor:
    """User history length in log2 buckets: 0, 1, 2-3, 4-7, 8-15, ... (lower bound)."""
    h = history.clamp(min=0)
    bucket = torch.where(h > 0, 2 ** torch.floor(torch.log2(h.clamp(min=1).double())), 0)
    return bucket.long()


def breakdowns(outputs: dict[str, Tensor], ks, stage: str = "test") -> dict[str, float]:
    """Metrics by position in session (``{stage}_by_position/P/...``, P=10 means 10+) and by
    user history length (``{stage}_by_history/H/...``, H = bucket lower bound), with the
    number of events of each group (``.../n_events``)."""
    out: dict[str, float] = {}
    groups = {
        "position": position_bucket(outputs["position"]),
        "history": history_bucket(outputs["history"]),
    }
    for name, g in groups.items():
        for value in torch.unique(g).tolist():
            sel = g == value
            prefix = f"{stage}_by_{name}/{value}/"
            out.update(metrics_from_ranks(outputs["rank"][sel], ks, prefix=prefix))
            out[f"{prefix}n_events"] = float(sel.sum())
    return out


class Evaluation:
    """The evaluation a LightningModule holds: one pass per stage (val, test), each
    collecting the ranks of its chunks (``begin`` makes a fresh ``collector``), then metrics
    (``finish``), kept per stage in ``metrics`` and ``outputs`` for results.json."""

    def __init__(self, ks, ties: str = "conservative", repeat_share: bool = True):
        self.ks = list(ks)
        self.ties = ties
        self.repeat_share = repeat_share  # the test pass's repeat shares (eval.repeat_share)
        self.collector = RankCollector(ties, rank_cap=max(self.ks), ks=self.ks)
        self.metrics: dict[str, dict[str, float]] = {}
        self.outputs: dict[str, dict[str, Tensor]] = {}

    def begin(self) -> RankCollector:
        self.collector = RankCollector(self.ties, rank_cap=max(self.ks), ks=self.ks)
        return self.collector

    def finish(
        self, stage: str, gather: Callable[[Tensor], Tensor] | None = None
    ) -> dict[str, float]:
        """The stage's metrics; ``gather`` concatenates across data-parallel ranks."""
        metrics, outputs = self.collector.finish(stage, self.ks, gather)
        self.metrics[stage], self.outputs[stage] = metrics, outputs
        return metrics

    def log(self, module, stage: str, gather=None) -> None:
        """Finish ``stage`` and log its metrics through the LightningModule ``module``:
        validation's recall and MRR at the largest K also to the progress bar."""
        metrics = self.finish(stage, gather)
        head = self.headline(metrics) if stage == "val" else {}
        module.log_dict({k: v for k, v in metrics.items() if k not in head})
        if head:
            module.log_dict(head, prog_bar=True)

    def headline(self, metrics: dict[str, float]) -> dict[str, float]:
        """Recall and MRR at the largest K over all events (not the repeat/explore parts):
        the progress bar's share of the metrics."""
        k = max(self.ks)
        return {
            n: v
            for n, v in metrics.items()
            if n.endswith((f"/recall@{k}", f"/mrr@{k}")) and "_" not in n.split("/")[0]
        }
