from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mocolab.queue import KeyQueue, queue_staleness
from mocolab.syncs import count_host_syncs


def keys(n, c=4, start=0):
    # key i has a recognisable first coordinate
    x = torch.zeros(n, c)
    x[:, 0] = torch.arange(start, start + n, dtype=torch.float)
    return x


def test_random_init_is_unit_norm_and_full():
    q = KeyQueue(8, 32)
    assert q.queue.shape == (8, 32)
    torch.testing.assert_close(q.queue.norm(dim=0), torch.ones(32))
    assert q.negatives().shape == (8, 32) and q.negatives().shape[1] == 32


@pytest.mark.parametrize("K,n", [(10, 3), (12, 4), (7, 7), (5, 1)])
def test_fifo_across_wraparound(K, n):
    q = KeyQueue(4, K, init="empty")
    written = []
    for step in range(9):
        batch = keys(n, start=step * n)
        q.enqueue(batch, index=torch.arange(step * n, step * n + n))
        written.extend(range(step * n, step * n + n))
        # the queue holds exactly the last min(K, total) keys, each at slot (position mod K)
        held = written[-K:]
        for key_id in held:
            slot = key_id % K
            assert q.queue[0, slot].item() == key_id
            assert q.queue_index[slot].item() == key_id
        assert q.negatives().shape[1] == min(K, len(written))
        assert int(q.queue_ptr) == len(written) % K


def test_empty_queue_exposes_only_real_keys():
    q = KeyQueue(4, 10, init="empty")
    assert q.negatives().shape == (4, 0)
    q.enqueue(keys(3))
    assert q.negatives().shape == (4, 3)
    q.enqueue(keys(8))
    assert q.negatives().shape == (4, 10)


def test_queue_step_records_the_enqueue_of_each_key():
    q = KeyQueue(4, 6, init="empty")
    for s in range(4):
        q.enqueue(keys(2, start=2 * s))
    # slots 0,1 were overwritten by the 4th call (wrap), slots 2..5 by calls 2 and 3
    assert q.queue_step.tolist() == [3, 3, 1, 1, 2, 2] and int(q.queue_count) == 4


def test_batch_larger_than_queue_keeps_the_last_K():
    q = KeyQueue(4, 5, init="empty")
    q.enqueue(keys(2))  # ptr 2
    q.enqueue(keys(7, start=2), index=torch.arange(2, 9))  # keys 2..8: only 4..8 stay, key i at slot i % 5
    assert q.queue[0].tolist() == [5.0, 6.0, 7.0, 8.0, 4.0] and q.queue_index.tolist() == [5, 6, 7, 8, 4]
    assert int(q.queue_ptr) == 9 % 5 and q.negatives().shape[1] == 5 and q.queue_step.tolist() == [1] * 5
    with pytest.raises(ValueError, match="dim"):
        q.enqueue(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"index must have shape \(2,\)"):
        q.enqueue(keys(2), index=torch.arange(3))


def test_enqueue_and_negatives_make_no_host_sync():
    q = KeyQueue(4, 10, init="empty")
    with count_host_syncs(strict=True):
        for step in range(5):  # wraps around, fills up
            q.enqueue(keys(3, start=3 * step), index=torch.arange(3))
            q.negatives()
    assert q.negatives().shape[1] == 10 and int(q.queue_ptr) == 15 % 10 and int(q.queue_filled) == 10


def test_fill_count_follows_a_loaded_state_dict():
    src = KeyQueue(4, 10, init="empty")
    src.enqueue(keys(3))
    q = KeyQueue(4, 10, init="empty")
    q.enqueue(keys(8))
    q.load_state_dict(src.state_dict())
    assert q.negatives().shape[1] == 3 and q.negatives().shape == (4, 3)
    q.enqueue(keys(2))
    assert q.negatives().shape[1] == 5 and int(q.queue_filled) == 5 and int(q.queue_ptr) == 5
    full = KeyQueue(4, 10)  # random init: all K slots act as negatives
    full.load_state_dict(src.state_dict())
    assert full.negatives().shape == (4, 3)


@pytest.mark.parametrize("K", [2.5, "4", True, -1])
def test_K_must_be_a_positive_integer(K):
    with pytest.raises(ValueError, match="K must be a positive integer"):
        KeyQueue(4, K)


def test_integral_float_K_is_accepted():
    assert KeyQueue(4, 6.0).K == 6 and KeyQueue(4.0, 6).queue.shape == (4, 6)


@pytest.mark.parametrize("kw", [dict(dim=0, K=4), dict(dim=4, K=0), dict(dim=4, K=4, init="zeros")])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        KeyQueue(**kw)


def test_state_dict_roundtrip_keeps_pointer():
    q = KeyQueue(4, 7)
    q.enqueue(F.normalize(torch.randn(5, 4), dim=1))
    q2 = KeyQueue(4, 7)
    q2.load_state_dict(q.state_dict())
    assert int(q2.queue_ptr) == 5 and torch.equal(q2.queue, q.queue)


# --------------------------------------------------------------------------- queue_staleness
@pytest.mark.parametrize("K,B", [(4096, 256), (1000, 128), (65536, 256), (100, 1), (5, 8), (1, 1)])
def test_queue_staleness_closed_form(K, B):
    r = queue_staleness(K, B, steps_per_epoch=50, m=0.99)
    oldest = math.ceil(K / B)
    assert r["oldest_key_age_steps"] == oldest
    assert r["oldest_key_age_epochs"] == pytest.approx(oldest / 50)
    assert r["full_batches"] == K // B and r["partial_keys"] == K % B
    # oracle: simulate a FIFO queue of key ages
    queue = []
    for _ in range(oldest + 3):
        queue = [a + 1 for a in queue] + [1] * B  # every key ages one step, a new batch arrives
        queue = queue[-K:] if len(queue) > K else queue
    assert sorted(r["ages"].tolist()) == sorted(queue)
    assert max(queue) == oldest
    assert r["mean_key_age_steps"] == pytest.approx(np.mean(queue))
    assert r["key_encoder_replaced"] == pytest.approx(1 - 0.99**oldest)


def test_queue_staleness_defaults_and_bad_input():
    r = queue_staleness(4096, 256)
    assert r["oldest_key_age_epochs"] is None and r["key_encoder_replaced"] is None
    with pytest.raises(ValueError, match="K must be a positive integer"):
        queue_staleness(0, 256)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        queue_staleness(4096, 2.5)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        queue_staleness(4096, 256, steps_per_epoch=0)
    with pytest.raises(ValueError, match="m must be in"):
        queue_staleness(4096, 256, m=-0.1)


def test_latest_is_the_last_writes_oldest_first_across_the_wrap():
    q = KeyQueue(4, 5, init="empty")
    q.enqueue(keys(3))
    q.enqueue(keys(4, start=3))  # 7 keys into 5 slots: the ring wraps around
    with count_host_syncs(strict=True):
        latest = q.latest(4)
    assert latest.shape == (4, 4) and latest[:, 0].tolist() == [3, 4, 5, 6]
    assert q.latest(5)[:, 0].tolist() == [2, 3, 4, 5, 6]
