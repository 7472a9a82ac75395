"""Evaluating a representation: features, the weighted kNN monitor, a linear probe.

Letters: N train samples (the kNN bank), Q test queries, C feature dim, L classes.

The kNN monitor is the one of Wu et al. (2018) used by the MoCo CIFAR-10 demo:
each test feature votes with its k = 200 nearest train features (cosine
similarity), each vote weighted by ``exp(sim / t)`` with t = 0.1.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .losses import check_temperature

__all__ = ["extract_features", "knn_predict", "knn_accuracy", "linear_probe", "evaluate_knn"]


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 512,
                     device: torch.device | str | None = None,
                     preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     normalize_features: bool = True) -> torch.Tensor:
    """Run ``encoder`` in eval mode over a tensor of images and return the features on the CPU.

    Args:
        encoder: any module mapping (B, 3, H, W) to (B, C).
        images: uint8 (N, 3, H, W) (normalised with :func:`mocolab.data.normalize`) or float, already preprocessed.
        preprocess: overrides the default preprocessing of each batch.
        normalize_features: L2-normalise the features (the kNN monitor works on the sphere).

    Shape:
        (N, 3, H, W) -> (N, C)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        device = next(encoder.parameters()).device
    if preprocess is None and images.dtype == torch.uint8:
        from .data import normalize as preprocess
    was_training = encoder.training
    encoder.eval()
    feats = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True)
            if preprocess is not None:
                x = preprocess(x)
            f = encoder(x).float()
            feats.append((F.normalize(f, dim=1) if normalize_features else f).cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(feats) if feats else torch.empty(0)


def knn_predict(feature: torch.Tensor, feature_bank: torch.Tensor, feature_labels: torch.Tensor,
                num_classes: int, k: int = 200, t: float = 0.1) -> torch.Tensor:
    """Weighted kNN class scores, ranked (the MoCo CIFAR-10 demo's monitor).

    Args:
        feature: (Q, C) normalised query features.
        feature_bank: (C, N) normalised train features, as columns.
        feature_labels: (N,) train labels.

    Returns:
        (Q, L) class indices, best first.
    """
    t = check_temperature(t, "t")
    k = min(int(k), feature_bank.shape[1])
    if k < 1:
        raise ValueError(f"k must be >= 1 and the bank non-empty, got k={k}")
    sim = feature @ feature_bank  # (Q, N)
    sim_weight, sim_indices = sim.topk(k=k, dim=-1)  # (Q, k)
    sim_labels = torch.gather(feature_labels.expand(feature.shape[0], -1), dim=-1, index=sim_indices)  # (Q, k)
    sim_weight = (sim_weight / t).exp()
    one_hot = torch.zeros(feature.shape[0] * k, num_classes, device=sim_labels.device)
    one_hot.scatter_(dim=-1, index=sim_labels.view(-1, 1), value=1.0)  # (Q·k, L)
    pred_scores = (one_hot.view(feature.shape[0], -1, num_classes) * sim_weight.unsqueeze(-1)).sum(dim=1)  # (Q, L)
    return pred_scores.argsort(dim=-1, descending=True)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 200, t: float = 0.1, num_classes: int | None = None,
                 chunk: int = 1024) -> float:
    """Top-1 accuracy (in %) of the weighted kNN classifier: train features as the bank, test features as queries.

    Shape:
        train_features: (N, C); train_labels: (N,); test_features: (Q, C); test_labels: (Q,).
    """
    if train_features.shape[0] != train_labels.shape[0] or test_features.shape[0] != test_labels.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    bank = F.normalize(train_features.float(), dim=1).t().contiguous()  # (C, N)
    test = F.normalize(test_features.float(), dim=1)
    correct = 0
    for s in range(0, test.shape[0], chunk):
        pred = knn_predict(test[s:s + chunk], bank, train_labels, num_classes, k, t)
        correct += int((pred[:, 0] == test_labels[s:s + chunk]).sum())
    return 100.0 * correct / max(1, test.shape[0])


def evaluate_knn(encoder: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
                 test_images: torch.Tensor, test_labels: torch.Tensor, k: int = 200, t: float = 0.1,
                 batch_size: int = 512, preprocess=None) -> float:
    """Extract features of both splits with ``encoder`` and return the weighted kNN accuracy in %."""
    ftr = extract_features(encoder, train_images, batch_size, preprocess=preprocess)
    fte = extract_features(encoder, test_images, batch_size, preprocess=preprocess)
    return knn_accuracy(ftr, train_labels, fte, test_labels, k=k, t=t)


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, epochs: int = 100, lr: float = 0.1, weight_decay: float = 0.0,
                 batch_size: int = 256, optimizer: str = "sgd", standardize: bool = True,
                 num_classes: int | None = None, seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """Train a linear classifier on frozen features; return train/test accuracy (in %).

    The MoCo paper's recipe is SGD with lr = 30, momentum 0.9, no weight decay on un-normalised
    backbone features (their scale is small, hence the huge lr). ``standardize=True`` centres and
    scales each feature with the train statistics, which makes an ordinary lr (0.1 for SGD, 1e-3
    for Adam) work on any encoder: the more forgiving alternative. Cosine learning-rate decay.

    Raises:
        ValueError: non-positive epochs / lr / batch size or an unknown optimizer.
    """
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(f"epochs, lr and batch_size must be positive, got {epochs}, {lr}, {batch_size}")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    g = torch.Generator().manual_seed(seed)
    xtr, xte = train_features.float().to(device), test_features.float().to(device)
    ytr, yte = train_labels.to(device), test_labels.to(device)
    if standardize:
        mu, sd = xtr.mean(0, keepdim=True), xtr.std(0, keepdim=True).clamp_min(1e-6)
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    if num_classes is None:
        num_classes = int(max(ytr.max(), yte.max())) + 1
    clf = nn.Linear(xtr.shape[1], num_classes).to(device)
    if optimizer == "sgd":
        opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((xtr.shape[0] + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        perm = torch.randperm(xtr.shape[0], generator=g).to(device)
        for s in range(0, xtr.shape[0], batch_size):
            idx = perm[s:s + batch_size]
            loss = F.cross_entropy(clf(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        train_acc = 100.0 * float((clf(xtr).argmax(1) == ytr).float().mean())
        test_acc = 100.0 * float((clf(xte).argmax(1) == yte).float().mean())
    return {"train_acc": train_acc, "test_acc": test_acc, "classifier": clf.cpu()}
