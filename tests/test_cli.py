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
TINY = ["pretrain", "--data", "shapes", "--limit", "64", "--epochs", "1", "--batch-size", "32", "--K", "64",
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
