# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · Setup and data
#
# **Goals.** Check that the environment works, see which device the course will
# use, and meet the data: the bundled synthetic dataset *shapes*, and the
# augmentations that turn one image into the two *views* that every contrastive
# method in this course compares.
#
# By the end you will have seen:
#
# 1. the library versions and the chosen device (CUDA > MPS > CPU);
# 2. a grid of training images with their class names;
# 3. two augmented views of the same image, with the random parameters that made them;
# 4. why raw pixels are a poor representation of this data: a weighted kNN
#    classifier on raw pixels is barely above chance, and the nearest neighbours
#    of an image share its brightness and position, not its shape.
#
# **Prerequisites.** Python and a little PyTorch (tensors, `nn.Module`). No
# knowledge of contrastive learning yet.
#
# **Run time.** About 10 seconds on a quiet 2-core CPU at the default size (8 s measured); no download.

# %% tags=["parameters"]
SEED = 0  # random seed for data generation, augmentation and subsets
DEVICE = "auto"  # "auto" (CUDA > MPS > CPU), "cpu", "cuda", "cuda:1", "mps"
DATASET = "shapes"  # "shapes" (bundled), "cifar10", "stl10", "cifar10-small" or an ImageFolder path
NUM_IMAGES = 5000  # training images to load (shapes: generated; others: a class-balanced subset)
NUM_TEST = 1000  # test images for the raw-pixel kNN baseline
IMAGE_SIZE = 32  # side of the augmented views in pixels
AUGMENTATION = "v2"  # "v2" (MoCo v2 recipe) or "v1" (MoCo v1 recipe)
DOWNLOAD = False  # download cifar10 / stl10 into $MOCOLAB_DATA or <repo>/data if missing
OUTPUT_DIR = "runs/00_setup_and_data"  # where figures and metrics.json are written

# %% [markdown]
# ## The environment
#
# The whole course needs only PyTorch, torchvision and the plotting stack. The
# versions below are worth quoting in any bug report.

# %%
import json
import platform
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
import torchvision

import mocolab
from mocolab import BatchAugment, describe_augmentation, load_images
from mocolab.evaluate import knn_accuracy
from mocolab.gallery import plot_image_grid
from mocolab.lesson import check_parameters

check_parameters(NUM_IMAGES=NUM_IMAGES, NUM_TEST=NUM_TEST, IMAGE_SIZE=IMAGE_SIZE, AUGMENTATION=AUGMENTATION, SEED=SEED)

output_dir = Path(OUTPUT_DIR)
output_dir.mkdir(parents=True, exist_ok=True)

versions = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "numpy": np.__version__,
    "matplotlib": matplotlib.__version__,
    "mocolab": mocolab.__version__,
}
for name, version in versions.items():
    print(f"{name:12s} {version}")
print(f"{'cpu threads':12s} {torch.get_num_threads()}")

# %% [markdown]
# `get_device` picks the fastest device available (an NVIDIA GPU, then Apple's
# MPS, then the CPU) and says why. Every later notebook starts with
# `lesson = Lesson(name, OUTPUT_DIR, seed=SEED, device=DEVICE)` (`mocolab.Lesson`),
# which calls it, seeds everything and makes the output folder; at its end
# `lesson.finish(metrics)` judges the notebook's headline effects against the
# test-set noise and writes `metrics.json`. `DEVICE = "cpu"` in the parameters
# cell is enough to force the CPU.

# %%
device = mocolab.get_device(DEVICE, verbose=True)
mocolab.seed_everything(SEED)

# %% [markdown]
# ## The data
#
# `load_images` returns a whole dataset as one `uint8` tensor of shape
# `(N, 3, H, W)`, plus the labels and the class names. Small datasets fit in
# memory this way, and batches are augmented directly on the device, which is much
# faster than decoding and transforming PIL images one at a time.
#
# The default dataset, **shapes**, is generated on the fly (no download). Each
# image shows one object, and its class is the object's *shape*. Everything else
# is a nuisance: the grey levels of object and background (light on dark or dark
# on light), a faint background texture (stripes, checks, ramps, blotches), the
# position, size, rotation and mirror image of the object, the odd clutter line
# and pixel noise. A good representation must see the shape through all of that.
# The labels are never used for training in this course, only to *evaluate*
# representations.
#
# (`DATASET = "shapes-color"` adds random colours, stronger textures and more
# clutter; see the exercises for why the default leaves colour out.)

# %%
t0 = time.perf_counter()
train_images, train_labels, classes = load_images(
    DATASET, split="train", limit=NUM_IMAGES, seed=SEED, download=DOWNLOAD
)
test_images, test_labels, _ = load_images(DATASET, split="test", limit=NUM_TEST, seed=SEED, download=DOWNLOAD)
load_seconds = time.perf_counter() - t0
num_classes = len(classes)
print(f"{DATASET}: train {tuple(train_images.shape)} {train_images.dtype}, test {tuple(test_images.shape)}")
print(f"{num_classes} classes: {', '.join(classes)}")
print(f"loaded in {load_seconds:.2f} s")
counts = torch.bincount(train_labels[train_labels >= 0], minlength=num_classes)
print("train images per class:", counts.tolist())
assert train_images.dtype == torch.uint8 and train_images.shape[1] == 3

# %% [markdown]
# A few training images of every class, one class per row:

# %%
per_class = 8
rows = [(train_labels == c).nonzero()[:per_class, 0] for c in range(num_classes)]
grid_idx = torch.cat(rows)
fig_grid = plot_image_grid(
    train_images[grid_idx], titles=[classes[int(train_labels[i])] for i in grid_idx], nrow=per_class
)
fig_grid.suptitle(f"{DATASET}: {per_class} training images per class")
fig_grid.savefig(output_dir / "dataset_grid.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# Notice how little the images of one row have in common *in pixels*: the grey
# levels, positions, sizes and rotations change from image to image, and only the
# outline of the object stays the same.
#
# ## Two views of one image
#
# Contrastive learning never sees a label. Instead it takes one image, makes two
# random *views* of it, and trains an encoder to map both views close together and
# away from the views of other images. What the encoder learns to ignore is exactly
# what the augmentation changes. MoCo's recipe (`BatchAugment`, preset `"v2"`):
#
# * **random resized crop**: a crop of 20–100 % of the image area, aspect ratio 3/4–4/3,
#   resized back to the full size (teaches invariance to position and scale);
# * **horizontal flip** with probability 0.5;
# * **colour jitter** of brightness, contrast, saturation (±40 %) and hue (±0.1),
#   applied with probability 0.8 (v1: always, hue ±0.4);
# * **grayscale** with probability 0.2 (together: colour is not a reliable cue);
# * **Gaussian blur** with probability 0.5 for images larger than 32 pixels.
#
# `BatchAugment` draws different parameters for every image of a batch and runs
# on whichever device the images are on. With `return_params=True` it also returns
# the parameters, which we print under each view (crop size and position in input
# pixels, jitter factors b/c/s and hue shift h, grayscale, blur sigma).

# %%
augment = BatchAugment(IMAGE_SIZE, preset=AUGMENTATION).to(device)
print(augment)
generator = torch.Generator(device=device).manual_seed(SEED)
num_show = 6
show = torch.cat([(test_labels == c).nonzero()[:1, 0] for c in range(num_classes)])[:num_show]
originals = test_images[show].to(device)
view_1, params_1 = augment(originals, generator=generator, return_params=True)
view_2, params_2 = augment(originals, generator=generator, return_params=True)

fig_views, axes = plt.subplots(3, num_show, figsize=(2.1 * num_show, 7.6))
for j in range(num_show):
    axes[0, j].imshow(originals[j].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
    axes[0, j].set_title(classes[int(test_labels[show[j]])])
    for row, (view, params) in enumerate([(view_1, params_1), (view_2, params_2)], start=1):
        pixels = augment.denormalize(view[j : j + 1])[0].permute(1, 2, 0).cpu().numpy()
        axes[row, j].imshow(pixels, interpolation="nearest")
        axes[row, j].set_xlabel(describe_augmentation(params, j), fontsize=7)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
axes[0, 0].set_ylabel("original")
axes[1, 0].set_ylabel("view 1 (query)")
axes[2, 0].set_ylabel("view 2 (key)")
fig_views.tight_layout()
fig_views.savefig(output_dir / "augmented_views.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# Notice that the two views of one image can differ more than two images of the
# same class do: different crops, different brightness and contrast, flipped or not.
# What survives every view is the shape of the object (unless a small crop cuts
# most of it away; such noisy pairs are part of the game). This is the signal a
# contrastive encoder is pushed to keep.
#
# ### One augmentation at a time
#
# To see what each operation contributes, switch the others off. Each row below
# applies one operation to the same four images.

# %%
single_ops = {
    "crop + flip": dict(p_jitter=0.0, p_gray=0.0, p_blur=0.0),
    "colour jitter": dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), p_flip=0.0, p_jitter=1.0, p_gray=0.0, p_blur=0.0),
    "grayscale": dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), p_flip=0.0, p_jitter=0.0, p_gray=1.0, p_blur=0.0),
    "blur": dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), p_flip=0.0, p_jitter=0.0, p_gray=0.0, p_blur=1.0),
}
base = originals[:4]
panels, titles = [], []
for name, kwargs in single_ops.items():
    op = BatchAugment(IMAGE_SIZE, preset=AUGMENTATION, **kwargs).to(device)
    for j in range(4):
        out = op(base[j : j + 1], generator=generator)
        panels.append(op.denormalize(out)[0].cpu())
        titles.append(name)
fig_ops = plot_image_grid(torch.stack(panels), titles=titles, nrow=4)
fig_ops.savefig(output_dir / "single_augmentations.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# Notice which nuisance each operation attacks: cropping moves and rescales the
# object, jitter changes the brightness of object and background and the contrast
# between them (on the grey *shapes* its saturation and hue parts have nothing to
# act on; on photos they shift the colours, and grayscale removes them). None of
# them changes the shape, which is why the shape is what a contrastive encoder can
# learn from these views.
#
# ## How fast is batched augmentation?
#
# Training feeds two views of every image of every batch through the
# augmentation, so it must be cheap compared with the encoder. We time one
# batch of 256 images on the chosen device.

# %%
batch = train_images[:256].to(device)
augment(batch)  # warm up
if device.type == "cuda":
    torch.cuda.synchronize()
repeats = 5
t0 = time.perf_counter()
for _ in range(repeats):
    augment(batch)
if device.type == "cuda":
    torch.cuda.synchronize()
augment_ms = (time.perf_counter() - t0) / repeats * 1000
print(f"BatchAugment on {device}: {augment_ms:.1f} ms per batch of {len(batch)} images")

# %% [markdown]
# ## A baseline: raw pixels
#
# How good are raw pixels as a representation? We use the evaluation that the
# rest of the course uses for every encoder: a **weighted kNN classifier** (the
# MoCo CIFAR-10 demo's monitor). Each test image looks up its k = 200 most similar
# training images by cosine similarity, and each neighbour votes for its class
# with weight exp(similarity / 0.1). Here the "features" are simply the
# flattened pixels.

# %%
def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """Flattened pixels in [0, 1], L2-normalised: the identity "encoder"."""
    return F.normalize(images.flatten(1).float() / 255.0, dim=1)  # (N, 3*H*W)


chance = 100.0 / num_classes
has_test_labels = bool((test_labels >= 0).all()) and bool((train_labels >= 0).all())
if has_test_labels:
    raw_knn = knn_accuracy(
        pixel_features(train_images), train_labels, pixel_features(test_images), test_labels,
        k=min(200, len(train_images)), t=0.1, num_classes=num_classes,
    )  # fmt: skip
    print(f"raw-pixel kNN accuracy: {raw_knn:.1f} %  (chance: {chance:.1f} %)")
else:
    raw_knn = float("nan")
    print("this split has no labels: skipping the kNN baseline")

# %% [markdown]
# What do raw pixels consider similar? For a few test images (left), the five most
# similar training images in pixel space:

# %%
num_queries, num_neighbours = 4, 5
sims = pixel_features(test_images[:num_queries]) @ pixel_features(train_images).T  # (Q, N)
top = sims.topk(num_neighbours, dim=1)
tiles, tile_titles = [], []
for qi in range(num_queries):
    tiles.append(test_images[qi])
    tile_titles.append(f"query: {classes[int(test_labels[qi])]}" if test_labels[qi] >= 0 else "query")
    for ni, si in zip(top.indices[qi], top.values[qi]):
        tiles.append(train_images[ni])
        name = classes[int(train_labels[ni])] if train_labels[ni] >= 0 else "?"
        tile_titles.append(f"{name} {float(si):.2f}")
fig_nn = plot_image_grid(torch.stack(tiles), titles=tile_titles, nrow=1 + num_neighbours)
fig_nn.savefig(output_dir / "pixel_neighbours.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# Notice that the nearest neighbours in pixel space share the query's background
# brightness and the position of the object, often not its shape: pixel
# similarity mostly measures the nuisances. The
# following notebooks train encoders whose kNN accuracy on the same test images
# rises far above this baseline, without ever seeing a label.

# %%
metrics = {
    "dataset": DATASET,
    "num_train": int(len(train_images)),
    "num_test": int(len(test_images)),
    "num_classes": int(num_classes),
    "classes": list(classes),
    "image_shape": list(train_images.shape[1:]),
    "view_shape": list(view_1.shape[1:]),
    "device": str(device),
    "versions": versions,
    "load_seconds": round(load_seconds, 3),
    "augment_ms_per_256": round(augment_ms, 2),
    "augmentation": AUGMENTATION,
    "raw_pixel_knn_acc": None if np.isnan(raw_knn) else round(raw_knn, 2),
    "chance_acc": round(chance, 2),
    "train_class_counts": counts.tolist(),
}
(output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
print(json.dumps({k: v for k, v in metrics.items() if k != "versions"}, indent=1))

# %% [markdown]
# ## Summary
#
# * `mocolab.get_device` chose the device; every notebook uses it the same way.
# * `load_images` gives a dataset as one `uint8` tensor; *shapes* is generated in
#   about a second and needs no download. `DATASET = "cifar10"` (with
#   `DOWNLOAD = True`), `"stl10"` or an ImageFolder path switch to real photos.
# * `BatchAugment` makes the MoCo views of a whole batch at once on any device;
#   two views of one image share the object's shape and little else.
# * Raw pixels are a poor representation of this data: their kNN accuracy is not far
#   above chance, because pixel similarity is dominated by brightness and position.
#
# **Next:** notebook 01 trains a first encoder with the simplest contrastive loss,
# the margin loss on pairs.
#
# ## Exercises
#
# 1. Set `AUGMENTATION = "v1"` and compare the views: which operation is stronger
#    in v1, and which is missing?
# 2. In the "one augmentation at a time" cell, change the crop scale to
#    `scale=(0.05, 1.0)`. How often does a view lose the object entirely? What
#    would that do to the positive pairs of contrastive learning?
# 3. Set `DATASET = "shapes-color"`. How do raw pixels fare now? Look at the
#    augmented views: how much of an image's colour survives the v2 jitter (hue
#    ±0.1 of a turn, grayscale only one time in five)? A contrastive encoder can
#    tell two images apart by colour alone, so on this variant a short run learns
#    colour instead of shape. SimCLR (Chen et al., 2020) found the same on ImageNet:
#    without strong colour distortion, instance discrimination is solved by colour
#    histograms.
# 4. Set `DATASET = "cifar10-small"` (if `../shared/data/cifar10-small` exists) or
#    `"cifar10"` with `DOWNLOAD = True`, and rerun. How do raw pixels fare on photos?
