"""count_host_syncs: host reads of tensor values are counted, nothing else, and torch is left as it was."""
from __future__ import annotations

import threading

import pytest
import torch

from mocolab.syncs import HOST_READ_METHODS, HostSyncError, count_host_syncs


def test_counts_each_kind_of_host_read():
    x = torch.arange(4.0)
    with count_host_syncs() as syncs:
        x.sum().item()
        bool(x[1])
        int(x[2]), float(x[3]), complex(x[0])
        x.tolist(), x.numpy(), x.cpu()
        x[: x.long()[2]]  # __index__
        repr(x), f"{x[0]:.1f}"  # each counted once, not the reads they make inside
        if x.any():
            pass
    assert syncs.count == 12
    assert syncs.by_method == {"item": 1, "__bool__": 2, "__int__": 1, "__float__": 1, "__complex__": 1,
                               "tolist": 1, "numpy": 1, "cpu": 1, "__index__": 1, "__repr__": 1, "__format__": 1}
    assert syncs.sites[0].startswith(__file__) and syncs.sites[0].endswith(" item")
    assert syncs.cuda_syncs is None or syncs.cuda_syncs >= 0


def test_device_work_and_metadata_are_not_counted():
    x = torch.randn(8, 3)
    with count_host_syncs() as syncs:
        y = (x @ x.t()).softmax(dim=1).argmax(dim=1)
        x.shape[0], x.dtype, x.device, x.is_contiguous(), len(x), x.dim()
        x.to(torch.float64), x.to(x.device), x.to("meta")
        m = torch.empty(3, device="meta")
        with pytest.raises((RuntimeError, NotImplementedError)):
            m.item()  # a meta tensor has no value to read: not a sync
    assert syncs.count == 0, syncs.sites
    assert y.shape == (8,)


def test_strict_raises_at_the_read_and_restores_torch():
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READ_METHODS + ("to",)}
    with pytest.raises(HostSyncError, match="item"):
        with count_host_syncs(strict=True):
            torch.ones(1).item()
    assert {name: getattr(torch.Tensor, name) for name in originals} == originals
    with count_host_syncs() as syncs:
        pass
    assert syncs.count == 0 and torch.ones(1).item() == 1.0 and bool(torch.ones(1))


def test_other_threads_are_not_counted():
    x = torch.ones(2)
    with count_host_syncs() as syncs:
        t = threading.Thread(target=lambda: x.sum().item())
        t.start()
        t.join()
        x.sum().item()
    assert syncs.count == 1
