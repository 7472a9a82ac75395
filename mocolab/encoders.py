"""Encoders and projection heads.

Every encoder follows torchvision's convention so that it plugs into
``MoCo(base_encoder, dim=...)`` exactly as in the official builder: the
constructor takes ``num_classes`` (the output dimension C) and the last layer
is an ``nn.Linear`` called ``fc``. The official MoCo v2 MLP head replaces
``fc`` by ``Linear -> ReLU -> fc`` (:func:`add_mlp_head`).

- :class:`ConvNet`: four conv blocks, a few hundred images/s on two CPU cores.
- :func:`cifar_resnet18`: ResNet-18 with a 3x3 stem and no max-pool (the
  official CIFAR-10 demo's model).
- :func:`torchvision_resnet`: any torchvision ResNet for ImageNet-size inputs.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .checks import positive_int

__all__ = ["ConvNet", "cifar_resnet18", "torchvision_resnet", "add_mlp_head", "backbone",
           "build_encoder", "ENCODERS"]


def _block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """A small ConvNet for CPU lessons: widths w, 2w, 4w, 8w, then average pool and ``fc``.

    Args:
        num_classes: output dimension (the embedding dim C when used by MoCo).
        width: channels of the first block.
        in_channels: input channels (3 for RGB, 1 for the L channel of Lab, ...).

    Shape:
        input (N, in_channels, H, W) -> output (N, num_classes).

    Raises:
        ValueError: a non-positive ``num_classes``, ``width`` or ``in_channels``.
    """

    def __init__(self, num_classes: int = 128, width: int = 32, in_channels: int = 3):
        super().__init__()
        num_classes, w = positive_int(num_classes, "ConvNet num_classes"), positive_int(width, "ConvNet width")
        in_channels = positive_int(in_channels, "ConvNet in_channels")
        self.features = nn.Sequential(
            _block(in_channels, w, pool=True),   # 32 -> 16
            _block(w, 2 * w, pool=True),         # 16 -> 8
            _block(2 * w, 4 * w, pool=True),     # 8 -> 4
            _block(4 * w, 8 * w, pool=False),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim = 8 * w
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))  # (N, num_classes)


def cifar_resnet18(num_classes: int = 128, **kwargs) -> nn.Module:
    """ResNet-18 for 32x32 images: 3x3 stride-1 stem, no max-pool (the MoCo CIFAR-10 demo's model).

    Extra keyword arguments go to ``torchvision.models.resnet18`` (e.g. ``norm_layer``).
    """
    from torchvision.models import resnet18

    net = resnet18(num_classes=num_classes, **kwargs)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.feature_dim = net.fc.in_features
    return net


def torchvision_resnet(name: str = "resnet50", num_classes: int = 128, **kwargs) -> nn.Module:
    """Any torchvision ResNet (``resnet18`` … ``resnet152``, ``wide_resnet50_2``) for ImageNet-size inputs.

    Raises:
        ValueError: ``name`` is not a torchvision ResNet.
    """
    import torchvision.models as tvm

    choices = [n for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                           "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d")]
    if name not in choices:
        raise ValueError(f"unknown ResNet {name!r}; choose one of {', '.join(choices)}")
    net = getattr(tvm, name)(num_classes=num_classes, **kwargs)
    net.feature_dim = net.fc.in_features
    return net


def add_mlp_head(encoder: nn.Module) -> nn.Module:
    """Replace ``encoder.fc`` by ``Linear(d, d) -> ReLU -> fc``, in place, as the official MoCo v2 builder does."""
    if not isinstance(getattr(encoder, "fc", None), nn.Linear):
        raise ValueError("add_mlp_head needs an encoder whose last layer is an nn.Linear called `fc`")
    d = encoder.fc.weight.shape[1]
    encoder.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), encoder.fc)
    return encoder


def backbone(encoder: nn.Module) -> nn.Module:
    """A deep copy of ``encoder`` whose ``fc`` (projection) is replaced by ``nn.Identity``."""
    net = copy.deepcopy(encoder)
    net.fc = nn.Identity()
    return net


ENCODERS = {
    "convnet": ConvNet,
    "resnet18-cifar": cifar_resnet18,
    "resnet18": lambda num_classes=128, **kw: torchvision_resnet("resnet18", num_classes, **kw),
    "resnet50": lambda num_classes=128, **kw: torchvision_resnet("resnet50", num_classes, **kw),
}


def build_encoder(name: str, num_classes: int = 128, **kwargs) -> nn.Module:
    """Build an encoder by name (``convnet``, ``resnet18-cifar``, ``resnet18``, ``resnet50``).

    Raises:
        ValueError: an unknown name (the message lists the choices).
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name](num_classes=num_classes, **kwargs)
