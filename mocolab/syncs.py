"""Count host reads of tensor values: the device -> host syncs of a block of code.

On a GPU, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``int(t)``,
``.tolist()``, ``.cpu()``, ``print(t)``, ...) waits for every queued kernel: the host stops feeding
the device, and the step can be neither captured in a CUDA graph nor compiled whole.
``torch.cuda.set_sync_debug_mode`` reports such syncs on a GPU only; :func:`count_host_syncs`
finds them on any device, the CPU included, by counting calls of the Tensor methods
that read values on the host::

    with count_host_syncs() as syncs:
        logits, labels = model(im_q, im_k)
    assert syncs.count == 0, syncs.sites

Copies between devices (``.to(other_device)``) count too. On a GPU the syncs that
CUDA itself reports (``torch.tensor(list, device="cuda")``, ``nonzero``, masked
indexing, ...) are counted apart, in ``cuda_syncs``. Only calls from the thread that
entered the block are counted; reads on meta tensors are not.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import traceback
import warnings
from collections.abc import Iterator

import torch

__all__ = ["count_host_syncs", "HostSyncCounter", "HostSyncError", "HOST_READ_METHODS"]

HOST_READ_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "numpy", "cpu",
                     "__repr__", "__format__")


class HostSyncError(RuntimeError):
    """A host read of a tensor value inside ``count_host_syncs(strict=True)``."""


class HostSyncCounter:
    """What :func:`count_host_syncs` found.

    Attributes:
        count: host reads of tensor values (calls of :data:`HOST_READ_METHODS` and cross-device ``.to``).
        by_method: ``collections.Counter`` of those calls by method name.
        sites: ``"file:line method"`` of the first 20 calls (outside torch itself).
        cuda_syncs: syncs reported by CUDA's sync debug mode; None when CUDA is not in use.
    """

    def __init__(self):
        self.count = 0
        self.by_method: collections.Counter = collections.Counter()
        self.sites: list[str] = []
        self.cuda_syncs: int | None = None

    def _record(self, name: str) -> None:
        self.count += 1
        self.by_method[name] += 1
        if len(self.sites) < 20:
            frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            self.sites.append(f"{where} {name}")

    def __repr__(self) -> str:
        return f"HostSyncCounter(count={self.count}, by_method={dict(self.by_method)}, cuda_syncs={self.cuda_syncs})"


def _cross_device(t: torch.Tensor, args, kwargs) -> bool:
    try:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
    except Exception:  # let .to() itself raise its error
        return False
    return device is not None and torch.device(device).type not in (t.device.type, "meta")


@contextlib.contextmanager
def count_host_syncs(strict: bool = False) -> Iterator[HostSyncCounter]:
    """Count host reads of tensor values in the block; yields a :class:`HostSyncCounter`.

    Args:
        strict: raise :class:`HostSyncError` at the first host read instead of counting it.
    """
    counter = HostSyncCounter()
    thread, busy = threading.get_ident(), [False]  # busy: inside a counted call (repr calls item, ...)
    saved = {name: torch.Tensor.__dict__.get(name) for name in HOST_READ_METHODS + ("to",)}

    def wrap(name, original, counts):
        def method(self, *args, **kwargs):
            if busy[0] or threading.get_ident() != thread or self.is_meta or not counts(self, args, kwargs):
                return original(self, *args, **kwargs)
            if strict:
                raise HostSyncError(f"host read of a tensor value: Tensor.{name}() on a {self.device} tensor")
            counter._record(name)
            busy[0] = True
            try:
                return original(self, *args, **kwargs)
            finally:
                busy[0] = False

        method.__name__ = name
        return method

    for name in HOST_READ_METHODS:
        setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name), lambda t, a, k: True))
    torch.Tensor.to = wrap("to", torch.Tensor.to, _cross_device)

    use_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    old_mode = torch.cuda.get_sync_debug_mode() if use_cuda else None
    caught = contextlib.nullcontext([])
    if use_cuda:
        torch.cuda.set_sync_debug_mode("warn")
        caught = warnings.catch_warnings(record=True)
    try:
        with caught as records:
            if use_cuda:
                warnings.simplefilter("always")
            yield counter
    finally:
        if use_cuda:
            torch.cuda.set_sync_debug_mode(old_mode)
            syncs = [r for r in records if "synchroniz" in str(r.message)]
            counter.cuda_syncs = len(syncs)
            for r in records:  # give back the other warnings
                if r not in syncs:
                    warnings.warn_explicit(r.message, r.category, r.filename, r.lineno)
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
