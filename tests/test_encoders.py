from __future__ import annotations

import pytest
import torch

from mocolab.encoders import ConvNet, add_mlp_head, backbone, build_encoder, cifar_resnet18, torchvision_resnet


def test_convnet_shapes():
    net = ConvNet(num_classes=32, width=8)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert backbone(net)(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert ConvNet(num_classes=8, width=4, in_channels=1)(torch.randn(2, 1, 32, 32)).shape == (2, 8)


def test_cifar_resnet18_stem():
    net = cifar_resnet18(num_classes=128)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 128)


def test_mlp_head_and_torchvision():
    net = add_mlp_head(ConvNet(num_classes=16, width=4))
    assert isinstance(net.fc[0], torch.nn.Linear) and net(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    assert torchvision_resnet("resnet18", 10).fc.out_features == 10


def test_bad_names():
    with pytest.raises(ValueError, match="choose one of"):
        build_encoder("vgg")
    with pytest.raises(ValueError, match="choose one of"):
        torchvision_resnet("resnet7")
    with pytest.raises(ValueError, match="width"):
        ConvNet(width=0)
