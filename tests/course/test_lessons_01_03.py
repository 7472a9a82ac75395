"""Effects that notebooks 01-03 rely on, checked over several seeds at a size where they hold.

Slow (a few short trainings on the shapes dataset); run with ``pytest -m slow``.
"""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import mocolab
from mocolab.train import TrainConfig, fit

SEEDS = (0, 1, 2)
WIDTH = 8


@pytest.fixture(scope="module")
def shapes():
    x, y, _ = mocolab.load_images("shapes", "train", limit=512)
    return x, y


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", SEEDS)
def test_moco_training_lowers_the_loss_below_ln_k_plus_1(shapes, seed):
    """Notebook 02: ln(K+1) - L (the InfoNCE bound) rises during training, from about 0."""
    x, _ = shapes
    torch.manual_seed(seed)
    K = 256
    model = mocolab.MoCo(partial(mocolab.ConvNet, width=WIDTH), dim=64, K=K, m=0.99, T=0.2)
    augment = mocolab.BatchAugment(32)
    hist = fit(model, x, augment, TrainConfig(epochs=3, batch_size=64, knn_every=0, seed=seed), device="cpu",
               verbose=False)
    # epoch 1 starts with a random queue; after 4 steps it holds only real keys
    first = sum(hist["step_loss"][4:8]) / 4
    last = sum(hist["step_loss"][-4:]) / 4
    assert last < first, (first, last)
    assert all(0.0 <= loss for loss in hist["step_loss"])
    assert math.log(K + 1) - last > 0.0


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", SEEDS)
def test_memory_bank_entries_follow_the_encoder_after_one_epoch(shapes, seed):
    """Notebook 03: after one epoch every entry was written once, so the bank agrees with fresh features
    much better than the random bank it started from."""
    x, _ = shapes
    torch.manual_seed(seed)
    model = mocolab.MemoryBankModel(partial(mocolab.ConvNet, width=WIDTH), num_samples=len(x), dim=64, K=256,
                                    T=0.07, bank_m=0.5)

    def bank_cosine():
        fresh = mocolab.extract_features(model.encoder_q, x)  # (M, C), normalised
        return float((fresh * F.normalize(model.bank.memory, dim=1)).sum(1).mean())

    before = bank_cosine()
    fit(model, x, mocolab.BatchAugment(32), TrainConfig(epochs=1, batch_size=64, knn_every=0, seed=seed),
        device="cpu", verbose=False)
    after = bank_cosine()
    assert abs(before) < 0.1, before
    assert after > before + 0.1, (before, after)
