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
# # 01 · Pairs and the margin: the contrastive loss of Hadsell, Chopra & LeCun (2006)
#
# **Goals.** By the end of this notebook you can
#
# - write the margin contrastive loss for a *pair* of embeddings and say what each term does;
# - build positive pairs (two augmented views of one image) and negative pairs (two different images)
#   without any labels;
# - watch a 2-D embedding move while a small ConvNet is trained with pairs;
# - compare it, at equal compute (same encoder backbone, same images, same batch, same number of steps),
#   with a softmax over many negatives (InfoNCE with in-batch negatives), and measure both with a kNN classifier.
#
# **Prerequisites.** Notebook 00 (the `shapes` dataset and the augmentations); PyTorch basics.
#
# **Run time.** About a minute at the default size on a quiet 2-core CPU (53 s measured; no GPU, no
# download); several times longer on a machine shared with other jobs. The wall-clock and CPU time of your run are printed at
# the end.

# %% tags=["parameters"]
SEED = 0                # seeds the data order, the augmentations and the weights
DEVICE = "auto"         # "auto" (CUDA > MPS > CPU), "cpu", "cuda"
DATASET = "shapes"      # the bundled synthetic dataset; "cifar10", "stl10" or an ImageFolder path also work
NUM_TRAIN = 3000        # training images (also the kNN bank)
NUM_TEST = 500          # test images (the kNN queries)
WIDTH = 32              # ConvNet width w (channels w, 2w, 4w, 8w)
EMBED_DIM = 2           # output dimension of the margin model: 2, so that we can look at it directly
INFONCE_DIM = 128       # output dimension of the InfoNCE model (as in MoCo)
MARGIN = 1.0            # the margin of the contrastive loss
T = 0.1                 # temperature of the InfoNCE softmax
EPOCHS = 5              # passes over the training images, for each of the two models
BATCH_SIZE = 128        # images per step: N positive pairs and N negative pairs per step
LR = 0.06               # SGD learning rate (cosine decay)
NUM_SHOW = 500          # test images drawn in the embedding scatter plots
OUTPUT_DIR = "runs/01_margin_contrastive_loss"  # figures and metrics.json go here

# %% [markdown]
# ## Setup
#
# Imports, the device, the seed, and the data: `NUM_TRAIN` training images and `NUM_TEST` test images as
# uint8 tensors. The labels are used **only** to evaluate (kNN) and to colour the plots, never to train.

# %%
import json
import math
import time
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

import mocolab
from mocolab.train import TrainConfig, fit

t_start, cpu_start = time.perf_counter(), time.process_time()
torch.set_num_threads(min(2, torch.get_num_threads()))
out = Path(OUTPUT_DIR)
out.mkdir(parents=True, exist_ok=True)
device = mocolab.get_device(DEVICE)
mocolab.seed_everything(SEED)

x_train, y_train, classes = mocolab.load_images(DATASET, "train", limit=NUM_TRAIN, seed=SEED)
x_test, y_test, _ = mocolab.load_images(DATASET, "test", limit=NUM_TEST, seed=SEED)
augment = mocolab.BatchAugment(image_size=x_train.shape[-1], preset="v2")
print(f"train {tuple(x_train.shape)}, test {tuple(x_test.shape)}, classes: {classes}")

# %% [markdown]
# ## The loss, written out
#
# Two embeddings `x1`, `x2` at Euclidean distance `D = ‖x1 − x2‖`, and a label `Y`: `Y = 0` for a similar
# (positive) pair, `Y = 1` for a dissimilar (negative) pair (the paper's convention):
#
# `L = (1 − Y) · ½ D²  +  Y · ½ · max(0, margin − D)²`
#
# A positive pair is pulled together with a spring of rest length 0. A negative pair is pushed apart,
# but only while it is closer than `margin`: beyond the margin it costs nothing, so the embedding cannot
# win by blowing up. Below, the loss is written naively, one pair at a time, and checked against
# `mocolab.margin_contrastive_loss` (which the rest of the notebook uses).

# %%
def margin_loss_naive(x1, x2, y, margin):
    total = 0.0
    for a, b, label in zip(x1, x2, y):
        D = torch.sqrt(((a - b) ** 2).sum())
        total = total + (1 - label) * 0.5 * D**2 + label * 0.5 * torch.clamp(margin - D, min=0) ** 2
    return total / len(y)


g = torch.Generator().manual_seed(SEED)
x1, x2 = torch.randn(8, EMBED_DIM, generator=g), torch.randn(8, EMBED_DIM, generator=g)
y = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
torch.testing.assert_close(mocolab.margin_contrastive_loss(x1, x2, y, margin=MARGIN),
                           margin_loss_naive(x1, x2, y.float(), MARGIN))
print("naive loop == mocolab.margin_contrastive_loss")

D = torch.linspace(0, 2 * MARGIN, 200)
zeros = torch.zeros(200, 1)
fig, ax = plt.subplots(figsize=(5, 3.4))
for label, name in [(0, "positive pair (Y = 0)"), (1, "negative pair (Y = 1)")]:
    per_pair = [mocolab.margin_contrastive_loss(zeros[i:i + 1], D[i:i + 1, None], torch.tensor([label]), MARGIN)
                for i in range(len(D))]
    ax.plot(D, torch.stack(per_pair), label=name)
ax.axvline(MARGIN, color="grey", linestyle=":", label="margin")
ax.set_xlabel("distance D"), ax.set_ylabel("loss of one pair"), ax.legend(), ax.grid(alpha=0.3)
fig.savefig(out / "loss_vs_distance.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# Notice the two branches: the positive branch grows without bound, the negative branch is zero for every
# `D ≥ margin`. A negative pair that is already far enough apart gives **no gradient at all**.

# %% [markdown]
# ## Making pairs without labels
#
# A **positive pair** is two augmented views of the same image (random crop, flip, colour jitter,
# grayscale). A **negative pair** is two different images. Within a batch of N images we get N positive
# pairs `(view₁ of i, view₂ of i)` and N negative pairs `(view₁ of i, view₂ of i+1)` by rolling the second
# views by one place. The batch order is random, so the "next" image is a random other image; one time in
# ten it shows the same shape class (the method cannot know that, it has no labels).

# %%
views1 = augment(x_train[:8], generator=torch.Generator().manual_seed(SEED))
views2 = augment(x_train[:8], generator=torch.Generator().manual_seed(SEED + 1))
mean, std = mocolab.data.normalization_stats(x_train.shape[-1])
fig, axes = plt.subplots(3, 1, figsize=(6, 3.6))
mocolab.plot_image_grid(x_train[:8], nrow=8, ax=axes[0], title="images")
mocolab.plot_image_grid(views1, nrow=8, ax=axes[1], title="view 1", mean=mean, std=std)
mocolab.plot_image_grid(views2, nrow=8, ax=axes[2], title="view 2",
                        mean=mean, std=std)
fig.savefig(out / "pairs.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# Each column of *view 1* and *view 2* is a positive pair; view 1 of column i with view 2 of column i+1 is
# a negative pair. Notice how much brightness, contrast, position and scale change inside a positive pair:
# those are the nuisances the encoder must learn to ignore.

# %% [markdown]
# ## The margin model
#
# The only thing new in this lesson is how the pairs are scored, so it is a short module here. It has the
# training interface that `mocolab.train.fit` expects from every model of the course:
# `logits, labels = model(im_q, im_k, index=...)` and `loss = model.criterion(logits, labels)`.
#
# - `z_q = encoder(im_q)`, `z_k = encoder(im_k)`: (N, EMBED_DIM) embeddings, **not** normalised
#   (the margin is a Euclidean distance).
# - pairs: `x1 = [z_q; z_q]`, `x2 = [z_k; roll(z_k, 1)]`, `Y = [0…0; 1…1]` (N positive, N negative pairs).
# - the "logits" returned are `−D(z_q, z_k)`, an (N, N) matrix of negative distances, with labels
#   `arange(N)`: `fit` uses them only for the pretext accuracy (is my own other view my nearest one?).

# %%
class MarginPairs(nn.Module):
    """Siamese encoder trained with the margin contrastive loss on N positive and N negative pairs per batch."""

    def __init__(self, base_encoder, dim=2, margin=1.0):
        super().__init__()
        self.encoder_q = base_encoder(num_classes=dim)
        self.margin = margin

    def forward(self, im_q, im_k, index=None):
        z_q, z_k = self.encoder_q(im_q), self.encoder_q(im_k)  # (N, C) each
        n = z_q.shape[0]
        x1 = torch.cat([z_q, z_q])  # (2N, C)
        x2 = torch.cat([z_k, z_k.roll(1, dims=0)])  # (2N, C): positives, then negatives
        y = torch.cat([torch.zeros(n), torch.ones(n)]).to(z_q.device)  # (2N,)
        self._pairs = (x1, x2, y)
        logits = -torch.cdist(z_q, z_k)  # (N, N), own view on the diagonal
        return logits, torch.arange(n, device=z_q.device)

    def criterion(self, logits, labels):
        return mocolab.margin_contrastive_loss(*self._pairs, margin=self.margin)


encoder_fn = partial(mocolab.ConvNet, width=WIDTH)

# %% [markdown]
# ## How we measure: kNN on the backbone features
#
# The two models below share the same ConvNet **backbone** (four conv blocks and average pooling, 8w
# features) and differ only in the last linear layer (`EMBED_DIM` outputs for the margin model,
# `INFONCE_DIM` for InfoNCE). So we measure both on the backbone features: a weighted kNN classifier
# (k = 200, the monitor of the MoCo CIFAR-10 demo) with the training images as the bank and the test images
# as queries. First, the same measurement on a **random-init** backbone: the level to beat.

# %%
def backbone_knn(encoder):
    feats = mocolab.backbone(encoder)
    return mocolab.evaluate_knn(feats, x_train, y_train, x_test, y_test)


mocolab.seed_everything(SEED)
random_init_knn_acc = backbone_knn(encoder_fn(num_classes=EMBED_DIM).to(device))
print(f"random-init backbone: kNN accuracy {random_init_knn_acc:.1f} % (chance {100 / len(classes):.0f} %)")

# %% [markdown]
# ## Training with pairs, and watching the embedding
#
# `fit` trains with SGD (cosine learning rate) on batches of `BATCH_SIZE` images, two fresh views per image
# per step. After every epoch we record the raw 2-D embeddings of `NUM_SHOW` test images and the backbone
# kNN accuracy.

# %%
config = TrainConfig(epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, knn_every=0, seed=SEED)
x_show, y_show = x_test[:NUM_SHOW], y_test[:NUM_SHOW]
snapshots = {}  # epoch -> (NUM_SHOW, EMBED_DIM) raw embeddings


def recorder(model, curve):
    def on_epoch(epoch, hist):
        snapshots[epoch] = mocolab.extract_features(model.encoder_q, x_show, normalize_features=False)
        curve.append(backbone_knn(model.encoder_q))
    return on_epoch


mocolab.seed_everything(SEED)
margin_model = MarginPairs(encoder_fn, dim=EMBED_DIM, margin=MARGIN).to(device)
snapshots[0] = mocolab.extract_features(margin_model.encoder_q, x_show, normalize_features=False)
margin_curve = []
margin_hist = fit(margin_model, x_train, augment, config, device=device, on_epoch=recorder(margin_model, margin_curve),
                  desc="margin")
margin_knn_acc = margin_curve[-1]
print(f"margin loss: {margin_hist['loss'][0]:.3f} -> {margin_hist['loss'][-1]:.3f}; "
      f"kNN {margin_knn_acc:.1f} % after {EPOCHS} epochs ({margin_hist['train_seconds']:.0f} s)")

# %% [markdown]
# ### The embedding at a few moments
#
# Each panel shows the same test images, coloured by their (never used) class, at initialisation and after
# some of the epochs. The grey circle has radius `MARGIN`, drawn around the centre of the points: the
# distance beyond which a negative pair stops pushing.

# %%
moments = sorted({0, 1, max(1, EPOCHS // 2), EPOCHS})
fig, axes = plt.subplots(1, len(moments), figsize=(3.6 * len(moments), 3.4))
for ax, epoch in zip(axes, moments):
    z = snapshots[epoch]
    if z.shape[1] > 2:  # a wider embedding is shown through its top two principal components
        z = torch.as_tensor(mocolab.embed_2d(z, method="pca"))
    mocolab.plot_embedding(z, y_show, classes, ax=ax, method="pca" if EMBED_DIM > 2 else "umap",
                           legend=epoch == moments[-1], title=f"epoch {epoch}")
    c = z.mean(0)
    ax.add_patch(plt.Circle((float(c[0]), float(c[1])), MARGIN, fill=False, color="grey", linestyle=":"))
    ax.set_xlabel("z[0]"), ax.set_ylabel("z[1]")
    ax.set_aspect("equal", adjustable="datalim")
fig.tight_layout()
fig.savefig(out / "margin_embedding.png", dpi=100, bbox_inches="tight")

spread = {e: float(torch.cdist(snapshots[e], snapshots[e]).mean()) for e in moments}
print("mean pairwise distance of the shown embeddings:", {e: round(v, 3) for e, v in spread.items()})

# %% [markdown]
# Notice the scale: at initialisation all images sit almost on one point; the negatives push the cloud
# apart, and the push stops for any pair once it is `MARGIN` apart (compare the printed mean pairwise
# distances with `MARGIN`). With one negative per positive pair, each image learns per step to be far from
# only *one* other image; whether the colours (classes) separate is what the kNN accuracy measures.

# %% [markdown]
# ## The same compute, with a softmax over many negatives
#
# Now the same backbone, the same images, batch size, epochs, optimizer and augmentations, trained with
# InfoNCE using the other images of the batch as negatives (`mocolab.EndToEnd`). With unit vectors
# `q = normalize(encoder(im_q))`, `k = normalize(encoder(im_k))`:
#
# `logits = q · kᵀ / T` (N, N) and `L = cross_entropy(logits, arange(N))`
#
# Every query is compared with its own key **and** N − 1 negatives at once, in a single softmax; a negative
# keeps receiving gradient in proportion to how close it is, instead of being switched off at a margin.
# Both models encode the same 2N views per step, so the cost per step is the same.

# %%
mocolab.seed_everything(SEED)
infonce_model = mocolab.EndToEnd(encoder_fn, dim=INFONCE_DIM, T=T).to(device)
infonce_curve = []


def infonce_on_epoch(epoch, hist):
    infonce_curve.append(backbone_knn(infonce_model.encoder_q))


infonce_hist = fit(infonce_model, x_train, augment, config, device=device, on_epoch=infonce_on_epoch, desc="infonce")
infonce_knn_acc = infonce_curve[-1]
print(f"InfoNCE loss: {infonce_hist['loss'][0]:.3f} -> {infonce_hist['loss'][-1]:.3f}; "
      f"kNN {infonce_knn_acc:.1f} % after {EPOCHS} epochs ({infonce_hist['train_seconds']:.0f} s)")

# %%
epochs = list(range(1, EPOCHS + 1))
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
axes[0].plot([0] + epochs, [random_init_knn_acc] + margin_curve, marker="o", label=f"margin (1 negative per pair)")
axes[0].plot([0] + epochs, [random_init_knn_acc] + infonce_curve, marker="o",
             label=f"InfoNCE ({BATCH_SIZE - 1} negatives per query)")
axes[0].axhline(100 / len(classes), color="grey", linestyle=":", label="chance")
axes[0].set_xlabel("epoch"), axes[0].set_ylabel("kNN accuracy on backbone features (%)"), axes[0].legend(fontsize="small")
axes[1].plot(epochs, margin_hist["pretext_acc"], marker="o", label="margin")
axes[1].plot(epochs, infonce_hist["pretext_acc"], marker="o", label="InfoNCE")
axes[1].set_xlabel("epoch"), axes[1].set_ylabel("pretext accuracy (%)"), axes[1].legend(fontsize="small")
axes[1].set_title("own view is the nearest of the batch's N keys")
for ax in axes:
    ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(out / "margin_vs_infonce.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# The left panel is what the representation is worth for recognising shapes; the right panel is how well
# each model solves its own pretext task (picking its other view among the N keys of the batch).
# The printed summary below states what this run measured.

# %%
gap = infonce_knn_acc - margin_knn_acc
print(f"random init {random_init_knn_acc:.1f} %, margin {margin_knn_acc:.1f} %, InfoNCE {infonce_knn_acc:.1f} % "
      f"(InfoNCE − margin = {gap:+.1f} points, one seed, {EPOCHS} epochs of {len(x_train) // BATCH_SIZE} steps)")
if abs(gap) < 2:
    print("At this budget the two are within 2 points: one seed cannot tell them apart.")
print(f"pretext accuracy in the last epoch (chance {100 / BATCH_SIZE:.1f} %): margin "
      f"{margin_hist['pretext_acc'][-1]:.1f} %, InfoNCE {infonce_hist['pretext_acc'][-1]:.1f} %")

seconds, cpu_seconds = time.perf_counter() - t_start, time.process_time() - cpu_start
metrics = {
    "random_init_knn_acc": random_init_knn_acc,
    "margin_knn_acc": margin_knn_acc,
    "infonce_knn_acc": infonce_knn_acc,
    "margin_knn_curve": margin_curve,
    "infonce_knn_curve": infonce_curve,
    "margin_loss": margin_hist["loss"],
    "infonce_loss": infonce_hist["loss"],
    "margin_pretext_acc": margin_hist["pretext_acc"],
    "infonce_pretext_acc": infonce_hist["pretext_acc"],
    "embedding_spread": {str(k): v for k, v in spread.items()},
    "steps": len(margin_hist["step_loss"]),
    "train_seconds": {"margin": margin_hist["train_seconds"], "infonce": infonce_hist["train_seconds"]},
    "seconds": seconds,
    "cpu_seconds": cpu_seconds,
    "device": str(device),
}
(out / "metrics.json").write_text(json.dumps(metrics, indent=2))
print(f"wrote {out / 'metrics.json'}; notebook ran in {seconds:.0f} s "
      f"({cpu_seconds:.0f} s of CPU time over all threads)")

# %% [markdown]
# ## Summary
#
# - The margin contrastive loss scores **pairs**: positives are pulled together, negatives pushed apart
#   until they are `MARGIN` apart, and then ignored.
# - Positive pairs come free from augmentations; negative pairs from other images. No labels are needed.
# - Each positive pair here meets **one** negative; InfoNCE compares every query with all N − 1 other
#   images of the batch in one softmax, for the same encoder cost. The printed kNN accuracies above say
#   how the two compared in this run. No published figure measures this exact comparison, and the
#   next notebook turns the softmax over many negatives into the InfoNCE loss that MoCo uses.
#
# ## Exercises
#
# 1. Set `EMBED_DIM = 128` (the scatter plots then show the top two principal components). Does the margin
#    model's kNN accuracy change? Why might a 2-D output limit the backbone?
# 2. Change `MARGIN` to 0.1 and to 10. What happens to the scale of the embedding and to the kNN accuracy?
#    (Hint: the positive term has no scale of its own.)
# 3. Give the margin model more negatives per step: roll `z_k` by 1, 2 and 3 places and add all three sets
#    of negative pairs. Is it as good as InfoNCE at the same number of steps? At the same wall-clock time?
