"""The `mocolab` command: option checking, a tiny run, resuming, python -m mocolab."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mocolab.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
TINY = ["pretrain", "--data", "shapes", "--limit", "128", "--epochs", "1", "--batch-size", "32", "--K", "64",
        "--knn-every", "1", "--device", "cpu", "--quiet"]


@pytest.mark.parametrize("args, match", [
    (["--preset", "imagenet"], "invalid choice: 'imagenet' (choose from 'cpu-small', 'cifar10-colab')"),
    (["--arch", "vit"], "choose from 'convnet', 'resnet18-cifar', 'resnet18', 'resnet50'"),
    (["--version", "v3"], "choose from 'v1', 'v2'"),
    (["--data", "mnist"], "unknown dataset 'mnist'; choose one of shapes"),
    (["--epochs", "0"], "positive integer"),
    (["--T", "0"], "T (temperature) must be > 0"),
    (["--m", "2"], "[0, 1]"),
    (["--resume"], "--out"),
    (["--batch-size", "20"], "divisible by bn_splits"),
])
def test_bad_options_are_one_clear_error(args, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err and err.count("error:") == 1


def test_help_lists_presets_and_options():
    text = build_parser().pretrain_parser.format_help()
    for word in ("cifar10-colab", "--symmetric", "--resume", "--compile", "--amp", "--channels-last", "--knn-every",
                 "imagefolder:PATH", "torchrun"):
        assert word in text


def test_no_command_prints_help(capsys):
    assert main([]) == 0 and "pretrain" in capsys.readouterr().out


def test_tiny_run_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"knn_acc", "knn_history", "loss_history", "images_per_second", "epochs", "config", "device"} <= set(metrics)
    assert metrics["config"]["K"] == 64 and metrics["device"] == "cpu" and metrics["images_per_second"] > 0
    assert main([*TINY, "--out", str(out)]) == 1  # refuses to overwrite a run
    assert "already exists" in capsys.readouterr().err
    assert main([*TINY, "--epochs", "2", "--out", str(out), "--resume"]) == 0  # continue for one more epoch
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and [e for e, _ in metrics["knn_history"]] == [1, 2]
    (out / "checkpoint.pt").write_bytes(b"garbage")
    assert main([*TINY, "--out", str(out), "--resume"]) == 1
    assert "checkpoint.pt" in capsys.readouterr().err


def test_python_dash_m_mocolab():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "mocolab", "pretrain", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0 and "--preset" in proc.stdout
    assert 'mocolab = "mocolab.cli:main"' in (REPO / "pyproject.toml").read_text()


SMALL = ["pretrain", "--data", "shapes", "--limit", "128", "--epochs", "1", "--batch-size", "32", "--K", "64",
         "--knn-every", "0", "--arch", "convnet", "--device", "cpu", "--quiet"]


@pytest.mark.parametrize("args, match", [
    (["--seed", "-1"], "argument --seed: the value must be an integer >= 0, got -1"),
    (["--K", "2.5"], "argument --K: the value must be a positive integer, got '2.5'"),
    (["--weight-decay", "-1"], "argument --weight-decay: expected a number >= 0, got -1"),
    (["--lr", "inf"], "argument --lr: expected a finite number, got 'inf'"),
    (["--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    (["--T", "inf"], "argument --T: expected a finite number, got 'inf'"),
    (["--data", "/no/such/dir"], "data path /no/such/dir does not exist"),
])
def test_bad_numbers_and_paths_name_the_option_and_value(args, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err and err.count("error:") == 1 and "unknown dataset" not in err


def test_unwritable_out_is_refused_before_any_data_loads(tmp_path, capsys, monkeypatch):
    import mocolab.pretrain

    monkeypatch.setattr(mocolab.pretrain, "load_pretrain_data", lambda *a, **k: pytest.fail("data loaded"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, match in ((afile, "is a file"), (afile / "run", "a part of the path is a file")):
        assert main([*SMALL, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("mocolab pretrain: error: ") and str(out) in err and match in err
    if os.geteuid() != 0:  # root writes into read-only directories
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert main([*SMALL, "--out", str(ro)]) == 1
        assert "cannot write to run directory" in capsys.readouterr().err


def test_a_second_writer_on_one_out_is_refused(tmp_path, capsys):
    """Another process holds OUT/.lock (flock): the run stops at once, naming the directory and that process."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"f = open({str(out / '.lock')!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX); f.write(f'{{os.getpid()}}\\n');"
         " f.flush(); print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main([*SMALL, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"run directory {out} is in use by process {holder.pid}" in err
        assert not (out / "checkpoint.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main([*SMALL, "--out", str(out)]) == 0  # the lock died with its process


def test_resume_may_change_lr_and_T_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*SMALL, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*SMALL, "--epochs", "2", "--lr", "0.015", "--T", "0.2", "--out", str(out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert "resuming with" in said and "lr 0.015 (was 0.03)" in said and "T 0.2 (was 0.1)" in said
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["resume_changes"] == {"T": [0.1, 0.2], "lr": [0.03, 0.015]}
    assert main([*SMALL, "--epochs", "1", "--out", str(out), "--resume"]) == 1  # below the 2 epochs done
    err = capsys.readouterr().err
    assert "already trained 2 epochs" in err and "--epochs 1" in err and err.count("error:") == 1
    assert main([*SMALL, "--epochs", "2", "--lr", "0.015", "--T", "0.2", "--out", str(out), "--resume"]) == 0
    assert "already trained all 2 epochs: nothing to train" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2
