"""What Lightning's ``trainer.precision`` means for training: under ``bf16-mixed`` the fused
loss's two [B, N] backward products run in bfloat16 (scores and loss stay float32)."""

from __future__ import annotations

import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.utilities import rank_zero_warn


def bf16_mixed(trainer) -> bool:
    """Lightning's bf16-mixed precision (autocast, no gradient scaler)."""
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    return isinstance(plugin, MixedPrecision) and plugin.precision == "bf16-mixed"


def product_dtype(trainer) -> torch.dtype | None:
    """bfloat16 under bf16-mixed: the dtype of the fused loss's backward products."""
    return torch.bfloat16 if bf16_mixed(trainer) else None


def cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (oneDNN's check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True  # unknown: no warning


def warn_if_emulated(trainer, device: torch.device) -> None:
    if bf16_mixed(trainer) and device.type == "cpu" and not cpu_bf16():
        rank_zero_warn(
            "trainer.precision=bf16-mixed on a CPU without native bfloat16 matrix "
            "products (AVX512-BF16/AMX): they are emulated, slower than float32"
        )
