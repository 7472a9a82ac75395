"""Weights in and out of mocolab: a backbone for downstream use, and the official MoCo checkpoints.

:func:`export_backbone` writes the query encoder without its projection head as a
torchvision-style state dict; :func:`load_moco_checkpoint_into_resnet` reads a checkpoint of the
official facebookresearch/moco code (``module.encoder_q.*`` keys) into a torchvision ResNet, as the
official ``main_lincls.py`` does. :func:`load_official_moco` loads a whole official MoCo state dict
(both encoders and the queue) into :class:`~mocolab.moco.MoCo`, and :func:`export_official_moco`
writes one. Files are read with ``torch.load(weights_only=True)`` (:mod:`mocolab.checkpoint`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .checkpoint import FORMAT, CheckpointError, clean_state_dict, read_weights_only, save_checkpoint
from .interface import ContrastiveModel

__all__ = ["export_backbone", "load_moco_checkpoint_into_resnet", "load_official_moco", "export_official_moco"]


def _encoder_q_state(source) -> dict[str, torch.Tensor]:
    """The query encoder's state dict (keys relative to the encoder) from a path, checkpoint dict or module."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        raw = read_weights_only(path, "cpu")
        if isinstance(raw, dict) and raw.get("format") == FORMAT:
            sd = raw["model"]
        elif isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
            sd = raw["state_dict"]  # the official format
        else:
            raise CheckpointError(f"{path} holds neither a mocolab checkpoint nor a dict with 'state_dict'")
    elif isinstance(source, nn.Module):
        encoder = source.eval_encoder() if isinstance(source, ContrastiveModel) else source  # or an encoder itself
        sd = {f"encoder_q.{k}": v for k, v in encoder.state_dict().items()}
    elif isinstance(source, Mapping):
        sd = source["model"] if "model" in source else source.get("state_dict", source)
    else:
        raise TypeError(f"expected a checkpoint path, a checkpoint dict or a module, got {type(source).__name__}")
    sd = clean_state_dict(sd)
    enc = {k[len("encoder_q."):]: v for k, v in sd.items() if k.startswith("encoder_q.")}
    if not enc:
        raise CheckpointError("no query-encoder weights (keys 'encoder_q.*' or 'module.encoder_q.*') found")
    return enc


def export_backbone(checkpoint_or_model, path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The query encoder without its projection head, as a torchvision-style state dict.

    Keys are those of the encoder itself (``conv1.weight``, ``layer1.0.bn1.running_mean``, …);
    every ``fc.*`` key (the linear or MLP projection head) is dropped, so the result loads into
    a torchvision ResNet with ``strict=False`` leaving only ``fc.weight`` / ``fc.bias`` missing.

    Args:
        checkpoint_or_model: a checkpoint path (mocolab or official format), a loaded checkpoint
            dict, a :class:`~mocolab.moco.MoCo` model or an encoder module.
        path: if given, the state dict is also saved there (atomically).

    Returns:
        the state dict (CPU tensors).

    Raises:
        CheckpointError: an unreadable checkpoint, or one without query-encoder weights.
    """
    enc = {k: v.detach().cpu().clone() for k, v in _encoder_q_state(checkpoint_or_model).items()
           if not k.startswith("fc.")}
    if path is not None:
        save_checkpoint(path, enc)
    return enc


def load_moco_checkpoint_into_resnet(path: str | os.PathLike, arch: str = "resnet50", num_classes: int = 1000,
                                     model: nn.Module | None = None) -> nn.Module:
    """Load a MoCo checkpoint's query encoder into a torchvision-style ResNet, as the official ``main_lincls.py``.

    The official checkpoint is
    ``{"state_dict": {"module.encoder_q.conv1.weight": ..., "module.encoder_q.fc.0.weight": ...}}``;
    ``module.encoder_q.`` is stripped, the projection head (``fc.*``) dropped, and the rest loaded with
    ``strict=False``; the only keys allowed to stay missing are ``fc.weight`` and ``fc.bias`` (the new
    classifier, re-initialised as in ``main_lincls.py``). mocolab checkpoints (``encoder_q.*``) load too.

    Args:
        path: the checkpoint file.
        arch: an encoder name of :func:`mocolab.encoders.build_encoder` (``resnet50``, ``resnet18``,
            ``resnet18-cifar``, ``convnet``); ignored when ``model`` is given.
        num_classes: classes of the new ``fc`` layer.
        model: load into this module instead of building one.

    Returns:
        the model with the backbone weights loaded and ``fc`` initialised as in ``main_lincls.py``
        (weights N(0, 0.01), bias 0).

    Raises:
        CheckpointError: unreadable file, no ``encoder_q`` weights, or keys that do not match the model
            (the message lists the unexpected and the missing keys).
    """
    from .encoders import build_encoder

    state = export_backbone(path)
    target = arch if model is None else type(model).__name__
    if model is None:
        model = build_encoder(arch, num_classes=num_classes)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ: another architecture
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        raise CheckpointError(f"checkpoint {path} does not match {target}: {len(lines)} tensors have other shapes "
                              f"({lines[0] if lines else str(err).splitlines()[0]}); is arch right?") from None
    missing = sorted(set(result.missing_keys) - {"fc.weight", "fc.bias"})
    if result.unexpected_keys or missing:
        raise CheckpointError(
            f"checkpoint {path} does not match {target}: "
            f"unexpected keys {sorted(result.unexpected_keys)[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}, "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''} (only fc.* may be missing)")
    if isinstance(getattr(model, "fc", None), nn.Linear):
        nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(model.fc.bias)
    return model


def _official_state(source) -> tuple[dict[str, torch.Tensor], str]:
    """A MoCo state dict (wrappers stripped) and a name for messages, from a path, checkpoint dict or state dict."""
    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        raw = read_weights_only(Path(source), "cpu")
    elif isinstance(source, Mapping):
        where, raw = "the state dict", source
    else:
        raise TypeError(f"expected a checkpoint path or a state dict, got {type(source).__name__}")
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]  # main_moco.py's checkpoint: {"epoch", "arch", "state_dict", "optimizer"}
    elif isinstance(raw, Mapping) and raw.get("format") == FORMAT:
        raw = raw["model"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{where} holds no MoCo state dict (expected a dict of tensors, or a dict with "
                              f"'state_dict')")
    return clean_state_dict(raw), where


def load_official_moco(model: nn.Module, source) -> nn.Module:
    """Load a whole official MoCo state dict (facebookresearch/moco ``builder.MoCo``) into ``model``, strictly.

    The official state dict holds ``encoder_q.*``, ``encoder_k.*``, ``queue`` (C, K) and ``queue_ptr``;
    its checkpoint files wrap it as ``{"state_dict": {"module.encoder_q...": ...}}`` (``module.`` is
    stripped). The four queue buffers that mocolab adds are filled as for a full queue of keys of unknown
    origin: ``queue_filled = K`` (the official queue starts full of random keys), ``queue_index = -1``
    (dataset index unknown), ``queue_step = -1`` and ``queue_count = 0`` (age unknown). A mocolab state
    dict (with those buffers) loads as it is. Files are read with ``weights_only=True``.

    Args:
        model: a :class:`~mocolab.moco.MoCo` built with the official run's encoder, ``dim``, ``K`` and head.
        source: a checkpoint path, a loaded checkpoint dict, or the state dict itself.

    Returns:
        ``model``, loaded.

    Raises:
        CheckpointError: an unreadable file, no MoCo state dict, a queue of another size, or keys and
            shapes that do not match the model (the message lists them).
    """
    sd, where = _official_state(source)
    if "queue" not in sd or "queue_ptr" not in sd:
        raise CheckpointError(f"{where} is not a MoCo state dict: it has no 'queue' and 'queue_ptr' "
                              f"(keys: {sorted(sd)[:6]}...)")
    queue = sd["queue"]
    K, dim = int(getattr(model, "K", queue.shape[-1])), model.queue.shape[0]
    if queue.dim() != 2 or tuple(queue.shape) != (dim, K):
        raise CheckpointError(f"{where} holds a queue of shape {tuple(queue.shape)} (dim C, K), this model's is "
                              f"({dim}, {K}); build MoCo with dim={queue.shape[0]}, K={queue.shape[-1]}")
    # the queue's own load fills the buffers the official state dict lacks (KeyQueue._load_from_state_dict)
    sd["queue_ptr"] = sd["queue_ptr"].reshape(-1)[:1].to(torch.long) % K
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # shapes differ
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        raise CheckpointError(f"{where} does not match this MoCo model: {len(lines)} tensors have other shapes "
                              f"({lines[0] if lines else str(err).splitlines()[0]}); are the encoder, dim and "
                              f"head (mlp) those of the official run?") from None
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
        raise CheckpointError(f"{where} does not match this MoCo model: missing keys {missing[:8]}"
                              f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                              f"{'...' if len(unexpected) > 8 else ''}; are the encoder and head (mlp) those of "
                              f"the official run?")
    return model


def export_official_moco(model: nn.Module, path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` with exactly the official MoCo keys: ``encoder_q.*``, ``encoder_k.*``, ``queue``,
    ``queue_ptr`` (mocolab's extra queue buffers are left out), as CPU tensors.

    Args:
        model: a :class:`~mocolab.moco.MoCo` model.
        path: if given, also write a file in the layout of the official ``main_moco.py`` checkpoints,
            ``{"state_dict": {"module.encoder_q...": ...}}``, which the official ``main_lincls.py`` reads.

    Returns:
        the state dict, without the ``module.`` prefix.
    """
    sd = clean_state_dict(model.state_dict())
    out = {k: v.detach().cpu().clone() for k, v in sd.items()
           if k.startswith(("encoder_q.", "encoder_k.")) or k in ("queue", "queue_ptr")}
    if "queue" not in out or not any(k.startswith("encoder_q.") for k in out):
        raise CheckpointError(f"{type(model).__name__} is not a MoCo model (it has no encoder_q and queue)")
    if path is not None:
        save_checkpoint(path, {"state_dict": {f"module.{k}": v for k, v in out.items()}})
    return out
