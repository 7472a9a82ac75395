"""Evaluating a representation: features, the weighted kNN monitor, a linear probe.

Letters: N train samples (the kNN bank), Q test queries, C feature dim, L classes.

The kNN monitor is the one of Wu et al. (2018) used by the MoCo CIFAR-10 demo:
each test feature votes with its k = 200 nearest train features (cosine
similarity), each vote weighted by ``exp(sim / t)`` with t = 0.1.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .augment import normalize
from .checks import choice, finite_positive, in_range, positive_int
from .datasets import balanced_subset, normalization_stats
from .losses import check_temperature

__all__ = ["extract_features", "knn_predict", "knn_accuracy", "linear_probe", "evaluate_knn", "per_class_subset",
           "train_supervised", "accuracy_noise", "compare_accuracies"]


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 512,
                     device: torch.device | str | None = None,
                     preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     normalize_features: bool = True, amp: bool = False, channels_last: bool = False,
                     to_cpu: bool = True) -> torch.Tensor:
    """Run ``encoder`` in eval mode over a tensor of images and return the features (float32).

    Args:
        encoder: any module mapping (B, 3, H, W) to (B, C).
        images: uint8 (N, 3, H, W) (normalised with :func:`mocolab.augment.normalize`) or float, already preprocessed.
        preprocess: overrides the default preprocessing of each batch.
        normalize_features: L2-normalise the features (the kNN monitor works on the sphere).
        amp: run the encoder under bf16 autocast (the features are returned in float32).
        channels_last: feed the encoder channels_last batches.
        to_cpu: return the features on the CPU (default); False keeps them on ``device``, with no
            host sync (the kNN monitor of :func:`mocolab.train.fit`).

    Shape:
        (N, 3, H, W) -> (N, C)
    """
    batch_size = positive_int(batch_size, "batch_size")
    if device is None:
        device = next(encoder.parameters()).device
    device = torch.device(device)
    if preprocess is None and images.dtype == torch.uint8:
        if images.dim() != 4 or images.shape[1] != 3:
            preprocess = normalize  # which says what is wrong with the images
        else:  # normalize, with its statistics built once, on the device
            mean, std = (torch.tensor(v, dtype=torch.float32, device=device)
                         for v in normalization_stats(images.shape[-1]))
            preprocess = functools.partial(normalize, mean=mean, std=std)
    was_training = encoder.training
    encoder.eval()
    feats = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True)
            if preprocess is not None:
                x = preprocess(x)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
                f = encoder(x).float()
            feats.append(F.normalize(f, dim=1) if normalize_features else f)
    finally:
        encoder.train(was_training)
    out = torch.cat(feats) if feats else torch.empty(0)
    return out.cpu() if to_cpu else out


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

    Runs on the device of ``train_features`` (the labels and queries are moved there), ``chunk``
    queries at a time; the correct count stays on the device and is read once at the end.

    Shape:
        train_features: (N, C); train_labels: (N,); test_features: (Q, C); test_labels: (Q,).
    """
    if train_features.shape[0] != train_labels.shape[0] or test_features.shape[0] != test_labels.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    dev = train_features.device
    train_labels, test_labels = train_labels.to(dev), test_labels.to(dev)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    bank = F.normalize(train_features.float(), dim=1).t().contiguous()  # (C, N)
    test = F.normalize(test_features.to(dev).float(), dim=1)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    for s in range(0, test.shape[0], chunk):
        pred = knn_predict(test[s:s + chunk], bank, train_labels, num_classes, k, t)
        correct += (pred[:, 0] == test_labels[s:s + chunk]).sum()
    return 100.0 * int(correct) / max(1, test.shape[0])  # the one host sync


def evaluate_knn(encoder: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
                 test_images: torch.Tensor, test_labels: torch.Tensor, k: int = 200, t: float = 0.1,
                 batch_size: int = 512, preprocess=None, *, amp: bool = False, channels_last: bool = False,
                 on_device: bool = False, num_classes: int | None = None) -> float:
    """Extract features of both splits with ``encoder`` and return the weighted kNN accuracy in %.

    ``on_device=True`` keeps the features on the encoder's device and searches there (one host sync
    in all: the monitor of :func:`mocolab.train.fit`); ``amp`` and ``channels_last`` as in
    :func:`extract_features`.
    """
    kw = dict(preprocess=preprocess, amp=amp, channels_last=channels_last, to_cpu=not on_device)
    ftr = extract_features(encoder, train_images, batch_size, **kw)
    fte = extract_features(encoder, test_images, batch_size, **kw)
    return knn_accuracy(ftr, train_labels, fte, test_labels, k=k, t=t, num_classes=num_classes)


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
    epochs, batch_size = positive_int(epochs, "epochs"), positive_int(batch_size, "batch_size")
    lr = finite_positive(lr, "lr")
    choice(optimizer, "optimizer", ("sgd", "adam"))
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


def per_class_subset(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``per_class`` items of every class, chosen at random (seeded), sorted.

    For label-efficiency curves: "1, 10, 100 labelled images per class".

    Shape:
        labels: (N,) -> (L·per_class,) indices.

    Raises:
        ValueError: ``per_class`` < 1, or a class with fewer than ``per_class`` items.
    """
    per_class = positive_int(per_class, "per_class")
    classes, counts = torch.as_tensor(labels).cpu().unique(return_counts=True)
    if len(counts) and int(counts.min()) < per_class:
        c = int(counts.argmin())
        raise ValueError(f"class {int(classes[c])} has only {int(counts[c])} items, fewer than per_class={per_class}")
    return balanced_subset(labels, per_class * len(classes), seed)  # per_class of every class


def train_supervised(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     augment: Callable[..., torch.Tensor], epochs: int = 10, batch_size: int = 256,
                     lr: float = 0.06, momentum: float = 0.9, weight_decay: float = 5e-4,
                     steps: int | None = None, seed: int = 0, device: str | torch.device = "auto",
                     desc: str = "supervised", verbose: bool = False) -> dict:
    """Train ``model`` as a classifier with labels and cross-entropy: the supervised baseline.

    The same optimiser as :func:`mocolab.train.fit` (SGD, momentum, weight decay, cosine
    decay to 0) and the same batched augmentation, so that a supervised encoder can be
    compared with a contrastive one at an equal budget of steps. Batches are drawn from
    consecutive random permutations of the images, so a labelled set smaller than a batch
    is repeated within a batch (each copy differently augmented).

    Args:
        model: a network whose output has one logit per class, e.g. ``ConvNet(num_classes=L)``.
        images: uint8 (N, 3, H, W) training images; labels: (N,).
        augment: maps a uint8 batch to normalised float views (``BatchAugment``), called as
            ``augment(x, generator=...)``.
        epochs: passes over the images (ignored when ``steps`` is given).
        batch_size: images per step, at most N.
        steps: total optimisation steps; default ``epochs · (N // batch)``.
        seed: seeds the batch order and the augmentations.
        device: ``"auto"`` or a device.

    Returns:
        dict with ``step_loss`` (list), ``train_acc`` (% on the augmented batches of the last
        epoch-equivalent), ``steps``, ``batch_size``, ``train_seconds``.

    Shape:
        images: (N, 3, H, W); labels: (N,).

    Raises:
        ValueError: non-positive epochs, steps, batch size or lr; mismatched images and labels.
    """
    import math
    import time

    from .device import get_device
    from .progress import progress

    n = int(images.shape[0])
    if images.dim() != 4 or n != int(labels.shape[0]) or n == 0:
        raise ValueError(f"images (N, 3, H, W) and labels (N,) must match and be non-empty, got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    epochs, batch_size = positive_int(epochs, "epochs"), positive_int(batch_size, "batch_size")
    lr = finite_positive(lr, "lr")
    steps = None if steps is None else positive_int(steps, "steps")
    dev = device if isinstance(device, torch.device) else get_device(device, verbose=verbose)
    batch = min(int(batch_size), n)
    total = int(steps) if steps is not None else epochs * (n // batch)
    per_epoch = max(1, n // batch)
    model.to(dev).train()
    images, labels = images.to(dev), labels.to(dev)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total)))
    stream = torch.empty(0, dtype=torch.long)
    step_loss, correct, seen = [], 0, 0
    t0 = time.perf_counter()
    for step in progress(range(total), desc=desc, leave=False):
        while stream.numel() < batch:
            stream = torch.cat([stream, torch.randperm(n, generator=gen)])
        idx, stream = stream[:batch].to(dev), stream[batch:]
        logits = model(augment(images[idx], generator=aug_gen))  # (B, L)
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step_loss.append(loss.item())
        if step >= total - per_epoch:  # accuracy over the last epoch-equivalent
            correct += int((logits.argmax(1) == labels[idx]).sum())
            seen += idx.numel()
    model.eval()
    return {"step_loss": step_loss, "train_acc": 100.0 * correct / max(1, seen), "steps": total,
            "batch_size": batch, "train_seconds": time.perf_counter() - t0}


def accuracy_noise(acc: float, num_test: int) -> float:
    """Two standard errors, in percentage points, of the difference of two accuracies near ``acc`` %.

    Each accuracy measured on ``num_test`` images has a standard error of ``sqrt(p(1 − p)/n)``;
    the difference of two independent ones ``sqrt(2p(1 − p)/n)``, and twice that is the noise
    band used to call a difference real. (Two models scored on the *same* test images make
    correlated errors, so the band is on the cautious side.) p is clamped to [0.01, 0.99].

    Raises:
        ValueError: ``num_test`` < 1 or ``acc`` outside [0, 100].
    """
    num_test = positive_int(num_test, "num_test")
    p = min(max(in_range(acc, "acc (a percentage)", 0.0, 100.0) / 100.0, 0.01), 0.99)
    return 100.0 * 2.0 * math.sqrt(2.0 * p * (1.0 - p) / num_test)


def compare_accuracies(name: str, acc: float, ref_name: str, ref: float, num_test: int) -> str:
    """One sentence comparing two accuracies (%) that stays true whatever the numbers are.

    The verdict is "higher" or "lower" only when the difference exceeds
    :func:`accuracy_noise` of the reference, else "within the test-set noise".

    Example:
        ``compare_accuracies("MoCo", 36.4, "random init", 21.0, 1000)`` ->
        ``"MoCo 36.4 % vs random init 21.0 % (+15.4 points, noise ±3.6): higher"``
    """
    diff, tol = float(acc) - float(ref), accuracy_noise(ref, num_test)
    verdict = "within the test-set noise" if abs(diff) < tol else ("higher" if diff > 0 else "lower")
    return f"{name} {acc:.1f} % vs {ref_name} {ref:.1f} % ({diff:+.1f} points, noise ±{tol:.1f}): {verdict}"
