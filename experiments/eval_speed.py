"""Evaluation throughput per network on config (a)'s data (experiments/bench.py: ~19k items,
the catalogue padded with unseen items to ``--catalogue``): scored test events per second of
one evaluation pass (history replay included; the best of ``--repeats`` passes), each
network untrained (the baselines fitted), run through the LightningModule's test hooks
without a Trainer, with glibc's malloc set up as run.py does. Run it from the
checkout to measure (it imports hrnn_lit from the working directory):

    PYTHONPATH=. python experiments/eval_speed.py --events 30000 --threads 1
    PYTHONPATH=. python experiments/eval_speed.py --catalogue 200000 --models hrnn_init pop
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (config (a)'s data helpers)

MODELS = ("session_rnn", "hrnn_init", "attention_hrnn", "hrnn_history", "pop", "user_pop")


NETS = {  # the model-API networks' classes
    "attention_hrnn": "hrnn_lit.nets.attention_hrnn.AttentionHRNN",
    "hrnn_history": "hrnn_lit.nets.history.HistoryHRNN",
}


def build(name: str, n_items: int, counts):
    """The network's LightningModule at config (a)'s sizes (H = 100)."""
    from hrnn_lit.models import baselines
    from hrnn_lit.models.module import RecurrentRecommender

    classes = {"pop": baselines.Pop, "user_pop": baselines.UserPop}
    if name in classes:
        return classes[name](n_items, counts)
    torch.manual_seed(0)
    H, hier = bench.A.hidden, name != "session_rnn"
    if name in NETS:
        sizes = {"user_hidden_size": H} if name == "hrnn_history" else {}
        kw = dict(net={"_target_": NETS[name], "hidden_size": H, **sizes})
    else:
        kw = dict(hidden_size=H, user_hidden_size=H if hier else 0,
                  user_propagation="init" if hier else "none")  # fmt: skip
    return RecurrentRecommender(n_items, counts, **kw).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=8000, help="scored test events (whole users)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="passes per network (the best)")
    p.add_argument("--catalogue", type=int, default=bench.A.catalogue, help="items (>= data's)")
    p.add_argument("--models", nargs="+", default=list(MODELS[1:]), choices=MODELS)
    args = p.parse_args()
    from hrnn_lit import runtime

    runtime.keep_freed_memory()  # as run.py: freed blocks reused, not fresh pages
    torch.set_num_threads(args.threads)
    for logger in ("pytorch_lightning", "lightning.pytorch"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    dm = bench.make_datamodule("gru4rec", bench.A.batch, quick=False)
    dm.eval_steps["test"] = bench.first_users(dm.eval_steps["test"], args.events)
    n_items, counts = bench.catalogue(dm, args.catalogue)
    chunks = list(dm.test_dataloader())
    n_scored = sum(c.n_scored for c in chunks)
    print(f"{n_items} items, {n_scored} scored of {sum(c.n_events for c in chunks)} events, "
          f"{len(chunks)} chunks, {args.threads} thread(s), {os.getloadavg()} load")
    for name in args.models:
        model = build(name, n_items, counts)
        if hasattr(model, "fit_data"):
            model.fit_data(dm.fit_steps)
        seconds = []
        for _ in range(args.repeats):
            with torch.inference_mode():
                t0 = time.perf_counter()
                model.on_test_epoch_start()
                for i, chunk in enumerate(chunks):
                    model.test_step(chunk, i)
                metrics = model.evaluation.finish("test")
                seconds.append(time.perf_counter() - t0)
        best = min(seconds)
        print(f"{name:<16}{n_scored / best:>10,.0f} scored events/s  {best:7.2f} s  "
              f"recall@20 {metrics['test/recall@20']:.4f}", flush=True)


if __name__ == "__main__":
    main()
