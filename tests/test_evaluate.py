from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mocolab.encoders import ConvNet
from mocolab.evaluate import (
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe,
    per_class_subset,
    train_supervised,
)


def test_knn_predict_matches_loop():
    torch.manual_seed(0)
    bank, labels = F.normalize(torch.randn(30, 5), dim=1), torch.randint(0, 3, (30,))
    queries = F.normalize(torch.randn(4, 5), dim=1)
    pred = knn_predict(queries, bank.t(), labels, 3, k=7, t=0.1)
    for i, q in enumerate(queries):
        sims = bank @ q
        top = sims.topk(7).indices
        scores = [sum(float(torch.exp(sims[j] / 0.1)) for j in top if labels[j] == c) for c in range(3)]
        assert pred[i, 0].item() == max(range(3), key=lambda c: scores[c])


def test_knn_accuracy_separable_and_bad_t():
    centers = F.normalize(torch.randn(4, 16), dim=1) * 5
    ytr, yte = torch.arange(4).repeat(25), torch.arange(4).repeat(5)
    xtr, xte = centers[ytr] + 0.1 * torch.randn(100, 16), centers[yte] + 0.1 * torch.randn(20, 16)
    assert knn_accuracy(xtr, ytr, xte, yte, k=10) == 100.0
    with pytest.raises(ValueError, match="temperature t"):
        knn_accuracy(xtr, ytr, xte, yte, t=0)


def test_extract_features_uint8_and_eval_mode():
    net = ConvNet(num_classes=8, width=4)
    imgs = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    f = extract_features(net, imgs, batch_size=4)
    assert f.shape == (10, 8) and net.training
    torch.testing.assert_close(f.norm(dim=1), torch.ones(10))


def test_linear_probe_learns_separable():
    centers = torch.randn(3, 8) * 3
    ytr, yte = torch.arange(3).repeat(30), torch.arange(3).repeat(10)
    out = linear_probe(centers[ytr] + torch.randn(90, 8) * 0.3, ytr, centers[yte] + torch.randn(30, 8) * 0.3, yte,
                       epochs=20, lr=0.1)
    assert out["test_acc"] > 95
    with pytest.raises(ValueError, match="optimizer"):
        linear_probe(centers, torch.arange(3), centers, torch.arange(3), optimizer="lbfgs")


def test_per_class_subset_counts_and_bad_input():
    labels = torch.arange(5).repeat(7)[torch.randperm(35)]
    idx = per_class_subset(labels, 3, seed=1)
    assert torch.equal(torch.bincount(labels[idx]), torch.full((5,), 3))
    assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == 15
    assert torch.equal(idx, per_class_subset(labels, 3, seed=1))
    with pytest.raises(ValueError, match="fewer than per_class"):
        per_class_subset(labels, 8)
    with pytest.raises(ValueError, match="per_class must be"):
        per_class_subset(labels, 0)


def test_train_supervised_learns_colour_classes():
    # two classes that differ by colour only; no augmentation: the classifier must fit them
    images = torch.zeros(40, 3, 8, 8, dtype=torch.uint8)
    labels = torch.arange(2).repeat(20)
    images[labels == 0, 0] = 255
    images[labels == 1, 2] = 255
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64, 2))
    hist = train_supervised(model, images, labels, lambda x, generator=None: x.float() / 255, steps=30,
                            batch_size=64, lr=0.5, device="cpu")
    assert hist["steps"] == 30 and hist["batch_size"] == 40 and len(hist["step_loss"]) == 30
    assert hist["step_loss"][-1] < hist["step_loss"][0]
    assert (model(images.float() / 255).argmax(1) == labels).all()
    with pytest.raises(ValueError, match="must match"):
        train_supervised(model, images, labels[:5], lambda x, generator=None: x.float())


def test_accuracy_noise_is_two_standard_errors_of_a_difference():
    from mocolab.evaluate import accuracy_noise

    # p = 0.5, n = 1000: SE of one accuracy 1.58 points, of a difference 2.24, two SE 4.47
    assert accuracy_noise(50.0, 1000) == pytest.approx(200 * math.sqrt(2 * 0.25 / 1000))
    assert accuracy_noise(50.0, 4000) == pytest.approx(accuracy_noise(50.0, 1000) / 2)  # 1/sqrt(n)
    assert accuracy_noise(0.0, 100) == accuracy_noise(1.0, 100) > 0  # p clamped to 1 %
    with pytest.raises(ValueError, match="num_test"):
        accuracy_noise(50.0, 0)
    with pytest.raises(ValueError, match="percentage"):
        accuracy_noise(0.5e3, 100)


def test_compare_accuracies_verdicts_follow_the_noise_band():
    from mocolab.evaluate import accuracy_noise, compare_accuracies

    tol = accuracy_noise(20.0, 1000)  # about 3.6 points
    assert compare_accuracies("a", 20.0 + tol + 0.1, "b", 20.0, 1000).endswith(": higher")
    assert compare_accuracies("a", 20.0 - tol - 0.1, "b", 20.0, 1000).endswith(": lower")
    assert compare_accuracies("a", 20.0 + tol - 0.1, "b", 20.0, 1000).endswith("within the test-set noise")
    line = compare_accuracies("MoCo", 36.4, "random init", 21.0, 1000)
    assert line.startswith("MoCo 36.4 % vs random init 21.0 % (+15.4 points, noise ±")


def _knn_as_before(encoder, bank_x, bank_y, test_x, test_y, k, t):
    """The monitor as it was (features copied to the CPU batch by batch, the count read per chunk): the oracle."""
    from mocolab.augment import normalize

    def feats(x):
        encoder.eval()
        with torch.no_grad():
            return torch.cat([F.normalize(encoder(normalize(x[s:s + 512])).float(), dim=1).cpu()
                              for s in range(0, x.shape[0], 512)])
    ftr, fte = feats(bank_x), feats(test_x)
    bank = F.normalize(ftr, dim=1).t().contiguous()
    correct = 0
    for s in range(0, fte.shape[0], 1024):
        pred = knn_predict(F.normalize(fte[s:s + 1024], dim=1), bank, bank_y, int(bank_y.max()) + 1, k, t)
        correct += int((pred[:, 0] == test_y[s:s + 1024]).sum())
    return ftr, 100.0 * correct / fte.shape[0]


def test_knn_monitor_on_the_device_gives_what_it_gave_on_the_host():
    """fit's monitor (features kept on the device, batches of 1024, the search in chunks there, one host read)
    gives the same features and accuracy as the host path it replaced, on the CPU in fp32."""
    from mocolab.evaluate import evaluate_knn
    from mocolab.syncs import count_host_syncs

    torch.manual_seed(0)
    net = ConvNet(num_classes=16, width=4)
    g = torch.Generator().manual_seed(1)
    bank_x = torch.randint(0, 256, (1100, 3, 16, 16), dtype=torch.uint8, generator=g)
    test_x = torch.randint(0, 256, (1300, 3, 16, 16), dtype=torch.uint8, generator=g)
    bank_y, test_y = torch.arange(1100) % 3, torch.arange(1300) % 3
    ref_feats, ref_acc = _knn_as_before(net, bank_x, bank_y, test_x, test_y, k=20, t=0.1)
    feats = extract_features(net, bank_x, batch_size=1024, to_cpu=False)
    assert torch.equal(feats, ref_feats)
    with count_host_syncs() as syncs:
        acc = knn_accuracy(feats, bank_y, extract_features(net, test_x, batch_size=1024, to_cpu=False), test_y,
                           k=20, t=0.1, num_classes=3)
    assert acc == ref_acc and syncs.count == 1, syncs.sites
    assert evaluate_knn(net, bank_x, bank_y, test_x, test_y, k=20, on_device=True, batch_size=1024) == ref_acc
    assert evaluate_knn(net, bank_x, bank_y, test_x, test_y, k=20, amp=True, channels_last=True) == pytest.approx(
        ref_acc, abs=5)  # bf16 features: close, not equal
