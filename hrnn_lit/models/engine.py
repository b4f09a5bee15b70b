"""Which engine makes a network's training update, and building a user's network.

``autograd`` trains any network of the model API (``hrnn_lit.models.api``) through torch
autograd; ``manual`` is the hand-written update of the built-in ``RecurrentCore`` (and its
C kernels and CUDA graph); ``auto`` picks ``manual`` where it applies."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from hrnn_lit.errors import ConfigError
from hrnn_lit.models.api import check_model
from hrnn_lit.models.core import RecurrentCore

ENGINES = ("auto", "autograd", "manual")


def resolve_engine(engine: str, net: nn.Module, cuda_graph: bool = False) -> str:
    """The engine that trains ``net`` (``autograd`` or ``manual``) for ``model.engine``."""
    if engine not in ENGINES:
        raise ConfigError(f"model.engine must be one of {list(ENGINES)}, got {engine!r}")
    builtin = isinstance(net, RecurrentCore)
    if engine == "manual" and not builtin:
        raise ConfigError(
            f"model.engine=manual: the hand-written update covers the built-in networks only, "
            f"not {type(net).__name__}; use model.engine=autograd (or auto)"
        )
    resolved = "manual" if engine == "auto" and builtin else engine
    resolved = "autograd" if resolved == "auto" else resolved
    if cuda_graph and resolved != "manual":
        raise ConfigError(
            "model.cuda_graph=true needs model.engine manual (or auto on a built-in network)"
        )
    return resolved


def build_net(spec: dict, n_items: int) -> nn.Module:
    """A user's network from its config (``_target_`` and arguments), given ``n_items``;
    one-line ConfigError where it cannot be built or lacks the model API."""
    if "_target_" not in spec:
        raise ConfigError("model.net needs a _target_ (the network's class, e.g. pkg.mod.Net)")
    try:
        net = instantiate(spec, n_items=n_items)
    except InstantiationException as e:
        msg = str(e.__cause__ or e).strip().splitlines()
        raise ConfigError(f"model.net ({spec['_target_']}): {msg[-1] if msg else e}") from None
    try:
        check_model(net)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    return net
