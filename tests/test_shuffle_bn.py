from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mocolab.distributed import concat_all_gather
from mocolab.shuffle_bn import SplitBatchNorm, batch_shuffle, batch_unshuffle, convert_split_bn
from mocolab.syncs import count_host_syncs


def test_one_split_equals_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    bn, sbn = nn.BatchNorm2d(3), SplitBatchNorm(3, num_splits=1)
    torch.testing.assert_close(sbn(x), bn(x))
    torch.testing.assert_close(sbn.running_mean, bn.running_mean)


def test_splits_normalise_each_group_separately():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    sbn = SplitBatchNorm(3, num_splits=2)
    out = sbn(x)
    ref = torch.cat([nn.BatchNorm2d(3)(x[i::2]) for i in range(2)])
    # split s holds samples s, s+S, ... in the (N/S, C*S) view: sample i belongs to split i % S
    torch.testing.assert_close(out[0::2], ref[:4])
    torch.testing.assert_close(out[1::2], ref[4:])
    # running stats: mean of the per-split running stats
    b0, b1 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    b0(x[0::2]), b1(x[1::2])
    torch.testing.assert_close(sbn.running_mean, (b0.running_mean + b1.running_mean) / 2)
    sbn.eval()
    assert sbn(x).shape == x.shape


def test_indivisible_batch_and_bad_splits():
    with pytest.raises(ValueError, match="divisible"):
        SplitBatchNorm(3, 4)(torch.randn(6, 3, 2, 2))
    with pytest.raises(ValueError, match="num_splits"):
        SplitBatchNorm(3, 0)


def test_convert_split_bn_keeps_weights():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    net[1].weight.data.fill_(2.0)
    convert_split_bn(net, 2)
    assert isinstance(net[1], SplitBatchNorm) and net[1].weight[0].item() == 2.0


def test_without_process_group():
    x = torch.arange(12.0).view(6, 2)
    assert concat_all_gather(x) is x
    xs, idx = batch_shuffle(x, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(xs, x)
    torch.testing.assert_close(batch_unshuffle(xs, idx), x)


class ReferenceSplitBatchNorm(nn.BatchNorm2d):
    """The earlier SplitBatchNorm (as in the official CIFAR-10 demo): S copies of the statistics on a reshape."""

    def __init__(self, num_features, num_splits, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x):
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.num_splits
        mean_split, var_split = self.running_mean.repeat(s), self.running_var.repeat(s)
        out = F.batch_norm(x.reshape(n // s, c * s, h, w), mean_split, var_split,
                           self.weight.repeat(s), self.bias.repeat(s), True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean_split.view(s, c).mean(dim=0))
            self.running_var.copy_(var_split.view(s, c).mean(dim=0))
            self.num_batches_tracked += 1
        return out.view(n, c, h, w)


@pytest.mark.parametrize("path", ["fused", "grouped"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_the_reference_implementation(path, fmt, dtype, monkeypatch):
    # "grouped" is the path a GPU takes for channels_last; here it is forced on the CPU
    monkeypatch.setattr(SplitBatchNorm, "_fuse", staticmethod(lambda x: path == "fused"))
    torch.manual_seed(0)
    ref, sbn = ReferenceSplitBatchNorm(6, 4).to(dtype), SplitBatchNorm(6, 4).to(dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0), ref.bias.normal_()
    sbn.load_state_dict(ref.state_dict())
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else {}
    for _ in range(3):
        x = (torch.randn(16, 6, 5, 7, dtype=dtype) * 3 + 2).contiguous(memory_format=fmt)
        x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
        grad = torch.randn_like(x)
        out_ref, out = ref(x_ref), sbn(x_new)
        (out_ref * grad).sum().backward()
        (out * grad).sum().backward()
        torch.testing.assert_close(out, out_ref, **tol)
        torch.testing.assert_close(x_new.grad, x_ref.grad, **tol)
        torch.testing.assert_close(sbn.weight.grad, ref.weight.grad, **tol)
        torch.testing.assert_close(sbn.bias.grad, ref.bias.grad, **tol)
        torch.testing.assert_close(sbn.running_mean, ref.running_mean, **tol)
        torch.testing.assert_close(sbn.running_var, ref.running_var, **tol)
        ref.weight.grad = ref.bias.grad = sbn.weight.grad = sbn.bias.grad = None
        if path == "grouped":  # no layout copy: the output keeps the input's layout
            assert out.is_contiguous(memory_format=fmt)
    assert int(sbn.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    sbn.eval(), ref.eval()
    torch.testing.assert_close(sbn(x), ref(x), **tol)


@pytest.mark.parametrize("path", ["fused", "grouped"])
def test_without_affine_or_running_stats_and_cumulative_momentum(path, monkeypatch):
    monkeypatch.setattr(SplitBatchNorm, "_fuse", staticmethod(lambda x: path == "fused"))
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64) + 1.0
    groups = [x[i::2] for i in range(2)]
    plain = SplitBatchNorm(3, 2, affine=False, track_running_stats=False).double()
    ref = torch.cat([F.batch_norm(g, None, None, training=True) for g in groups])
    torch.testing.assert_close(plain(x)[torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])], ref)
    cumulative = SplitBatchNorm(3, 2, momentum=None).double()
    for _ in range(2):
        cumulative(x)
    torch.testing.assert_close(cumulative.running_mean, x.mean(dim=(0, 2, 3)))  # the mean of the group means
    unbiased = torch.stack([g.var(dim=(0, 2, 3)) for g in groups]).mean(0)
    torch.testing.assert_close(cumulative.running_var, unbiased)


@pytest.mark.parametrize("path", ["fused", "grouped"])
def test_split_bn_makes_no_host_sync(path, monkeypatch):
    monkeypatch.setattr(SplitBatchNorm, "_fuse", staticmethod(lambda x: path == "fused"))
    sbn = SplitBatchNorm(3, 2)
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    with count_host_syncs(strict=True):
        sbn(x).sum().backward()
        sbn(x.contiguous(memory_format=torch.channels_last)).sum().backward()


@pytest.mark.parametrize("affine", [True, False])
def test_grouped_backward_passes_gradcheck(affine):
    from mocolab.shuffle_bn import _GroupedBatchNorm

    torch.manual_seed(0)
    x = (torch.randn(8, 3, 4, 5, dtype=torch.float64) * 2 + 1).contiguous(memory_format=torch.channels_last)
    weight = (torch.rand(3, dtype=torch.float64) + 0.5) if affine else None
    bias = torch.randn(3, dtype=torch.float64) if affine else None
    inputs = [t.requires_grad_() for t in (x, weight, bias) if t is not None]

    def fn(x, *wb):
        return _GroupedBatchNorm.apply(x.unflatten(0, (4, 2)), *(wb or (None, None)), 1e-5)[0]

    assert torch.autograd.gradcheck(fn, inputs)
