"""The course's models, trained with the learner's functions of notebooks 01–03.

Letters: N batch size, C feature dim, K negatives per query, M memory-bank size.

Each builder takes the function that :func:`mocolab.exercises.check` returned. When that is the library's
stand-in (the exercise is not written yet, or did not pass) it builds the library's model, exactly as a notebook
would without the exercise; when it is the learner's, it builds a subclass of that model which calls the
learner's function at the same point of the step. Both draw the same random numbers when they are built, so a
correct function trains the same model, up to float rounding.

- :func:`margin_pairs`: :class:`~mocolab.MarginPairs` whose loss is the learner's ``margin_loss`` (01).
- :func:`moco`: :class:`~mocolab.MoCo` whose logits are the learner's ``infonce`` (02).
- :func:`memory_bank_model`: :class:`~mocolab.MemoryBankModel` whose bank is written by the learner's
  ``bank_update`` (03).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..baselines import MarginPairs, MemoryBankModel
from ..losses import _autocast_off
from ..memory_bank import MemoryBank
from ..moco import MoCo
from .use import is_yours

__all__ = ["margin_pairs", "moco", "memory_bank_model", "MarginPairsWith", "MoCoWith", "MemoryBankWith",
           "MemoryBankModelWith"]


# ======================================================================= 01 the margin loss
class MarginPairsWith(MarginPairs):
    """:class:`~mocolab.MarginPairs` whose loss is ``margin_loss(x1, x2, y, margin)``, a function of the learner.

    The loss of a pair depends on the pair only through its distance D, so each of the 2N pairs (the N positives
    on the diagonal of the logits, then the N negatives) is handed over as two points on a line, D apart:
    ``x1 = 0``, ``x2 = D``, both (2N, 1). The gradient flows through D back into the encoder.
    """

    def __init__(self, margin_loss: Callable, base_encoder: Callable[..., nn.Module], dim: int = 128,
                 margin: float = 1.0):
        super().__init__(base_encoder, dim=dim, margin=margin)
        self.margin_loss = margin_loss

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        d2 = -torch.cat([logits[rows, labels], logits[rows, labels.roll(1)]])  # (2N,): positives, then negatives
        y = torch.cat([torch.zeros_like(labels), torch.ones_like(labels)])  # 0: similar pair, 1: dissimilar
        D = d2.clamp_min(1e-12).sqrt()[:, None]  # (2N, 1)
        return self.margin_loss(torch.zeros_like(D), D, y, self.margin)


def margin_pairs(margin_loss: Callable, base_encoder: Callable[..., nn.Module], dim: int = 128,
                 margin: float = 1.0) -> MarginPairs:
    """The margin model of notebook 01: :class:`MarginPairsWith` the learner's ``margin_loss``, or
    :class:`~mocolab.MarginPairs` when ``margin_loss`` is the library's stand-in."""
    if is_yours("margin_loss", margin_loss):
        return MarginPairsWith(margin_loss, base_encoder, dim=dim, margin=margin)
    return MarginPairs(base_encoder, dim=dim, margin=margin)


# ======================================================================= 02 InfoNCE
class MoCoWith(MoCo):
    """:class:`~mocolab.MoCo` whose logits come from ``infonce(q, k, queue, T) -> (logits, labels, loss)``.

    Every step hands the learner's function the query encoder's output (not yet normalised), the unit keys and
    the queue (C, K), in at least fp32 with autocast off (as :func:`~mocolab.losses.infonce_logits` computes
    them); its logits (N, 1+K) are what the model returns, and the model's loss is their cross-entropy with the
    positive in column 0 (which a correct ``infonce`` returns as its loss).
    """

    def __init__(self, infonce: Callable, base_encoder: Callable[..., nn.Module], **kwargs):
        super().__init__(base_encoder, **kwargs)
        self.infonce = infonce

    def contrast(self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
                 index: torch.Tensor | None = None) -> torch.Tensor:
        dtype = torch.promote_types(q.dtype, torch.float32)  # as infonce_logits: the contrast in at least fp32
        with _autocast_off(q.device):
            logits, _, _ = self.infonce(q.to(dtype), k.to(dtype), negatives.to(dtype), self.T)  # (N, 1+K)
        return logits


def moco(infonce: Callable, base_encoder: Callable[..., nn.Module], **kwargs) -> MoCo:
    """A MoCo model (``kwargs`` as :class:`~mocolab.MoCo`'s): :class:`MoCoWith` the learner's ``infonce``, or
    :class:`~mocolab.MoCo` when ``infonce`` is the library's stand-in."""
    if is_yours("infonce", infonce):
        return MoCoWith(infonce, base_encoder, **kwargs)
    return MoCo(base_encoder, **kwargs)


# ======================================================================= 03 the bank update
class MemoryBankWith(MemoryBank):
    """:class:`~mocolab.MemoryBank` whose entries are written by ``bank_update(memory, index, features, m)``.

    The learner's function receives the features as the model computed them, carrying gradients.
    """

    def __init__(self, bank_update: Callable, num_samples: int, dim: int, m: float = 0.5):
        super().__init__(num_samples, dim, m=m)
        self.bank_update = bank_update

    def update(self, index: torch.Tensor, features: torch.Tensor) -> None:
        self._check_index(index)
        self.bank_update(self.memory, index, features.to(self.memory.dtype), self.m)


class MemoryBankModelWith(MemoryBankModel):
    """:class:`~mocolab.MemoryBankModel` whose bank is a :class:`MemoryBankWith` the learner's ``bank_update``,
    starting from the same random entries as the library's model."""

    def __init__(self, bank_update: Callable, base_encoder: Callable[..., nn.Module], num_samples: int,
                 dim: int = 128, **kwargs):
        super().__init__(base_encoder, num_samples, dim=dim, **kwargs)
        with torch.random.fork_rng(devices=[]):  # the library's bank above drew the entries: draw nothing more
            bank = MemoryBankWith(bank_update, num_samples, dim, m=self.bank.m)
        bank.memory.copy_(self.bank.memory)
        self.bank = bank


def memory_bank_model(bank_update: Callable, base_encoder: Callable[..., nn.Module], num_samples: int,
                      **kwargs) -> MemoryBankModel:
    """A memory-bank model (``kwargs`` as :class:`~mocolab.MemoryBankModel`'s): :class:`MemoryBankModelWith` the
    learner's ``bank_update``, or :class:`~mocolab.MemoryBankModel` when it is the library's stand-in."""
    if is_yours("bank_update", bank_update):
        return MemoryBankModelWith(bank_update, base_encoder, num_samples, **kwargs)
    return MemoryBankModel(base_encoder, num_samples, **kwargs)
