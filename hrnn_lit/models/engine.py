"""How a network's training update is made, and building a user's network.

Every network trains through its own ``start``/``step``/``score`` in one loop
(``module.RecurrentRecommender.training_step``). ``model.engine``: ``auto`` fuses the
candidates' scores with the loss where the network's scores are a linear form of its state
(``score_factors``: ``ops.sampled_loss``) and uses hand-written loss gradients otherwise;
``autograd`` is the plain reference: the network's ``score`` and the loss in torch ops."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from torch import nn

from hrnn_lit.errors import ConfigError
from hrnn_lit.nets.api import check_model

ENGINES = ("auto", "autograd")
REMOVED = {
    "manual": "the hand-written update was retired: every network trains through its own "
    "start/step/score with fused ops (model.engine=auto)",
}


def resolve_engine(engine: str, cuda_graph: bool = False) -> str:
    """``model.engine`` checked: one line for a removed or unknown value."""
    if engine in REMOVED:
        raise ConfigError(f"model.engine={engine}: {REMOVED[engine]}")
    if engine not in ENGINES:
        raise ConfigError(f"model.engine must be one of {list(ENGINES)}, got {engine!r}")
    if cuda_graph:
        raise ConfigError(
            "model.cuda_graph=true: the captured CUDA-graph step was retired with the "
            "hand-written update (set model.cuda_graph=false; trainer=gpu trains eagerly)"
        )
    return engine


def takes(target, name: str) -> bool:
    """Whether the class (or its dotted path) ``target`` takes the argument ``name``."""
    import inspect

    try:
        cls = get_class(target) if isinstance(target, str) else target
        return name in inspect.signature(cls).parameters
    except Exception:  # not importable: instantiate says why
        return False


def build_net(spec: dict, n_items: int, n_users: int | None = None) -> nn.Module:
    """A user's network from its config (``_target_`` and arguments), given ``n_items`` (and
    ``n_users`` where its constructor takes it); one-line ConfigError where it cannot be
    built or lacks the model API."""
    if "_target_" not in spec:
        raise ConfigError("model.net needs a _target_ (the network's class, e.g. pkg.mod.Net)")
    sizes = {"n_items": n_items}
    if n_users is not None and takes(spec["_target_"], "n_users"):
        sizes["n_users"] = n_users
    try:
        net = instantiate(spec, **sizes)
    except InstantiationException as e:
        msg = str(e.__cause__ or e).strip().splitlines()
        raise ConfigError(f"model.net ({spec['_target_']}): {msg[-1] if msg else e}") from None
    try:
        check_model(net)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    return net


def make_net(net, network: dict, n_items: int, n_users: int | None = None) -> nn.Module:
    """The LightningModule's network: ``net`` itself (an instance), built from its config
    (a dict), or None: the built-in ``RecurrentCore`` from the flat keys ``network``."""
    from hrnn_lit.nets.recurrent import RecurrentCore

    if net is not None and network:
        key = sorted(network)[0]
        raise ConfigError(
            f"model.{key}: a key of the built-in network, which model.net replaces (the "
            f"network takes its own arguments, e.g. +model.net.{key}=...)"
        )
    if isinstance(net, nn.Module):
        check_model(net)
        return net
    if net is not None:
        return build_net(net, n_items, n_users)
    return RecurrentCore(n_items, **network)
