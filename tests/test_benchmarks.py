"""benchmarks/throughput.py and benchmarks/gpu_check.sh, run on the CPU at toy sizes."""
from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _throughput():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_reports_step_augmentation_knn_and_syncs_side_by_side(capsys):
    r = _throughput().main(["--device", "cpu", "--width", "4", "--batch-size", "16", "--epochs", "2",
                            "--num-images", "48", "--knn-bank", "64", "--knn-queries", "16", "--reps", "1",
                            "--end-to-end"])
    for key in ("step_images_per_s", "knn_images_per_s", "save_s", "projected_200_epochs_min",
                "end_to_end_projected_200_epochs_min"):
        assert r[key] > 0, key
    assert set(r["augment_views_per_s"]) == {"two_calls", "one_call_2n"} and r["knn_on_device"]
    assert r["syncs_per_step"] >= 0 and r["loss_finite"]
    out = capsys.readouterr().out
    assert "host syncs per step" in out and "kNN monitor" in out and "200 epochs projected" in out


def test_gpu_check_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_stage_on_the_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "all stages passed" in res.stdout, res.stdout + res.stderr
