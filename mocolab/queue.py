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

:func:`queue_staleness` says, in closed form, how old the keys of a full queue are.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checks import choice, positive_int
from .momentum import check_momentum

__all__ = ["KeyQueue", "queue_staleness"]

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
        ValueError: ``dim`` or ``K`` not a positive integer, or an unknown ``init``.
    """

    def __init__(self, dim: int, K: int, init: str = "random"):
        super().__init__()
        dim = positive_int(dim, "queue dim (C)")
        K = positive_int(K, "queue size K")
        choice(init, "queue init", _INITS)
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # an official MoCo state dict has only `queue` and `queue_ptr`: its queue is full (of random keys at
        # first), the origin and age of its keys unknown; fill the other buffers so that it loads strictly
        if prefix + "queue" in state_dict and prefix + "queue_filled" not in state_dict:
            K = state_dict[prefix + "queue"].shape[-1]
            state_dict[prefix + "queue_filled"] = torch.full((1,), K, dtype=torch.long)
            for name in ("queue_index", "queue_step"):
                state_dict.setdefault(prefix + name, torch.full((K,), -1, dtype=torch.long))
            state_dict.setdefault(prefix + "queue_count", torch.zeros(1, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._filled = None  # queue_filled may have changed: read it once, at the next use

    def _num_filled(self) -> int:
        if self._filled is None:
            self._filled = min(self.K, int(self.queue_filled))  # one host read after a load, not one per step
        return self._filled

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
        pos = self._slots(n - kept, kept)  # (kept,)
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

    def _slots(self, offset: int, n: int) -> torch.Tensor:
        """The ring slots ``(ptr + offset + i) mod K`` for i < n, on the device (no host read of the pointer)."""
        return (self.queue_ptr + offset + torch.arange(n, device=self.queue_ptr.device)) % self.K  # (n,)

    def latest(self, n: int) -> torch.Tensor:
        """The ``n`` keys written last, oldest first: (n, C)."""
        return self.queue[:, self._slots(-n, n)].t()

    def negatives(self) -> torch.Tensor:
        """The keys that act as negatives, (C, K_valid): all K, or only the filled slots of an empty-started queue."""
        filled = self._num_filled()
        if filled >= self.K:
            return self.queue
        return self.queue[:, :filled]  # filled slots are contiguous until the first wrap


def queue_staleness(K: int, batch_size: int, steps_per_epoch: int | None = None, m: float | None = None) -> dict:
    """How old the keys in a full MoCo queue are.

    Each step enqueues the ``batch_size`` newest keys and drops the oldest
    (He et al. 2020, Sec. 3.2). When the queue is used at a step, its
    newest keys are 1 step old and the oldest were produced
    ``ceil(K / batch_size)`` steps ago; when the batch does not divide K the
    oldest batch is only partly left. Those keys come from as many different
    versions of the key encoder.

    Args:
        K: queue size, >= 1.
        batch_size: keys enqueued per step, >= 1.
        steps_per_epoch: steps in one epoch, to express ages in epochs.
        m: key-encoder momentum in [0, 1], to say how much the key encoder
            has moved since the oldest key was made.

    Returns:
        dict with ``oldest_key_age_steps`` = ceil(K / batch_size),
        ``oldest_key_age_epochs`` (None without ``steps_per_epoch``),
        ``mean_key_age_steps``, ``ages`` (K,) integer age of every key,
        ``full_batches`` = K // batch_size, ``partial_keys`` = K % batch_size,
        ``encoder_versions`` (= oldest age), and ``key_encoder_replaced`` =
        1 - m ** oldest age (the weight of key-encoder updates made since the
        oldest key; None without ``m``).

    Raises:
        ValueError: K or batch_size < 1, or steps_per_epoch < 1.
    """
    K, B = positive_int(K, "K"), positive_int(batch_size, "batch_size")
    if steps_per_epoch is not None:
        steps_per_epoch = positive_int(steps_per_epoch, "steps_per_epoch (or None)")
    if m is not None:
        m = check_momentum(m)
    full, partial = divmod(K, B)
    oldest = -(-K // B)  # ceil(K / B)
    ages = np.repeat(np.arange(1, full + 1), B)  # (full * B,)
    if partial:
        ages = np.concatenate([ages, np.full(partial, full + 1)])  # (K,)
    mean_age = (B * full * (full + 1) / 2 + partial * (full + 1)) / K
    return {
        "K": K,
        "batch_size": B,
        "oldest_key_age_steps": oldest,
        "oldest_key_age_epochs": None if steps_per_epoch is None else oldest / steps_per_epoch,
        "mean_key_age_steps": mean_age,
        "ages": ages,
        "full_batches": full,
        "partial_keys": partial,
        "encoder_versions": oldest,
        "key_encoder_replaced": None if m is None else 1.0 - m**oldest,
    }
