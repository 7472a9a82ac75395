"""fit (the training loop), its schedules and configuration, and the pretrain recipe."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from mocolab.data import BatchAugment
from mocolab.distributed import shard
from mocolab.encoders import ConvNet
from mocolab.moco import EndToEnd, MemoryBankModel, MoCo
from mocolab.train import (PRESETS, VERSIONS, TrainConfig, build_model, fit, lr_at, make_optimizer, pretrain,
                           resolve_config)

HISTORY_KEYS = {"epoch", "loss", "pretext_acc", "lr", "knn_epoch", "knn_acc", "step_loss", "images_per_second",
                "train_seconds", "device"}


def data(n=32, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % 4


def moco(**kw):
    torch.manual_seed(0)
    return MoCo(partial(ConvNet, width=4), dim=8, K=32, m=0.9, T=0.2, **kw)


def test_fit_equals_a_plain_loop():
    """Oracle: the loop written out by hand (batch order, views, cosine lr, SGD) gives the same weights and losses."""
    images, labels = data()
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.1, knn_every=0, seed=5)
    model = moco()
    hist = fit(model, images, BatchAugment(16), cfg, device="cpu", verbose=False)

    ref = moco()
    opt = make_optimizer(ref, cfg)
    aug = BatchAugment(16)
    gen, aug_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    losses, step, total = [], 0, 2 * 4
    for _ in range(2):
        perm = torch.randperm(32, generator=gen)
        for s in range(4):
            idx = perm[s * 8:(s + 1) * 8]
            im_q, im_k = aug(images[idx], generator=aug_gen), aug(images[idx], generator=aug_gen)
            for g in opt.param_groups:
                g["lr"] = 0.1 * 0.5 * (1 + math.cos(math.pi * step / total))
            logits, lab = ref(im_q, im_k, index=idx)
            loss = ref.criterion(logits, lab)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
    assert hist["step_loss"] == losses
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_history_keys_and_monitor():
    images, labels = data()
    seen = []
    hist = fit(moco(), images, BatchAugment(16), TrainConfig(epochs=3, batch_size=8, knn_every=2, knn_k=5),
               eval_data=(images, labels, images[:8], labels[:8]), device="cpu", verbose=False,
               on_step=lambda st: seen.append((st.epoch, st.step, st.im_q.shape)), on_epoch=lambda e, h: None)
    assert HISTORY_KEYS <= set(hist)
    assert hist["epoch"] == [1, 2, 3] and hist["knn_epoch"] == [2, 3]  # every 2 epochs and at the end
    assert len(hist["step_loss"]) == 12 and len(seen) == 12 and seen[-1][:2] == (3, 11)
    assert all(0 <= a <= 100 for a in hist["knn_acc"] + hist["pretext_acc"])
    assert hist["images_per_second"] > 0 and hist["device"] == "cpu"


@pytest.mark.parametrize("make", [
    lambda: moco(symmetric=True),
    lambda: moco(shuffle_bn="split", bn_splits=2),
    lambda: EndToEnd(partial(ConvNet, width=4), dim=8),
    lambda: MemoryBankModel(partial(ConvNet, width=4), num_samples=32, dim=8, K=16),
])
def test_fit_trains_every_model_kind(make):
    images, _ = data()
    hist = fit(make(), images, BatchAugment(16), TrainConfig(epochs=1, batch_size=8, channels_last=True),
               device="cpu", verbose=False)
    assert all(math.isfinite(v) for v in hist["step_loss"]) and len(hist["step_loss"]) == 4


def test_schedules():
    cos = TrainConfig(lr=1.0)
    assert lr_at(cos, 0, 100) == 1.0 and lr_at(cos, 50, 100) == pytest.approx(0.5) and lr_at(cos, 100, 100) < 1e-9
    step = TrainConfig(lr=1.0, schedule="step")  # official: x0.1 at epochs 120 and 160 of 200
    assert [lr_at(step, s, 200) for s in (0, 119, 120, 159, 160, 199)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    assert lr_at(TrainConfig(lr=0.3, schedule="constant"), 77, 100) == 0.3


@pytest.mark.parametrize("kw, match", [
    (dict(epochs=0), "epochs"), (dict(lr=-1), "lr"), (dict(schedule="linear"), "schedule"),
    (dict(knn_every=-1), "knn_every"),
])
def test_train_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)
    with pytest.raises(ValueError, match="allowed"):
        TrainConfig.from_dict({"epochs": 1, "bogus": 2})


def test_bad_inputs_to_fit():
    images, _ = data()
    with pytest.raises(ValueError, match="uint8"):
        fit(moco(), images.float(), BatchAugment(16), TrainConfig(epochs=1, batch_size=8), device="cpu", verbose=False)
    with pytest.raises(ValueError, match="larger than the dataset"):
        fit(moco(), images, BatchAugment(16), TrainConfig(epochs=1, batch_size=64), device="cpu", verbose=False)


def test_shard_splits_a_global_batch():
    idx = torch.arange(12)
    parts = [shard(idx, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), idx) and all(len(p) == 4 for p in parts)
    assert torch.equal(shard(idx), idx)  # one process
    with pytest.raises(ValueError, match="divisible"):
        shard(idx, 0, 5)


def test_resolve_config_layers_preset_version_options():
    c = resolve_config("cifar10-colab")
    assert (c["arch"], c["dim"], c["K"], c["m"], c["T"], c["batch_size"], c["lr"], c["weight_decay"], c["epochs"],
            c["shuffle_bn"], c["bn_splits"], c["schedule"], c["mlp"], c["data"]) == \
        ("resnet18-cifar", 128, 4096, 0.99, 0.1, 512, 0.06, 5e-4, 200, "split", 8, "cosine", False, "cifar10")
    v2 = resolve_config("cifar10-colab", "v2", T=0.3)
    assert v2["mlp"] and v2["augment"] == "v2" and v2["T"] == 0.3 and v2["schedule"] == "cosine"
    v1 = resolve_config(version="v1")
    assert not v1["mlp"] and v1["augment"] == "v1" and v1["T"] == 0.07 and v1["schedule"] == "step"
    assert resolve_config(epochs=None)["epochs"] == PRESETS["cpu-small"]["epochs"]  # None leaves the preset's
    assert set(VERSIONS) == {"v1", "v2"}


@pytest.mark.parametrize("kw, match", [
    (dict(preset="imagenet"), "unknown preset.*cpu-small, cifar10-colab"),
    (dict(version="v3"), "unknown MoCo version.*v1, v2"),
    (dict(arch="vit"), "unknown arch.*convnet, resnet18-cifar, resnet18, resnet50"),
    (dict(data="mnist"), "unknown dataset.*shapes"),
    (dict(bogus=1), "unknown option"),
    (dict(T=0), "T"), (dict(m=1.5), r"\[0, 1\]"), (dict(K=0), "K"), (dict(lr=0), "lr"),
    (dict(batch_size=100), "bn_splits"), (dict(K=128), "K .* at least one batch"),
    (dict(resume=True), "--out"), (dict(device="tpu"), "device"),
])
def test_resolve_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(**kw)


def test_build_model_follows_the_config():
    m = build_model(resolve_config(version="v2", K=256, dim=16))
    assert m.queue.shape == (16, 256) and m.shuffle_bn == "split" and isinstance(m.encoder_q.fc, torch.nn.Sequential)


def test_pretrain_writes_metrics_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    res = pretrain(dict(limit=64, epochs=1, batch_size=32, K=64, knn_every=1, out=str(out)), verbose=False)
    m = res.metrics
    for key in ("knn_acc", "knn_history", "loss_history", "images_per_second", "epochs", "config", "device"):
        assert key in m
    assert m["epochs"] == 1 and m["knn_history"][0][0] == 1 and 0 <= m["knn_acc"] <= 100
    assert (out / "metrics.json").exists() and (out / "checkpoint.pt").exists()
    from mocolab.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="already exists"):
        pretrain(dict(limit=64, epochs=1, batch_size=32, K=64, out=str(out)), verbose=False)
    with pytest.raises(CheckpointError, match="other settings.*K=64"):
        pretrain(dict(limit=64, epochs=1, batch_size=32, K=96, out=str(out), resume=True), verbose=False)


def test_amp_and_channels_last_on_the_cpu():
    """bf16 autocast (the GPU path's setting) runs on the CPU too and keeps the queue in float32."""
    images, _ = data(16)
    model = moco()
    hist = fit(model, images, BatchAugment(16), TrainConfig(epochs=1, batch_size=8, amp=True, channels_last=True),
               device="cpu", verbose=False)
    assert all(math.isfinite(v) for v in hist["step_loss"]) and model.queue.dtype == torch.float32
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(32), atol=1e-2, rtol=0)


def test_compile_option_compiles_both_encoders_in_place(monkeypatch, tmp_path):
    """compile=True calls Module.compile (in place: the state-dict keys stay those of the plain model).

    Compiling for real takes minutes on a small CPU; benchmarks/gpu_check.sh runs it on a GPU.
    """
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    images, _ = data(16)
    model = moco()
    keys = set(model.state_dict())
    fit(model, images, BatchAugment(16), TrainConfig(epochs=1, batch_size=8, compile=True), device="cpu",
        verbose=False, checkpoint=tmp_path / "c.pt")
    assert compiled == [model.encoder_q, model.encoder_k]
    from mocolab.checkpoint import load_checkpoint

    assert set(load_checkpoint(tmp_path / "c.pt")["model"]) == keys
