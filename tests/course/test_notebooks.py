"""Every notebook, executed top to bottom through papermill at CI size.

How it works
------------
Each ``notebooks/*.ipynb`` (found by glob, so a new notebook is tested as
soon as it exists) runs on a fresh kernel with ``notebooks/`` as its working
directory. Papermill injects the notebook's entry of :data:`CI_PARAMETERS`
plus ``OUTPUT_DIR`` (a temporary directory) after the cell tagged
``parameters``. The notebook writes ``OUTPUT_DIR/metrics.json``; the test
reads it and calls the notebook's checker from :data:`CHECKS`.

Adding a notebook (notebook owners)
-----------------------------------
1. Add ``"NN_name": {"EPOCHS": 1, ...}`` to :data:`CI_PARAMETERS`: sizes that
   run in well under a minute on two CPU cores. A notebook without an entry
   runs with its default parameters.
2. Write ``check_NN(metrics, output_dir)`` asserting on what the notebook
   measured (shapes, ranges, orderings that must hold even at CI size) and
   add it to :data:`CHECKS`. A notebook without a checker must still write a
   non-empty ``metrics.json``.
3. If it needs longer than :data:`DEFAULT_TIMEOUT_S`, add it to
   :data:`TIMEOUT_S`.

``MOCOLAB_NOTEBOOK_DIR=/some/dir`` runs the notebooks of another directory
(for trying the machinery on scratch notebooks).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = Path(os.environ.get("MOCOLAB_NOTEBOOK_DIR", REPO / "notebooks")).resolve()
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

# --------------------------------------------------------------------------
# Per-notebook CI sizes, checkers and time limits (owners add their entries)
# --------------------------------------------------------------------------

#: Parameters injected into each notebook in CI, on top of OUTPUT_DIR.
#: Keys are notebook names without extension; values override the
#: notebook's ``parameters`` cell. DEVICE stays "auto" unless set here.
CI_PARAMETERS: dict[str, dict] = {
    "00_setup_and_data": {"NUM_IMAGES": 500, "NUM_TEST": 200},
    "01_margin_contrastive_loss": {"NUM_TRAIN": 256, "NUM_TEST": 128, "WIDTH": 8, "EPOCHS": 1, "BATCH_SIZE": 64,
                                   "NUM_SHOW": 128},
    "02_npair_and_infonce": {"NUM_TRAIN": 256, "NUM_TEST": 128, "WIDTH": 8, "K": 128, "EPOCHS": 1, "SWEEP_EPOCHS": 1,
                             "BATCH_SIZE": 64, "TEMPERATURES": [0.1, 0.5], "QUEUE_SIZES": [64, 128]},
    "03_memory_bank": {"NUM_TRAIN": 256, "NUM_TEST": 128, "IMAGE_SIZE": 16, "WIDTH": 8, "K": 128, "EPOCHS": 2,
                       "BATCH_SIZE": 64, "KNN_EVERY": 1, "NUM_STALE": 128},
    "04_queue_without_momentum": {"NUM_TRAIN": 256, "NUM_TEST": 64, "WIDTH": 4, "EPOCHS": 2, "BATCH_SIZE": 64,
                                  "K": 128},
    "05_momentum_encoder": {"NUM_TRAIN": 256, "NUM_TEST": 64, "WIDTH": 4, "EPOCHS": 1, "BATCH_SIZE": 64, "K": 128},
    "06_shuffle_bn": {"NUM_TRAIN": 256, "NUM_TEST": 64, "WIDTH": 4, "EPOCHS": 2, "BATCH_SIZE": 64, "K": 128},
    "08_evaluating_representations": {"NUM_IMAGES": 256, "NUM_TEST": 200, "WIDTH": 16, "EPOCHS": 1, "BATCH_SIZE": 128,
                                      "K": 256, "PROBE_EPOCHS": 5, "LABELS_PER_CLASS": [1, 10],
                                      "TRANSFER_NUM_IMAGES": 200, "TRANSFER_NUM_TEST": 100},
    "09_looking_inside": {"NUM_IMAGES": 256, "NUM_EVAL": 128, "PROBE_BATCH": 64, "WIDTH": 16, "K": 128, "EPOCHS": 1,
                          "BATCH_SIZE": 64, "EMBEDDING_METHOD": "pca", "GALLERY_QUERIES": 2},
    "07_moco_full": {"NUM_IMAGES": 128, "EPOCHS": 2, "BATCH_SIZE": 32, "K": 64, "KNN_EVERY": 1, "COMPARE": True},
    "10_beyond_moco": {"NUM_IMAGES": 128, "NUM_TEST": 64, "WIDTH": 8, "CMC_WIDTH": 4, "STUDENT_WIDTH": 4, "K": 64,
                       "EPOCHS": 1, "CMC_EPOCHS": 1, "BATCH_SIZE": 32, "MOCHI_N_HARD": 8, "MOCHI_S": 8,
                       "MOCHI_S_PRIME": 2, "MOCHI_WARMUP_EPOCHS": 0, "NUM_CLUSTERS": 4, "RECLUSTER_EVERY": 2,
                       "CLUSTER_WARMUP_EPOCHS": 0, "KNN_K": 10},
}


# Checkers, one per notebook: ``check_NN(metrics: dict, output_dir: Path)``
# asserts on the notebook's metrics.json (already loaded as ``metrics``)
# and may look at the files it wrote to ``output_dir``.


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_percent(x) -> bool:
    return _finite_number(x) and 0.0 <= x <= 100.0


def check_01(metrics: dict, output_dir: Path) -> None:
    for key in ("random_init_knn_acc", "margin_knn_acc", "infonce_knn_acc"):
        assert _is_percent(metrics[key]), f"{key} = {metrics[key]!r} is not a percentage"
    epochs = CI_PARAMETERS["01_margin_contrastive_loss"]["EPOCHS"]
    for key in ("margin_knn_curve", "infonce_knn_curve", "margin_loss", "infonce_loss"):
        assert len(metrics[key]) == epochs and all(_finite_number(v) for v in metrics[key]), key
    assert metrics["margin_knn_acc"] == metrics["margin_knn_curve"][-1]
    assert metrics["infonce_knn_acc"] == metrics["infonce_knn_curve"][-1]
    assert metrics["dim"] == 128  # both models: the same 128-d unit-length embedding
    for when, share in metrics["negatives_past_margin"].items():
        assert _is_percent(share), (when, share)
    for pos, neg in metrics["pair_distance_means"].values():
        assert 0.0 <= pos <= 2.0 + 1e-6 and 0.0 <= neg <= 2.0 + 1e-6  # unit vectors are at most 2 apart
    params = CI_PARAMETERS["01_margin_contrastive_loss"]
    assert (metrics["num_train"], metrics["num_test"]) == (params["NUM_TRAIN"], params["NUM_TEST"])
    _check_verdicts("01", metrics)
    _check_figures(output_dir, ("loss_vs_distance", "pairs", "pair_distances", "margin_embedding", "margin_vs_infonce"))


def check_02(metrics: dict, output_dir: Path) -> None:
    params = CI_PARAMETERS["02_npair_and_infonce"]
    assert metrics["ln_k_plus_1"] == pytest.approx(math.log(params["K"] + 1), abs=1e-9)
    assert _finite_number(metrics["init_loss"])
    assert abs(metrics["init_loss"] - metrics["ln_k_plus_1"]) < 1.0, (metrics["init_loss"], metrics["ln_k_plus_1"])
    assert metrics["bound_max"] <= metrics["ln_k_plus_1"] + 1e-6  # the bound can never pass ln(K+1)
    for key, swept in (("temperature_sweep", "TEMPERATURES"), ("negatives_sweep", "QUEUE_SIZES")):
        assert set(metrics[key]) == {str(v) for v in params[swept]}, (key, metrics[key])
        assert all(_is_percent(v) for v in metrics[key].values()), (key, metrics[key])
    assert (metrics["num_train"], metrics["num_test"]) == (params["NUM_TRAIN"], params["NUM_TEST"])
    assert all(int(k) < metrics["num_train"] for k in metrics["negatives_sweep"])
    _check_verdicts("02", metrics)
    _check_figures(output_dir, ("bound", "temperature_sweep", "negatives_sweep"))


def check_03(metrics: dict, output_dir: Path) -> None:
    params = CI_PARAMETERS["03_memory_bank"]
    dim = metrics["dim"]
    assert metrics["num_train"] == params["NUM_TRAIN"] and metrics["num_test"] == params["NUM_TEST"]
    assert metrics["image_size"] == params["IMAGE_SIZE"]
    assert metrics["bank_bytes"] == params["NUM_TRAIN"] * dim * 4  # one float32 entry per training image
    assert metrics["queue_bytes"] == params["K"] * dim * 4
    assert metrics["bank_bytes_imagenet"] == 1_281_167 * dim * 4
    assert metrics["bank_bytes_billion"] == 10**9 * dim * 4
    assert metrics["total_steps"] == params["EPOCHS"] * (params["NUM_TRAIN"] // params["BATCH_SIZE"])
    epochs = list(range(0, params["EPOCHS"] + 1, params["KNN_EVERY"]))  # 0: before training
    assert metrics["probe_epoch"] == epochs and metrics["knn_epoch"] == epochs
    for key in ("staleness", "view_cosine", "staleness_nce"):
        values = metrics[key]
        assert len(values) == len(epochs), (key, values)
        assert all(_finite_number(v) and -1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in values), (key, values)
    for key in ("random_init_knn_acc", "softmax_knn_acc", "nce_knn_acc", "moco_knn_acc"):
        assert _is_percent(metrics[key]), f"{key} = {metrics[key]!r} is not a percentage"
    for run in ("softmax", "nce", "moco"):  # every run starts from the same initial weights
        curve = metrics[f"{run}_knn_curve"]
        assert len(curve) == len(epochs) and curve[0] == metrics["random_init_knn_acc"], (run, curve)
        assert curve[-1] == metrics[f"{run}_knn_acc"], (run, curve)
    assert len(metrics["headline_effects"]) == 3
    _check_verdicts("03", metrics)
    _check_figures(output_dir, ("memory", "staleness", "nce_vs_softmax", "bank_vs_moco"))


def check_00(metrics: dict, output_dir: Path) -> None:
    params = CI_PARAMETERS["00_setup_and_data"]
    assert metrics["dataset"] == "shapes" and metrics["num_classes"] == 10 == len(metrics["classes"])
    assert metrics["num_train"] == params["NUM_IMAGES"] and metrics["num_test"] == params["NUM_TEST"]
    assert metrics["image_shape"] == [3, 32, 32] and metrics["view_shape"] == [3, 32, 32]
    counts = metrics["train_class_counts"]
    assert sum(counts) == params["NUM_IMAGES"] and max(counts) - min(counts) <= 1, counts
    assert isinstance(metrics["device"], str) and metrics["device"]
    assert _finite_number(metrics["augment_ms_per_256"]) and metrics["augment_ms_per_256"] > 0
    # raw pixels are a poor representation of shapes: at most a little above chance
    assert _is_percent(metrics["raw_pixel_knn_acc"]) and metrics["raw_pixel_knn_acc"] < 50
    _check_figures(output_dir, ("dataset_grid", "augmented_views", "single_augmentations", "pixel_neighbours"))


def check_10(metrics: dict, output_dir: Path) -> None:
    for key in ("moco_knn_acc", "cmc_knn_acc", "mochi_knn_acc", "debiased_knn_acc", "cluster_knn_acc",
                "teacher_knn_acc", "crd_student_knn_acc", "l2_student_knn_acc"):
        assert _is_percent(metrics[key]), f"{key} = {metrics[key]!r} is not a percentage"
    assert metrics["teacher_knn_acc"] == metrics["moco_knn_acc"], "the teacher is the MoCo encoder"
    for key in ("false_negative_rate_before", "false_negative_rate_after"):
        assert _finite_number(metrics[key]) and 0.0 <= metrics[key] <= 1.0, f"{key} = {metrics[key]!r}"
    # MoCHi mixes the hardest keys (and the query): by construction closer to the query than the queue's mean
    assert metrics["mochi_synthetic_sim_mean"] > metrics["mochi_queue_sim_mean"]
    # CMC runs on the bundled colour shapes by default (no download, no ../shared)
    assert metrics["cmc_dataset"] == "shapes-lab", metrics["cmc_dataset"]
    for key in ("cmc_random_init_knn_acc", "cmc_l_knn_acc", "cmc_ab_knn_acc"):
        assert _is_percent(metrics[key]), f"{key} = {metrics[key]!r} is not a percentage"
    # the debiased loss at T and at DEBIASED_T, MoCo at DEBIASED_T, and the share of queries at the debiased floor
    epochs = CI_PARAMETERS["10_beyond_moco"]["EPOCHS"]
    for key in ("debiased_knn_acc_at_debiased_t", "moco_knn_acc_at_debiased_t"):
        assert _is_percent(metrics[key]), f"{key} = {metrics[key]!r} is not a percentage"
    for run in ("debiased", "moco"):
        for suffix in ("", "_at_debiased_t"):
            share, history = metrics[f"{run}_floor_share{suffix}"], metrics[f"{run}_floor_share_history{suffix}"]
            assert _finite_number(share) and 0.0 <= share <= 1.0, (run, suffix, share)
            assert len(history) == epochs and history[-1] == share, (run, suffix, history, share)
    loss = metrics["debiased_floor_loss"]  # the mean loss of the queries at the floor; None when there were none
    assert (loss is None) == (metrics["debiased_floor_share"] == 0.0), loss
    assert loss is None or (_finite_number(loss) and loss >= 0.0), loss
    assert metrics["debiased_t"] == 0.5
    for key in ("same_before", "other_before", "same_after", "other_after"):
        v = metrics[f"cmc_agreement_{key}"]
        assert _finite_number(v) and -1.0 - 1e-5 <= v <= 1.0 + 1e-5, (key, v)
    assert metrics["num_train"] == 128 and metrics["num_test"] == 64
    _check_verdicts("10", metrics)
    from mocolab.lesson import AT_SCALE, judge_effects

    # claims the notebook says need more scale (clustering) are judged and recorded, not claimed
    assert metrics["at_scale_effects"] == judge_effects("10", metrics, AT_SCALE), metrics["at_scale_effects"]
    _check_figures(output_dir, ("lab_views", "mochi_similarities", "debiased_floor", "knn_summary"))


def check_07(metrics: dict, output_dir: Path) -> None:
    params = CI_PARAMETERS["07_moco_full"]
    assert _is_percent(metrics["knn_acc"]) and metrics["knn_acc"] == metrics["knn_history"][-1][1]
    assert [e for e, _ in metrics["knn_history"]] == list(range(1, params["EPOCHS"] + 1))
    assert len(metrics["loss_history"]) == params["EPOCHS"] and all(_finite_number(v) for v in metrics["loss_history"])
    assert _finite_number(metrics["images_per_second"]) and metrics["images_per_second"] > 0
    assert isinstance(metrics["device"], str) and metrics["device"]
    assert metrics["queue_fill_step"] == math.ceil(params["K"] / params["BATCH_SIZE"])
    assert metrics["config"]["preset"] == "cifar10-colab" and metrics["config"]["K"] == params["K"]
    assert sorted(metrics["compare"]) == ["recipe", "symmetric", "v1", "v2"]
    for name, run in metrics["compare"].items():
        assert _is_percent(run["knn_acc"]) and run["seconds"] > 0 and run["images_per_second"] > 0, name
    assert metrics["compare"]["recipe"]["knn_acc"] == metrics["knn_acc"]
    assert _is_percent(metrics["backbone_knn_acc"]) and _is_percent(metrics["random_init_knn_acc"])
    assert metrics["num_train"] == params["NUM_IMAGES"] and metrics["num_test"] == max(10, params["NUM_IMAGES"] // 5)
    assert metrics["total_steps"] == params["EPOCHS"] * (params["NUM_IMAGES"] // params["BATCH_SIZE"])
    assert len(metrics["headline_effects"]) == 1 and isinstance(metrics["headline_effects"][0]["holds"], bool)
    # headless, mocolab's own moco_step trains beside mocolab.MoCo: the same operations, the same numbers
    ours = metrics["your_moco"]
    assert ours["yours"] is False and ours["steps"] == params["NUM_IMAGES"] // params["BATCH_SIZE"] * ours["epochs"]
    assert ours["knn_acc"] == ours["mocolab_knn_acc"] and _is_percent(ours["knn_acc"]) and ours["same_pointer"]
    assert ours["max_step_logit_difference"] == ours["max_logit_difference"] == ours["max_queue_difference"] == 0.0
    for name in ("knn_and_loss.png", "v1_v2_symmetric.png", "backbone.pt", "recipe/checkpoint.pt",
                 "recipe/metrics.json", "v2/checkpoint.pt"):
        assert (output_dir / name).stat().st_size > 0, name


def check_08(metrics: dict, output_dir: Path) -> None:
    params = CI_PARAMETERS["08_evaluating_representations"]
    for key in ("knn_acc", "random_init_knn_acc", "supervised_knn_acc", "linear_acc", "linear_acc_official",
                "random_init_linear_acc", "supervised_linear_acc", "supervised_acc", "knn_monitor_acc"):
        assert _is_percent(metrics[key]), f"{key} = {metrics[key]!r} is not a percentage"
    assert metrics["steps"] == params["EPOCHS"] * (params["NUM_IMAGES"] // params["BATCH_SIZE"])
    assert len(metrics["linear_probe_grid"]) == 4 and all(_is_percent(v) for v in metrics["linear_probe_grid"].values())
    # the k sweep and the headline kNN are the same computation at k = 200
    assert metrics["knn_k_sweep"]["moco"]["200"] == metrics["knn_acc"]
    assert metrics["knn_k_sweep"]["random"]["200"] == metrics["random_init_knn_acc"]
    for name, scale in metrics["feature_scale"].items():
        assert _finite_number(scale["mean_sq_norm"]) and scale["mean_sq_norm"] > 0, name
    eff = metrics["label_efficiency"]
    assert sorted(eff, key=int) == [str(n) for n in params["LABELS_PER_CLASS"]], eff
    for n, row in eff.items():
        assert sorted(row) == ["moco", "random", "supervised"] and all(_is_percent(v) for v in row.values()), (n, row)
    assert metrics["linear_acc"] == metrics["linear_probe_grid"]["standardised_lr0.1"]
    # the default transfer domain is bundled ("shapes-outline"): transfer is always measured
    transfer_keys = [k for k in metrics if k.startswith("transfer_") and k.endswith("_acc")]
    assert len(transfer_keys) == 6, transfer_keys
    assert metrics["transfer_skipped"] is None, metrics["transfer_skipped"]
    assert all(_is_percent(metrics[k]) for k in transfer_keys), {k: metrics[k] for k in transfer_keys}
    assert metrics["transfer_num_train"] == params["TRANSFER_NUM_IMAGES"]
    assert metrics["transfer_num_test"] == params["TRANSFER_NUM_TEST"]
    assert (metrics["num_train"], metrics["num_test"]) == (params["NUM_IMAGES"], params["NUM_TEST"])
    assert len(metrics["headline_effects"]) == 3, metrics["headline_effects"]
    _check_figures(output_dir, ("pretraining_curves", "knn_k_sweep", "label_efficiency", "transfer_domains"))


def check_09(metrics: dict, output_dir: Path) -> None:
    epochs = CI_PARAMETERS["09_looking_inside"]["EPOCHS"]
    for key in ("alignment_history", "uniformity_history", "pos_sim_history", "neg_sim_history",
                "collapse_std_history", "collapse_std_no_negatives_history"):
        assert len(metrics[key]) == epochs + 1 and all(_finite_number(v) for v in metrics[key]), key
    assert all(0.0 <= v <= 4.0 for v in metrics["alignment_history"])  # E‖q − k‖² on the unit sphere
    assert all(-8.0 <= v <= 1e-6 for v in metrics["uniformity_history"])  # log E exp(−2‖x − y‖²), ‖x − y‖² ≤ 4
    for key in ("pos_sim_mean", "neg_sim_mean"):
        assert -1.0 <= metrics[key] <= 1.0, key
    assert metrics["pos_sim_mean"] == metrics["pos_sim_history"][-1]
    # at epoch 0 the queue holds random unit vectors: negatives are uncorrelated with q
    assert abs(metrics["neg_sim_history"][0]) < 0.05, metrics["neg_sim_history"]
    # both runs start from the same weights; without negatives the features stay bunched together
    assert metrics["collapse_std_history"][0] == metrics["collapse_std_no_negatives_history"][0]
    assert metrics["collapse_std"] == metrics["collapse_std_history"][-1]
    assert 0.0 <= metrics["collapse_std_no_negatives"] < metrics["collapse_std"] <= 1.0
    for key in ("knn_acc", "knn_acc_no_negatives", "knn_acc_random_init"):
        assert _is_percent(metrics[key]), (key, metrics[key])
    params = CI_PARAMETERS["09_looking_inside"]
    assert (metrics["num_train"], metrics["num_test"]) == (params["NUM_IMAGES"], params["NUM_EVAL"])
    assert len(metrics["headline_effects"]) == 3, metrics["headline_effects"]
    assert metrics["embedding_method"] == "pca"
    _check_figures(output_dir, ("similarity_histograms", "alignment_uniformity", "embedding_through_training",
                                "collapse", "nearest_and_hardest"))


def _check_figures(output_dir: Path, names) -> None:
    """Each named figure was written, as NAME.png in the notebook's output folder, and is not empty."""
    for name in names:
        assert (output_dir / f"{name}.png").stat().st_size > 0, name


def _check_verdicts(number: str, metrics: dict) -> None:
    """metrics.json holds one verdict per headline effect of the notebook, as judge_effects gives them."""
    from mocolab.lesson import judge_effects

    assert metrics["headline_effects"] == judge_effects(number, metrics), metrics["headline_effects"]
    assert len(metrics["headline_effects"]) >= 1
    assert all("not measured" not in e["detail"] for e in metrics["headline_effects"]), metrics["headline_effects"]


def check_04(metrics: dict, output_dir: Path) -> None:
    params = CI_PARAMETERS["04_queue_without_momentum"]
    for run in ("m0", "m099"):
        for key in ("knn_acc", "pretext_acc", "key_identification"):
            assert _is_percent(metrics[f"{key}_{run}"]), f"{key}_{run} = {metrics[f'{key}_{run}']!r}"
        assert -1.0 <= metrics[f"key_consistency_{run}"] <= 1.0 + 1e-6
        losses = metrics[f"loss_{run}"]
        assert len(losses) == params["EPOCHS"] and all(_finite_number(v) for v in losses)
        assert metrics[f"knn_acc_{run}"] == metrics[f"knn_curve_{run}"][-1]
        ages = metrics[f"consistency_by_age_{run}"]
        assert len(ages) == math.ceil(params["K"] / params["BATCH_SIZE"]), ages  # the probe covers the whole queue
        # the newest keys were written by the key encoder as it is now: recomputing them gives the same keys
        assert abs(ages[0] - 1.0) < 1e-4, ages
    assert metrics["chance_loss"] == math.log(params["K"] + 1)
    assert (metrics["num_train"], metrics["num_test"]) == (params["NUM_TRAIN"], params["NUM_TEST"])
    assert _is_percent(metrics["random_init_knn_acc"])
    assert metrics["your_enqueue"] is False  # headless: the stub is not written, mocolab's enqueue stands in
    _check_verdicts("04", metrics)
    _check_figures(output_dir, ("curves_m0_vs_momentum", "step_loss", "consistency_by_age"))


def check_05(metrics: dict, output_dir: Path) -> None:
    params = CI_PARAMETERS["05_momentum_encoder"]
    sweep = metrics["momentum_sweep"]
    assert list(sweep) == ["0", "0.9", "0.99", "0.999"], list(sweep)
    for m, row in sweep.items():
        assert _is_percent(row["knn_acc"]) and _is_percent(row["key_identification"]), (m, row)
        assert -1.0 <= row["key_consistency"] <= 1.0 + 1e-6, (m, row)
        assert len(row["knn_curve"]) == params["EPOCHS"], (m, row)
    assert metrics["total_steps"] == params["EPOCHS"] * (params["NUM_TRAIN"] // params["BATCH_SIZE"])
    # after a few steps an m = 0.999 key encoder has hardly moved: its queue is consistent, at least as m = 0's
    assert sweep["0.999"]["key_consistency"] > 0.999, sweep["0.999"]
    assert sweep["0.999"]["key_consistency"] >= sweep["0"]["key_consistency"] - 1e-6
    assert (metrics["num_train"], metrics["num_test"]) == (params["NUM_TRAIN"], params["NUM_TEST"])
    assert _is_percent(metrics["random_init_knn_acc"])
    assert metrics["your_momentum_update"] is False  # headless: mocolab's update stands in
    _check_verdicts("05", metrics)
    _check_figures(output_dir, ("momentum_sweep", "consistency_by_age", "curves_per_m"))


def check_06(metrics: dict, output_dir: Path) -> None:
    params = CI_PARAMETERS["06_shuffle_bn"]
    for run in ("no_shuffle", "shuffle"):
        assert _is_percent(metrics[f"pretext_acc_{run}"]) and _is_percent(metrics[f"knn_acc_{run}"]), run
        assert len(metrics[f"pretext_curve_{run}"]) == params["EPOCHS"] == len(metrics[f"loss_{run}"])
        assert metrics[f"pretext_acc_{run}"] == metrics[f"pretext_curve_{run}"][-1]
        assert all(_finite_number(v) for v in metrics[f"loss_{run}"])
    assert metrics["bn_group_size"] == params["BATCH_SIZE"] // metrics["bn_splits"]
    assert _is_percent(metrics["random_init_knn_acc"])
    assert metrics["knn_epochs"][-1] == params["EPOCHS"]
    assert len(metrics["knn_curve_shuffle"]) == len(metrics["knn_epochs"])
    assert metrics["num_train"] == params["NUM_TRAIN"] and metrics["num_test"] == params["NUM_TEST"]
    assert metrics["total_steps"] == params["EPOCHS"] * (params["NUM_TRAIN"] // params["BATCH_SIZE"])
    assert len(metrics["headline_effects"]) == 1 and isinstance(metrics["headline_effects"][0]["holds"], bool)
    assert metrics["your_shuffled_keys"] is False  # headless: mocolab's shuffled keys stand in
    _check_figures(output_dir, ("shuffle_vs_no_shuffle",))


#: Notebook name -> its checker (defined above).
CHECKS: dict[str, Callable[[dict, Path], None]] = {
    "00_setup_and_data": check_00,
    "01_margin_contrastive_loss": check_01,
    "02_npair_and_infonce": check_02,
    "03_memory_bank": check_03,
    "04_queue_without_momentum": check_04,
    "05_momentum_encoder": check_05,
    "06_shuffle_bn": check_06,
    "07_moco_full": check_07,
    "08_evaluating_representations": check_08,
    "09_looking_inside": check_09,
    "10_beyond_moco": check_10,
}

#: Seconds a notebook may take at CI size before the test fails.
DEFAULT_TIMEOUT_S = 600
TIMEOUT_S: dict[str, int] = {}

# --------------------------------------------------------------------------
# Machinery
# --------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Quiet, headless kernels: no progress bars (mocolab.progress and plain tqdm); exercise stubs fall back to the
# library's implementation (mocolab.exercises).
KERNEL_ENV = {
    "CI": os.environ.get("CI", "true"),
    "MOCOLAB_QUIET": "1",
    "MOCOLAB_HEADLESS": "1",
    "TQDM_DISABLE": "1",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
}


def strip_ansi(text: str) -> str:
    """Remove terminal colour codes (IPython tracebacks are coloured)."""
    return _ANSI.sub("", text)


_PAPERMILL_TAGS = {"injected-parameters", "papermill-error-cell-tag"}


def describe_failure(exc, executed_path: Path) -> str:
    """A readable report of a papermill execution error: the cell and its traceback.

    The cell is located in the executed notebook by its error output and
    numbered as in the source notebook (papermill's own cells not counted).
    """
    import nbformat

    where = f"cell In[{getattr(exc, 'exec_count', '?')}]"
    if executed_path.exists():
        nb = nbformat.read(executed_path, as_version=4)
        source_cells = [c for c in nb.cells if not _PAPERMILL_TAGS & set(c.metadata.get("tags", []))]
        for index, cell in enumerate(source_cells):
            if any(out.get("output_type") == "error" for out in cell.get("outputs", [])):
                first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
                where = f"cell {index} (first line: {first!r})"
                break
    traceback = strip_ansi("\n".join(getattr(exc, "traceback", []) or []))
    return (
        f"{executed_path.name.split('.')[0]}: {where} raised {exc.ename}: {strip_ansi(str(exc.evalue))}\n"
        f"executed notebook: {executed_path}\n\n{traceback}"
    )


@pytest.fixture(scope="session")
def python3_kernel(tmp_path_factory):
    """Make kernel name ``python3`` resolve to this interpreter, then verify it.

    Jupyter searches the user's data directory before the environment's, so a
    stray ``~/.local/share/jupyter/kernels/python3`` could start another
    Python. A kernelspec on JUPYTER_PATH (searched first) pins it to ours.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    kernels = tmp_path_factory.mktemp("jupyter") / "kernels" / "python3"
    kernels.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (mocolab tests)",
        "language": "python",
    }
    (kernels / "kernel.json").write_text(json.dumps(spec))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(kernels.parents[1]), old]))
    try:
        resolved = KernelSpecManager().get_kernel_spec("python3").argv[0]
        assert Path(resolved).resolve() == Path(sys.executable).resolve(), (
            f"kernel python3 resolves to {resolved}, not the test interpreter {sys.executable}"
        )
        yield "python3"
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old


def execute(notebook: Path, output_dir: Path, parameters: dict, kernel_name: str, timeout_s: int):
    """Run ``notebook`` through papermill; returns the executed notebook's path.

    Raises:
        pytest.fail.Exception: with the failing cell and traceback if a cell raises.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    executed = output_dir / f"{notebook.stem}.executed.ipynb"
    failure = None
    try:
        papermill.execute_notebook(
            str(notebook),
            str(executed),
            parameters={**parameters, "OUTPUT_DIR": str(output_dir)},
            kernel_name=kernel_name,
            cwd=str(notebook.parent),
            progress_bar=False,
            log_output=False,
            start_timeout=120,
            execution_timeout=timeout_s,
        )
    except PapermillExecutionError as exc:
        failure = describe_failure(exc, executed)
    if failure is not None:  # outside the except block: no chained traceback
        pytest.fail(failure, pytrace=False)
    return executed


def _timeout(stem: str) -> int:
    return TIMEOUT_S.get(stem, DEFAULT_TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.parametrize(
    "notebook",
    [pytest.param(nb, id=nb.stem, marks=pytest.mark.timeout(_timeout(nb.stem) + 60)) for nb in NOTEBOOKS],
)
def test_notebook_runs_and_reports(notebook: Path, tmp_path: Path, monkeypatch, python3_kernel):
    for key, value in KERNEL_ENV.items():
        monkeypatch.setenv(key, value)
    # The kernel imports the library from this checkout even without an install.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    output_dir = tmp_path / notebook.stem
    output_dir.mkdir()

    execute(notebook, output_dir, CI_PARAMETERS.get(notebook.stem, {}), python3_kernel, _timeout(notebook.stem))

    metrics_path = output_dir / "metrics.json"
    assert metrics_path.exists(), f"{notebook.stem} did not write OUTPUT_DIR/metrics.json"
    metrics = json.loads(metrics_path.read_text())
    assert isinstance(metrics, dict) and metrics, f"{notebook.stem}: metrics.json is empty or not an object"
    check = CHECKS.get(notebook.stem)
    if check is not None:
        check(metrics, output_dir)


def test_ci_tables_name_existing_notebooks():
    """A typo in a CI_PARAMETERS / CHECKS / TIMEOUT_S key would silently skip the checks."""
    if NOTEBOOK_DIR != (REPO / "notebooks").resolve():
        pytest.skip("MOCOLAB_NOTEBOOK_DIR points elsewhere")
    stems = {nb.stem for nb in NOTEBOOKS}
    for table_name, table in [("CI_PARAMETERS", CI_PARAMETERS), ("CHECKS", CHECKS), ("TIMEOUT_S", TIMEOUT_S)]:
        unknown = sorted(set(table) - stems)
        assert not unknown, f"{table_name} has entries for notebooks that do not exist: {unknown}"


def test_ci_parameters_exist_in_parameters_cell():
    """Injected names must be declared in the notebook's `parameters` cell (else they are silently unused)."""
    import nbformat

    for nb_path in NOTEBOOKS:
        overrides = CI_PARAMETERS.get(nb_path.stem, {})
        nb = nbformat.read(nb_path, as_version=4)
        cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(cells) == 1, f"{nb_path.name}: needs exactly one cell tagged `parameters`, found {len(cells)}"
        declared = set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*(?::[^=]*)?=", cells[0].source, flags=re.M))
        assert "OUTPUT_DIR" in declared, f"{nb_path.name}: the parameters cell must define OUTPUT_DIR"
        undeclared = sorted(set(overrides) - declared)
        assert not undeclared, f"{nb_path.name}: CI_PARAMETERS sets {undeclared}, not in its parameters cell"
