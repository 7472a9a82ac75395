"""mocolab: contrastive self-supervised learning, built up to Momentum Contrast.

The library is one concept per module; the names used across the notebooks are
re-exported here. ``mocolab.plotting`` and ``mocolab.widgets`` are imported on
first use (they pull in matplotlib, UMAP and ipywidgets).
"""
from __future__ import annotations

import importlib

from .device import get_device, seed_everything
from .encoders import ConvNet, MLPHead, add_mlp_head, backbone, build_encoder, cifar_resnet18, torchvision_resnet
from .evaluate import (accuracy_noise, compare_accuracies, evaluate_knn, extract_features, knn_accuracy, knn_predict,
                       linear_probe, per_class_subset, train_supervised)
from .losses import (NCECriterion, debiased_infonce_loss, infonce_logits, infonce_loss, margin_contrastive_loss,
                     nce_loss, npair_loss)
from .memory_bank import MemoryBank
from .metrics import KeyConsistencyProbe, alignment, collapse_std, key_consistency, similarity_stats, uniformity
from .moco import EndToEnd, MemoryBankModel, MoCo
from .momentum import MomentumUpdater, cosine_momentum, momentum_update
from .progress import progress
from .queue import KeyQueue
from .shuffle_bn import SplitBatchNorm, batch_shuffle, batch_unshuffle, concat_all_gather, convert_split_bn
from .data import (BatchAugment, ShapesDataset, TwoCropsTransform, describe_augmentation, get_dataset, load_images,
                   make_shapes, moco_v1_transform, moco_v2_transform, normalize, shared_cifar10_small)
from .multiview import CMC, lab_views, rgb_to_lab
from .hard_negatives import (ClusterMoCo, DebiasedMoCo, MoCHi, false_negative_rate, kmeans,
                             mix_hard_negatives)
from .distill import ContrastiveDistill
from .lesson import EFFECTS, Lesson, judge_effects

__version__ = "0.1.0"

_LAZY = ("plotting", "widgets", "train", "cli", "checkpoint", "distributed")
# names re-exported from the lazy submodules: mocolab.plot_embedding, mocolab.temperature_explorer, ...
_LAZY_NAMES = {
    **dict.fromkeys(("embed_2d", "plot_embedding", "plot_similarity_histograms", "plot_curves", "plot_image_grid",
                     "nearest_and_hardest", "plot_neighbours", "plot_sweep"), "plotting"),
    **dict.fromkeys(("temperature_softmax", "ema_track", "queue_staleness", "temperature_explorer",
                     "momentum_explorer", "queue_explorer"), "widgets"),
    **dict.fromkeys(("fit", "TrainConfig", "pretrain", "NonFiniteLossError"), "train"),
    **dict.fromkeys(("save_checkpoint", "load_checkpoint", "export_backbone", "load_moco_checkpoint_into_resnet",
                     "CheckpointError"), "checkpoint"),
}


def __getattr__(name):  # lazy submodules: mocolab.plotting, mocolab.widgets, ...
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'mocolab' has no attribute {name!r}")
