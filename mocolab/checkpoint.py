"""Checkpoints: atomic, resumable, loadable with ``weights_only=True``; exporting a backbone.

A mocolab checkpoint is a plain dict of tensors, numbers, strings, lists and
dicts, so ``torch.load(path, weights_only=True)`` reads it without running
any pickled code. It holds everything :func:`mocolab.train.fit` needs to
continue a run exactly where it stopped:

- ``model``: the model's state dict (both encoders, ``queue``, ``queue_ptr`` and
  the other queue buffers);
- ``optimizer``: the SGD state (momentum buffers);
- ``epoch``, ``step``: the last finished epoch and the global step count;
- ``rng``: the random-number states as uint8 tensors (torch CPU, CUDA, the
  batch-order and augmentation generators of :func:`~mocolab.train.fit`),
  one dict per rank;
- ``history``, ``train_config`` and ``config`` (the run's settings as plain values).

:func:`save_checkpoint` writes to a temporary file in the same directory,
flushes it to disk and renames it over the target, so a crash mid-write
leaves the previous checkpoint intact.

:func:`export_backbone` writes the query encoder without its projection head
as a torchvision-style state dict; :func:`load_moco_checkpoint_into_resnet`
reads a checkpoint of the official facebookresearch/moco code (``module.encoder_q.*``
keys) into a torchvision ResNet, as the official ``main_lincls.py`` does.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "export_backbone",
           "load_moco_checkpoint_into_resnet", "clean_state_dict", "FORMAT"]

#: The value of ``state["format"]`` in every mocolab training checkpoint.
FORMAT = "mocolab-checkpoint-v1"
_REQUIRED = ("model", "optimizer", "epoch", "step", "rng", "history")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, corrupt, truncated or of the wrong kind."""


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same directory, fsync, ``os.replace``).

    If anything fails before the rename, the file already at ``path`` (the last good
    checkpoint) is left untouched and the temporary file is removed.

    Returns:
        the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _read(path: Path, map_location) -> Any:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, random bytes, pickled objects outside the allow-list, ...
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt, truncated or not a "
                              f"PyTorch checkpoint of plain tensors ({type(err).__name__}: {reason})") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a mocolab training checkpoint written by :func:`save_checkpoint` / :func:`mocolab.train.fit`.

    Uses ``torch.load(..., weights_only=True)``: no pickled code is run.

    Raises:
        CheckpointError: the file is missing, unreadable, corrupt or truncated, or is not a
            mocolab training checkpoint (the message names the path).
    """
    path = Path(path)
    state = _read(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a mocolab training checkpoint (expected a dict with "
                              f"format={FORMAT!r})")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it is incomplete")
    return state


_WRAPPERS = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) parts from every key."""
    out = {}
    for key, value in state_dict.items():
        parts = [p for p in key.split(".") if p + "." not in _WRAPPERS]
        out[".".join(parts)] = value
    return out


def _encoder_q_state(source) -> dict[str, torch.Tensor]:
    """The query encoder's state dict (keys relative to the encoder) from a path, checkpoint dict or module."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        raw = _read(path, "cpu")
        if isinstance(raw, dict) and raw.get("format") == FORMAT:
            sd = raw["model"]
        elif isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
            sd = raw["state_dict"]  # the official format
        else:
            raise CheckpointError(f"{path} holds neither a mocolab checkpoint nor a dict with 'state_dict'")
    elif isinstance(source, nn.Module):
        if hasattr(source, "encoder_q"):
            sd = {f"encoder_q.{k}": v for k, v in source.encoder_q.state_dict().items()}
        else:  # an encoder itself
            sd = {f"encoder_q.{k}": v for k, v in source.state_dict().items()}
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

    The official checkpoint is ``{"state_dict": {"module.encoder_q.conv1.weight": ..., "module.encoder_q.fc.0.weight": ...}}``;
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
