"""A memory bank of one feature per training sample (Wu et al. 2018, instance discrimination).

Letters: N batch size, C feature dim, K negatives per query, M bank size (= number of training samples).

The bank costs O(M·C) memory, against O(K·C) for MoCo's queue. Each step only
the entries of the batch's samples are refreshed, so most entries were
computed by an older encoder ("stale").

Update convention (stated once, used everywhere):
``new = m·old + (1 − m)·feature``, then L2-normalised. ``m = 0`` replaces the entry.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checks import integer, positive_int
from .momentum import check_momentum

__all__ = ["MemoryBank"]


class MemoryBank(nn.Module):
    """One L2-normalised entry per training sample.

    Buffers:
        memory: (M, C), unit rows, initialised with random unit vectors.

    Args:
        num_samples: M.
        dim: C.
        m: momentum of the entry update (Wu et al. use 0.5), in [0, 1].

    Raises:
        ValueError: non-positive sizes or m outside [0, 1].
    """

    def __init__(self, num_samples: int, dim: int, m: float = 0.5):
        super().__init__()
        num_samples = integer(num_samples, "num_samples (samples in the memory bank)", 2)
        dim = positive_int(dim, "memory bank dim (C)")
        self.m = check_momentum(m)
        self.register_buffer("memory", F.normalize(torch.randn(num_samples, dim), dim=1))  # (M, C)

    @property
    def num_samples(self) -> int:
        return self.memory.shape[0]

    def _check_index(self, index: torch.Tensor) -> None:
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            raise ValueError(f"sample indices must lie in [0, {self.num_samples}), got range "
                             f"[{int(index.min())}, {int(index.max())}]")

    @torch.no_grad()
    def update(self, index: torch.Tensor, features: torch.Tensor) -> None:
        """``memory[i] ← normalize(m·memory[i] + (1 − m)·feature)`` for each sample index i.

        Shape:
            index: (N,) long; features: (N, C).
        """
        self._check_index(index)
        new = self.m * self.memory[index] + (1.0 - self.m) * features.detach().to(self.memory.dtype)  # (N, C)
        self.memory[index] = F.normalize(new, dim=1)

    @torch.no_grad()
    def sample(self, index: torch.Tensor, K: int, exclude_positive: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniformly sample K negative indices per query (with replacement across draws).

        With ``exclude_positive`` a query's own index is never drawn: draw from M − 1 values
        and shift those ≥ the positive up by one, which keeps the distribution uniform.

        Shape:
            index: (N,) -> (N, K) long.
        """
        K = positive_int(K, "K (negatives per query)")
        self._check_index(index)
        n, M = index.shape[0], self.num_samples
        if exclude_positive:
            idx = torch.randint(0, M - 1, (n, K), generator=generator, device="cpu").to(index.device)  # (N, K)
            idx = idx + (idx >= index[:, None]).long()
        else:
            idx = torch.randint(0, M, (n, K), generator=generator, device="cpu").to(index.device)
        return idx

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Entries at ``index``: (...,) -> (..., C)."""
        return self.memory[index]
