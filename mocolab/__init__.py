"""mocolab: contrastive self-supervised learning, built up to Momentum Contrast.

The library is one concept per module; the names used across the notebooks are
re-exported here. The views (``mocolab.plotting``, ``mocolab.gallery``, ``mocolab.embedding``,
``mocolab.widgets``) are imported on first use (they pull in matplotlib, UMAP and ipywidgets).
"""
from __future__ import annotations

import importlib

from .augment import BatchAugment, denormalize, describe_augmentation, normalize
from .baselines import EndToEnd, MarginPairs, MemoryBankModel
from .datasets import load_images, shared_cifar10_small
from .device import get_device, seed_everything
from .distill import ContrastiveDistill
from .distributed import concat_all_gather
from .encoders import ConvNet, add_mlp_head, backbone, build_encoder, cifar_resnet18, torchvision_resnet
from .evaluate import (
    accuracy_noise,
    compare_accuracies,
    evaluate_knn,
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe,
    per_class_subset,
    train_supervised,
)
from .hard_negatives import ClusterMoCo, DebiasedMoCo, MoCHi, false_negative_rate, mix_hard_negatives
from .interface import ContrastiveModel
from .kmeans import kmeans
from .lesson import EFFECTS, Lesson, judge_effects
from .losses import (
    NCECriterion,
    debiased_infonce_loss,
    infonce_logits,
    infonce_loss,
    margin_contrastive_loss,
    nce_loss,
    npair_loss,
)
from .memory_bank import MemoryBank
from .metrics import (
    KeyConsistencyProbe,
    alignment,
    collapse_std,
    key_consistency,
    nearest_and_hardest,
    similarity_stats,
    temperature_softmax,
    uniformity,
)
from .moco import MoCo
from .momentum import MomentumUpdater, cosine_momentum, ema_track, momentum_update
from .multiview import CMC, lab_views, rgb_to_lab
from .progress import progress
from .queue import KeyQueue, queue_staleness
from .shapes import make_shapes
from .shuffle_bn import SplitBatchNorm, batch_shuffle, batch_unshuffle, convert_split_bn

__version__ = "0.1.0"

_LAZY = ("plotting", "gallery", "embedding", "widgets", "train", "pretrain", "cli", "checkpoint", "interop")
# names re-exported from the lazy submodules: mocolab.plot_embedding, mocolab.temperature_explorer, ...
_LAZY_NAMES = {
    "embed_2d": "embedding",
    **dict.fromkeys(("plot_similarity_histograms", "plot_curves", "plot_sweep"), "plotting"),
    **dict.fromkeys(("plot_embedding", "plot_image_grid", "plot_neighbours"), "gallery"),
    **dict.fromkeys(("temperature_explorer", "momentum_explorer", "queue_explorer"), "widgets"),
    **dict.fromkeys(("fit", "TrainConfig", "NonFiniteLossError"), "train"),  # mocolab.pretrain is the module
    **dict.fromkeys(("save_checkpoint", "load_checkpoint", "CheckpointError"), "checkpoint"),
    **dict.fromkeys(("export_backbone", "load_moco_checkpoint_into_resnet", "load_official_moco",
                     "export_official_moco"), "interop"),
}


def __getattr__(name):  # lazy submodules: mocolab.plotting, mocolab.widgets, ...
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'mocolab' has no attribute {name!r}")
