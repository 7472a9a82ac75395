"""Every model of the course has the one training interface: fit trains it and resumes it exactly."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mocolab
from mocolab.augment import BatchAugment
from mocolab.checkpoint import load_checkpoint
from mocolab.interface import ContrastiveModel
from mocolab.train import TrainConfig, fit

N, BATCH, SIZE = 64, 16, 16  # 4 steps per epoch

# each entry builds one model on the base encoder `enc` (the suite's tiny_encoder)
MODELS = {
    "moco": lambda enc: mocolab.MoCo(enc, dim=8, K=32, m=0.9, T=0.2, shuffle_bn="split", bn_splits=2),
    "moco-symmetric-cosine-m": lambda enc: mocolab.MoCo(enc, dim=8, K=32, m=0.9, T=0.2, symmetric=True,
                                                    momentum_schedule="cosine", queue_init="empty"),
    "end-to-end": lambda enc: mocolab.EndToEnd(enc, dim=8, T=0.2),
    "memory-bank-nce": lambda enc: mocolab.MemoryBankModel(enc, num_samples=N, dim=8, K=16, T=0.2, loss="nce"),
    "margin-pairs": lambda enc: mocolab.MarginPairs(enc, dim=8, margin=1.0),
    # warm-up ends during epoch 2 and k-means runs at steps 1, 4, 7: a resume at step 4 must know the step
    "mochi": lambda enc: mocolab.MoCHi(enc, dim=8, K=32, m=0.9, T=0.2, n_hard=8, s=4, s_prime=2, warmup_steps=6),
    "debiased": lambda enc: mocolab.DebiasedMoCo(enc, dim=8, K=32, m=0.9, T=0.2, tau_plus=0.1),
    "cluster": lambda enc: mocolab.ClusterMoCo(enc, dim=8, K=32, m=0.9, T=0.2, num_clusters=3, recluster_every=3,
                                           warmup_steps=1),
    "cmc": lambda enc: mocolab.CMC(enc, dim=8, K=32, m=0.9, T=0.2),
    "distill-crd": lambda enc: mocolab.ContrastiveDistill(enc(num_classes=8), enc(num_classes=8), dim=8, K=32, T=0.2),
    "distill-l2": lambda enc: mocolab.ContrastiveDistill(enc(num_classes=8), enc(num_classes=8), dim=8, K=32, T=0.2,
                                                     loss="l2"),
}


def data():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    labels = torch.arange(N) % 4
    return images, (images, labels, images[:16], labels[:16])


def build(name, enc):
    torch.manual_seed(0)
    return MODELS[name](enc)


def run(name, enc, *, checkpoint=None, resume=None, stop_in_epoch=None):
    images, eval_data = data()
    model = build(name, enc)
    if name == "cluster":
        model.set_class_labels(eval_data[1])  # false negatives are counted with the batch's index

    def on_step(state):
        if state.epoch == stop_in_epoch:
            raise KeyboardInterrupt  # killed during that epoch: the checkpoint holds the epoch before
    cfg = TrainConfig(epochs=2, batch_size=BATCH, lr=0.05, knn_every=1, knn_k=5, seed=1)
    hist = fit(model, images, BatchAugment(SIZE), cfg, eval_data=eval_data, device="cpu", verbose=False,
               checkpoint=checkpoint, resume=resume, on_step=on_step if stop_in_epoch else None)
    return model, hist


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_trains_with_fit_and_resumes_exactly(name, tmp_path, tiny_encoder):
    ref, ref_hist = run(name, tiny_encoder)
    assert isinstance(ref, ContrastiveModel)
    assert len(ref_hist["step_loss"]) == 8 and all(math.isfinite(v) for v in ref_hist["step_loss"])
    assert ref_hist["knn_epoch"] == [1, 2] and all(0 <= a <= 100 for a in ref_hist["knn_acc"])

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        run(name, tiny_encoder, checkpoint=ckpt, stop_in_epoch=2)
    assert load_checkpoint(ckpt)["epoch"] == 1
    torch.manual_seed(12345)  # what the checkpoint restores must not depend on the state of the process
    model, hist = run(name, tiny_encoder, checkpoint=ckpt, resume=ckpt)
    assert hist["step_loss"] == ref_hist["step_loss"] and hist["knn_acc"] == ref_hist["knn_acc"]
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert ref_sd.keys() == sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], sd[k]), k
    if name in ("mochi", "cluster"):
        assert int(sd["step_count"]) == 8 and model.steps_done == 8


@pytest.mark.parametrize("name", list(MODELS))
def test_the_interface_of_every_model(name, monkeypatch, tiny_encoder):
    model = build(name, tiny_encoder)
    x1, x2 = torch.randn(8, 3, SIZE, SIZE), torch.randn(8, 3, SIZE, SIZE)
    index = torch.arange(8)
    model.set_progress(0, 10)
    logits, labels = model(x1, x2, index=index)
    assert logits.dim() == 2 and labels.shape == (logits.shape[0],) and labels.dtype == torch.long
    loss = model.loss(logits, labels)
    assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    loss.backward()
    # the loss is a function of forward's output alone: another step in between does not change it
    model(x2, x1, index=index + 8)
    torch.testing.assert_close(model.loss(logits.detach(), labels), loss.detach(), rtol=0, atol=0)

    features = model.eval_encoder()(x1)
    assert features.dim() == 2 and features.shape[0] == 8
    assert not any(isinstance(vars(c).get("encoder_q"), property) for c in type(model).__mro__)  # no fake encoder

    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    model.compile_encoders()
    submodules = {id(m) for m in model.modules()}
    assert compiled and all(id(m) in submodules for m in compiled)



@pytest.mark.parametrize("name", list(MODELS))
def test_trained_encoders_hold_every_parameter_the_optimiser_trains(name, tiny_encoder):
    """What DistributedDataParallel wraps under several processes: every parameter with a gradient, nothing else."""
    model = build(name, tiny_encoder)
    declared = {id(p) for enc in model.trained_encoders for p in model.get_submodule(enc).parameters()}
    assert declared == {id(p) for p in model.parameters() if p.requires_grad}


def test_fit_refuses_a_model_without_the_interface():
    class Plain(nn.Module):
        def forward(self, im_q, im_k, index=None):
            return im_q.flatten(1), torch.zeros(im_q.shape[0], dtype=torch.long)

    images, _ = data()
    with pytest.raises(TypeError, match="ContrastiveModel"):
        fit(Plain(), images, BatchAugment(SIZE), TrainConfig(epochs=1, batch_size=BATCH), device="cpu", verbose=False)


def test_the_base_class_defaults():
    class Linear(ContrastiveModel):
        def __init__(self):
            super().__init__()
            self.encoder_q = nn.Linear(3, 2)

        def forward(self, im_q, im_k, index=None):
            return self.encoder_q(im_q) @ self.encoder_q(im_k).t(), torch.arange(im_q.shape[0])

    model = Linear()
    assert model.set_progress(3, 10) is None and model.eval_encoder() is model.encoder_q
    logits, labels = model(torch.randn(4, 3), torch.randn(4, 3))
    torch.testing.assert_close(model.loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))
    with pytest.raises(NotImplementedError, match="forward"):
        ContrastiveModel()(torch.zeros(1), torch.zeros(1))
