"""Checkpoints of a training run: atomic, resumable, loadable with ``weights_only=True``.

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

:func:`training_state` builds that dict, :func:`restore_training_state` puts it back into a model,
an optimizer and the generators. :func:`save_checkpoint` writes to a temporary file in the same
directory, flushes it to disk and renames it over the target, so a crash mid-write leaves the
previous checkpoint intact. Exporting weights to other code is :mod:`mocolab.interop`.

A run directory (``mocolab pretrain --out DIR``) is held by one writer at a time:
:func:`lock_run_dir` takes an exclusive lock on ``DIR/.lock`` for the run's life, and
:func:`remove_orphan_temporaries` clears what killed saves left behind.
"""
from __future__ import annotations

import contextlib
import copy
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "RunDirectoryError", "save_checkpoint", "load_checkpoint", "read_weights_only",
           "clean_state_dict", "training_state", "restore_training_state", "rng_state", "to_plain", "lock_run_dir",
           "remove_orphan_temporaries", "FORMAT"]

#: The value of ``state["format"]`` in every mocolab training checkpoint.
FORMAT = "mocolab-checkpoint-v1"
_REQUIRED = ("model", "optimizer", "epoch", "step", "rng", "history")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, corrupt, truncated or of the wrong kind."""


class RunDirectoryError(CheckpointError):
    """A run directory cannot be written, or another process is writing it."""


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


def remove_orphan_temporaries(directory: str | os.PathLike,
                              names: tuple[str, ...] = ("checkpoint.pt", "metrics.json")) -> list[Path]:
    """Delete the temporary files that killed saves of ``names`` left in ``directory`` (``.NAME.*.tmp``).

    Call it only while no save runs in the directory (``mocolab pretrain`` does so holding
    :func:`lock_run_dir`). Returns the files removed.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for pattern in [f".{name}.*tmp" for name in names] + [".write-test.*.tmp"]:
        for tmp in directory.glob(pattern):
            try:
                if tmp.is_file():
                    tmp.unlink()
                    removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def _lock_holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        return "another process"
    return f"process {text.split()[0]}" if text else "another process"


@contextlib.contextmanager
def lock_run_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the run directory ``directory`` (created if missing) while the block runs.

    The lock is ``flock`` on ``DIR/.lock`` (which holds the owner's pid): it is released when the
    block ends or the process dies, so a stale file never blocks a later run. Taking the lock also
    proves that the directory can be written.

    Raises:
        RunDirectoryError: ``directory`` is a file or cannot be written, or another process (or another
            run in this process) holds the lock; the message names the directory and the other pid.
    """
    directory = Path(directory)
    what = f"run directory {directory}"
    if directory.exists() and not directory.is_dir():
        raise RunDirectoryError(f"{what} is a file, not a directory; choose another --out")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock_path = directory / ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except (FileExistsError, NotADirectoryError):
        raise RunDirectoryError(f"cannot create {what}: a part of the path is a file; choose another --out") from None
    except OSError as err:
        raise RunDirectoryError(f"cannot write to {what} ({err.strerror or err}); choose a writable --out") from None
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, the run goes on unguarded
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirectoryError(f"{what} is in use by {_lock_holder(lock_path)}, which is writing it; wait "
                                        f"for that run to end, or choose another --out") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            probe_fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=directory)
            os.close(probe_fd)
            os.unlink(probe)
        except OSError as err:
            raise RunDirectoryError(f"cannot write to {what} ({err.strerror or err}); "
                                    f"choose a writable --out") from None
        yield directory
    finally:
        os.close(fd)  # releases the lock


def _weights_only_reason(text: str) -> str | None:
    """What ``torch.load(weights_only=True)`` refused (e.g. "Unsupported global: GLOBAL fractions.Fraction"),
    or None when the error is not a refusal of the weights-only unpickler."""
    if "WeightsUnpickler error:" not in text and not text.startswith("Weights only load failed"):
        return None
    detail = " ".join(text.split("WeightsUnpickler error:", 1)[-1].split())  # torch's own words, on one line
    for tail in (" Please use `torch.serialization", " Check the documentation of torch.load"):
        detail = detail.split(tail, 1)[0]
    return detail.strip().rstrip(".") or "an object outside the allowed plain types"


def read_weights_only(path: Path, map_location) -> Any:
    """``torch.load(path, weights_only=True)``, with a :class:`CheckpointError` that says what is wrong."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (0 bytes)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, random bytes, pickled objects outside the allow-list, ...
        text = str(err).strip()
        refused = _weights_only_reason(text)
        if refused is not None:
            raise CheckpointError(
                f"{path} is not a plain-tensor checkpoint: torch.load(weights_only=True) refused it ({refused}). "
                f"mocolab does not load it: unpickling it fully could run arbitrary code. If the file is corrupt, "
                f"use an intact copy; if it comes from other code, save only its tensors and plain values "
                f"(e.g. its state_dict)") from None
        first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(".") if text else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt or truncated "
                              f"({type(err).__name__}: {first})") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a mocolab training checkpoint written by :func:`save_checkpoint` / :func:`mocolab.train.fit`.

    Uses ``torch.load(..., weights_only=True)``: no pickled code is run.

    Raises:
        CheckpointError: the file is missing, unreadable, corrupt or truncated, or is not a
            mocolab training checkpoint (the message names the path).
    """
    path = Path(path)
    state = read_weights_only(path, map_location)
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


def to_plain(obj):
    """``obj`` with numbers, strings, lists, dicts and tensors only (what ``weights_only=True`` loads back)."""
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    return str(obj)


def rng_state(gen: torch.Generator, aug_gen: torch.Generator, dev: torch.device) -> dict:
    """This process's random-number states, as uint8 tensors (loadable with ``weights_only=True``): torch's,
    the batch order's ``gen``, the augmentations' ``aug_gen`` (on ``dev``) and CUDA's."""
    state = {"torch": torch.get_rng_state(), "batch_order": gen.get_state(), "augment": aug_gen.get_state(),
             "augment_device": dev.type}
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def _set_rng_state(rng, r: int, W: int, gen: torch.Generator, aug_gen: torch.Generator, dev: torch.device,
                   verbose: bool) -> None:
    rng = [rng] if isinstance(rng, dict) else list(rng)
    if len(rng) != W and verbose:
        print(f"mocolab: the checkpoint was written by {len(rng)} process(es), this run has {W}; "
              f"training continues, but not bit-identically")
    mine = rng[r] if r < len(rng) else rng[0]
    torch.set_rng_state(mine["torch"])
    gen.set_state(mine["batch_order"])
    if mine.get("augment_device") == dev.type:
        aug_gen.set_state(mine["augment"])
    elif verbose:
        print(f"mocolab: the checkpoint's augmentation stream was on {mine.get('augment_device')}, this run is "
              f"on {dev.type}; it restarts from the seed")
    if dev.type == "cuda" and "cuda" in mine:
        torch.cuda.set_rng_state(mine["cuda"], dev)


def training_state(model: nn.Module, opt: torch.optim.Optimizer, *, clone: bool = False, **progress) -> dict:
    """The checkpoint of a run now: the model's state dict (wrappers stripped), the optimizer's, and
    ``progress`` (``epoch``, ``step``, ``rng`` (one :func:`rng_state` per rank), ``history`` and the run's
    other plain values). ``clone``: copies of the tensors, to be written later while training goes on."""
    model_state, opt_state = clean_state_dict(model.state_dict()), opt.state_dict()
    if clone:
        model_state = {k: v.detach().clone() for k, v in model_state.items()}
        opt_state = copy.deepcopy(opt_state)
    return {"format": FORMAT, "model": model_state, "optimizer": opt_state, **progress}


def restore_training_state(resume, model: nn.Module, opt: torch.optim.Optimizer, steps_per_epoch: int,
                           gen: torch.Generator, aug_gen: torch.Generator, dev: torch.device, *, rank: int = 0,
                           world_size: int = 1, verbose: bool = True) -> dict:
    """Put a checkpoint of :func:`training_state` back: the model, the optimizer and the random-number generators.

    The optimizer keeps this device's SGD kernel (fused or foreach), not the writer's.

    Args:
        resume: a checkpoint path, or a loaded checkpoint.
        model, opt: where the states go.
        steps_per_epoch: this run's, to check that the data and batch size are the checkpoint's.
        gen, aug_gen, dev: the batch-order and augmentation generators, and the device of the latter.
        rank, world_size: this process's rank and the number of processes (each rank takes its own states).

    Returns:
        the checkpoint dict (``epoch``, ``step``, ``history``, ...).

    Raises:
        CheckpointError: an unreadable checkpoint, or one that does not fit this model, data or batch size.
    """
    state = resume if isinstance(resume, dict) else load_checkpoint(resume)
    where = resume if not isinstance(resume, dict) else "the checkpoint"
    impl = {k: opt.param_groups[0].get(k) for k in ("fused", "foreach")} if opt.param_groups else {}
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{where} does not fit this model: {str(err).splitlines()[0]}") from None
    for g in opt.param_groups:
        g.update(impl)  # this device's SGD kernel, not the one of the run that wrote the checkpoint
    if state["step"] != state["epoch"] * steps_per_epoch:
        raise CheckpointError(f"{where} was written after {state['step']} steps in {state['epoch']} epochs, "
                              f"but this run has {steps_per_epoch} steps per epoch: the dataset size or "
                              f"the batch size differ")
    _set_rng_state(state["rng"], rank, world_size, gen, aug_gen, dev, verbose)
    return state
