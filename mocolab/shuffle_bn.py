"""Shuffling BN: keep BatchNorm from leaking which key belongs to which query.

Letters: N per-rank batch, W world size (number of processes), C channels.

BatchNorm computes statistics over the samples it sees together. If a query
and its positive key are normalised with statistics of the same subset, the
statistics themselves carry a signal that solves the pretext task ("cheating").
MoCo shuffles the keys across GPUs before the key encoder, so the two sides
are normalised over different subsets, and unshuffles afterwards.

- :class:`SplitBatchNorm` simulates per-GPU BN on one device (the CIFAR-10 demo's way).
- :func:`batch_shuffle` / :func:`batch_unshuffle` shuffle a batch across DDP ranks,
  or within one batch when there is no process group.
- :func:`concat_all_gather` gathers a tensor from all ranks, and returns it unchanged
  with one rank or no process group at all.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["SplitBatchNorm", "convert_split_bn", "concat_all_gather", "batch_shuffle", "batch_unshuffle",
           "world_size", "rank"]


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if _dist_on() else 1


def rank() -> int:
    return dist.get_rank() if _dist_on() else 0


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over ``num_splits`` groups separately.

    With S splits a batch of N behaves like S GPUs with N/S samples each. The running
    statistics are the average over the groups. In eval mode it is a plain BatchNorm2d.

    Shape:
        (N, C, H, W) with N divisible by ``num_splits``.

    Raises:
        ValueError: ``num_splits`` < 1, or (in training) a batch not divisible by it.
    """

    def __init__(self, num_features: int, num_splits: int = 8, **kw):
        super().__init__(num_features, **kw)
        if int(num_splits) < 1:
            raise ValueError(f"num_splits must be a positive integer, got {num_splits}")
        self.num_splits = int(num_splits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.num_splits
        if n % s:
            raise ValueError(f"SplitBatchNorm: batch of {n} is not divisible by num_splits={s}")
        mean_split = self.running_mean.repeat(s)  # (S·C,)
        var_split = self.running_var.repeat(s)
        out = F.batch_norm(x.reshape(n // s, c * s, h, w), mean_split, var_split,
                           self.weight.repeat(s), self.bias.repeat(s), True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean_split.view(s, c).mean(dim=0))
            self.running_var.copy_(var_split.view(s, c).mean(dim=0))
            self.num_batches_tracked += 1
        return out.view(n, c, h, w)


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by a :class:`SplitBatchNorm`, keeping weights and stats."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SplitBatchNorm):
        new = SplitBatchNorm(module.num_features, num_splits, eps=module.eps, momentum=module.momentum,
                             affine=module.affine, track_running_stats=module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(module.weight.device if module.affine else module.running_mean.device)
    for name, child in module.named_children():
        setattr(module, name, convert_split_bn(child, num_splits))
    return module


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


@torch.no_grad()
def batch_shuffle(x: torch.Tensor, generator: torch.Generator | None = None):
    """Shuffle a batch across all ranks (or within the batch with one process).

    Rank 0 draws the permutation of the W·N samples and broadcasts it.

    Returns:
        ``(x_shuffled, idx_unshuffle)``: this rank's N shuffled samples and the inverse permutation.
    """
    W = world_size()
    x_all = concat_all_gather(x)  # (W·N, ...)
    n_all = x_all.shape[0]
    idx_shuffle = torch.randperm(n_all, generator=generator).to(x.device)
    if W > 1:
        dist.broadcast(idx_shuffle, src=0)
    idx_unshuffle = torch.argsort(idx_shuffle)
    idx_this = idx_shuffle.view(W, -1)[rank()]
    return x_all[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo :func:`batch_shuffle`: gather the shuffled outputs and take this rank's original samples."""
    W = world_size()
    x_all = concat_all_gather(x)  # (W·N, ...)
    idx_this = idx_unshuffle.view(W, -1)[rank()]
    return x_all[idx_this]
