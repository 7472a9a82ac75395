"""benchmarks/throughput.py and benchmarks/gpu_check.sh, run on the CPU at toy sizes."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _throughput():
    return load_script("benchmarks/throughput.py")


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


def _real_photos():
    return load_script("benchmarks/real_photos.py")


def _tiny_imagefolder(root: Path, per_class: dict[str, int]) -> Path:
    from PIL import Image

    for split, counts in (("train", per_class), ("test", {name: 2 for name in per_class})):
        for c, (name, n) in enumerate(counts.items()):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                colour = (40 * c + 5 * i, 90, 200 - 30 * c)
                Image.new("RGB", (32, 32), colour).save(root / split / name / f"{i:03d}.png")
    return root


def test_real_photos_draws_the_same_balanced_subset_for_a_seed(tmp_path):
    rp = _real_photos()
    root = _tiny_imagefolder(tmp_path / "root", {"cat": 9, "dog": 7})
    picks = []
    for run in range(2):
        dest = tmp_path / f"sub{run}"
        assert rp.draw_subset(root, 5, seed=3, dest=dest) == 10
        picks.append({c: sorted(p.name for p in (dest / "train" / c).iterdir()) for c in ("cat", "dog")})
        assert sorted(p.name for p in (dest / "test" / "dog").iterdir()) == ["000.png", "001.png"]
    assert picks[0] == picks[1] and all(len(v) == 5 for v in picks[0].values())
    assert rp.draw_subset(root, 5, seed=4, dest=tmp_path / "other") == 10
    other = {c: sorted(p.name for p in (tmp_path / "other" / "train" / c).iterdir()) for c in ("cat", "dog")}
    assert other != picks[0]  # C(9,5) * C(7,5) = 2646 subsets: seed 4 draws another one
    with pytest.raises(SystemExit, match="class 'dog' has 7 training photos, fewer than --per-class 8"):
        rp.draw_subset(root, 8, seed=0, dest=tmp_path / "too_many")


@pytest.mark.slow
def test_real_photos_runs_pretrain_and_reports_before_and_after(tmp_path, capsys):
    root = _tiny_imagefolder(tmp_path / "root", {"a": 8, "b": 8, "c": 8})
    rows = _real_photos().main(["--root", str(root), "--per-class", "8", "--seeds", "0", "--epochs", "1",
                                "--work", str(tmp_path / "work"), "--", "--batch-size", "4", "--bn-splits", "2"])
    (seed, n, before, after, seconds), = rows
    assert (seed, n) == (0, 24) and 0 <= before <= 100 and 0 <= after <= 100 and seconds > 0
    assert (tmp_path / "work" / "run0" / "checkpoint.pt").exists()
    out = capsys.readouterr().out
    assert "| subset / seed | random init | after 1 epochs | train time |" in out and "| 0 |" in out
