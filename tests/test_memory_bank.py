from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mocolab.memory_bank import MemoryBank


def test_update_convention_and_unit_norm():
    bank = MemoryBank(10, 4, m=0.5)
    old = bank.memory[[2, 5]].clone()
    f = F.normalize(torch.randn(2, 4), dim=1)
    bank.update(torch.tensor([2, 5]), f)
    torch.testing.assert_close(bank.memory[[2, 5]], F.normalize(0.5 * old + 0.5 * f, dim=1))
    torch.testing.assert_close(bank.memory.norm(dim=1), torch.ones(10))


def test_m0_replaces():
    bank = MemoryBank(10, 4, m=0.0)
    f = F.normalize(torch.randn(1, 4), dim=1)
    bank.update(torch.tensor([3]), f)
    torch.testing.assert_close(bank.memory[3], f[0])


def test_sampling_excludes_positive_and_is_uniform():
    bank = MemoryBank(5, 2)
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 4, 2])
    idx = bank.sample(index, 20000, generator=g)
    assert idx.shape == (3, 20000)
    assert not (idx == index[:, None]).any()
    counts = torch.bincount(idx[0], minlength=5).float() / 20000
    torch.testing.assert_close(counts[1:], torch.full((4,), 0.25), atol=0.02, rtol=0)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MemoryBank(10, 4, m=1.5)
    with pytest.raises(ValueError, match="num_samples"):
        MemoryBank(1, 4)
    with pytest.raises(ValueError, match="indices"):
        MemoryBank(10, 4).update(torch.tensor([10]), torch.zeros(1, 4))
