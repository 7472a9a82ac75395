"""The effect that lessons 04 and 05 teach, measured at a small size (slow: nine short trainings).

A claim about training dynamics, so it is checked over several seeds, at a size where it held for
every seed tried (oldest-key cosine, 3 seeds: m = 0 0.82-0.91, m = 0.9 0.945-0.949,
m = 0.99 0.980-0.998). The notebooks report the figures at their default sizes.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch

from mocolab import BatchAugment, ConvNet, KeyConsistencyProbe, MoCo, load_images
from mocolab.train import TrainConfig, fit

pytestmark = pytest.mark.slow


def _train(images, m, seed):
    torch.manual_seed(seed)
    model = MoCo(partial(ConvNet, width=8), dim=32, K=128, m=m, T=0.1)
    probe = KeyConsistencyProbe()  # the whole queue: 128 / 32 = 4 steps
    config = TrainConfig(epochs=1, batch_size=32, lr=0.06, seed=seed, knn_every=0)
    hist = fit(model, images, BatchAugment(32), config, device="cpu", on_step=probe, on_epoch=probe.on_epoch,
               verbose=False)
    return hist, probe.last


@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_key_consistency_rises_with_momentum(seed):
    images, _, _ = load_images("shapes", "train", limit=256, seed=seed)
    results = {m: _train(images, m, seed) for m in (0.0, 0.9, 0.99)}
    oldest = {m: last["by_age"][-1] for m, (_, last) in results.items()}
    mean = {m: hist["key_consistency"][-1] for m, (hist, _) in results.items()}
    ident = {m: hist["key_identification"][-1] for m, (hist, _) in results.items()}
    # the slower the key encoder, the less the oldest keys in the queue have drifted
    assert oldest[0.0] < oldest[0.9] < oldest[0.99], oldest
    assert mean[0.0] < mean[0.9] < mean[0.99], mean
    # and the more often the current key encoder recognises its own stored keys
    assert ident[0.0] < ident[0.9] < ident[0.99], ident
