"""The momentum (EMA) update of the key encoder, and momentum schedules.

``θk ← m·θk + (1 − m)·θq`` (He et al. 2020, eq. 2). With m = 1 the key
encoder is frozen, with m = 0 it is a copy of the query encoder. The update
is one ``torch._foreach_lerp_`` over all parameters at once, in place:
``θk ← θk + (1 − m)·(θq − θk)``, no new tensors per step (the official builder
loops over parameters and allocates a new tensor for each). :func:`freeze` makes a module a key
encoder (no gradients); :func:`ema_track` simulates the EMA on a moving target, in NumPy.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .checks import integer, probability

__all__ = ["check_momentum", "freeze", "momentum_update", "MomentumUpdater", "cosine_momentum", "constant_momentum",
           "MOMENTUM_SCHEDULES", "momentum_at", "ema_track"]


def check_momentum(m: float, name: str = "m") -> float:
    """Return ``m`` as a float, or raise ``ValueError`` unless 0 ≤ m ≤ 1."""
    return probability(m, f"momentum {name}")


def freeze(module: nn.Module) -> nn.Module:
    """No gradients for ``module``'s parameters (a key encoder, a teacher): it moves only by momentum, or not at all.

    Returns ``module``, changed in place.
    """
    for p in module.parameters():
        p.requires_grad = False
    return module


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


TARGETS = ("random_walk", "step")


def _make_target(target, steps: int, seed: int, step_at: int | None) -> np.ndarray:
    if callable(target):
        values = np.asarray([target(t) for t in range(steps)], dtype=np.float64)
    elif isinstance(target, str):
        if target == "random_walk":
            rng = np.random.default_rng(seed)
            values = np.cumsum(rng.standard_normal(steps)) * 0.1
            values -= values[0]
        elif target == "step":
            at = steps // 4 if step_at is None else step_at
            values = (np.arange(steps) >= at).astype(np.float64)
        else:
            raise ValueError(f"target must be one of {TARGETS}, a callable or an array, got {target!r}")
    else:
        values = np.asarray(target, dtype=np.float64)
        if values.shape[0] != steps:
            raise ValueError(f"a target array must have steps={steps} rows, got {values.shape[0]}")
    if values.ndim not in (1, 2):
        raise ValueError(f"target values must be scalars or vectors, got shape {values.shape[1:]}")
    return values


def ema_track(
    m: float,
    steps: int = 300,
    target: str | Callable[[int], Any] | Sequence = "random_walk",
    *,
    seed: int = 0,
    step_at: int | None = None,
) -> dict:
    """How an exponential moving average with momentum m follows a target.

    This is the key encoder of MoCo (He et al. 2020, Eq. 2):
    ``theta_k <- m * theta_k + (1 - m) * theta_q``, with the query encoder
    ``theta_q`` as a moving target. ``ema[0] = target[0]`` (the key encoder
    starts as a copy), then ``ema[t] = m * ema[t-1] + (1 - m) * target[t]``.
    m = 0 copies the target at every step; m = 1 never moves. The key
    drift per step is ``|ema[t] - ema[t-1]| = (1 - m) * |target[t] -
    ema[t-1]|``: a large m keeps successive keys consistent, at the price of
    lagging behind the query encoder by about 1 / (1 - m) steps.

    Args:
        m: momentum in [0, 1].
        steps: number of steps, >= 2.
        target: "random_walk" (seeded Gaussian random walk), "step" (0 then
            1 from ``step_at``, default steps // 4), a callable ``t -> value``
            or an array of ``steps`` values (scalars or vectors).
        seed: random-walk seed.
        step_at: step of the jump for ``target="step"``.

    Returns:
        dict with ``target`` and ``ema`` (steps,) or (steps, D) arrays,
        ``error`` (steps,) = |target - ema|, ``lag`` = mean error,
        ``drift`` (steps,) = |ema[t] - ema[t-1]| (drift[0] = 0),
        ``mean_drift``, ``time_constant`` = 1 / (1 - m) (inf for m = 1),
        ``half_life`` = steps for a gap to halve (ln 0.5 / ln m), and ``m``.

    Shape:
        target: (steps,) or (steps, D)

    Raises:
        ValueError: m outside [0, 1], steps < 2, or an unknown target.
    """
    m = check_momentum(m)
    steps = integer(steps, "steps", 2)
    tgt = _make_target(target, steps, seed, step_at)  # (steps,) or (steps, D)
    ema = np.empty_like(tgt)
    ema[0] = tgt[0]
    for t in range(1, steps):
        ema[t] = m * ema[t - 1] + (1.0 - m) * tgt[t]

    def norm(x):
        return np.abs(x) if x.ndim == 1 else np.linalg.norm(x, axis=-1)

    error = norm(tgt - ema)  # (steps,)
    drift = np.zeros(steps)
    drift[1:] = norm(np.diff(ema, axis=0))
    if m == 1.0:
        half_life, tau = math.inf, math.inf
    elif m == 0.0:
        half_life, tau = 0.0, 1.0
    else:
        half_life, tau = math.log(0.5) / math.log(m), 1.0 / (1.0 - m)
    return {
        "m": m,
        "target": tgt,
        "ema": ema,
        "error": error,
        "lag": float(error.mean()),
        "drift": drift,
        "mean_drift": float(drift[1:].mean()),
        "time_constant": tau,
        "half_life": half_life,
    }
