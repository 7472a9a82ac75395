"""Reference solutions of the exercises in notebooks 01–07.

Try each exercise in its notebook first: the checker there says which case fails and
gives a hint. ``make solutions`` runs every checker against the functions below
(``python -m mocolab.exercises notebooks/solutions/solutions.py``).

The half-mass temperature of notebook 02 is a prediction, not a function: the positive
gets half the softmax mass when exp(s⁺/T) equals the sum of exp(sⱼ/T) over the negatives.
For the explorer's similarities (positive 0.6, sixteen negatives between −0.58 and 0.33)
that is near T = 0.2: at T = 1 every candidate looks alike (p ≈ 1/17), at T = 0.05 the
positive takes almost everything.
"""
import math

import torch
import torch.nn.functional as F


# 01 · the margin contrastive loss ---------------------------------------------------------
def margin_loss(x1, x2, y, margin):
    """L = (1 − Y)·½·D² + Y·½·max(0, margin − D)² with D = ‖x1 − x2‖, averaged over the N pairs."""
    y = y.to(x1.dtype)
    D = (x1 - x2).norm(dim=1)  # (N,)
    similar = (1 - y) * 0.5 * D**2
    dissimilar = y * 0.5 * torch.clamp(margin - D, min=0) ** 2
    return (similar + dissimilar).mean()


# 02 · InfoNCE, and the chance loss --------------------------------------------------------
def infonce(q, k, queue, T):
    """Logits (N, 1+K) with the positive at index 0, labels of zeros, and the cross-entropy."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # (N, 1)
    l_neg = torch.einsum("nc,ck->nk", q, queue)  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / T  # (N, 1+K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return logits, labels, F.cross_entropy(logits, labels)


def chance_loss(K):
    """All 1 + K candidates equally likely: −log(1 / (K + 1))."""
    return math.log(K + 1)


# 03 · the memory-bank update --------------------------------------------------------------
@torch.no_grad()
def bank_update(memory, index, features, m):
    """memory[i] ← normalize(m·memory[i] + (1 − m)·feature), for the batch's rows only."""
    new = m * memory[index] + (1 - m) * features
    memory[index] = F.normalize(new, dim=1)


# 04 · enqueue on a ring buffer ------------------------------------------------------------
@torch.no_grad()
def enqueue(queue, ptr, keys):
    """Key i goes to column (ptr + i) % K; the oldest keys are overwritten first."""
    n, K = keys.shape[0], queue.shape[1]
    columns = (ptr + torch.arange(n, device=queue.device)) % K
    queue[:, columns] = keys.t()
    return (ptr + n) % K


# 05 · the momentum update, in place -------------------------------------------------------
@torch.no_grad()
def momentum_update(encoder_k, encoder_q, m):
    """θk ← m·θk + (1 − m)·θq on the existing tensors (parameters only, as in MoCo).

    The official code writes ``param_k.data = param_k.data * m + param_q.data * (1. - m)``: also correct, and
    accepted, but it allocates a new tensor per parameter at every step.
    """
    for p_k, p_q in zip(encoder_k.parameters(), encoder_q.parameters()):
        p_k.mul_(m).add_(p_q, alpha=1 - m)


# 06 · keys with the batch shuffled --------------------------------------------------------
@torch.no_grad()
def shuffled_keys(encoder_k, im_k):
    """Shuffle the batch, encode it, normalise, and put the keys back in the original order."""
    idx_shuffle = torch.randperm(im_k.shape[0], device=im_k.device)
    k = F.normalize(encoder_k(im_k[idx_shuffle]), dim=1)
    return k[torch.argsort(idx_shuffle)]


# 07 · the whole MoCo step -----------------------------------------------------------------
def moco_step(encoder_q, encoder_k, queue, ptr, im_q, im_k, m, T):
    """One MoCo step from the pieces above: returns (logits, labels, new ptr)."""
    momentum_update(encoder_k, encoder_q, m)  # 1. θk ← m·θk + (1 − m)·θq
    k = shuffled_keys(encoder_k, im_k)  # 2. keys: no gradient, shuffled BN
    q = F.normalize(encoder_q(im_q), dim=1)  # 3. queries, with gradient
    negatives = queue.clone().detach()  # the enqueue below overwrites the queue in place
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # (N, 1)
    l_neg = torch.einsum("nc,ck->nk", q, negatives)  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / T  # 4. the positive at index 0
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    ptr = enqueue(queue, ptr, k)  # 5. the newest keys in, the oldest out
    return logits, labels, ptr
