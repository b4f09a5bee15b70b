"""Extra negative samples drawn by popularity^alpha, in bulk for a whole chunk of steps."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class PopularitySampler:
    """Draws item indices with P(i) proportional to count_i ** alpha (alpha=0: uniform)."""

    def __init__(self, counts: np.ndarray, alpha: float = 0.5):
        counts = torch.as_tensor(counts, dtype=torch.float64).clamp(min=0)
        weights = torch.where(counts > 0, counts**alpha, 0.0)  # 0 ** 0 would be 1
        if weights.sum() <= 0:
            raise ValueError("item counts must not all be zero")
        cdf = torch.cumsum(weights, 0)
        self.cdf = (cdf / cdf[-1]).to(torch.float32)
        self.cdf[-1] = 1.0

    def to(self, device: torch.device) -> PopularitySampler:
        self.cdf = self.cdf.to(device)
        return self

    def draw(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(shape, device=self.cdf.device, generator=generator)
        return torch.searchsorted(self.cdf, u, right=True).clamp_(max=self.cdf.numel() - 1)
