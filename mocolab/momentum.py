"""The momentum (EMA) update of the key encoder, and momentum schedules.

``θk ← m·θk + (1 − m)·θq`` (He et al. 2020, eq. 2). With m = 1 the key
encoder is frozen, with m = 0 it is a copy of the query encoder. The update
is one ``torch._foreach_lerp_`` over all parameters at once, in place:
``θk ← θk + (1 − m)·(θq − θk)``, no new tensors per step (the official builder
loops over parameters and allocates a new tensor for each).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["check_momentum", "momentum_update", "MomentumUpdater", "cosine_momentum", "constant_momentum",
           "MOMENTUM_SCHEDULES", "momentum_at"]


def check_momentum(m: float, name: str = "m") -> float:
    """Return ``m`` as a float, or raise ``ValueError`` unless 0 ≤ m ≤ 1."""
    try:
        m = float(m)
    except (TypeError, ValueError):
        raise ValueError(f"momentum {name} must be a number in [0, 1], got {m!r}") from None
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum {name} must be in [0, 1], got {m}")
    return m


def _pairs(encoder_k: nn.Module, encoder_q: nn.Module, buffers: bool):
    pk, pq = list(encoder_k.parameters()), list(encoder_q.parameters())
    if len(pk) != len(pq):
        raise ValueError("encoder_k and encoder_q must have the same parameters")
    if buffers:  # floating-point buffers only (BN running mean/var, not num_batches_tracked)
        bk = [b for b in encoder_k.buffers() if b.is_floating_point()]
        bq = [b for b in encoder_q.buffers() if b.is_floating_point()]
        pk, pq = pk + bk, pq + bq
    return pk, pq


@torch.no_grad()
def _update(tk: Sequence[torch.Tensor], tq: Sequence[torch.Tensor], m: float) -> None:
    if m == 1.0:
        return
    if m == 0.0:  # lerp with weight 1 is exact too, but a copy is cheaper
        torch._foreach_copy_(tk, tq)
        return
    torch._foreach_lerp_(tk, tq, 1.0 - m)


@torch.no_grad()
def momentum_update(encoder_k: nn.Module, encoder_q: nn.Module, m: float, buffers: bool = False) -> None:
    """In place: ``θk ← m·θk + (1 − m)·θq`` over all parameters (and float buffers if ``buffers``).

    Raises:
        ValueError: m outside [0, 1], or encoders with different parameters.
    """
    m = check_momentum(m)
    _update(*_pairs(encoder_k, encoder_q, buffers), m)


class MomentumUpdater:
    """:func:`momentum_update` with the tensor lists gathered once (the hot path of a training step).

    Args:
        encoder_k, encoder_q: the two encoders (same architecture).
        buffers: also average float buffers (BN running statistics). The official
            code does not: the key encoder's BN statistics come from its own forward passes.
    """

    def __init__(self, encoder_k: nn.Module, encoder_q: nn.Module, buffers: bool = False):
        self.tk, self.tq = _pairs(encoder_k, encoder_q, buffers)

    def __call__(self, m: float) -> None:
        _update(self.tk, self.tq, check_momentum(m))


def constant_momentum(m0: float, step: int, total_steps: int) -> float:
    """m stays at m0 (the MoCo recipe)."""
    return m0


def cosine_momentum(m0: float, step: int, total_steps: int) -> float:
    """``m = 1 − (1 − m0)·(cos(π·step/total) + 1)/2``: from m0 to 1 over training (BYOL, MoCo v3)."""
    if total_steps <= 0:
        return m0
    t = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - m0) * (math.cos(math.pi * t) + 1.0) / 2.0


MOMENTUM_SCHEDULES = {"constant": constant_momentum, "cosine": cosine_momentum}


def momentum_at(schedule: str, m0: float, step: int, total_steps: int) -> float:
    """m at ``step`` of ``total_steps`` under a named schedule.

    Raises:
        ValueError: an unknown schedule name.
    """
    if schedule not in MOMENTUM_SCHEDULES:
        raise ValueError(f"unknown momentum schedule {schedule!r}; choose one of {', '.join(MOMENTUM_SCHEDULES)}")
    return MOMENTUM_SCHEDULES[schedule](check_momentum(m0), step, total_steps)
