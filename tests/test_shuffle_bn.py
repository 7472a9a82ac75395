import pytest
import torch
from torch import nn

from mocolab.shuffle_bn import SplitBatchNorm, batch_shuffle, batch_unshuffle, concat_all_gather, convert_split_bn


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
