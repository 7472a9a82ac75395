"""Checkpoints: atomic writes, weights_only loading, exact resumption, NaN guard, backbone export."""
from __future__ import annotations

import os

import pytest
import torch

from mocolab.augment import BatchAugment
from mocolab.checkpoint import FORMAT, CheckpointError, clean_state_dict, load_checkpoint, save_checkpoint
from mocolab.encoders import ConvNet, cifar_resnet18
from mocolab.interop import export_backbone, load_moco_checkpoint_into_resnet
from mocolab.moco import MoCo
from mocolab.train import NonFiniteLossError, TrainConfig, fit


@pytest.fixture
def tiny_model(tiny_encoder):
    """``tiny_model(seed=0, **kw)``: a seeded MoCo on the tiny encoder, with split BN."""

    def make(seed=0, **kw):
        torch.manual_seed(seed)
        kw = {"shuffle_bn": "split", "bn_splits": 2, **kw}
        return MoCo(tiny_encoder, dim=8, K=48, m=0.9, T=0.2, **kw)

    return make


def tiny_data(n=48, size=16):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.fixture
def tiny_run(tiny_model):
    """``tiny_run(epochs, tmp_path, name, stop_after=None, resume=None, **model_kw)``: (model, history,
    checkpoint path) of a short fit with a checkpoint; killed during epoch ``stop_after + 1`` if given."""

    def run(epochs, tmp_path, name, stop_after=None, resume=None, **model_kw):
        model = tiny_model(**model_kw)
        images = tiny_data()
        labels = torch.arange(48) % 4
        cfg = TrainConfig(epochs=epochs, batch_size=16, lr=0.05, knn_every=1, knn_k=5, seed=3)
        ckpt = tmp_path / name / "checkpoint.pt"

        def on_step(state):
            if stop_after is not None and state.epoch == stop_after + 1:
                raise KeyboardInterrupt  # a run killed during the epoch after `stop_after`
        try:
            hist = fit(model, images, BatchAugment(16), cfg, eval_data=(images, labels, images[:16], labels[:16]),
                       device="cpu", verbose=False, checkpoint=ckpt, resume=resume, on_step=on_step)
        except KeyboardInterrupt:
            hist = None
        return model, hist, ckpt

    return run


def test_interrupted_and_resumed_run_is_bit_identical(tiny_run, tmp_path):
    ref_model, ref_hist, _ = tiny_run(3, tmp_path, "ref")
    _, none, ckpt = tiny_run(3, tmp_path, "cut", stop_after=1)
    assert none is None and load_checkpoint(ckpt)["epoch"] == 1
    torch.manual_seed(12345)  # the global RNG is part of the checkpoint: disturbing it must not matter
    model, hist, _ = tiny_run(3, tmp_path, "cut", resume=ckpt)
    ref_sd, sd = ref_model.state_dict(), model.state_dict()
    assert ref_sd.keys() == sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], sd[k]), k
    assert hist["step_loss"] == ref_hist["step_loss"]
    assert hist["loss"] == ref_hist["loss"] and hist["knn_acc"] == ref_hist["knn_acc"]
    assert hist["epoch"] == [1, 2, 3]


def test_checkpoint_contents_load_with_weights_only(tiny_run, tmp_path):
    _, _, ckpt = tiny_run(1, tmp_path, "a")
    state = torch.load(ckpt, weights_only=True)
    assert state["format"] == FORMAT and state["epoch"] == 1 and state["step"] == 3
    for key in ("encoder_q.fc.weight", "encoder_k.fc.weight", "queue", "queue_ptr", "queue_index", "queue_count"):
        assert key in state["model"]
    rng = state["rng"][0]
    assert {"torch", "batch_order", "augment"} <= set(rng) and all(
        isinstance(rng[k], torch.Tensor) for k in ("torch", "batch_order", "augment"))
    assert state["optimizer"]["state"]  # SGD momentum buffers
    assert not list(tmp_path.glob("a/.*tmp"))  # no temporary file left behind


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_corrupt_truncated_or_wrong_file_names_the_path(tiny_run, tmp_path, content):
    _, _, ckpt = tiny_run(1, tmp_path, "b")
    bad = tmp_path / "bad.pt"
    if content is None:  # truncated
        bad.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    else:
        bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a mocolab training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_pickled_objects_are_refused(tmp_path):
    from fractions import Fraction  # any class outside weights_only's allow-list

    torch.save({"format": FORMAT, "x": Fraction(1, 3)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"a": torch.ones(3)})

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"a": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_nan_loss_stops_the_run_and_leaves_the_last_checkpoint(tiny_model, tmp_path, monkeypatch):
    model = tiny_model()
    images = tiny_data()
    ckpt = tmp_path / "nan" / "checkpoint.pt"
    saved = {}

    def loss(logits, labels, original=model.loss):
        loss = original(logits, labels)
        return loss * float("nan") if saved else loss

    def on_epoch(epoch, hist):  # after epoch 1 was checkpointed, the loss turns NaN
        saved.update({k: v.clone() for k, v in model.state_dict().items()})
    monkeypatch.setattr(model, "loss", loss)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, knn_every=0, seed=3)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2.*intact"):
        fit(model, images, BatchAugment(16), cfg, device="cpu", verbose=False, checkpoint=ckpt, on_epoch=on_epoch)
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1
    for k, v in saved.items():
        assert torch.equal(state["model"][k], v), k


def test_resume_checks_the_run_matches(tiny_run, tiny_model, tmp_path):
    _, _, ckpt = tiny_run(1, tmp_path, "d")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        tiny_run(2, tmp_path, "e", resume=ckpt, mlp=True)
    model = tiny_model()
    cfg = TrainConfig(epochs=2, batch_size=8, seed=3, knn_every=0)
    with pytest.raises(CheckpointError, match="steps per epoch"):
        fit(model, tiny_data(), BatchAugment(16), cfg, device="cpu", verbose=False, resume=ckpt)


def test_clean_state_dict_strips_wrappers():
    sd = {"encoder_q.module.conv1.weight": 1, "encoder_k._orig_mod.fc.bias": 2, "queue": 3}
    assert clean_state_dict(sd) == {"encoder_q.conv1.weight": 1, "encoder_k.fc.bias": 2, "queue": 3}


def test_export_backbone_drops_the_projection_head(tiny_run, tmp_path):
    torch.manual_seed(0)
    moco = MoCo(cifar_resnet18, dim=16, K=32, mlp=True)
    sd = export_backbone(moco, tmp_path / "backbone.pt")
    assert "conv1.weight" in sd and not any(k.startswith("fc.") or "encoder" in k for k in sd)
    net = cifar_resnet18(num_classes=10)
    result = net.load_state_dict(sd, strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys
    assert torch.equal(net.conv1.weight, moco.encoder_q.conv1.weight)
    assert torch.load(tmp_path / "backbone.pt", weights_only=True).keys() == sd.keys()
    _, _, ckpt = tiny_run(1, tmp_path, "f")  # from a training checkpoint, too
    assert "features.0.0.weight" in export_backbone(ckpt)


def official_checkpoint(path, mlp=True):
    """A checkpoint in the format of facebookresearch/moco's main_moco.py (torchvision resnet18, renamed)."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = resnet18(num_classes=128)
    sd = {}
    for k, v in net.state_dict().items():
        if k.startswith("fc.") and mlp:  # the v2 MLP head: fc.0 (d->d), fc.2 (d->128)
            sd[f"module.encoder_q.fc.2.{k[3:]}"] = v
            sd[f"module.encoder_q.fc.0.{k[3:]}"] = torch.zeros(512, 512) if k.endswith("weight") else torch.zeros(512)
        else:
            sd[f"module.encoder_q.{k}"] = v
        sd[f"module.encoder_k.{k}"] = v.clone()
    sd["module.queue"] = torch.randn(128, 64)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {}}, path)
    return net


def test_load_official_moco_checkpoint_into_resnet(tmp_path):
    ref = official_checkpoint(tmp_path / "checkpoint_0199.pth.tar")
    net = load_moco_checkpoint_into_resnet(tmp_path / "checkpoint_0199.pth.tar", arch="resnet18", num_classes=10)
    assert net.fc.out_features == 10 and float(net.fc.bias.detach().abs().sum()) == 0.0
    for k, v in ref.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(net.state_dict()[k], v), k


def test_official_checkpoint_with_wrong_arch_or_keys_is_a_clear_error(tmp_path):
    official_checkpoint(tmp_path / "ck.pth")
    with pytest.raises(CheckpointError, match="unexpected keys|missing keys|other shapes"):
        load_moco_checkpoint_into_resnet(tmp_path / "ck.pth", arch="resnet50")
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_moco_checkpoint_into_resnet(tmp_path / "ck.pth", arch="convnet")
    torch.save({"state_dict": {"module.other.weight": torch.ones(1)}}, tmp_path / "nokeys.pth")
    with pytest.raises(CheckpointError, match="encoder_q"):
        load_moco_checkpoint_into_resnet(tmp_path / "nokeys.pth", arch="resnet18")
    os.truncate(tmp_path / "ck.pth", 100)
    with pytest.raises(CheckpointError, match="ck.pth"):
        load_moco_checkpoint_into_resnet(tmp_path / "ck.pth", arch="resnet18")


def test_history_added_by_callbacks_survives_a_checkpoint(tiny_model, tmp_path):
    """Measurements that an on_epoch callback appends to the history (numpy numbers too) are saved and resumed."""
    import numpy as np

    def probe(epoch, hist):
        hist.setdefault("probe", []).append(np.float32(epoch) / 2)
    model, images = tiny_model(), tiny_data()
    cfg = TrainConfig(epochs=1, batch_size=16, knn_every=0, seed=3)
    ckpt = tmp_path / "p.pt"
    fit(model, images, BatchAugment(16), cfg, device="cpu", verbose=False, checkpoint=ckpt, on_epoch=probe)
    assert load_checkpoint(ckpt)["history"]["probe"] == [0.5]
    hist = fit(tiny_model(), images, BatchAugment(16), TrainConfig(epochs=2, batch_size=16, knn_every=0, seed=3),
               device="cpu", verbose=False, checkpoint=ckpt, resume=ckpt, on_epoch=probe)
    assert hist["probe"] == [0.5, 1.0]


def test_refused_and_corrupt_files_say_what_they_are_without_cutting_torchs_text(tmp_path):
    from fractions import Fraction

    torch.save({"format": FORMAT, "x": Fraction(1, 3)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "evil.pt")
    msg = str(exc.value)
    assert "evil.pt is not a plain-tensor checkpoint" in msg and "weights_only=True" in msg
    assert "fractions.Fraction" in msg and "does not load it" in msg and "arbitrary code" in msg
    assert "Re-running" not in msg and "weights_only` set to `False" not in msg
    torch.save({"a": torch.ones(100)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.pt: the file is corrupt or truncated \(RuntimeError: "
                                              r"PytorchStreamReader failed reading zip archive: failed finding "
                                              r"central directory\)"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt: the file is empty"):
        load_checkpoint(tmp_path / "empty.pt")


def test_lock_run_dir_holds_one_writer(tmp_path):
    from mocolab.checkpoint import RunDirectoryError, lock_run_dir

    run = tmp_path / "run"
    with lock_run_dir(run):
        assert (run / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(RunDirectoryError, match=f"run directory {run} is in use by process {os.getpid()}"):
            with lock_run_dir(run):
                pass
    with lock_run_dir(run):  # released; the lock file left behind does not block
        pass


def test_lock_run_dir_refuses_what_cannot_be_written(tmp_path, monkeypatch):
    import tempfile

    from mocolab.checkpoint import RunDirectoryError, lock_run_dir

    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunDirectoryError, match="afile is a file, not a directory"):
        with lock_run_dir(tmp_path / "afile"):
            pass

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", denied)  # a read-only directory, even for root
    with pytest.raises(RunDirectoryError, match=r"cannot write to run directory .*ro \(Permission denied\)"):
        with lock_run_dir(tmp_path / "ro"):
            pass


def test_orphan_temporaries_of_killed_saves_are_removed(tmp_path):
    from mocolab.checkpoint import remove_orphan_temporaries

    names = (".checkpoint.pt.k1x2.tmp", ".checkpoint.pt.9zq.tmp", ".metrics.json.tmp", "notes.tmp", "checkpoint.pt")
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_orphan_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".checkpoint.pt.9zq.tmp", ".checkpoint.pt.k1x2.tmp", ".metrics.json.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "notes.tmp"]


class OfficialMoCo(torch.nn.Module):
    """The state of facebookresearch/moco's builder.MoCo: encoder_q, encoder_k, queue (C, K), queue_ptr."""

    def __init__(self, dim=8, K=48):
        super().__init__()
        torch.manual_seed(7)
        self.encoder_q = ConvNet(num_classes=dim, width=4)
        self.encoder_k = ConvNet(num_classes=dim, width=4)
        self.register_buffer("queue", torch.nn.functional.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.tensor([16]))


def test_official_moco_state_dict_loads_and_exports(tiny_model, tmp_path):
    from mocolab.interop import export_official_moco, load_official_moco

    official = OfficialMoCo()
    ref = official.state_dict()
    model = tiny_model(seed=1)
    model.load_state_dict(ref)  # strict: the buffers the official state dict lacks are filled
    assert int(model.queue_filled) == 48 and torch.equal(model.queue, ref["queue"])
    model = tiny_model(seed=1)
    torch.save({"epoch": 200, "arch": "convnet", "state_dict": {f"module.{k}": v for k, v in ref.items()}},
               tmp_path / "checkpoint_0199.pth.tar")
    load_official_moco(model, tmp_path / "checkpoint_0199.pth.tar")
    for k, v in ref.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert int(model.queue_filled) == 48 and model.negatives().shape[1] == 48 and int(model.queue_ptr) == 16
    assert bool((model.queue_index == -1).all()) and bool((model.queue_step == -1).all())
    assert int(model.queue_count) == 0
    logits, _ = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))  # trains on from there
    assert logits.shape == (4, 49) and int(model.queue_ptr) == 20

    exported = export_official_moco(model, tmp_path / "export.pth.tar")
    assert set(exported) == set(ref)  # exactly the official keys
    assert OfficialMoCo().load_state_dict(exported) is not None  # strict
    saved = torch.load(tmp_path / "export.pth.tar", weights_only=True)["state_dict"]
    assert all(k.startswith("module.") for k in saved) and {k[7:] for k in saved} == set(ref)
    again = load_official_moco(tiny_model(seed=2), tmp_path / "export.pth.tar")
    assert torch.equal(again.queue, model.queue)


def test_official_moco_of_another_size_is_a_clear_error(tiny_model, tmp_path):
    from mocolab.interop import load_official_moco

    with pytest.raises(CheckpointError, match=r"queue of shape \(8, 64\).*K=64"):
        load_official_moco(tiny_model(), OfficialMoCo(K=64).state_dict())
    with pytest.raises(CheckpointError, match="missing keys.*fc"):
        load_official_moco(tiny_model(mlp=True), OfficialMoCo().state_dict())
    with pytest.raises(CheckpointError, match="no 'queue'"):
        load_official_moco(tiny_model(), {"encoder_q.w": torch.ones(1)})
