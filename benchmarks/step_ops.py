#!/usr/bin/env python
"""Operators and host syncs of one MoCo training step, counted with torch.profiler on the CPU.

The step: MoCo forward (momentum update, keys, logits, enqueue), loss, backward and an SGD
step, for the ConvNet (width 16) with split-BN (8 groups), batch 64 of 32x32 images, K 4096.
Counted after two warm-up steps:

- ``aten_ops``: every aten operator call, nested ones included (a launch-count proxy);
- ``top_level_ops``: aten calls not made inside another aten call;
- ``kernels``: aten calls that compute (leaf calls, not views, allocations or metadata): about
  the kernel launches on a GPU;
- ``bn_ops``: aten calls of the SplitBatchNorm layers, forward (under the layer) and backward
  (the autograd nodes those forward calls created);
- ``copies``: ``aten::copy_`` / ``aten::clone`` / ``aten::contiguous`` calls (layout copies among them);
- ``host_syncs``: host reads of tensor values (:func:`mocolab.syncs.count_host_syncs`).

    python benchmarks/step_ops.py [--channels-last] [--shuffle-bn split|off] [--gpu-path] [--json]

``--gpu-path`` makes SplitBatchNorm take the path a GPU takes (per-group ``var_mean`` for a
channels_last batch, where the CPU copies to contiguous and uses the fused kernel).
"""
from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from mocolab.encoders import ConvNet
from mocolab.moco import MoCo
from mocolab.shuffle_bn import SplitBatchNorm
from mocolab.syncs import count_host_syncs

_COPIES = ("aten::copy_", "aten::clone", "aten::contiguous")
_NO_KERNEL = {f"aten::{name}" for name in (
    "view", "_unsafe_view", "as_strided", "expand", "expand_as", "t", "transpose", "permute", "unsqueeze", "squeeze",
    "reshape", "_reshape_alias", "flatten", "unflatten", "slice", "select", "narrow", "detach", "alias", "empty",
    "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "result_type", "to", "lift_fresh",
    "promote_types", "split", "chunk", "unbind", "unfold", "numpy_T", "is_nonzero", "_local_scalar_dense", "item")}


def _ancestors(e):
    p = e.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def count_ops(batch_size=64, image_size=32, K=4096, width=16, shuffle_bn="split", bn_splits=8,
              channels_last=False, threads=1, gpu_path=False) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = MoCo(partial(ConvNet, width=width), dim=128, K=K, m=0.99, T=0.1, shuffle_bn=shuffle_bn,
                 bn_splits=bn_splits)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    im_q = torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=fmt)
    im_k = torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=fmt)

    def step():
        logits, labels = model(im_q, im_k)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fuse = SplitBatchNorm.__dict__.get("_fuse")
    if gpu_path and fuse is not None:
        SplitBatchNorm._fuse = staticmethod(lambda x: x.is_contiguous())
    try:
        return _count(model, step, shuffle_bn, channels_last)
    finally:
        if gpu_path and fuse is not None:
            SplitBatchNorm._fuse = fuse


def _count(model, step, shuffle_bn, channels_last) -> dict:
    for _ in range(2):
        step()
    forward = SplitBatchNorm.forward

    def labelled(self, x):
        with record_function("SplitBatchNorm"):
            return forward(self, x)

    SplitBatchNorm.forward = labelled
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        SplitBatchNorm.forward = forward
    with count_host_syncs() as syncs:
        step()

    events = list(prof.events())
    aten = [e for e in events if e.name.startswith("aten::")]
    bn_fwd = [e for e in aten if any(a.name == "SplitBatchNorm" for a in _ancestors(e))]
    bn_seq = {e.sequence_nr for e in events  # autograd nodes made under the layers, a custom Function's too
              if e.sequence_nr >= 0 and any(a.name == "SplitBatchNorm" for a in _ancestors(e))}
    bn_bwd = [e for e in aten if any(a.name.startswith("autograd::engine::evaluate_function")
                                     and a.sequence_nr in bn_seq for a in _ancestors(e))]
    top = [e for e in aten if not any(a.name.startswith("aten::") for a in _ancestors(e))]
    kernels = [e for e in aten
               if e.name not in _NO_KERNEL and not any(c.name.startswith("aten::") for c in e.cpu_children)]
    kernel_set = set(kernels)
    return {
        "shuffle_bn": shuffle_bn, "channels_last": channels_last, "aten_ops": len(aten), "top_level_ops": len(top),
        "kernels": len(kernels),
        "bn_ops": len(bn_fwd) + len(bn_bwd), "bn_kernels": sum(e in kernel_set for e in bn_fwd + bn_bwd),
        "bn_forward_ops": len(bn_fwd), "bn_backward_ops": len(bn_bwd),
        "copies": sum(e.name in _COPIES for e in aten), "host_syncs": syncs.count,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--shuffle-bn", default="split", choices=("split", "off"))
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--gpu-path", action="store_true", help="SplitBatchNorm as on a GPU (see above)")
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    args = ap.parse_args(argv)
    r = count_ops(batch_size=args.batch_size, K=args.K, shuffle_bn=args.shuffle_bn, channels_last=args.channels_last,
                  gpu_path=args.gpu_path)
    if args.json:
        print(json.dumps(r))
        return
    share = 100.0 * r["bn_ops"] / r["aten_ops"]
    print(f"one MoCo step (ConvNet w16, batch {args.batch_size}, 32 px, K {args.K}, shuffle_bn={args.shuffle_bn}, "
          f"{'channels_last' if args.channels_last else 'contiguous'}{', GPU path' if args.gpu_path else ''}):")
    print(f"  aten ops {r['aten_ops']} (top level {r['top_level_ops']}, computing {r['kernels']}), "
          f"of them BatchNorm {r['bn_ops']} ({share:.0f} %: forward {r['bn_forward_ops']}, "
          f"backward {r['bn_backward_ops']}; computing {r['bn_kernels']}), "
          f"copies {r['copies']}, host syncs {r['host_syncs']}")


if __name__ == "__main__":
    main()
