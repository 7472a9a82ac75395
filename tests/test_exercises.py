"""The exercise checkers: the reference solutions pass, every typical mistake fails with its own hint,
and no function that feeds the library the wrong inputs passes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mocolab
from mocolab import exercises
from mocolab.exercises import EXERCISES, MISTAKES, check, run_check
from mocolab.exercises.core import DATA_NOTE, _diagnose, _fmt, _modes
from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
SOLUTIONS_PATH = REPO / "notebooks" / "solutions" / "solutions.py"


sol = load_script("notebooks/solutions/solutions.py", "mocolab_reference_solutions")


@pytest.fixture(autouse=True)
def _headless(monkeypatch):
    monkeypatch.setenv("MOCOLAB_HEADLESS", "1")


# ----------------------------------------------------------------------------- the right answers
@pytest.mark.parametrize("name", list(EXERCISES))
def test_reference_solution_passes(name):
    result = run_check(name, getattr(sol, name))
    assert result.passed, str(result)
    assert str(result).startswith("✓") and "Checked:" in str(result)


@pytest.mark.parametrize("name", list(EXERCISES))
def test_library_fallback_passes(name):
    result = run_check(name, EXERCISES[name].library)
    assert result.passed, str(result)


def test_every_notebook_01_to_07_has_an_exercise_and_07_has_the_step():
    assert {e.notebook for e in EXERCISES.values()} == {"01", "02", "03", "04", "05", "06", "07"}
    assert EXERCISES["moco_step"].notebook == "07"


# ----------------------------------------------------------------------------- correct answers in other styles
# Any correct solution passes, whatever its style; the official MoCo code's own forms among them.
def _margin_style(distance=lambda x1, x2: (x1 - x2).norm(dim=1), combine=None):
    def margin_loss(x1, x2, y, margin):
        D = distance(x1, x2)
        if combine is not None:
            return combine(D, y, margin)
        y = y.float()
        return ((1 - y) * 0.5 * D**2 + y * 0.5 * F.relu(margin - D) ** 2).mean()
    return margin_loss


def _margin_naive(x1, x2, y, margin):  # notebook 01's loop, one pair at a time
    total = 0.0
    for a, b, label in zip(x1, x2, y.float()):
        D = torch.sqrt(((a - b) ** 2).sum())
        total = total + (1 - label) * 0.5 * D**2 + label * 0.5 * torch.clamp(margin - D, min=0) ** 2
    return total / len(y)


MARGIN_STYLES = {
    "reference": sol.margin_loss,
    "library": lambda x1, x2, y, margin: mocolab.margin_contrastive_loss(x1, x2, y, margin=margin),
    "pairwise_distance (eps = 1e-6)": _margin_style(F.pairwise_distance),
    "cdist diagonal": _margin_style(lambda x1, x2: torch.cdist(x1, x2).diagonal()),
    "sqrt of the squared distance": _margin_style(lambda x1, x2: ((x1 - x2) ** 2).sum(dim=1).sqrt()),
    "torch.where(y == 0, …)": _margin_style(combine=lambda D, y, m: torch.where(
        y == 0, 0.5 * D**2, 0.5 * torch.clamp(m - D, min=0) ** 2).mean()),
    "y as bool": _margin_style(combine=lambda D, y, m: torch.where(
        y.bool(), 0.5 * (m - D).clamp_min(0).pow(2), 0.5 * D.pow(2)).mean()),
    "naive loop": _margin_naive,
}


def _infonce_official(q, k, queue, T):  # moco/builder.py's einsum forms
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [q, queue.clone().detach()])
    logits = torch.cat([l_pos, l_neg], dim=1)
    logits /= T
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    return logits, labels, F.cross_entropy(logits, labels)


def _infonce_style(l_pos, l_neg, normalise=lambda x: x / x.norm(dim=1, keepdim=True)):
    def infonce(q, k, queue, T):
        q, k = normalise(q), normalise(k)
        logits = torch.cat([l_pos(q, k), l_neg(q, queue)], dim=1) / T
        labels = torch.zeros(len(q), dtype=torch.long)
        return logits, labels, F.cross_entropy(logits, labels)
    return infonce


def _infonce_library(q, k, queue, T):
    logits, labels = mocolab.infonce_logits(q, F.normalize(k, dim=1), queue, T, normalize=True)  # k must be unit
    return logits, labels, F.cross_entropy(logits, labels)


INFONCE_STYLES = {
    "official einsum": _infonce_official,
    "reference": sol.infonce,
    "library": _infonce_library,
    "bmm": _infonce_style(lambda q, k: torch.bmm(q[:, None, :], k[:, :, None]).squeeze(-1),
                          lambda q, queue: torch.mm(q, queue)),
    "(q * k).sum and q @ queue": _infonce_style(lambda q, k: (q * k).sum(dim=1, keepdim=True),
                                                lambda q, queue: q @ queue),
    "cosine_similarity": _infonce_style(lambda q, k: F.cosine_similarity(q, k, dim=1)[:, None],
                                        lambda q, queue: F.cosine_similarity(q[:, :, None], queue[None], dim=1),
                                        normalise=lambda x: x),
    "diagonal of q @ k.T": _infonce_style(lambda q, k: (q @ k.t()).diagonal()[:, None], lambda q, queue: q @ queue),
}

CHANCE_STYLES = {
    "math.log(K + 1)": sol.chance_loss,
    "-math.log(1 / (K + 1))": lambda K: -math.log(1 / (K + 1)),
    "math.log1p(K)": lambda K: math.log1p(K),
    "a tensor": lambda K: torch.log(torch.tensor(K + 1.0)),
    "a numpy float": lambda K: np.log(K + 1),
    "cross-entropy of uniform logits": lambda K: F.cross_entropy(torch.zeros(1, K + 1),
                                                                 torch.zeros(1, dtype=torch.long)),
}


def _bank_index_copy(memory, index, features, m):
    with torch.no_grad():
        memory.index_copy_(0, index, F.normalize(m * memory[index] + (1 - m) * features, dim=1))


def _bank_data(memory, index, features, m):  # .data instead of torch.no_grad()
    memory.data[index] = F.normalize(m * memory.data[index] + (1 - m) * features.data, dim=1)


@torch.no_grad()
def _bank_row_loop(memory, index, features, m):
    for i, row in enumerate(index.tolist()):
        memory[row] = F.normalize(m * memory[row] + (1 - m) * features[i], dim=0)


def _bank_detach_lerp(memory, index, features, m):  # .detach() instead of torch.no_grad()
    new = torch.lerp(features.detach(), memory[index], m)
    memory[index] = new / new.norm(dim=1, keepdim=True)


BANK_STYLES = {"reference": sol.bank_update, "index_copy_": _bank_index_copy, "memory.data[index] = …": _bank_data,
               "a loop over rows": _bank_row_loop, ".detach() and lerp": _bank_detach_lerp}


@torch.no_grad()
def _enqueue_loop(queue, ptr, keys):
    for i in range(keys.shape[0]):
        queue[:, ptr] = keys[i]
        ptr = (ptr + 1) % queue.shape[1]
    return ptr


@torch.no_grad()
def _enqueue_two_slices(queue, ptr, keys):  # the official slice, split in two where the batch runs past the end
    n, K = keys.shape[0], queue.shape[1]
    first = min(n, K - ptr)
    queue[:, ptr:ptr + first] = keys[:first].T
    queue[:, :n - first] = keys[first:].T
    return torch.tensor((ptr + n) % K)  # a 0-d long tensor


def _enqueue_index_copy(queue, ptr, keys):
    cols = (ptr + torch.arange(keys.shape[0])) % queue.shape[1]
    queue.index_copy_(1, cols, keys.detach().T)
    return torch.tensor([(ptr + keys.shape[0]) % queue.shape[1]])  # like the official queue_ptr buffer, (1,)


ENQUEUE_STYLES = {"reference": sol.enqueue, "a Python loop": _enqueue_loop, "two slices": _enqueue_two_slices,
                  "index_copy_, pointer as a (1,) tensor": _enqueue_index_copy,
                  "numpy pointer": lambda queue, ptr, keys: np.int64(sol.enqueue(queue, ptr, keys))}


@torch.no_grad()
def _momentum_official(encoder_k, encoder_q, m):  # moco/builder.py, _momentum_update_key_encoder
    for param_q, param_k in zip(encoder_q.parameters(), encoder_k.parameters()):
        param_k.data = param_k.data * m + param_q.data * (1. - m)


@torch.no_grad()
def _momentum_foreach(encoder_k, encoder_q, m):
    pk, pq = list(encoder_k.parameters()), list(encoder_q.parameters())
    torch._foreach_mul_(pk, m)
    torch._foreach_add_(pk, pq, alpha=1 - m)


@torch.no_grad()
def _momentum_lerp(encoder_k, encoder_q, m):
    for p_k, p_q in zip(encoder_k.parameters(), encoder_q.parameters()):
        p_k.lerp_(p_q, 1 - m)


@torch.no_grad()
def _momentum_copy_named(encoder_k, encoder_q, m):
    params_q = dict(encoder_q.named_parameters())
    for name, p_k in encoder_k.named_parameters():
        p_k.copy_(m * p_k + (1 - m) * params_q[name])


def _momentum_data_in_place(encoder_k, encoder_q, m):  # .data instead of torch.no_grad()
    for p_k, p_q in zip(encoder_k.parameters(), encoder_q.parameters()):
        p_k.data.mul_(m).add_(p_q.data, alpha=1 - m)


MOMENTUM_STYLES = {"official .data =": _momentum_official, "reference": sol.momentum_update,
                   "library": mocolab.momentum_update, "_foreach_mul_ / _foreach_add_": _momentum_foreach,
                   "lerp_": _momentum_lerp, "copy_ over named_parameters": _momentum_copy_named,
                   ".data in place": _momentum_data_in_place}


@torch.no_grad()
def _keys_library(encoder_k, im_k):
    im, idx_unshuffle = mocolab.batch_shuffle(im_k)
    return mocolab.batch_unshuffle(F.normalize(encoder_k(im), dim=1), idx_unshuffle)


def _keys_inverse(inverse, no_grad=True):
    def shuffled_keys(encoder_k, im_k):
        with torch.set_grad_enabled(not no_grad):
            idx = torch.randperm(im_k.shape[0])
            k = F.normalize(encoder_k(im_k[idx]), dim=1)
            return k[inverse(idx)].detach()
    return shuffled_keys


def _inverse_by_index(idx):
    inv = torch.zeros_like(idx)
    inv[idx] = torch.arange(len(idx))
    return inv


KEYS_STYLES = {
    "randperm + argsort": sol.shuffled_keys,
    "batch_shuffle / batch_unshuffle": _keys_library,
    "scatter_ inverse": _keys_inverse(lambda idx: torch.empty_like(idx).scatter_(0, idx, torch.arange(len(idx)))),
    "inverse by index assignment, .detach()": _keys_inverse(_inverse_by_index, no_grad=False),
}


def _moco_official(encoder_q, encoder_k, queue, ptr, im_q, im_k, m, T):  # moco/builder.py's forward, one process
    q = encoder_q(im_q)  # queries: NxC
    q = nn.functional.normalize(q, dim=1)
    with torch.no_grad():  # no gradient to keys
        _momentum_official(encoder_k, encoder_q, m)  # update the key encoder
        im_k, idx_unshuffle = mocolab.batch_shuffle(im_k)
        k = encoder_k(im_k)  # keys: NxC
        k = nn.functional.normalize(k, dim=1)
        k = mocolab.batch_unshuffle(k, idx_unshuffle)
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [q, queue.clone().detach()])
    logits = torch.cat([l_pos, l_neg], dim=1)
    logits /= T
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    ptr = _enqueue_two_slices(queue, ptr, k)  # the official slice, wrapping around (K % N != 0 here)
    return logits, labels, ptr


def _moco_pieces(encoder_q, encoder_k, queue, ptr, im_q, im_k, m, T):  # the library's pieces, no shuffle
    mocolab.momentum_update(encoder_k, encoder_q, m)
    with torch.no_grad():
        k = F.normalize(encoder_k(im_k), dim=1)
    logits, labels = mocolab.infonce_logits(encoder_q(im_q), k, queue.clone(), T, normalize=True)
    return logits, labels, _enqueue_loop(queue, ptr, k)


def _moco_lerp_matmul(encoder_q, encoder_k, queue, ptr, im_q, im_k, m, T):
    _momentum_lerp(encoder_k, encoder_q, m)
    k = F.normalize(encoder_k(im_k), dim=1).detach()  # .detach() instead of torch.no_grad()
    q = F.normalize(encoder_q(im_q), dim=1)
    logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.detach().clone()], dim=1) / T
    return logits, torch.zeros(len(q), dtype=torch.long), _enqueue_index_copy(queue, ptr, k)


STEP_STYLES = {"official forward": _moco_official, "reference": sol.moco_step, "library pieces": _moco_pieces,
               "lerp_, (q * k).sum, .detach()": _moco_lerp_matmul}

STYLES = {"margin_loss": MARGIN_STYLES, "infonce": INFONCE_STYLES, "chance_loss": CHANCE_STYLES,
          "bank_update": BANK_STYLES, "enqueue": ENQUEUE_STYLES, "momentum_update": MOMENTUM_STYLES,
          "shuffled_keys": KEYS_STYLES, "moco_step": STEP_STYLES}
DATA_ASSIGNED = {("momentum_update", "official .data ="), ("moco_step", "official forward")}


@pytest.mark.parametrize("name,style", [(n, s) for n, styles in STYLES.items() for s in styles])
def test_correct_styles_pass(name, style):
    result = run_check(name, STYLES[name][style])
    assert result.passed, str(result)
    if (name, style) in DATA_ASSIGNED:  # correct but costly: the ✓ says what it costs
        assert result.note == DATA_NOTE and f"Note: {DATA_NOTE}" in str(result)
    else:
        assert not result.note and "Note:" not in str(result)


def test_every_exercise_accepts_at_least_three_styles():
    assert set(STYLES) == set(EXERCISES)
    assert all(len(styles) >= 3 for styles in STYLES.values())


# ----------------------------------------------------------------------------- wrong answers
def _fails_with(name, fn, mistake):
    result = run_check(name, fn)
    assert result.status == "failed", str(result)
    assert result.mistake == mistake, f"expected {mistake}, got {result.mistake}:\n{result}"
    text = str(result)
    assert text.startswith("✗") and "Case:" in text and f"Hint: {MISTAKES[mistake]}" in text
    return result


# 01 · margin loss ------------------------------------------------------------------------------------
def _margin(similar, dissimilar, reduce=torch.mean):
    def loss(x1, x2, y, margin):
        y = y.to(x1.dtype)
        D = (x1 - x2).norm(dim=1)
        return reduce((1 - y) * similar(D) + y * dissimilar(D, margin))
    return loss


_half_sq = lambda D: 0.5 * D**2  # noqa: E731
_hinge = lambda D, m: 0.5 * torch.clamp(m - D, min=0) ** 2  # noqa: E731

MARGIN_MISTAKES = {
    "labels_swapped": lambda x1, x2, y, m: sol.margin_loss(x1, x2, 1 - y, m),
    "missing_half": _margin(lambda D: D**2, lambda D, m: torch.clamp(m - D, min=0) ** 2),
    "loss_not_mean": _margin(_half_sq, _hinge, reduce=torch.sum),
    "hinge_not_clamped": _margin(_half_sq, lambda D, m: 0.5 * (m - D) ** 2),
    "hinge_on_squared_distance": _margin(_half_sq, lambda D, m: 0.5 * torch.clamp(m - D**2, min=0) ** 2),
    "hinge_not_squared": _margin(_half_sq, lambda D, m: 0.5 * torch.clamp(m - D, min=0)),
    "distance_not_squared": _margin(lambda D: 0.5 * D, _hinge),
    "margin_ignored": lambda x1, x2, y, m: mocolab.margin_contrastive_loss(x1, x2, y),  # margin 1
    "labels_ignored": lambda x1, x2, y, m: sol.margin_loss(x1, x2, torch.zeros_like(y), m),
    "not_a_tensor": lambda x1, x2, y, m: sol.margin_loss(x1, x2, y, m).item(),
    "detached": lambda x1, x2, y, m: sol.margin_loss(x1, x2, y, m).detach(),
}


@pytest.mark.parametrize("mistake", list(MARGIN_MISTAKES))
def test_margin_loss_mistakes(mistake):
    _fails_with("margin_loss", MARGIN_MISTAKES[mistake], mistake)


# 02 · InfoNCE ----------------------------------------------------------------------------------------
def _infonce(normalise=lambda x: F.normalize(x, dim=1), order="pos_first", scale=lambda logits, T: logits / T,
             labels=lambda n: torch.zeros(n, dtype=torch.long), reduction="mean", detach=False, cut=""):
    def infonce(q, k, queue, T):
        q, k = normalise(q), normalise(k)
        l_pos = ((q.detach() if cut == "pos" else q) * k).sum(dim=1, keepdim=True)
        l_neg = (q.detach() if cut == "neg" else q) @ queue
        logits = scale(torch.cat([l_pos, l_neg] if order == "pos_first" else [l_neg, l_pos], dim=1), T)
        lab = labels(q.shape[0])
        loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long), reduction=reduction)
        return logits, lab, loss.detach() if detach else loss
    return infonce


INFONCE_MISTAKES = {
    "positive_not_first": _infonce(order="pos_last"),
    "temperature_twice": _infonce(scale=lambda logits, T: logits / T / T),
    "no_temperature": _infonce(scale=lambda logits, T: logits),
    "temperature_multiplied": _infonce(scale=lambda logits, T: logits * T),
    "not_normalised": _infonce(normalise=lambda x: x),
    "normalised_wrong_dim": _infonce(normalise=lambda x: F.normalize(x, dim=0)),
    "labels_not_zero": _infonce(labels=lambda n: torch.arange(n)),
    "labels_dtype": _infonce(labels=lambda n: torch.zeros(n)),
    "loss_not_mean": _infonce(reduction="sum"),
    "query_detached_in_negatives": _infonce(cut="neg"),
    "query_detached_in_positive": _infonce(cut="pos"),
    "detached": _infonce(detach=True),
}


@pytest.mark.parametrize("mistake", list(INFONCE_MISTAKES))
def test_infonce_mistakes(mistake):
    _fails_with("infonce", INFONCE_MISTAKES[mistake], mistake)


CHANCE_MISTAKES = {
    "chance_forgot_positive": lambda K: math.log(K),
    "chance_log_base": lambda K: math.log2(K + 1),
    "chance_probability": lambda K: 1 / (K + 1),
    "chance_sign": lambda K: -math.log(K + 1),
}


@pytest.mark.parametrize("mistake", list(CHANCE_MISTAKES))
def test_chance_loss_mistakes(mistake):
    _fails_with("chance_loss", CHANCE_MISTAKES[mistake], mistake)


# 03 · memory bank ------------------------------------------------------------------------------------
def _bank_reversed(memory, index, features, m):
    with torch.no_grad():
        memory[index] = F.normalize((1 - m) * memory[index] + m * features, dim=1)


def _bank_not_renormalised(memory, index, features, m):
    with torch.no_grad():
        memory[index] = m * memory[index] + (1 - m) * features


def _bank_wrong_dim(memory, index, features, m):
    with torch.no_grad():
        memory[index] = F.normalize(m * memory[index] + (1 - m) * features, dim=0)


def _bank_first_rows(memory, index, features, m):
    with torch.no_grad():
        n = len(index)
        memory[:n] = F.normalize(m * memory[:n] + (1 - m) * features, dim=1)


def _bank_returns_new(memory, index, features, m):
    out = memory.clone()
    sol.bank_update(out, index, features, m)
    return out


def _bank_not_detached(memory, index, features, m):
    memory[index] = F.normalize(m * memory[index] + (1 - m) * features, dim=1)


def _bank_scales_everything(memory, index, features, m):
    with torch.no_grad():
        memory.mul_(m)
        memory[index] += (1 - m) * features
        memory[index] = F.normalize(memory[index], dim=1)


BANK_MISTAKES = {
    "bank_momentum_reversed": _bank_reversed,
    "bank_not_renormalised": _bank_not_renormalised,
    "normalised_wrong_dim": _bank_wrong_dim,
    "bank_ignores_index": _bank_first_rows,
    "not_updated_in_place": _bank_returns_new,
    "not_detached": _bank_not_detached,
    "bank_other_rows": _bank_scales_everything,
}


@pytest.mark.parametrize("mistake", list(BANK_MISTAKES))
def test_bank_update_mistakes(mistake):
    _fails_with("bank_update", BANK_MISTAKES[mistake], mistake)


# 04 · ring buffer ------------------------------------------------------------------------------------
def _enqueue_slice(queue, ptr, keys):  # no wrap-around: fails when the batch runs past the end
    with torch.no_grad():
        queue[:, ptr:ptr + keys.shape[0]] = keys.t()
    return (ptr + keys.shape[0]) % queue.shape[1]


def _enqueue_unwrapped_pointer(queue, ptr, keys):
    sol.enqueue(queue, ptr, keys)
    return ptr + keys.shape[0]


def _enqueue_off_by_one(queue, ptr, keys):
    sol.enqueue(queue, ptr, keys)
    return (ptr + keys.shape[0] + 1) % queue.shape[1]


def _enqueue_reset(queue, ptr, keys):
    n, K = keys.shape[0], queue.shape[1]
    if ptr + n > K:
        ptr = 0
    with torch.no_grad():
        queue[:, ptr:ptr + n] = keys.t()
    return (ptr + n) % K


def _enqueue_at_zero(queue, ptr, keys):
    sol.enqueue(queue, 0, keys)
    return (ptr + keys.shape[0]) % queue.shape[1]


def _enqueue_rows(queue, ptr, keys):
    with torch.no_grad():
        queue[:, (ptr + torch.arange(keys.shape[0])) % queue.shape[1]] = keys
    return (ptr + keys.shape[0]) % queue.shape[1]


def _enqueue_reversed(queue, ptr, keys):
    return sol.enqueue(queue, ptr, keys.flip(0))


def _enqueue_new_tensor(queue, ptr, keys):
    queue = queue.clone()
    return sol.enqueue(queue, ptr, keys)


def _enqueue_not_detached(queue, ptr, keys):
    queue[:, (ptr + torch.arange(keys.shape[0])) % queue.shape[1]] = keys.t()
    return (ptr + keys.shape[0]) % queue.shape[1]


ENQUEUE_MISTAKES = {
    "pointer_not_wrapping": _enqueue_slice,
    "queue_reset_instead_of_wrap": _enqueue_reset,
    "pointer_off_by_one": _enqueue_off_by_one,
    "queue_ignores_pointer": _enqueue_at_zero,
    "keys_as_rows": _enqueue_rows,
    "keys_reversed": _enqueue_reversed,
    "not_updated_in_place": _enqueue_new_tensor,
    "not_detached": _enqueue_not_detached,
    "pointer_not_int": lambda queue, ptr, keys: float(sol.enqueue(queue, ptr, keys)),
}


@pytest.mark.parametrize("mistake", list(ENQUEUE_MISTAKES))
def test_enqueue_mistakes(mistake):
    _fails_with("enqueue", ENQUEUE_MISTAKES[mistake], mistake)


def test_enqueue_pointer_that_never_wraps_is_named():
    _fails_with("enqueue", _enqueue_unwrapped_pointer, "pointer_not_wrapping")


# 05 · momentum ---------------------------------------------------------------------------------------
@torch.no_grad()
def _momentum_reversed(encoder_k, encoder_q, m):
    for p_k, p_q in zip(encoder_k.parameters(), encoder_q.parameters()):
        p_k.mul_(1 - m).add_(p_q, alpha=m)


@torch.no_grad()
def _momentum_on_query(encoder_k, encoder_q, m):
    for p_k, p_q in zip(encoder_k.parameters(), encoder_q.parameters()):
        p_q.mul_(m).add_(p_k, alpha=1 - m)


@torch.no_grad()
def _momentum_new_parameters(encoder_k, encoder_q, m):
    for mod_k, mod_q in zip(encoder_k.modules(), encoder_q.modules()):
        for name, p_q in mod_q.named_parameters(recurse=False):
            setattr(mod_k, name, nn.Parameter(m * getattr(mod_k, name) + (1 - m) * p_q, requires_grad=False))


@torch.no_grad()
def _momentum_sharing(encoder_k, encoder_q, m):
    for p_k, p_q in zip(encoder_k.parameters(), encoder_q.parameters()):
        if m == 0:  # a copy... of the reference, not of the values
            p_k.data = p_q.data
        else:
            p_k.mul_(m).add_(p_q, alpha=1 - m)


def _momentum_in_eval(encoder_k, encoder_q, m):
    sol.momentum_update(encoder_k, encoder_q, m)
    encoder_k.eval()


def _momentum_recorded(encoder_k, encoder_q, m):
    for p_k, p_q in zip(encoder_k.parameters(), encoder_q.parameters()):
        p_k.mul_(m).add_((1 - m) * p_q)


@torch.no_grad()
def _momentum_with_buffers(encoder_k, encoder_q, m):
    for t_k, t_q in zip(encoder_k.state_dict().values(), encoder_q.state_dict().values()):
        if t_k.is_floating_point():
            t_k.mul_(m).add_(t_q, alpha=1 - m)


MOMENTUM_MISTAKES = {
    "momentum_reversed": _momentum_reversed,
    "query_updated": _momentum_on_query,
    "parameters_replaced": _momentum_new_parameters,
    "shares_storage": _momentum_sharing,
    "mode_changed": _momentum_in_eval,
    "momentum_not_no_grad": _momentum_recorded,
    "momentum_buffers": _momentum_with_buffers,
    "momentum_missing": lambda encoder_k, encoder_q, m: None,
}


@pytest.mark.parametrize("mistake", list(MOMENTUM_MISTAKES))
def test_momentum_update_mistakes(mistake):
    _fails_with("momentum_update", MOMENTUM_MISTAKES[mistake], mistake)


# 06 · shuffle ----------------------------------------------------------------------------------------
def _keys(shuffle=True, unshuffle="argsort", normalise=True, no_grad=True, calls=1, mode=None):
    def shuffled_keys(encoder_k, im_k):
        if mode is not None:
            return _in_mode(mode, encoder_k, lambda: _keys()(encoder_k, im_k))
        with torch.set_grad_enabled(not no_grad):
            n = im_k.shape[0]
            idx = torch.randperm(n) if shuffle else torch.arange(n)
            for _ in range(calls - 1):
                encoder_k(im_k[idx])
            k = encoder_k(im_k[idx])
            k = F.normalize(k, dim=1) if normalise else k
            if unshuffle == "argsort":
                return k[torch.argsort(idx)]
            return k[idx] if unshuffle == "same" else k
    return shuffled_keys


def _in_mode(mode, encoder, then):
    """``then`` (a zero-argument callable or a value) with ``encoder`` switched to eval mode: "eval" restores train
    mode afterwards, "left in eval" leaves it in eval mode (switching after computing)."""
    if mode == "eval":
        encoder.eval()
        out = then() if callable(then) else then
        encoder.train()
        return out
    out = then() if callable(then) else then
    encoder.eval()
    return out


SHUFFLE_MISTAKES = {
    "shuffle_not_undone": _keys(unshuffle=None),
    "unshuffle_with_shuffle_index": _keys(unshuffle="same"),
    "not_shuffled": _keys(shuffle=False),
    "not_normalised": _keys(normalise=False),
    "key_not_detached": _keys(no_grad=False),
    "one_encoder_call": _keys(calls=2),
    "key_encoder_eval": _keys(mode="eval"),
    "mode_changed": _keys(mode="left in eval"),
}


@pytest.mark.parametrize("mistake", list(SHUFFLE_MISTAKES))
def test_shuffled_keys_mistakes(mistake):
    _fails_with("shuffled_keys", SHUFFLE_MISTAKES[mistake], mistake)


# 07 · the MoCo step ----------------------------------------------------------------------------------
def _step(momentum=sol.momentum_update, keys="after", key_encoder="k", detach_keys=True, normalise_q=True,
          pos_first=True, divide=lambda logits, T: logits / T, clone_queue=True, enqueue_first=False,
          enqueue=sol.enqueue, q_grad=True, labels=lambda n: torch.zeros(n, dtype=torch.long), cut="", mode=None):
    def moco_step(encoder_q, encoder_k, queue, ptr, im_q, im_k, m, T):
        def make_keys():
            enc = encoder_k if key_encoder == "k" else encoder_q
            if mode is not None:
                return _in_mode(mode, enc, lambda: sol.shuffled_keys(enc, im_k))
            if detach_keys:
                return sol.shuffled_keys(enc, im_k)
            return F.normalize(enc(im_k), dim=1)

        if keys == "before":
            k = make_keys()
            momentum(encoder_k, encoder_q, m)
        else:
            momentum(encoder_k, encoder_q, m)
            k = make_keys()
        with torch.set_grad_enabled(q_grad):
            q = encoder_q(im_q)
            q = F.normalize(q, dim=1) if normalise_q else q
        if enqueue_first:
            ptr = enqueue(queue, ptr, k)
        negatives = queue.clone().detach() if clone_queue else queue
        l_pos = ((q.detach() if cut == "pos" else q) * k).sum(dim=1, keepdim=True)
        l_neg = (q.detach() if cut == "neg" else q) @ negatives
        logits = divide(torch.cat([l_pos, l_neg] if pos_first else [l_neg, l_pos], dim=1), T)
        if not enqueue_first:
            ptr = enqueue(queue, ptr, k)
        return logits, labels(q.shape[0]), ptr
    return moco_step


STEP_MISTAKES = {
    "positive_not_first": _step(pos_first=False),
    "temperature_twice": _step(divide=lambda logits, T: logits / T / T),
    "not_normalised": _step(normalise_q=False),
    "key_not_detached": _step(detach_keys=False, momentum=lambda k, q, m: mocolab.momentum_update(k, q, m)),
    "keys_before_momentum": _step(keys="before"),
    "keys_from_query_encoder": _step(key_encoder="q"),
    "enqueue_before_logits": _step(enqueue_first=True),
    "queue_not_cloned": _step(clone_queue=False),
    "momentum_reversed": _step(momentum=_momentum_reversed),
    "query_updated": _step(momentum=lambda k, q, m: sol.momentum_update(q, k, m)),
    "parameters_replaced": _step(momentum=_momentum_new_parameters),
    "momentum_not_no_grad": _step(momentum=lambda k, q, m: _momentum_recorded(k, q, m)),
    "momentum_missing": _step(momentum=lambda k, q, m: None),
    "pointer_not_wrapping": _step(enqueue=_enqueue_slice),
    "queries_without_grad": _step(q_grad=False),
    "labels_not_zero": _step(labels=lambda n: torch.arange(n)),
    "labels_dtype": _step(labels=lambda n: torch.zeros(n)),
    "query_detached_in_negatives": _step(cut="neg"),
    "query_detached_in_positive": _step(cut="pos"),
    "key_encoder_eval": _step(mode="eval"),
    "mode_changed": _step(mode="left in eval"),
}


@pytest.mark.parametrize("mistake", list(STEP_MISTAKES))
def test_moco_step_mistakes(mistake):
    _fails_with("moco_step", STEP_MISTAKES[mistake], mistake)


GENERIC_MISTAKES = {"raised": lambda K: {}[K], "wrong_return": lambda K: "ln(K + 1)"}


@pytest.mark.parametrize("mistake", list(GENERIC_MISTAKES))
def test_generic_mistakes(mistake):
    _fails_with("chance_loss", GENERIC_MISTAKES[mistake], mistake)


ALL_MISTAKES = {"margin_loss": MARGIN_MISTAKES, "infonce": INFONCE_MISTAKES, "chance_loss": CHANCE_MISTAKES,
                "bank_update": BANK_MISTAKES, "enqueue": ENQUEUE_MISTAKES, "momentum_update": MOMENTUM_MISTAKES,
                "shuffled_keys": SHUFFLE_MISTAKES, "moco_step": STEP_MISTAKES}


def test_every_catalogued_mistake_has_a_function_that_makes_it():
    covered = set(GENERIC_MISTAKES).union(*ALL_MISTAKES.values())
    assert covered == set(MISTAKES), f"without a test: {set(MISTAKES) - covered}; unknown: {covered - set(MISTAKES)}"


# ------------------------------------------------------------------------ regressions: the verdict names the real slip
def _official_enqueue(queue, ptr, keys):  # moco/builder.py's _dequeue_and_enqueue, one process
    batch_size = keys.shape[0]
    assert queue.shape[1] % batch_size == 0  # for simplicity
    queue[:, ptr:ptr + batch_size] = keys.detach().T  # replace the keys at ptr (dequeue and enqueue)
    return (ptr + batch_size) % queue.shape[1]  # move pointer


def test_official_enqueue_that_needs_k_divisible_by_n_is_named():
    _fails_with("enqueue", _official_enqueue, "pointer_not_wrapping")
    _fails_with("moco_step", _step(enqueue=_official_enqueue), "pointer_not_wrapping")


def test_query_detached_in_the_negatives_is_a_gradient_mistake_not_the_momentum():
    result = run_check("moco_step", STEP_MISTAKES["query_detached_in_negatives"])
    assert result.mistake == "query_detached_in_negatives", str(result)
    assert "step 1 of 5" in result.case and result.got.startswith("∂L/∂")


def test_a_key_encoder_in_eval_mode_is_named():
    for name, fn in (("shuffled_keys", SHUFFLE_MISTAKES["key_encoder_eval"]),
                     ("moco_step", STEP_MISTAKES["key_encoder_eval"])):
        result = run_check(name, fn)
        assert result.mistake == "key_encoder_eval" and "eval mode" in result.hint, str(result)


def test_float_labels_show_their_dtype():
    for name, fn in (("infonce", INFONCE_MISTAKES["labels_dtype"]), ("moco_step", STEP_MISTAKES["labels_dtype"])):
        result = run_check(name, fn)
        assert "float32" in result.got and "int64" in result.expected, str(result)


def test_fmt_shows_the_dtype_where_it_may_be_what_is_wrong():
    assert _fmt(torch.zeros(4)) == "tensor (4,) [0, 0, 0, 0]"
    assert _fmt(torch.zeros(4), dtype=True) == "tensor (4,), float32 [0, 0, 0, 0]"
    assert _fmt(torch.tensor(3.0), dtype=True) == "tensor(3, float32)" and _fmt(3.0, dtype=True) == "3.0 (a float)"
    assert "float64" in _fmt(np.float64(3.0), dtype=True) and "int64" in _fmt(np.int64(3), dtype=True)


def test_chance_loss_names_only_a_mistake_true_at_every_k():
    result = run_check("chance_loss", lambda K: math.log(K) + 1 / K)  # = log2(K + 1) = 1 at K = 1, only there
    assert result.status == "failed" and result.mistake is None and "natural" not in str(result), str(result)
    result = run_check("chance_loss", lambda K: math.log2(K + 1) if K > 1 else math.log(2))  # right at K = 1 only
    assert result.case == "K = 16 negatives" and result.mistake is None, str(result)


def test_a_mistake_whose_variant_coincides_with_another_or_the_answer_is_not_named():
    a, b = torch.zeros(2), torch.ones(2)
    assert _diagnose(b, [("x", b), ("y", b)], a) is None  # two mistakes give the same output: neither is true
    assert _diagnose(b, [("x", b), ("x", b)], a) == "x"
    assert _diagnose(b, [("x", b)], b) is None  # the variant is the right answer here: not a mistake
    assert _diagnose(b, [("x", None), ("y", lambda: 1 / 0), ("z", b)], a) == "z"


def test_mode_changes_matter_only_for_batchnorm_and_dropout():
    assert _modes(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == []
    assert _modes(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout()).eval()) == [False, False]


def test_official_momentum_update_passes_with_the_cost_note_and_parameters_replaced_explains_why_not():
    result = run_check("momentum_update", _momentum_official)
    assert result.passed and result.note == DATA_NOTE, str(result)
    assert "new tensor per parameter" in result.note
    hint = run_check("momentum_update", _momentum_new_parameters).hint
    assert "optimizer" in hint and "requires grad" in hint


# ------------------------------------------------------------------------ the library's output, fed the wrong inputs
LIB = {name: ex.library for name, ex in EXERCISES.items()}  # the library's version of each exercise


def _random_queue_like(queue):
    return F.normalize(torch.randn_like(queue), dim=0)


WRONG_INPUTS = {
    "margin_loss": [lambda x1, x2, y, m: mocolab.margin_contrastive_loss(x1, x2, torch.ones_like(y), margin=m),
                    lambda x1, x2, y, m: mocolab.margin_contrastive_loss(x1, x1.roll(1, 0), y, margin=m)],
    "infonce": [lambda q, k, queue, T: LIB["infonce"](q, k, _random_queue_like(queue), T),  # ignores the queue
                lambda q, k, queue, T: LIB["infonce"](q, q, queue, T),  # ignores k
                lambda q, k, queue, T: LIB["infonce"](q, k, queue, 0.07)],  # ignores T
    "chance_loss": [lambda K: math.log(1024 + 1)],
    "bank_update": [lambda memory, index, features, m: LIB["bank_update"](memory, index, features, 0.5),
                    lambda memory, index, features, m: LIB["bank_update"](
                        memory, torch.arange(len(index)), features, m)],
    "enqueue": [lambda queue, ptr, keys: LIB["enqueue"](queue, 0, keys),
                lambda queue, ptr, keys: LIB["enqueue"](queue, ptr, keys[:1].expand_as(keys))],
    "momentum_update": [lambda encoder_k, encoder_q, m: mocolab.momentum_update(encoder_k, encoder_q, 0.999),
                        lambda encoder_k, encoder_q, m: mocolab.momentum_update(encoder_q, encoder_k, m)],
    "shuffled_keys": [lambda encoder_k, im_k: LIB["shuffled_keys"](encoder_k, im_k.flip(0)),
                      lambda encoder_k, im_k: LIB["shuffled_keys"](encoder_k, im_k)[torch.randperm(len(im_k))]],
    "moco_step": [
        # ignores the queue: negatives from a fresh random queue
        lambda eq, ek, queue, ptr, im_q, im_k, m, T: LIB["moco_step"](
            eq, ek, _random_queue_like(queue), ptr, im_q, im_k, m, T)[:2] + (LIB["enqueue"](
                queue, ptr, LIB["shuffled_keys"](ek, im_k)),),
        # ignores the pointer: always enqueues at column 0
        lambda eq, ek, queue, ptr, im_q, im_k, m, T: LIB["moco_step"](eq, ek, queue, 0, im_q, im_k, m, T),
        # ignores m: the official 0.999
        lambda eq, ek, queue, ptr, im_q, im_k, m, T: LIB["moco_step"](eq, ek, queue, ptr, im_q, im_k, 0.999, T),
        # swaps the views
        lambda eq, ek, queue, ptr, im_q, im_k, m, T: LIB["moco_step"](eq, ek, queue, ptr, im_k, im_q, m, T),
    ],
}


@pytest.mark.parametrize("name,index", [(n, i) for n, fns in WRONG_INPUTS.items() for i in range(len(fns))])
def test_library_output_for_the_wrong_inputs_never_passes(name, index):
    result = run_check(name, WRONG_INPUTS[name][index])
    assert result.status == "failed", str(result)


@pytest.mark.parametrize("name", list(EXERCISES))
@pytest.mark.parametrize("answer", [lambda *a: None, lambda *a: "nonsense", lambda *a: 1 / 0])
def test_any_answer_gives_a_verdict_and_never_raises(name, answer):
    result = run_check(name, answer)
    assert result.status == "failed" and result.hint, str(result)


def test_garbage_instead_of_a_function():
    result = run_check("enqueue", 3)
    assert result.status == "failed" and "enqueue(queue, ptr, keys)" in result.hint


# ----------------------------------------------------------------------------- check(): the notebook's entry point
def _stub(*args):
    raise NotImplementedError


def test_stub_falls_back_to_the_library_and_says_so_headless(capsys):
    fn = check("enqueue", _stub)
    assert fn is EXERCISES["enqueue"].library
    out = capsys.readouterr().out
    assert "not written yet" in out and "Headless run" in out and "mocolab.KeyQueue.enqueue" in out


def test_stub_in_jupyter_asks_for_the_code(capsys, monkeypatch):
    monkeypatch.setenv("MOCOLAB_HEADLESS", "0")
    result = run_check("moco_step", _stub)
    result.fallback, result.headless = "mocolab.MoCo", False
    text = str(result)
    assert text.startswith("…") and "Replace `raise NotImplementedError`" in text and "continues" in text
    assert "<pre" in result._repr_html_()


def test_a_wrong_function_falls_back_to_the_library(capsys):
    fn = check("momentum_update", _momentum_reversed)
    assert fn is mocolab.momentum_update
    out = capsys.readouterr().out
    assert out.startswith("✗") and MISTAKES["momentum_reversed"] in out and "continues with" in out


def test_a_right_function_is_returned(capsys):
    assert check("chance_loss", sol.chance_loss) is sol.chance_loss
    assert capsys.readouterr().out.startswith("✓")


def test_unknown_exercise():
    with pytest.raises(ValueError, match="no exercise named"):
        check("nope", sol.enqueue)


def test_checks_leave_the_random_state_alone():
    state = torch.get_rng_state()
    for name in EXERCISES:
        run_check(name, getattr(sol, name))
    LIB["enqueue"](torch.zeros(2, 4), 0, torch.ones(3, 2))
    LIB["bank_update"](F.normalize(torch.ones(4, 2), dim=1), torch.tensor([1]), torch.ones(1, 2), 0.5)
    assert torch.equal(state, torch.get_rng_state())


def test_jupyter_shows_the_block_as_text_and_html():
    from IPython.lib.pretty import pretty

    result = run_check("chance_loss", sol.chance_loss)
    assert pretty(result) == str(result)
    assert "✓" in result._repr_html_() and "#2e7d32" in result._repr_html_()


def test_headless_detection(monkeypatch):
    monkeypatch.setenv("MOCOLAB_HEADLESS", "1")
    assert exercises.is_headless()
    monkeypatch.setenv("MOCOLAB_HEADLESS", "0")
    assert not exercises.is_headless()
    monkeypatch.delenv("MOCOLAB_HEADLESS")
    assert exercises.is_headless()  # no Jupyter kernel in a test


# ----------------------------------------------------------------------------- the widget exercise
def test_temperature_for_mass():
    sims = mocolab.metrics.default_similarities(16, 0)
    for mass in (0.5, 0.2, 0.9):
        T = exercises.temperature_for_mass(sims, mass)
        assert mocolab.metrics.temperature_softmax(sims, T)["probs"][0] == pytest.approx(mass, abs=1e-6)
    with pytest.raises(ValueError, match="most similar"):
        exercises.temperature_for_mass([0.1, 0.5, 0.2])
    with pytest.raises(ValueError, match="mass"):
        exercises.temperature_for_mass(sims, 0.01)


def test_half_mass_headless_prints_the_check(capsys):
    assert exercises.half_mass_temperature(0.1) is None
    out = capsys.readouterr().out
    answer = exercises.temperature_for_mass(mocolab.metrics.default_similarities(16, 0))
    assert f"T = {answer:.3g}" in out and "Your prediction, T = 0.1" in out
    exercises.half_mass_temperature(None)
    assert "no prediction" in capsys.readouterr().out


def test_half_mass_widget_confirms_when_the_slider_reaches_it(monkeypatch):
    monkeypatch.setenv("MOCOLAB_HEADLESS", "0")
    box = exercises.half_mass_temperature(1.0)
    slider = box.controls["T"]
    text = lambda: box.output.outputs[0]["text"]  # noqa: E731
    assert "raise T" not in text() and "lower T" in text()  # at T = 1 the positive has far less than half
    answer = exercises.temperature_for_mass(mocolab.metrics.default_similarities(16, 0))
    slider.value = answer
    assert text().startswith("✓") and "Your prediction, T = 1" in text()
    slider.value = answer / 4
    assert "raise T" in text()


# ----------------------------------------------------------------------------- python -m mocolab.exercises
def test_main_passes_the_solutions_and_fails_a_wrong_file(tmp_path, capsys):
    assert exercises.main([str(SOLUTIONS_PATH)]) == 0
    assert f"{len(EXERCISES)} of {len(EXERCISES)} exercises pass" in capsys.readouterr().out
    wrong = tmp_path / "wrong.py"
    wrong.write_text("import math\n\ndef chance_loss(K):\n    return math.log(K)\n")
    assert exercises.main([str(wrong), "--only", "chance_loss", "--only", "enqueue"]) == 1
    out = capsys.readouterr().out
    assert MISTAKES["chance_forgot_positive"] in out and "defines no function enqueue" in out
