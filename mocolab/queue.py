"""A FIFO queue of keys (the dictionary of MoCo).

Letters: N batch size, C feature dim, K queue size.

The queue is a ring buffer of K columns and a pointer. A batch of N keys is
written at the pointer and the pointer advances by N modulo K; when the batch
does not divide K the write wraps around to the start, so no key is ever
dropped (the official builder instead asserts ``K % N == 0``); of a batch larger
than the queue only the last K keys are kept.

The pointer is read and moved on the device (index arithmetic), so an enqueue
makes no device -> host sync. How many slots are filled is mirrored on the host:
the slicing in :meth:`KeyQueue.negatives` needs the number there.

Two ways to start: ``init="random"`` fills the queue with random unit vectors,
as the official code does (they act as easy negatives until real keys replace
them); ``init="empty"`` marks every slot empty, so that only real keys act as
negatives (``negatives()`` returns just the filled part).
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KeyQueue", "check_positive_int"]

_INITS = ("random", "empty")


def check_positive_int(value, name: str) -> int:
    """Return ``value`` as an int, or raise ``ValueError`` unless it is an integral number ≥ 1 (2.0 yes, 2.5 no)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        value = int(value)
    else:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


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
        ValueError: ``dim`` or ``K`` not a positive integer, or an unknown ``init``.
    """

    def __init__(self, dim: int, K: int, init: str = "random"):
        super().__init__()
        dim = check_positive_int(dim, "queue dim (C)")
        K = check_positive_int(K, "queue size K")
        if init not in _INITS:
            raise ValueError(f"queue init must be one of {_INITS}, got {init!r}")
        self.K, self.queue_init = K, init
        self.register_buffer("queue", F.normalize(torch.randn(dim, self.K), dim=0))  # (C, K)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue_filled", torch.full((1,), self.K if init == "random" else 0, dtype=torch.long))
        self.register_buffer("queue_index", torch.full((self.K,), -1, dtype=torch.long))
        self.register_buffer("queue_step", torch.full((self.K,), -1, dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros(1, dtype=torch.long))
        if init == "empty":
            self.queue.zero_()
        self._filled: int | None = self.K if init == "random" else 0  # host mirror of queue_filled; None: read it

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._filled = None  # queue_filled may have changed: read it once, at the next use

    def _num_filled(self) -> int:
        if self._filled is None:
            self._filled = min(self.K, int(self.queue_filled))  # one host read after a load, not one per step
        return self._filled

    @property
    def num_valid(self) -> int:
        """How many keys currently act as negatives."""
        return self._num_filled()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Write N keys at the pointer (wrapping around), oldest keys are overwritten first.

        Shape:
            keys: (N, C), any N (N > K keeps the last K); index: optional (N,) dataset indices.

        Raises:
            ValueError: keys of the wrong dimension, or an index of the wrong shape.
        """
        n, c = keys.shape
        if c != self.queue.shape[0]:
            raise ValueError(f"keys must have dim C = {self.queue.shape[0]}, got {c}")
        if index is not None and tuple(index.shape) != (n,):
            raise ValueError(f"index must have shape ({n},) like the keys {tuple(keys.shape)}, "
                             f"got {tuple(index.shape)}")
        kept = min(n, self.K)  # of a batch larger than the queue, only the last K keys stay
        keys = keys[n - kept:]
        # slot of key i is (ptr + i) mod K, computed on the device: no host read of the pointer
        pos = (self.queue_ptr + (n - kept) + torch.arange(kept, device=self.queue_ptr.device)) % self.K  # (kept,)
        self.queue.index_copy_(1, pos, keys.t().to(self.queue.dtype))
        if index is not None:
            self.queue_index.index_copy_(0, pos, index[n - kept:].to(self.queue_index))
        self.queue_step.index_copy_(0, pos, self.queue_count.expand(kept))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.K)
        filled = min(self.K, self._num_filled() + n)
        if filled != self._filled:  # once the queue is full, nothing to write
            self.queue_filled.fill_(filled)
            self._filled = filled
        self.queue_count += 1

    def negatives(self) -> torch.Tensor:
        """The keys that act as negatives, (C, K_valid): all K, or only the filled slots of an empty-started queue."""
        filled = self._num_filled()
        if filled >= self.K:
            return self.queue
        return self.queue[:, :filled]  # filled slots are contiguous until the first wrap

    def key_age(self) -> torch.Tensor:
        """Age of each filled key in enqueue calls (0 = written by the latest call), (K_valid,)."""
        steps = self.queue_step[: self.negatives().shape[1]]
        return (self.queue_count - 1 - steps).clamp_min(0)
