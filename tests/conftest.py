"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest

from mocolab.encoders import ConvNet


def _tiny_encoder(num_classes: int = 16, in_channels: int = 3) -> ConvNet:
    """A ConvNet of width 4: a few thousand parameters, a step in milliseconds on one CPU core."""
    return ConvNet(num_classes=num_classes, width=4, in_channels=in_channels)


@pytest.fixture
def tiny_encoder():
    """The base encoder of the models under test: ``MoCo(tiny_encoder, dim=16, K=32)``, ``tiny_encoder(8)``.

    Takes ``num_classes`` (the output dimension) and ``in_channels``, as every base encoder of mocolab does.
    """
    return _tiny_encoder
