"""Several processes, one run: DistributedDataParallel for ``mocolab pretrain`` under ``torchrun``.

Letters: W world size (number of processes), r this process's rank, B global batch, b = B / W.

``torchrun --nproc_per_node W -m mocolab pretrain ...`` starts W processes with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set.
:func:`init_from_env` joins the process group (NCCL on CUDA, Gloo on the CPU);
:func:`mocolab.train.fit` then

- gives every rank its slice of the same seeded permutation (:func:`shard`): the W
  slices of a step together are exactly the global batch of a one-process run;
- wraps the model's ``trained_encoders`` (MoCo's ``encoder_q``) in ``DistributedDataParallel``
  (:func:`wrap_trained_encoders`), so gradients are averaged over ranks; the key encoder is
  updated by momentum on every rank alike;
- lets :class:`~mocolab.moco.MoCo` (``shuffle_bn="ddp"``/``"auto"``) shuffle the keys across
  ranks and gather every rank's keys into the queue, so the queue is the same everywhere;
- logs, evaluates, writes metrics and checkpoints on rank 0 only.

With no process group all of these are no-ops: the same code runs in one process.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .interface import ContrastiveModel, unwrap

__all__ = ["world_size", "rank", "concat_all_gather", "init_from_env", "cleanup", "is_main_process", "shard",
           "wrap_trained_encoders", "unwrap_trained_encoders", "broadcast_module", "all_gather_objects",
           "all_reduce_mean", "barrier", "env_world_size"]


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """W, the number of processes (1 with no process group)."""
    return dist.get_world_size() if _dist_on() else 1


def rank() -> int:
    """r, this process's rank (0 with no process group)."""
    return dist.get_rank() if _dist_on() else 0


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (no gradient).

    With no process group, or one rank, returns ``x`` itself.

    Shape:
        (N, ...) -> (W·N, ...)
    """
    if world_size() == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(gathered, x.contiguous())
    return torch.cat(gathered, dim=0)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by ``torchrun``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def init_from_env(device: str = "auto") -> tuple[bool, torch.device | None]:
    """Join the process group described by torchrun's environment variables, if there is one.

    Backend: NCCL when CUDA is available (and ``device`` is not ``"cpu"``), Gloo otherwise.
    On CUDA each process takes the GPU ``LOCAL_RANK``.

    Returns:
        ``(initialised_here, device)``: whether this call created the process group (so the
        caller should :func:`cleanup` it), and the device this rank must use (None: one process).

    Raises:
        ValueError: ``WORLD_SIZE`` > 1 without ``RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``.
    """
    if env_world_size() <= 1:
        return False, None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} not set; launch with "
                         f"`torchrun --nproc_per_node N -m mocolab pretrain ...`")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    use_cuda = torch.cuda.is_available() and str(device) != "cpu"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        return False, dev
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True, dev


def cleanup() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0, and in a run of one process."""
    return rank() == 0


def shard(batch_index: torch.Tensor, r: int | None = None, W: int | None = None) -> torch.Tensor:
    """This rank's slice of a global batch of indices: rows ``r·b … (r+1)·b`` with b = B / W.

    Shape:
        (B,) -> (B / W,)

    Raises:
        ValueError: B not divisible by W.
    """
    r = rank() if r is None else r
    W = world_size() if W is None else W
    B = batch_index.shape[0]
    if B % W:
        raise ValueError(f"the global batch size {B} must be divisible by the number of processes {W}")
    b = B // W
    return batch_index[r * b:(r + 1) * b]


def wrap_trained_encoders(model: ContrastiveModel, device: torch.device) -> ContrastiveModel:
    """Wrap each of ``model.trained_encoders`` (MoCo's ``encoder_q``) in DistributedDataParallel, in place.

    Only those encoders are trained by gradients; wrapping them alone (not the whole MoCo
    module, as the official code does) keeps the key encoder and the queue out of DDP's
    buffer broadcasts. No-op with one process.
    """
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    for name in model.trained_encoders:
        encoder = model.get_submodule(name)
        if not isinstance(encoder, DDP):
            setattr(model, name, DDP(encoder, device_ids=ids))
    return model


def unwrap_trained_encoders(model: ContrastiveModel) -> ContrastiveModel:
    """Undo :func:`wrap_trained_encoders` (in place)."""
    for name in model.trained_encoders:
        encoder = model.get_submodule(name)
        if unwrap(encoder) is not encoder:
            setattr(model, name, unwrap(encoder))
    return model


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks (no-op with one process)."""
    if world_size() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` on every rank (``[obj]`` with one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (a new tensor; ``x`` itself with one process)."""
    if world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / world_size()


def barrier() -> None:
    """Wait for all ranks (no-op with one process)."""
    if world_size() > 1:
        dist.barrier()
