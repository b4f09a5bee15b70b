"""Final activations of the scores and of the init projection, as the official GRU4Rec code
names them, with their derivatives from the output alone (for hand-written backwards)."""

from __future__ import annotations

import torch
from torch import Tensor

ACTIVATIONS = {"linear": lambda x: x, "tanh": torch.tanh, "relu": torch.relu}
PARAMETRIC = {"leaky": 1, "elu": 1, "selu": 2}  # name-<a>[-<b>]: number of parameters


def parse_activation(name: str) -> tuple[str, tuple[float, ...]]:
    """(kind, parameters) of an activation name: ``linear``, ``tanh``, ``relu``, or the
    official GRU4Rec code's ``leaky-<a>``, ``elu-<a>``, ``selu-<lambda>-<alpha>`` with
    parameters > 0 (strictly increasing functions). ValueError naming what is wrong."""
    if name in ACTIVATIONS:
        return name, ()
    kind, *args = str(name).split("-")
    if kind not in PARAMETRIC or len(args) != PARAMETRIC[kind]:
        raise ValueError(
            f"must be one of {sorted(ACTIVATIONS)}, leaky-<a>, elu-<a> or "
            f"selu-<lambda>-<alpha>, got {name!r}"
        )
    try:
        params = tuple(float(a) for a in args)
    except ValueError:
        raise ValueError(f"{name!r}: the parameters must be numbers") from None
    if not all(p > 0 and p < float("inf") for p in params):
        raise ValueError(f"{name!r}: the parameters must be finite and > 0")
    return kind, params


def activation(name: str):
    """The function of an activation name (``parse_activation``), as the official code
    defines them (switching at x >= 0): leaky-a: x or a x; elu-a: x or a (e^x - 1);
    selu-l-a: l x or l a (e^x - 1)."""
    kind, params = parse_activation(name)
    if kind in ACTIVATIONS:
        return ACTIVATIONS[kind]
    if kind == "leaky":
        (a,) = params
        return lambda x: torch.where(x >= 0, x, a * x)
    lam, a = (1.0, *params) if kind == "elu" else params
    # expm1 of the clamped value: the unused branch stays finite (no 0 * inf in backward)
    return lambda x: lam * torch.where(x >= 0, x, a * torch.expm1(x.clamp(max=0)))


def activation_derivative(name: str, y: Tensor) -> Tensor | None:
    """d y / d x of y = act(x) from y alone (None: identity). With parameters > 0, y >= 0
    exactly where x >= 0."""
    kind, params = parse_activation(name)
    if kind == "linear":
        return None
    if kind == "tanh":
        return 1 - y * y
    if kind == "relu":
        return (y > 0).to(y.dtype)
    if kind == "leaky":
        return torch.full_like(y, params[0]).masked_fill_(y >= 0, 1.0)
    lam, a = (1.0, *params) if kind == "elu" else params
    return (y + lam * a).masked_fill_(y >= 0, lam)


def ranking_activation(name: str) -> str:
    """The activation evaluation ranks by: the final one where it cannot change the order
    by saturating into ties of its own making, else linear (a parametric activation is
    strictly increasing, so the order is the same; the official evaluation leaves it out)."""
    return name if name in ACTIVATIONS else "linear"


def at_least_float32(x: Tensor) -> Tensor:
    """Scores for the losses and the ranks: float32 where autocast made them half precision
    (bfloat16 scores would tie and round the loss)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
