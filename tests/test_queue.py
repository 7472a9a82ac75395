import pytest
import torch
import torch.nn.functional as F

from mocolab.queue import KeyQueue


def keys(n, c=4, start=0):
    # key i has a recognisable first coordinate
    x = torch.zeros(n, c)
    x[:, 0] = torch.arange(start, start + n, dtype=torch.float)
    return x


def test_random_init_is_unit_norm_and_full():
    q = KeyQueue(8, 32)
    assert q.queue.shape == (8, 32)
    torch.testing.assert_close(q.queue.norm(dim=0), torch.ones(32))
    assert q.negatives().shape == (8, 32) and q.num_valid == 32


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
        assert q.num_valid == min(K, len(written))
        assert int(q.queue_ptr) == len(written) % K


def test_empty_queue_exposes_only_real_keys():
    q = KeyQueue(4, 10, init="empty")
    assert q.negatives().shape == (4, 0)
    q.enqueue(keys(3))
    assert q.negatives().shape == (4, 3)
    q.enqueue(keys(8))
    assert q.negatives().shape == (4, 10)


def test_key_age():
    q = KeyQueue(4, 6, init="empty")
    for s in range(4):
        q.enqueue(keys(2, start=2 * s))
    # slots 0,1 were overwritten by the 4th call (wrap), slots 2..5 by calls 2 and 3
    assert q.key_age().tolist() == [0, 0, 2, 2, 1, 1]


def test_batch_larger_than_queue_is_an_error():
    q = KeyQueue(4, 5)
    with pytest.raises(ValueError, match="larger than the queue"):
        q.enqueue(keys(6))
    with pytest.raises(ValueError, match="dim"):
        q.enqueue(torch.zeros(2, 3))


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
