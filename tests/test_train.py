"""fit (the training loop), its schedules and configuration, and the pretrain recipe."""
from __future__ import annotations

import math
import os

import pytest
import torch

from mocolab.augment import BatchAugment
from mocolab.baselines import EndToEnd, MemoryBankModel
from mocolab.distributed import shard
from mocolab.moco import MoCo
from mocolab.pretrain import PRESETS, VERSIONS, build_model, choose_queue_size, pretrain, resolve_config
from mocolab.train import TrainConfig, fit, lr_at, make_optimizer

HISTORY_KEYS = {"epoch", "loss", "pretext_acc", "lr", "knn_epoch", "knn_acc", "step_loss", "images_per_second",
                "train_seconds", "device"}


def data(n=32, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % 4


@pytest.fixture
def moco(tiny_encoder):
    """``moco(**kw)``: a seeded MoCo on the tiny encoder."""

    def make(**kw):
        torch.manual_seed(0)
        return MoCo(tiny_encoder, dim=8, K=32, m=0.9, T=0.2, **kw)

    return make


def test_fit_equals_a_plain_loop(moco):
    """Oracle: the loop written out by hand (batch order, views, cosine lr, SGD) gives the same weights and losses
    (on the CPU: bit for bit)."""
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
            im_q, im_k = aug(torch.cat([images[idx], images[idx]]), generator=aug_gen).chunk(2)  # one call, 2N
            for g in opt.param_groups:
                g["lr"] = 0.1 * 0.5 * (1 + math.cos(math.pi * step / total))
            logits, lab = ref(im_q, im_k, index=idx)
            loss = ref.loss(logits, lab)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
    assert hist["step_loss"] == losses
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_history_keys_and_monitor(moco):
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
    lambda moco, enc: moco(symmetric=True),
    lambda moco, enc: moco(shuffle_bn="split", bn_splits=2),
    lambda moco, enc: EndToEnd(enc, dim=8),
    lambda moco, enc: MemoryBankModel(enc, num_samples=32, dim=8, K=16),
])
def test_fit_trains_every_model_kind(moco, tiny_encoder, make):
    images, _ = data()
    hist = fit(make(moco, tiny_encoder), images, BatchAugment(16),
               TrainConfig(epochs=1, batch_size=8, channels_last=True), device="cpu", verbose=False)
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


def test_bad_inputs_to_fit(moco):
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
    res = pretrain(dict(limit=128, epochs=1, batch_size=32, K=64, knn_every=1, out=str(out)), verbose=False)
    m = res.metrics
    for key in ("knn_acc", "knn_history", "loss_history", "images_per_second", "epochs", "config", "device"):
        assert key in m
    assert m["epochs"] == 1 and m["knn_history"][0][0] == 1 and 0 <= m["knn_acc"] <= 100
    assert (out / "metrics.json").exists() and (out / "checkpoint.pt").exists()
    from mocolab.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="already exists"):
        pretrain(dict(limit=128, epochs=1, batch_size=32, K=64, out=str(out)), verbose=False)
    with pytest.raises(CheckpointError, match="other settings.*K=64"):
        pretrain(dict(limit=128, epochs=1, batch_size=32, K=96, out=str(out), resume=True), verbose=False)


def test_amp_and_channels_last_on_the_cpu(moco):
    """bf16 autocast (the GPU path's setting) runs on the CPU too and keeps the queue in float32."""
    images, _ = data(16)
    model = moco()
    hist = fit(model, images, BatchAugment(16), TrainConfig(epochs=1, batch_size=8, amp=True, channels_last=True),
               device="cpu", verbose=False)
    assert all(math.isfinite(v) for v in hist["step_loss"]) and model.queue.dtype == torch.float32
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(32), atol=1e-2, rtol=0)


def test_compile_option_compiles_both_encoders_in_place(moco, monkeypatch, tmp_path):
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


SMALL = dict(limit=128, epochs=1, batch_size=32, K=64, knn_every=0, arch="convnet", device="cpu")


@pytest.mark.parametrize("kw, match", [
    (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"),
    (dict(lr=float("nan")), "lr must be a finite number > 0, got nan"),
    (dict(T=float("inf")), r"T \(temperature\) must be > 0 and finite, got inf"),
    (dict(T=float("nan")), r"T \(temperature\) must be > 0 and finite, got nan"),
    (dict(weight_decay=-1.0), "weight_decay must be a finite number >= 0, got -1.0"),
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    (dict(data="/no/such/dir"), "data path /no/such/dir does not exist"),
    (dict(data="imagefolder:/no/such/dir"), "ImageFolder directory /no/such/dir does not exist"),
])
def test_resolve_config_rejects_non_finite_negative_and_missing(kw, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(**kw)


def test_resume_applies_a_new_lr_T_and_weight_decay(tmp_path):
    from mocolab.checkpoint import load_checkpoint

    out = tmp_path / "run"
    pretrain(dict(SMALL, schedule="constant", out=str(out)), verbose=False)
    res = pretrain(dict(SMALL, schedule="constant", epochs=2, lr=0.015, T=0.2, weight_decay=1e-4, out=str(out),
                        resume=True), verbose=False)
    assert res.model.T == 0.2 and res.history["lr"] == [0.03, 0.015]
    assert res.metrics["resume_changes"] == {"T": [0.1, 0.2], "lr": [0.03, 0.015], "weight_decay": [5e-4, 1e-4]}
    state = load_checkpoint(out / "checkpoint.pt")
    assert [(g["lr"], g["weight_decay"]) for g in state["optimizer"]["param_groups"]] == [(0.015, 1e-4)]
    assert state["config"]["lr"] == 0.015 and state["epoch"] == 2
    from mocolab.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="already trained 2 epochs, more than epochs=1"):
        pretrain(dict(SMALL, schedule="constant", lr=0.015, T=0.2, weight_decay=1e-4, out=str(out), resume=True),
                 verbose=False)
    with pytest.raises(CheckpointError, match="other settings.*m=0.99"):  # m is not one of lr, T, weight_decay
        pretrain(dict(SMALL, schedule="constant", epochs=3, m=0.9, out=str(out), resume=True), verbose=False)


def test_metrics_follow_the_run_and_any_run_file_needs_overwrite(tmp_path):
    """metrics.json is rewritten after every epoch; a stale one goes at the start of an --overwrite run."""
    import json

    from mocolab.checkpoint import CheckpointError

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"stale": true}')
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # left by a killed save
    (out / ".metrics.json.tmp").write_text("{")
    with pytest.raises(CheckpointError, match="metrics.json already exists.*--overwrite"):
        pretrain(dict(SMALL, out=str(out)), verbose=False)

    def stop(epoch, hist):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        pretrain(dict(SMALL, out=str(out), overwrite=True), on_epoch=stop, verbose=False)
    assert not (out / "metrics.json").exists()  # the old run's metrics did not survive beside the new run
    assert not list(out.glob(".*.tmp"))

    seen = []

    def peek(epoch, hist):
        if epoch == 2:
            seen.append(json.loads((out / "metrics.json").read_text()))
    res = pretrain(dict(SMALL, epochs=2, out=str(out), overwrite=True), on_epoch=peek, verbose=False)
    assert seen[0]["epochs"] == 1 and seen[0]["finished"] is False and "stale" not in seen[0]
    assert res.metrics["finished"] is True and json.loads((out / "metrics.json").read_text())["epochs"] == 2


def test_a_second_run_on_one_out_is_refused(tmp_path):
    from mocolab.checkpoint import RunDirectoryError, lock_run_dir

    out = tmp_path / "run"
    with lock_run_dir(out):  # a separate open file: flock refuses it even within one process
        with pytest.raises(RunDirectoryError, match=f"run directory {out} is in use by process {os.getpid()}"):
            pretrain(dict(SMALL, out=str(out)), verbose=False)
    assert not (out / "checkpoint.pt").exists()


def test_one_class_data_warns_that_the_knn_monitor_says_nothing(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 16)):
        (tmp_path / split / "only").mkdir(parents=True)
        for i in range(n):
            pixels = g.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / split / "only" / f"{i}.png")
    res = pretrain(dict(SMALL, data=f"imagefolder:{tmp_path}", limit=None, batch_size=16, K=32, knn_k=5),
                   verbose=False)
    assert res.metrics["knn_acc"] == 100.0
    assert any("1 class" in w and "says nothing" in w for w in res.metrics["warnings"])
    assert "warning: the data has 1 class" in capsys.readouterr().err


# -- the GPU path, checked on the CPU: no host sync per step, checkpoint cadence, divergence guard ---------------
def _no_sync_augment(x, generator=None):
    """Views with per-image noise and no host read (BatchAugment is checked by its own tests)."""
    x = x.float() / 255.0
    return x + 0.1 * torch.rand(x.shape, generator=generator, device=x.device)


@pytest.mark.parametrize("make", [
    lambda moco, enc: EndToEnd(enc, dim=8),
    lambda moco, enc: moco(shuffle_bn="split", bn_splits=2),
])
def test_fit_steps_read_nothing_back_to_the_host(moco, tiny_encoder, make):
    """Without on_step, fit's loop reads no device value per step: two runs of 2 and 6 steps make the same
    number of host reads (the epoch's one read of the losses, counts and finiteness flag)."""
    from mocolab.syncs import count_host_syncs

    images, _ = data(48)
    cfg = TrainConfig(epochs=1, batch_size=8, knn_every=0)
    counts = []
    for steps in (2, 6):
        with count_host_syncs() as syncs:
            fit(make(moco, tiny_encoder), images[:8 * steps], _no_sync_augment, cfg, device="cpu", verbose=False)
        counts.append(syncs.count)
    assert counts[0] == counts[1] <= 1, syncs.sites
    seen = []  # with on_step the loss is read each step, and handed over as a float
    fit(make(moco, tiny_encoder), images[:16], _no_sync_augment, cfg, device="cpu", verbose=False,
        on_step=lambda st: seen.append(st.loss))
    assert len(seen) == 2 and all(type(v) is float for v in seen)


def test_checkpoint_cadence(moco, tmp_path, monkeypatch):
    import mocolab.train as train

    images, _ = data()
    written = []
    real = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda path, state: (written.append(state["epoch"]),
                                                                       real(path, state)))

    def run(**kw):
        written.clear()
        fit(moco(), images, BatchAugment(16), TrainConfig(epochs=5, batch_size=16, knn_every=0, **kw), device="cpu",
            verbose=False, checkpoint=tmp_path / "c.pt")
        return list(written)
    assert run() == [1, 2, 3, 4, 5]  # fit's default: every epoch
    assert run(save_every=2) == [2, 4, 5]  # and always the last one
    assert run(save_every=0) == [5]
    assert run(save_every=0, save_every_seconds=1e-9) == [1, 2, 3, 4, 5]  # by time
    with pytest.raises(ValueError, match="save_every"):
        TrainConfig(save_every=-1)


def test_interrupt_saves_the_last_finished_epoch_as_it_was(moco, tmp_path):
    """Ctrl-C during epoch 3 with no checkpoint due: epoch 2 is written as it was at its end, and resuming
    from it gives the run that was never interrupted, bit for bit."""
    from mocolab.checkpoint import load_checkpoint

    images, _ = data()
    cfg = TrainConfig(epochs=4, batch_size=8, knn_every=0, save_every=0, seed=1)
    ref = moco()
    fit(ref, images, BatchAugment(16), cfg, device="cpu", verbose=False)

    def stop(st):
        if st.epoch == 3 and st.step == 9:
            raise KeyboardInterrupt
    ckpt = tmp_path / "c.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(moco(), images, BatchAugment(16), cfg, device="cpu", verbose=False, checkpoint=ckpt, on_step=stop)
    assert load_checkpoint(ckpt)["epoch"] == 2 and load_checkpoint(ckpt)["step"] == 8
    model = moco()
    fit(model, images, BatchAugment(16), cfg, device="cpu", verbose=False, checkpoint=ckpt, resume=ckpt)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_divergence_guard_watches_buffers_and_never_saves_them(moco, tmp_path):
    """A BN running_var that turns infinite (the loss stays finite: training BN uses batch statistics) stops
    the run at the end of that epoch; the last finite epoch is written, the bad state never."""
    from mocolab.checkpoint import load_checkpoint
    from mocolab.train import DivergenceError, NonFiniteLossError

    images, _ = data()
    model = moco()
    bn = model.encoder_q.features[1][1]
    calls = []

    def augment(x, generator=None):
        calls.append(1)
        if len(calls) == 6:  # epoch 2 (4 steps per epoch)
            bn.running_var[0] = float("inf")
        return _no_sync_augment(x, generator)
    ckpt = tmp_path / "c.pt"
    match = r"epoch 2 .*features\.1\.1\.running_var.*epoch 1 .*intact.*--lr"
    with pytest.raises(NonFiniteLossError, match=match) as err:
        fit(model, images, augment, TrainConfig(epochs=4, batch_size=8, knn_every=0, save_every=0), device="cpu",
            verbose=False, checkpoint=ckpt)
    assert "loss became" not in str(err.value) and DivergenceError is NonFiniteLossError
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1
    assert all(v.isfinite().all() for v in state["model"].values() if v.is_floating_point())


def test_cli_exits_nonzero_on_divergence_and_leaves_only_finite_checkpoints(tmp_path, capsys):
    from mocolab.checkpoint import load_checkpoint
    from mocolab.cli import main

    out = tmp_path / "run"
    rc = main(["pretrain", "--limit", "256", "--batch-size", "32", "--K", "128", "--epochs", "3", "--lr", "1e4",
               "--schedule", "constant", "--device", "cpu", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "diverged" in err and "--lr" in err, err
    if (out / "checkpoint.pt").exists():
        state = load_checkpoint(out / "checkpoint.pt")
        assert all(v.isfinite().all() for v in state["model"].values() if v.is_floating_point())


def test_sgd_is_fused_only_on_a_gpu(moco):
    opt = make_optimizer(moco(), TrainConfig())
    assert not opt.param_groups[0].get("fused")


@pytest.mark.parametrize("K, n, batch, symmetric, explicit, expect", [
    (4096, 50000, 512, False, False, 4096),   # the CIFAR-10 recipe on all of CIFAR-10: as given
    (4096, 3000, 256, False, False, 1024),    # the preset's K on 3,000 images: half an epoch's keys at most
    (4096, 3000, 256, True, False, 2048),     # symmetric: 6,000 keys an epoch
    (4096, 5000, 256, False, False, 2048),
    (2048, 3000, 256, False, True, 2048),     # explicit and below the keys per epoch: as given
    (512, 256, 32, False, False, 128),
    (64, 3000, 64, False, False, 64),         # already small: as given
])
def test_choose_queue_size_follows_the_data(K, n, batch, symmetric, explicit, expect):
    chosen, why = choose_queue_size(K, n, batch, symmetric=symmetric, explicit=explicit)
    assert chosen == expect
    assert (why is None) == (chosen == K)
    if why is not None:
        assert f"K {chosen}" in why and str(K) in why and str(n) in why
    assert batch * (2 if symmetric else 1) <= chosen < n * (2 if symmetric else 1)


def test_choose_queue_size_refuses_what_cannot_work():
    with pytest.raises(ValueError, match=r"K 4096 is not below the 3000 keys.*e\.g\. 1024"):
        choose_queue_size(4096, 3000, 256, explicit=True)
    with pytest.raises(ValueError, match=r"K 256 is not below the 256 keys"):
        choose_queue_size(256, 256, 64, explicit=True)
    with pytest.raises(ValueError, match=r"too few for batch_size 256.*--batch-size to 64"):
        choose_queue_size(4096, 256, 256)


def test_pretrain_says_which_queue_size_it_chose(tmp_path, capsys):
    r = pretrain(limit=200, epochs=1, batch_size=32, knn_every=0, device="cpu", out=str(tmp_path / "run"))
    assert r.config["K"] == 64 and r.model.queue.shape[1] == 64
    assert "queue size K 64 instead of the preset's 4096" in capsys.readouterr().out
    assert "K 64" in r.metrics["queue_size"] and r.metrics["config"]["K"] == 64
    # a resumption keeps the chosen K (the preset's 4096 is not "another setting")
    r2 = pretrain(limit=200, epochs=2, batch_size=32, knn_every=0, device="cpu", out=str(tmp_path / "run"),
                  resume=True)
    assert r2.config["K"] == 64 and r2.metrics["epochs"] == 2
    with pytest.raises(ValueError, match="K 4096 is not below the 200 keys"):
        pretrain(limit=200, epochs=1, batch_size=32, K=4096, device="cpu")
