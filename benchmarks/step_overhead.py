#!/usr/bin/env python
"""How much does MoCo add to a training step, beyond the encoder itself?

On the CPU with the ConvNet (batch 256, K 4096, dim 128), three timings, interleaved
(one of each per round, so that a busy machine slows all three alike) and summarised
by their medians:

- lower bound: the query encoder's forward + backward and the key encoder's forward on
  the same images, nothing else;
- mocolab: the full training step of ``mocolab.train.fit`` (``train_step``: momentum update,
  keys, logits against the queue, loss, enqueue, backward, SGD) on the same images;
- official: the same step with the official builder's way (facebookresearch/moco
  ``moco/builder.py``): a Python loop over parameters allocating a new tensor each
  (``p_k.data = p_k.data * m + p_q.data * (1 - m)``) and ``queue.clone().detach()``.

Prints the medians and the ratios to the lower bound (mocolab's goal: ≤ 1.05).
Augmentation is not included (see ``throughput.py`` for the whole loop).

    python benchmarks/step_overhead.py [--batch-size 256 --K 4096 --rounds 15 --threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from mocolab.encoders import ConvNet
from mocolab.moco import MoCo
from mocolab.train import TrainConfig, make_optimizer, train_step


class OfficialMoCo(nn.Module):
    """facebookresearch/moco's builder, single process (no DDP gather / shuffle), for timing only."""

    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0
        self.queue[:, ptr:ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    def forward(self, im_q, im_k, index=None):
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = F.normalize(self.encoder_k(im_k), dim=1)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        self._dequeue_and_enqueue(k)
        return logits, labels

    def loss(self, logits, labels):
        return F.cross_entropy(logits, labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--width", type=int, default=32, help="ConvNet width")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    N = args.batch_size
    enc = partial(ConvNet, width=args.width)
    im_q, im_k = torch.randn(N, 3, 32, 32), torch.randn(N, 3, 32, 32)
    cfg = TrainConfig(lr=0.06, batch_size=N)

    ours = MoCo(enc, dim=128, K=args.K, m=0.99, T=0.1, shuffle_bn="off")
    official = OfficialMoCo(enc, dim=128, K=args.K, m=0.99, T=0.1)
    bound = MoCo(enc, dim=128, K=args.K, m=0.99, T=0.1, shuffle_bn="off")  # its two encoders, used bare
    if args.channels_last:
        for mod in (ours, official, bound):
            mod.to(memory_format=torch.channels_last)
        im_q, im_k = (x.contiguous(memory_format=torch.channels_last) for x in (im_q, im_k))
    opt_ours, opt_official = make_optimizer(ours, cfg), make_optimizer(official, cfg)
    index = torch.arange(N)

    def lower_bound():
        with torch.no_grad():
            bound.encoder_k(im_k)
        bound.encoder_q.zero_grad(set_to_none=True)
        bound.encoder_q(im_q).sum().backward()

    def step_ours():
        train_step(ours, opt_ours, im_q, im_k, index, lr=0.06)

    def step_official():
        train_step(official, opt_official, im_q, im_k, index, lr=0.06)

    LB, OURS, OFF = "lower bound (q fwd+bwd, k fwd)", "mocolab train_step", "official builder's way"
    variants = {LB: lower_bound, OURS: step_ours, OFF: step_official}
    times = {name: [] for name in variants}
    for r in range(args.warmup + args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med[LB]
    print(f"ConvNet(width={args.width}), batch {N}, K {args.K}, {args.threads} threads, "
          f"channels_last={args.channels_last}, {args.rounds} rounds (median)")
    for name, t in med.items():
        print(f"  {name:34s} {1000 * t:8.1f} ms   ratio {t / base:.3f}")
    print(f"mocolab / lower bound = {med[OURS] / base:.3f} (goal <= 1.05); "
          f"official / lower bound = {med[OFF] / base:.3f}")


if __name__ == "__main__":
    main()
