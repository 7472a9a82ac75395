"""Shuffling BN: keep BatchNorm from leaking which key belongs to which query.

Letters: N per-rank batch, W world size (number of processes), C channels.

BatchNorm computes statistics over the samples it sees together. If a query
and its positive key are normalised with statistics of the same subset, the
statistics themselves carry a signal that solves the pretext task ("cheating").
MoCo shuffles the keys across GPUs before the key encoder, so the two sides
are normalised over different subsets, and unshuffles afterwards.

- :class:`SplitBatchNorm` simulates per-GPU BN on one device (the CIFAR-10 demo's way).
- :func:`batch_shuffle` / :func:`batch_unshuffle` shuffle a batch across DDP ranks (gathering it
  with :func:`~mocolab.distributed.concat_all_gather`), or within one batch when there is no process group.
- :data:`SHUFFLE_BN_MODES`: how :class:`~mocolab.moco.MoCo` may shuffle (``shuffle_bn=``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .checks import positive_int
from .distributed import concat_all_gather, rank, world_size

__all__ = ["SHUFFLE_BN_MODES", "SplitBatchNorm", "convert_split_bn", "batch_shuffle", "batch_unshuffle"]

#: ``MoCo(shuffle_bn=...)``: "auto" ("ddp" under several processes, else "off"), "off", "split"
#: (SplitBatchNorm, keys shuffled within the batch) or "ddp" (keys shuffled across processes).
SHUFFLE_BN_MODES = ("auto", "off", "split", "ddp")


class _GroupedBatchNorm(torch.autograd.Function):
    """Batch norm with statistics per (group, channel) of x (N/S, S, C, H, W), over dims (0, 3, 4), in any layout.

    Forward: one ``var_mean`` and one ``addcmul`` over x. Backward, from the per-(group, channel)
    sums Σ dy and Σ dy·x: ``dx = a·dy + b·x + c``, two reductions and two ``addcmul`` over x,
    about half the passes of autograd through the same forward.
    Returns the output and the (S, C) mean and biased variance (no gradient).
    """

    @staticmethod
    def forward(ctx, xs, weight, bias, eps):
        var, mean = torch.var_mean(xs, dim=(0, 3, 4), correction=0)  # (S, C)
        dtype = torch.promote_types(xs.dtype, torch.float32)  # the small per-channel terms in at least fp32
        mean, var = mean.to(dtype), var.to(dtype)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else torch.addcmul(bias, mean, scale, value=-1.0)
        out = torch.addcmul(shift[..., None, None].to(xs.dtype), xs, scale[..., None, None].to(xs.dtype))
        ctx.save_for_backward(xs, mean, invstd, scale)
        ctx.mark_non_differentiable(mean, var)
        ctx.param_dtype = None if weight is None else weight.dtype
        return out, mean, var

    @staticmethod
    def backward(ctx, dy, _mean, _var):
        xs, mean, invstd, scale = ctx.saved_tensors  # scale = weight · invstd
        count = xs.numel() // mean.numel()
        s1 = dy.sum(dim=(0, 3, 4), dtype=mean.dtype)  # (S, C)
        s2 = torch.addcmul((dy * xs).sum(dim=(0, 3, 4), dtype=mean.dtype), mean, s1, value=-1.0)  # Σ dy·(x − mean)
        s2.mul_(invstd)  # Σ dy·x̂, x̂ the normalised x
        dx = None
        if ctx.needs_input_grad[0]:  # dx = scale·(dy − s1/count − x̂·s2/count) = a·dy + b·x + c
            b = torch.mul(scale, invstd).mul_(s2).mul_(-1.0 / count)
            c = torch.addcmul(torch.mul(scale, s1).mul_(-1.0 / count), b, mean, value=-1.0)
            dx = torch.addcmul(c[..., None, None].to(xs.dtype), xs, b[..., None, None].to(xs.dtype))
            dx = dx.addcmul_(dy, scale[..., None, None].to(dy.dtype))
        dweight = s2.sum(dim=0).to(ctx.param_dtype) if ctx.needs_input_grad[1] else None
        dbias = s1.sum(dim=0).to(ctx.param_dtype) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over ``num_splits`` groups separately.

    With S splits a batch of N behaves like S GPUs with N/S samples each: sample i is in
    group i mod S. The running statistics move towards the average of the group statistics
    (the variance unbiased per group, as BatchNorm does). In eval mode it is a plain BatchNorm2d.

    A contiguous batch is normalised by one batch-norm kernel on its (N/S, S·C, H, W) view.
    On a GPU any other layout (channels_last) is normalised with per-group ``var_mean`` on
    its (N/S, S, C, H, W) view, keeping the layout (no copy); on the CPU, where that
    reduction is slow, the batch is made contiguous first.

    Shape:
        (N, C, H, W) with N divisible by ``num_splits``.

    Raises:
        ValueError: ``num_splits`` < 1, or (in training) a batch not divisible by it.
    """

    def __init__(self, num_features: int, num_splits: int = 8, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = positive_int(num_splits, "num_splits")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        self._check_input_dim(x)
        n, c, h, w = x.shape
        s = self.num_splits
        if n % s:
            raise ValueError(f"SplitBatchNorm: batch of {n} is not divisible by num_splits={s}")
        count = n // s * h * w  # values per channel and group
        if count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)} "
                             f"in {s} groups")
        if self._fuse(x):
            out, mean, var = self._fused(x.contiguous(), s)
        else:
            out, mean, var = self._grouped(x, s)
        if self.track_running_stats:
            self._update_running(mean, var, count)
        return out

    @staticmethod
    def _fuse(x: torch.Tensor) -> bool:
        """Whether to normalise with the fused kernel: a contiguous batch, or any on the CPU (copied there,
        as per-group ``var_mean`` is slow on the CPU)."""
        return x.is_contiguous() or x.device.type == "cpu"

    def _fused(self, x: torch.Tensor, s: int):
        """One batch-norm kernel on the (N/S, S·C, H, W) view; returns the output, the (S, C) mean and biased var."""
        n, c, h, w = x.shape
        weight = self.weight.expand(s, c).reshape(s * c) if self.affine else None  # (S·C,)
        bias = self.bias.expand(s, c).reshape(s * c) if self.affine else None
        out, mean, invstd = torch.native_batch_norm(x.view(n // s, s * c, h, w), weight, bias, None, None, True, 0.0,
                                                    self.eps)
        var = invstd.detach().pow(-2).sub_(self.eps)  # biased variance, for the running statistics
        return out.view(n, c, h, w), mean.detach().view(s, c), var.view(s, c)

    def _grouped(self, x: torch.Tensor, s: int):
        """Per-group statistics on the (N/S, S, C, H, W) view, in any layout. Same returns as :meth:`_fused`."""
        xs = x.unflatten(0, (x.shape[0] // s, s))  # a view in any layout: sample i is in group i mod S
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        out, mean, var = _GroupedBatchNorm.apply(xs, weight, bias, self.eps)
        return out.flatten(0, 1), mean, var

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """Running statistics ← towards the group average (unbiased variance), on the device."""
        self.num_batches_tracked.add_(1)
        rm, rv = self.running_mean, self.running_var
        mean, var = mean.to(rm.dtype), var.to(rv.dtype)
        s, unbias = mean.shape[0], count / (count - 1)
        if self.momentum is None:  # cumulative average, as BatchNorm
            factor = self.num_batches_tracked.reciprocal().to(rm.dtype)
            rm.lerp_(mean.mean(dim=0), factor)
            rv.lerp_(var.mean(dim=0) * unbias, factor)
            return
        w, ones = self.momentum, rm.new_ones(s)  # r ← (1 − w)·r + w·(group average), one matrix-vector op each
        rm.addmv_(mean.t(), ones, beta=1.0 - w, alpha=w / s)
        rv.addmv_(var.t(), ones, beta=1.0 - w, alpha=w * unbias / s)


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
def batch_shuffle(x: torch.Tensor, generator: torch.Generator | None = None):
    """Shuffle a batch across all ranks (or within the batch with one process).

    Rank 0 draws the permutation of the W·N samples and broadcasts it.

    Returns:
        ``(x_shuffled, idx_unshuffle)``: this rank's N shuffled samples and the inverse permutation.
    """
    W = world_size()
    x_all = concat_all_gather(x)  # (W·N, ...)
    n_all = x_all.shape[0]
    if generator is None:  # drawn on the device: no host-to-device copy
        idx_shuffle = torch.randperm(n_all, device=x.device)
    else:
        idx_shuffle = torch.randperm(n_all, generator=generator, device=generator.device).to(x.device)
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
