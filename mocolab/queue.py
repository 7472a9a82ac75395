"""A FIFO queue of keys (the dictionary of MoCo).

Letters: N batch size, C feature dim, K queue size.

The queue is a ring buffer of K columns and a pointer. A batch of N ≤ K keys is
written at the pointer and the pointer advances by N modulo K; when the batch
does not divide K the write wraps around to the start, so no key is ever
dropped (the official builder instead asserts ``K % N == 0``).

Two ways to start: ``init="random"`` fills the queue with random unit vectors,
as the official code does (they act as easy negatives until real keys replace
them); ``init="empty"`` marks every slot empty, so that only real keys act as
negatives (``negatives()`` returns just the filled part).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KeyQueue"]

_INITS = ("random", "empty")


class KeyQueue(nn.Module):
    """FIFO ring buffer of L2-normalised keys.

    Buffers (saved in ``state_dict``):
        queue: (C, K) keys as columns (the official layout).
        queue_ptr: (1,) index of the next slot to write.
        queue_filled: (1,) number of slots holding real keys (≤ K).
        queue_index: (K,) dataset index of the sample each key came from (-1 if unknown).
        queue_step: (K,) enqueue count at which each key was written (-1 if never), for staleness.

    Args:
        dim: C, the key dimension.
        K: the number of keys held.
        init: ``"random"`` (random unit vectors, the official start) or ``"empty"``.

    Raises:
        ValueError: a non-positive ``dim`` or ``K``, or an unknown ``init``.
    """

    def __init__(self, dim: int, K: int, init: str = "random"):
        super().__init__()
        if int(dim) <= 0:
            raise ValueError(f"queue dim (C) must be a positive integer, got {dim}")
        if int(K) <= 0:
            raise ValueError(f"queue size K must be a positive integer, got {K}")
        if init not in _INITS:
            raise ValueError(f"queue init must be one of {_INITS}, got {init!r}")
        self.K, self.queue_init = int(K), init
        self.register_buffer("queue", F.normalize(torch.randn(int(dim), self.K), dim=0))  # (C, K)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue_filled", torch.full((1,), self.K if init == "random" else 0, dtype=torch.long))
        self.register_buffer("queue_index", torch.full((self.K,), -1, dtype=torch.long))
        self.register_buffer("queue_step", torch.full((self.K,), -1, dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros(1, dtype=torch.long))
        if init == "empty":
            self.queue.zero_()

    @property
    def num_valid(self) -> int:
        """How many keys currently act as negatives."""
        return int(self.queue_filled)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Write N keys at the pointer (wrapping around), oldest keys are overwritten first.

        Shape:
            keys: (N, C), N ≤ K; index: optional (N,) dataset indices.

        Raises:
            ValueError: N > K, or keys of the wrong dimension.
        """
        n, c = keys.shape
        if c != self.queue.shape[0]:
            raise ValueError(f"keys must have dim C = {self.queue.shape[0]}, got {c}")
        if n > self.K:
            raise ValueError(f"a batch of {n} keys is larger than the queue (K = {self.K}); "
                             f"use a batch size ≤ K or a larger K")
        ptr = int(self.queue_ptr)
        first = min(n, self.K - ptr)  # slots before the end
        self.queue[:, ptr:ptr + first] = keys[:first].t().to(self.queue.dtype)
        if index is not None:
            self.queue_index[ptr:ptr + first] = index[:first]
        self.queue_step[ptr:ptr + first] = self.queue_count
        if first < n:  # wrap around
            rest = n - first
            self.queue[:, :rest] = keys[first:].t().to(self.queue.dtype)
            if index is not None:
                self.queue_index[:rest] = index[first:]
            self.queue_step[:rest] = self.queue_count
        self.queue_ptr[0] = (ptr + n) % self.K
        self.queue_filled[0] = min(self.K, int(self.queue_filled) + n)
        self.queue_count += 1

    def negatives(self) -> torch.Tensor:
        """The keys that act as negatives, (C, K_valid): all K, or only the filled slots of an empty-started queue."""
        if int(self.queue_filled) >= self.K:
            return self.queue
        return self.queue[:, : int(self.queue_filled)]  # filled slots are contiguous until the first wrap

    def key_age(self) -> torch.Tensor:
        """Age of each filled key in enqueue calls (0 = written by the latest call), (K_valid,)."""
        steps = self.queue_step[: self.negatives().shape[1]]
        return (self.queue_count - 1 - steps).clamp_min(0)
