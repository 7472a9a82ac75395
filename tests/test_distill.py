"""Contrastive distillation (CRD) and feature regression: logits oracle, losses in closed form, frozen teacher."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mocolab.distill import ContrastiveDistill
from mocolab.encoders import ConvNet


def pair(dim=16):
    torch.manual_seed(0)
    return ConvNet(num_classes=dim, width=4), ConvNet(num_classes=dim, width=8)


@pytest.mark.parametrize("loss", ["crd", "l2"])
def test_logits_oracle_and_enqueue(loss):
    student, teacher = pair()
    model = ContrastiveDistill(student, teacher, dim=16, K=32, T=0.2, loss=loss)
    x = torch.randn(4, 3, 32, 32)
    queue = model.queue.clone()
    logits, labels = model(x, torch.randn(4, 3, 32, 32), index=torch.arange(4))
    assert logits.shape == (4, 33) and labels.tolist() == [0] * 4
    with torch.no_grad():
        q, k = F.normalize(student(x), dim=1), F.normalize(teacher(x), dim=1)  # student in train mode, teacher eval
    expected = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / 0.2
    torch.testing.assert_close(logits.detach(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.queue[:, :4], k.t())
    assert model.queue_index[:4].tolist() == [0, 1, 2, 3]
    value = model.loss(logits, labels)
    if loss == "crd":
        torch.testing.assert_close(value, F.cross_entropy(logits, labels))
    else:  # mean squared distance between the normalised features
        torch.testing.assert_close(value, (q - k).pow(2).sum(1).mean(), atol=1e-5, rtol=1e-5)
    value.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.fc.weight.grad is not None


def test_l2_gradient_ignores_the_negatives():
    student, teacher = pair()
    model = ContrastiveDistill(student, teacher, dim=16, K=32, T=0.2, loss="l2")
    logits, labels = model(torch.randn(4, 3, 32, 32))
    logits.retain_grad()
    model.loss(logits, labels).backward()
    assert float(logits.grad[:, 1:].abs().max()) == 0.0


def test_crd_initial_loss_near_ln_k_plus_1_with_collinear_features():
    """Closed form: all candidates equally similar -> loss = ln(K + 1)."""
    class Const(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.w * torch.ones(x.shape[0], 8)

    model = ContrastiveDistill(Const(), Const(), dim=8, K=10, T=0.1, queue_init="empty")
    model.enqueue(F.normalize(torch.ones(10, 8), dim=1))
    logits, labels = model(torch.randn(3, 3, 4, 4))
    assert model.loss(logits, labels).item() == pytest.approx(math.log(11), rel=1e-5)


def test_teacher_stays_frozen_in_eval_mode():
    student, teacher = pair()
    model = ContrastiveDistill(student, teacher, dim=16, K=32)
    model.train()
    assert student.training and not teacher.training
    running = teacher.features[0][1].running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    torch.testing.assert_close(teacher.features[0][1].running_mean, running)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_teacher_view_other_uses_im_k():
    student, teacher = pair()
    model = ContrastiveDistill(student, teacher, dim=16, K=32, teacher_view="other", queue_init="empty")
    x, y = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    model(x, y)
    with torch.no_grad():
        torch.testing.assert_close(model.queue[:, :2], F.normalize(teacher(y), dim=1).t())
    with pytest.raises(ValueError, match="im_k"):
        model(x)


def test_trains_with_fit():
    from mocolab.augment import BatchAugment
    from mocolab.train import TrainConfig, fit

    student, teacher = pair()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(16) % 2
    model = ContrastiveDistill(student, teacher, dim=16, K=32)
    hist = fit(model, images, BatchAugment(32), TrainConfig(epochs=1, batch_size=8, knn_k=5),
               eval_data=(images, labels, images, labels), device="cpu", verbose=False)
    assert len(hist["knn_acc"]) == 1


@pytest.mark.parametrize("kw,match", [(dict(loss="kl"), "loss"), (dict(teacher_view="x"), "teacher_view"),
                                      (dict(T=0), "temperature"), (dict(K=0), "K")])
def test_bad_arguments(kw, match):
    student, teacher = pair()
    with pytest.raises(ValueError, match=match):
        ContrastiveDistill(student, teacher, dim=16, **{"K": 32, **kw})


def test_mismatched_dims_are_reported():
    student = ConvNet(num_classes=8, width=4)
    teacher = ConvNet(num_classes=16, width=4)
    model = ContrastiveDistill(student, teacher, dim=16, K=32)
    with pytest.raises(ValueError, match="student must output"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="nn.Module"):
        ContrastiveDistill(lambda x: x, teacher, dim=16)
