"""Device choice and seeding.

``get_device("auto")`` picks CUDA, then Apple's MPS, then the CPU, and says
which one it picked, so that a notebook's output records where it ran.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["get_device", "seed_everything"]

_CHOICES = ("auto", "cpu", "cuda", "mps")


def get_device(device: str | torch.device = "auto", verbose: bool = True) -> torch.device:
    """Resolve a device name to a ``torch.device``.

    Args:
        device: ``"auto"`` (CUDA > MPS > CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
            ``"mps"``, or a ``torch.device``.
        verbose: print the choice and why.

    Raises:
        ValueError: an unknown name, or a device that this machine does not have.
    """
    if isinstance(device, torch.device):
        chosen, why = device, "given"
    else:
        name = str(device).lower()
        if name.split(":")[0] not in _CHOICES:
            raise ValueError(f"unknown device {device!r}; choose one of {', '.join(_CHOICES)} (or 'cuda:N')")
        if name == "auto":
            if torch.cuda.is_available():
                chosen, why = torch.device("cuda"), f"CUDA is available ({torch.cuda.get_device_name(0)})"
            elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                chosen, why = torch.device("mps"), "Apple MPS is available"
            else:
                chosen, why = torch.device("cpu"), f"no GPU found; {torch.get_num_threads()} CPU threads"
        else:
            chosen, why = torch.device(name), "asked for"
            if chosen.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use 'auto' or 'cpu'")
            mps = getattr(torch.backends, "mps", None)
            if chosen.type == "mps" and not (mps and mps.is_available()):
                raise ValueError(f"device {device!r} asked for, but MPS is not available here; use 'auto' or 'cpu'")
    if verbose:
        print(f"mocolab: using device {chosen} ({why})")
    return chosen


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
