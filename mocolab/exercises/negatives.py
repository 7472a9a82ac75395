"""Checkers of notebooks 03 and 04: where the negatives are kept, the memory bank and the queue."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..memory_bank import MemoryBank
from ..queue import KeyQueue
from .core import _as_int, _call, _close, _diagnose, _Failure, _fmt, _is_float, _unit, _where


# ======================================================================= 03 memory-bank update
def _lib_bank_update(memory, index, features, m):
    """The library's update (:meth:`mocolab.MemoryBank.update`), in place on ``memory``."""
    with torch.random.fork_rng(devices=[]):  # building a bank draws random entries: leave the caller's stream alone
        bank = MemoryBank(max(2, memory.shape[0]), memory.shape[1], m=m)
    bank.memory = memory  # the bank now writes into the caller's tensor
    bank.update(index, features)


def _check_bank_update(fn) -> str:
    gen = torch.Generator().manual_seed(3)
    cases = [(10, 4, 3, 0.3), (7, 3, 7, 0.8), (12, 5, 1, 0.9), (9, 4, 4, 0.0), (9, 4, 4, 1.0), (16, 8, 5, 0.5)]
    for M, c, n, m in cases:
        memory = _unit(M, c, generator=gen)
        index = torch.randperm(M, generator=gen)[:n]
        features = _unit(n, c, generator=gen)
        case = f"M = {M} entries of C = {c}, N = {n} features, m = {m:g}"
        inputs = f"index = {index.tolist()}, features {_fmt(features)}, m = {m:g}"
        before = memory.clone()
        feats = features.clone().requires_grad_()  # as q comes from the encoder
        returned = _call(fn, case, inputs, memory, index.clone(), feats, m)
        expected = before.clone()
        _lib_bank_update(expected, index, features, m)
        if memory.requires_grad or memory.grad_fn is not None:
            raise _Failure(case, "not_detached", inputs=inputs, got="memory now requires grad")
        if torch.equal(memory, before) and not torch.equal(expected, before):
            raise _Failure(case, "not_updated_in_place", inputs=inputs, expected=f"rows {index.tolist()} rewritten",
                           got="memory unchanged" + (f"; returned {_fmt(returned)}" if returned is not None else ""))
        if not _close(memory, expected, atol=1e-6):
            old = before[index]

            def placed(rows, at=index):
                out = before.clone()
                out[at] = rows
                return out

            first = torch.arange(n)
            variants = [
                ("bank_momentum_reversed", lambda: placed(F.normalize(m * features + (1 - m) * old, dim=1))),
                ("bank_not_renormalised", lambda: placed(m * old + (1 - m) * features)),
                ("normalised_wrong_dim", lambda: placed(F.normalize(m * old + (1 - m) * features, dim=0))),
                ("bank_ignores_index", lambda: placed(F.normalize(m * before[:n] + (1 - m) * features, dim=1), first)),
                ("bank_ignores_index", lambda: placed(F.normalize(m * old + (1 - m) * features, dim=1), first)),
            ]
            mistake = _diagnose(memory, variants, expected, atol=1e-6)
            if mistake is None:
                rest = torch.ones(M, dtype=torch.bool)
                rest[index] = False
                if not torch.equal(memory[rest], before[rest]):
                    mistake = "bank_other_rows"
            exp_text, got_text = _where(memory, expected, atol=1e-6)
            raise _Failure(case, mistake, inputs=inputs, expected=f"memory {exp_text}", got=f"memory {got_text}",
                           hint="" if mistake else "memory[index] = F.normalize(m * memory[index] + (1 - m) * "
                                                   "features, dim=1), without gradients.")
    return ("the whole bank after 6 updates: M = 7 to 16 entries, N = 1 to M features, m = 0, 0.3 to 0.9 and 1, "
            "features that carry gradients; untouched rows stay as they were.")


# ======================================================================= 04 ring buffer
def _lib_enqueue(queue, ptr, keys):
    """The library's enqueue (:meth:`mocolab.KeyQueue.enqueue`), in place on ``queue``; returns the new pointer."""
    with torch.random.fork_rng(devices=[]):  # building a queue draws random keys: leave the caller's stream alone
        kq = KeyQueue(queue.shape[0], queue.shape[1])
    kq.load_state_dict({"queue": queue.detach(), "queue_ptr": torch.tensor([int(ptr)])}, strict=False)
    kq.enqueue(keys.detach())
    with torch.no_grad():
        queue.copy_(kq.queue)
    return int(kq.queue_ptr)


def _queue_variants(before, ptr, keys, K):
    n = keys.shape[0]
    k = keys.detach()

    def written(at, cols_keys=k):
        out = before.clone()
        out[:, torch.as_tensor(at) % K] = cols_keys.t()
        return out

    ring, start = [(ptr + i) % K for i in range(n)], list(range(n))
    return [  # writing from column 0 is a reset when the batch runs past the end, else the pointer ignored
        ("queue_reset_instead_of_wrap" if ptr + n > K else "queue_ignores_pointer", lambda: written(start)),
        ("keys_reversed", lambda: written(ring, k.flip(0))),
        ("pointer_off_by_one", lambda: written([(ptr + 1 + i) % K for i in range(n)])),
        ("pointer_off_by_one", lambda: written([(ptr - 1 + i) % K for i in range(n)])),
    ]


def _check_queue_state(case, inputs, queue, got_ptr, exp_queue, exp_ptr, before, ptr, keys, atol=1e-6):
    """Compare a queue and its pointer after an enqueue with the expected ones; name the mistake if known."""
    K, n = queue.shape[1], keys.shape[0]
    if queue.requires_grad or queue.grad_fn is not None:
        raise _Failure(case, "not_detached", inputs=inputs, got="the queue now requires grad")
    if torch.equal(queue, before) and not torch.equal(exp_queue, before):
        raise _Failure(case, "not_updated_in_place", inputs=inputs,
                       expected=f"columns {[(ptr + i) % K for i in range(n)]} rewritten", got="queue unchanged")
    p = _as_int(got_ptr)
    if p is None:
        raise _Failure(case, "pointer_not_int" if _is_float(got_ptr) else "wrong_return", inputs=inputs,
                       expected=f"the new pointer, an int: {exp_ptr}", got=_fmt(got_ptr, dtype=True))
    if not _close(queue, exp_queue, atol=atol):
        mistake = _diagnose(queue, _queue_variants(before, ptr, keys, K), exp_queue, atol=atol)
        if mistake is None and p not in range(K):
            mistake = "pointer_not_wrapping"
        exp_text, got_text = _where(queue.t(), exp_queue.t(), atol=atol)
        raise _Failure(case, mistake, inputs=inputs,
                       expected=f"pointer {exp_ptr}; queue columns: {exp_text.replace('row', 'column')}",
                       got=f"pointer {p}; queue columns: {got_text.replace('row', 'column')}",
                       hint="" if mistake else "Key i goes to column (ptr + i) % K of the queue.")
    if p != exp_ptr:
        mistake = ("pointer_not_wrapping" if p == ptr + n or p >= K
                   else "pointer_off_by_one" if abs(p - exp_ptr) == 1 or {p, exp_ptr} == {0, K - 1}
                   else None)
        raise _Failure(case, mistake, inputs=inputs, expected=f"pointer {exp_ptr}", got=f"pointer {p}",
                       hint="" if mistake else "The new pointer is (ptr + N) % K.")
    return p


def _queue_error_classifier(ptr, n, K, rows: bool = True):
    def classify(err):
        text = str(err)
        if isinstance(err, AssertionError) and K % n and (not text or "%" in text):  # assert K % N == 0
            return "pointer_not_wrapping"
        if ptr + n > K and any(w in text for w in ("shape", "size", "index", "bounds", "match")):
            return "pointer_not_wrapping"
        if rows and ("shape" in text or "size" in text):
            return "keys_as_rows"
        if "leaf Variable" in text or "requires grad" in text:
            return "not_detached"
        return None
    return classify


def _check_enqueue(fn) -> str:
    gen = torch.Generator().manual_seed(4)
    sequences = [(3, 8, [2, 2, 2, 2, 2]), (3, 10, [4, 4, 4, 4]), (2, 7, [7, 7]), (4, 5, [1] * 6),
                 (3, 9, [4, 2, 5, 3]), (5, 6, [4, 4, 4])]
    for s, (c, K, batches) in enumerate(sequences):
        torch.default_generator.manual_seed(100 + s)
        oracle = KeyQueue(c, K)  # random unit keys, pointer 0
        queue = oracle.queue.clone()
        ptr = 0
        for call, n in enumerate(batches, start=1):
            keys = _unit(n, c, generator=gen)
            if s == len(sequences) - 1:
                keys.requires_grad_()  # the last sequence: keys fresh from an encoder, with gradients
            wraps = " (this batch runs past the end)" if ptr + n > K else ""
            case = f"K = {K} keys of C = {c}, batches of {batches}: call {call}, ptr = {ptr}, N = {n}{wraps}"
            inputs = f"queue {tuple(queue.shape)}, ptr = {ptr}, keys {_fmt(keys)}"
            before = queue.clone()
            got_ptr = _call(fn, case, inputs, queue, ptr, keys, classify=_queue_error_classifier(ptr, n, K))
            oracle.enqueue(keys.detach())
            ptr = _check_queue_state(case, inputs, queue, got_ptr, oracle.queue, int(oracle.queue_ptr), before, ptr,
                                     keys)
    return ("queue and pointer after every call of 6 sequences (25 calls) against mocolab.KeyQueue: K = 5 to 10, "
            "N = 1 to K, K not divisible by N (writes that wrap around), N = K, varying N, keys with gradients.")
