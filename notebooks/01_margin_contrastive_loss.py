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
# - train a small ConvNet with pairs and see, in the distances between its embeddings, which pairs still
#   teach it something;
# - compare it with a softmax over many negatives (InfoNCE with in-batch negatives) in two runs that differ
#   **only in the loss** (same encoder, same 128-d unit-length embedding, same initial weights, images,
#   batches, views and steps), measured with a kNN classifier.
#
# **Prerequisites.** Notebook 00 (the `shapes` dataset and the augmentations); PyTorch basics.
#
# **Run time.** About half a minute at the default size on a quiet 2-core CPU (no GPU, no download);
# several times longer on a machine shared with other jobs. The wall-clock time of your run is printed at the end.

# %% tags=["parameters"]
SEED = 0                # seeds the data order, the augmentations and the weights
DEVICE = "auto"         # "auto" (CUDA > MPS > CPU), "cpu", "cuda"
DATASET = "shapes"      # the bundled synthetic dataset; "cifar10", "stl10" or an ImageFolder path also work
NUM_TRAIN = 2048        # training images (also the kNN bank)
NUM_TEST = 1000         # test images (the kNN queries)
WIDTH = 16              # ConvNet width w (channels w, 2w, 4w, 8w)
DIM = 128               # C, the embedding dimension of both models (unit vectors, as in MoCo)
MARGIN = 1.0            # the margin of the contrastive loss (unit vectors are at most 2 apart)
T = 0.1                 # temperature of the InfoNCE softmax
EPOCHS = 8              # passes over the training images, for each of the two models
BATCH_SIZE = 64         # N, images per step: N positive and N negative pairs per step
LR = 0.06               # SGD learning rate (cosine decay)
NUM_SHOW = 500          # test images drawn in the embedding scatter plots
OUTPUT_DIR = "runs/01_margin_contrastive_loss"  # figures and metrics.json go here

# %% [markdown]
# ## Setup
#
# `mocolab.Lesson` starts the clock, makes the output folder, picks the device and seeds everything;
# `lesson.load` returns `NUM_TRAIN` training and `NUM_TEST` test images as uint8 tensors. The labels are
# used **only** to evaluate (kNN) and to colour the plots, never to train.

# %%
from functools import partial

import matplotlib.pyplot as plt
import torch

import mocolab
from mocolab.train import TrainConfig, fit

lesson = mocolab.Lesson("01_margin_contrastive_loss", OUTPUT_DIR, seed=SEED, device=DEVICE)
out, device = lesson.out, lesson.device
x_train, y_train, x_test, y_test, classes = lesson.load(DATASET, NUM_TRAIN, NUM_TEST)
augment = mocolab.BatchAugment(image_size=x_train.shape[-1], preset="v2")

# %% [markdown]
# ## The loss of a pair
#
# Two embeddings `x1`, `x2` at Euclidean distance `D = ‖x1 − x2‖`, and a label `Y`: `Y = 0` for a similar
# (positive) pair, `Y = 1` for a dissimilar (negative) pair (the paper's convention):
#
# `L = (1 − Y) · ½ D²  +  Y · ½ · max(0, margin − D)²`
#
# A positive pair is pulled together with a spring of rest length 0. A negative pair is pushed apart,
# but only while it is closer than `margin`: beyond the margin it costs nothing. Why a margin? A negative pair
# only has to be far enough apart to be told from a positive one; pushing pairs that already are would spend
# the training on them (and, in an unbounded space, could go on forever). With the margin, a negative pair is
# done once it is far enough.

# %% [markdown]
# ### Your turn: the loss for a whole batch
#
# Write `margin_loss(x1, x2, y, margin)` for N pairs at once: `x1`, `x2` of shape (N, C), `y` of shape (N,)
# holding 0 (similar) or 1 (dissimilar), and one number back, the loss above averaged over the N pairs. A
# training step scores a whole batch of pairs, so the function works on tensors, without a Python loop over
# the pairs, and it must let gradients flow back into `x1` and `x2`: the margin model below minimises it.
#
# The checker compares your function with `mocolab.margin_contrastive_loss`, value and gradient, on batches of
# several sizes, margins and label mixes, and names the usual slips when it recognises one. Once it passes,
# your function draws the curves below and trains the margin model; until then the notebook uses the
# library's loss. A reference solution is in `notebooks/solutions/solutions.py`.

# %%
from mocolab import exercises


def margin_loss(x1, x2, y, margin):
    """Mean over the N pairs of (1 − y)·½·D² + y·½·max(0, margin − D)², with D = ‖x1 − x2‖."""
    raise NotImplementedError  # your code here


margin_loss = exercises.check("margin_loss", margin_loss)

# %% [markdown]
# ### Predict, then draw
#
# Before you run the next cell, sketch the loss of **one** pair against its distance D, from 0 to 2, once for
# a positive pair and once for a negative pair, with the margin at `MARGIN`. Where is each curve zero, and
# where does it have no slope? The cell draws both with the `margin_loss` above, one pair at a time.

# %%
exercises.announce("margin_loss", margin_loss, "this plot")
D = torch.linspace(0, 2, 200)
zeros = torch.zeros(200, 1)
fig, ax = plt.subplots(figsize=(5, 3.4))
for label, name in [(0, "positive pair (Y = 0)"), (1, "negative pair (Y = 1)")]:
    per_pair = [margin_loss(zeros[i:i + 1], D[i:i + 1, None], torch.tensor([label]), MARGIN).detach()
                for i in range(len(D))]
    ax.plot(D, torch.stack(per_pair).reshape(-1), label=name)
ax.axvline(MARGIN, color="grey", linestyle=":", label="margin")
ax.set_xlabel("distance D"), ax.set_ylabel("loss of one pair"), ax.legend(), ax.grid(alpha=0.3)
fig.savefig(out / "loss_vs_distance.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# Notice the two branches: the positive branch grows with D, the negative branch is zero for every
# `D ≥ margin`. A negative pair that is already far enough apart gives **no gradient at all**. The x-axis
# stops at 2 because the models below compare unit vectors, which are never more than 2 apart.

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
mean, std = mocolab.datasets.normalization_stats(x_train.shape[-1])
fig, axes = plt.subplots(3, 1, figsize=(6, 3.6))
mocolab.plot_image_grid(x_train[:8], nrow=8, ax=axes[0], title="images")
mocolab.plot_image_grid(views1, nrow=8, ax=axes[1], title="view 1", mean=mean, std=std)
mocolab.plot_image_grid(views2, nrow=8, ax=axes[2], title="view 2", mean=mean, std=std)
fig.savefig(out / "pairs.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# Each column of *view 1* and *view 2* is a positive pair; view 1 of column i with view 2 of column i+1 is
# a negative pair. Notice how much brightness, contrast, position and scale change inside a positive pair:
# those are the nuisances the encoder must learn to ignore.

# %% [markdown]
# ## The margin model
#
# The only thing new in this lesson is how the pairs are scored, so the model is short: `mocolab.MarginPairs`
# (in `mocolab/baselines.py`). It has the training interface that `mocolab.train.fit` expects from every
# model of the course (`mocolab.ContrastiveModel`): `logits, labels = model(im_q, im_k, index=...)` and
# `loss = model.loss(logits, labels)`.
#
# - `z_q = normalize(encoder(im_q))`, `z_k = normalize(encoder(im_k))`: (N, DIM) unit vectors, the same
#   embedding as the InfoNCE model below. On the unit sphere `D² = 2 − 2·cos`, so `MARGIN = 1` asks a
#   negative pair for a cosine below ½, and two unrelated directions (cosine 0) sit at `D = √2`.
# - `forward` scores every pair of the batch by minus its squared distance, `logits[i, j] = −‖z_q[i] − z_k[j]‖²`
#   (N, N), with labels `arange(N)`: `fit` uses them for the pretext accuracy (is my own other view the
#   nearest one?).
# - `loss` takes the pairs from these scores: N positive pairs `(z_q[i], z_k[i])` (the diagonal) and N
#   negative pairs `(z_q[i], z_k[i − 1])`, `Y = [0…0; 1…1]`, and averages the margin loss over the 2N pairs.
#
# The run below trains with **your** `margin_loss` once it has passed: `wrap_losses.margin_pairs` builds the
# same model, from the same initial weights, with a `loss` that calls your function on the 2N pairs (the loss
# of a pair depends on it only through its distance D, so each pair reaches your function as two points D
# apart). Until then it builds `mocolab.MarginPairs` itself. The run prints which one it uses.

# %%
from mocolab.exercises import wrap_losses

encoder_fn = partial(mocolab.ConvNet, width=WIDTH)

# %% [markdown]
# ## How we measure: kNN on the backbone features
#
# Both models below are the same ConvNet (four conv blocks and average pooling, 8w backbone features, then
# a linear layer to DIM) started from the **same initial weights**. We measure both on the backbone
# features: a weighted kNN classifier (k = 200, the monitor of the MoCo CIFAR-10 demo) with the training
# images as the bank and the test images as queries. First, the same measurement on the random-init
# backbone: the level to beat.

# %%
def backbone_knn(encoder):
    feats = mocolab.backbone(encoder)
    return mocolab.evaluate_knn(feats, x_train, y_train, x_test, y_test)


mocolab.seed_everything(SEED)
random_init_knn_acc = backbone_knn(encoder_fn(num_classes=DIM).to(device))
print(f"random-init backbone: kNN accuracy {random_init_knn_acc:.1f} % (chance {100 / len(classes):.0f} %)")

# %% [markdown]
# ## Training with pairs
#
# `fit` trains with SGD (cosine learning rate) on batches of `BATCH_SIZE` images, two fresh views per image
# per step. After every epoch we record the embeddings of `NUM_SHOW` test images and the backbone kNN
# accuracy.

# %%
config = TrainConfig(epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, knn_every=0, seed=SEED)
x_show, y_show = x_test[:NUM_SHOW], y_test[:NUM_SHOW]
snapshots = {}  # epoch -> (NUM_SHOW, DIM) unit-length embeddings of the margin model


def recorder(model, curve, snapshots=None):
    def on_epoch(epoch, hist):
        if snapshots is not None:
            snapshots[epoch] = mocolab.extract_features(model.encoder_q, x_show)
        curve.append(backbone_knn(model.encoder_q))
    return on_epoch


exercises.announce("margin_loss", margin_loss, "the margin run")
mocolab.seed_everything(SEED)
margin_model = wrap_losses.margin_pairs(margin_loss, encoder_fn, dim=DIM, margin=MARGIN).to(device)
snapshots[0] = mocolab.extract_features(margin_model.encoder_q, x_show)
margin_curve = []
margin_hist = fit(margin_model, x_train, augment, config, device=device,
                  on_epoch=recorder(margin_model, margin_curve, snapshots), desc="margin")
margin_knn_acc = margin_curve[-1]
steps = len(margin_hist["step_loss"])
print(f"margin loss: {margin_hist['loss'][0]:.3f} -> {margin_hist['loss'][-1]:.3f}; "
      f"kNN {margin_knn_acc:.1f} % after {EPOCHS} epochs = {steps} steps ({margin_hist['train_seconds']:.0f} s)")

# %% [markdown]
# ### Which pairs still teach the model?
#
# A positive pair pulls as long as `D > 0`; a negative pair pushes only while `D < MARGIN`. Below are the
# distances of the positive pairs (two views of one test image) and of the negative pairs (view 1 of an
# image and view 2 of another) before and after training, with the margin drawn in.

# %%
@torch.no_grad()
def pair_distances(encoder, images, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    v1, v2 = augment(images.to(device), generator=gen), augment(images.to(device), generator=gen)
    z1 = mocolab.extract_features(encoder, v1)  # (n, C), unit length
    z2 = mocolab.extract_features(encoder, v2)
    return (z1 - z2).norm(dim=1), (z1 - z2.roll(1, dims=0)).norm(dim=1)  # positives, negatives: (n,) each


mocolab.seed_everything(SEED)
init_encoder = encoder_fn(num_classes=DIM).to(device)  # the weights both models started from
distances = {"before training": pair_distances(init_encoder, x_show, SEED),
             f"after {steps} steps": pair_distances(margin_model.encoder_q, x_show, SEED)}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharex=True)
bins = torch.linspace(0, 2, 41)
for ax, (when, (d_pos, d_neg)) in zip(axes, distances.items()):
    ax.hist(d_pos.numpy(), bins=bins.numpy(), alpha=0.6, label="positive pairs")
    ax.hist(d_neg.numpy(), bins=bins.numpy(), alpha=0.6, label="negative pairs")
    ax.axvline(MARGIN, color="grey", linestyle=":", label="margin")
    ax.set_title(f"margin model, {when}"), ax.set_xlabel("distance D between unit embeddings")
    ax.grid(alpha=0.3)
axes[0].set_ylabel("pairs"), axes[0].legend(fontsize="small")
fig.tight_layout()
fig.savefig(out / "pair_distances.png", dpi=100, bbox_inches="tight")

negatives_past_margin = {when: 100.0 * float((d_neg >= MARGIN).float().mean()) for when, (_, d_neg) in distances.items()}
mean_distance = {when: (float(d_pos.mean()), float(d_neg.mean())) for when, (d_pos, d_neg) in distances.items()}
for when in distances:
    print(f"{when}: mean D of positives {mean_distance[when][0]:.2f}, of negatives {mean_distance[when][1]:.2f}; "
          f"{negatives_past_margin[when]:.0f} % of negative pairs at D ≥ MARGIN (no gradient)")

# %% [markdown]
# Notice that before training every pair, positive or negative, sits close to D = 0: the random encoder
# maps all images near one point, and the negatives have the whole margin to travel. After training the
# negative pairs have moved right; each one past the dotted margin contributes exactly zero to the loss and
# to the gradient (the printed share), and inside the margin the push `margin − D` fades as a pair
# approaches it. Each positive pair keeps pulling in proportion to its distance.
#
# ### The embedding through training
#
# The same test images, coloured by their (never used) class, drawn through the top two principal
# components of the 128-d embedding, at initialisation and after some of the epochs.

# %%
moments = sorted({0, 1, max(1, EPOCHS // 2), EPOCHS})
fig, axes = plt.subplots(1, len(moments), figsize=(3.6 * len(moments), 3.4))
for ax, epoch in zip(axes, moments):
    mocolab.plot_embedding(snapshots[epoch], y_show, classes, ax=ax, method="pca",
                           legend=epoch == moments[-1], title=f"epoch {epoch}")
fig.tight_layout()
fig.savefig(out / "margin_embedding.png", dpi=100, bbox_inches="tight")

spread = {e: float(torch.cdist(snapshots[e], snapshots[e]).mean()) for e in moments}
print("mean pairwise distance of the shown embeddings:", {e: round(v, 3) for e, v in spread.items()})

# %% [markdown]
# Notice that the cloud, bunched together at epoch 0, spreads out within the first epoch, and that the
# groups it forms mix all colours: the directions along which the margin model spreads the images most are
# not the shape classes. A 2-D projection keeps only part of 128 dimensions, so the kNN accuracy (on all
# backbone features) is the measurement and the picture an illustration. The printed mean pairwise
# distances say how far apart the test images end up on the sphere (unrelated directions sit at √2 ≈ 1.41).

# %% [markdown]
# ## The same everything, with a softmax over many negatives
#
# Now the same backbone and head, the same initial weights, images, batches, views, optimizer and steps,
# trained with InfoNCE using the other images of the batch as negatives (`mocolab.EndToEnd`). With the same
# unit vectors `q = normalize(encoder(im_q))`, `k = normalize(encoder(im_k))`:
#
# `logits = q · kᵀ / T` (N, N) and `L = cross_entropy(logits, arange(N))`
#
# Every query is compared with its own key **and** N − 1 negatives at once, in a single softmax; a negative
# keeps receiving gradient in proportion to its softmax weight, instead of being switched off at a margin.
# Both models encode the same 2N views per step, so the cost per step is the same. The loss is the only
# difference between the two runs.

# %%
mocolab.seed_everything(SEED)
infonce_model = mocolab.EndToEnd(encoder_fn, dim=DIM, T=T).to(device)
infonce_curve = []
infonce_hist = fit(infonce_model, x_train, augment, config, device=device,
                   on_epoch=recorder(infonce_model, infonce_curve), desc="infonce")
infonce_knn_acc = infonce_curve[-1]
print(f"InfoNCE loss: {infonce_hist['loss'][0]:.3f} -> {infonce_hist['loss'][-1]:.3f}; "
      f"kNN {infonce_knn_acc:.1f} % after {EPOCHS} epochs ({infonce_hist['train_seconds']:.0f} s)")

# %%
epochs = list(range(1, EPOCHS + 1))
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
axes[0].plot([0] + epochs, [random_init_knn_acc] + margin_curve, marker="o", label="margin (1 negative per pair)")
axes[0].plot([0] + epochs, [random_init_knn_acc] + infonce_curve, marker="o",
             label=f"InfoNCE ({BATCH_SIZE - 1} negatives per query)")
axes[0].axhline(100 / len(classes), color="grey", linestyle=":", label="chance")
axes[0].set_xlabel("epoch"), axes[0].set_ylabel("kNN accuracy on backbone features (%)")
axes[0].legend(fontsize="small")
axes[1].plot(epochs, margin_hist["pretext_acc"], marker="o", label="margin")
axes[1].plot(epochs, infonce_hist["pretext_acc"], marker="o", label="InfoNCE")
axes[1].set_xlabel("epoch"), axes[1].set_ylabel("pretext accuracy (%)"), axes[1].legend(fontsize="small")
axes[1].set_title("own view is the nearest of the batch's N keys")
for ax in axes:
    ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(out / "margin_vs_infonce.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# The left panel is what the representation is worth for recognising shapes, epoch by epoch; the right
# panel is how well each model solves the pretext task of picking its other view among the N keys of the
# batch. Notice that the gap between the two kNN curves opens in the first epochs. The comparisons below use
# the test-set noise band: two standard errors of the difference of two accuracies measured on `NUM_TEST`
# images (`mocolab.accuracy_noise`).

# %%
print(mocolab.compare_accuracies("margin", margin_knn_acc, "random init", random_init_knn_acc, len(y_test)))
print(mocolab.compare_accuracies("InfoNCE", infonce_knn_acc, "margin", margin_knn_acc, len(y_test)))
print(f"pretext accuracy in the last epoch (chance {100 / BATCH_SIZE:.1f} %): margin "
      f"{margin_hist['pretext_acc'][-1]:.1f} %, InfoNCE {infonce_hist['pretext_acc'][-1]:.1f} %")

metrics = lesson.finish({
    "random_init_knn_acc": random_init_knn_acc,
    "margin_knn_acc": margin_knn_acc,
    "infonce_knn_acc": infonce_knn_acc,
    "margin_knn_curve": margin_curve,
    "infonce_knn_curve": infonce_curve,
    "margin_loss": margin_hist["loss"],
    "infonce_loss": infonce_hist["loss"],
    "margin_pretext_acc": margin_hist["pretext_acc"],
    "infonce_pretext_acc": infonce_hist["pretext_acc"],
    "negatives_past_margin": negatives_past_margin,
    "pair_distance_means": mean_distance,
    "embedding_spread": {str(k): v for k, v in spread.items()},
    "dim": DIM,
    "margin": MARGIN,
    "steps": steps,
    "train_seconds": {"margin": margin_hist["train_seconds"], "infonce": infonce_hist["train_seconds"]},
})

# %% [markdown]
# ## Summary
#
# - The margin contrastive loss scores **pairs**: positives are pulled together, negatives pushed apart
#   until they are `MARGIN` apart, and then ignored.
# - Positive pairs come free from augmentations; negative pairs from other images. No labels are needed.
# - With the same encoder, the same 128-d unit-length embedding and the same steps, the two runs differ only
#   in the loss. Each positive pair of the margin model meets **one** negative, and a negative past the margin
#   gives no gradient; InfoNCE compares every query with all N − 1 other images of the batch in one softmax.
#   At the default size InfoNCE's backbone kNN accuracy is above the margin model's by more than the
#   test-set noise band (the verdict printed above, `headline_effects` in `metrics.json`).
# - The next notebook turns the softmax over many negatives into the InfoNCE loss that MoCo uses.
#
# ## Exercises
#
# 1. Set `DIM = 2` for both models and draw the margin model's raw 2-D embedding (no PCA). Do the two kNN
#    accuracies change? Why might a 2-D output limit the backbone, even though kNN reads the backbone?
# 2. Change `MARGIN` to 0.5 and to 1.4 (≈ √2, the distance of two orthogonal unit vectors). What happens to
#    the share of negative pairs past the margin and to the kNN accuracy? What does a margin above 2 do on
#    the unit sphere?
# 3. Give the margin model more negatives per step: roll `z_k` by 1, 2 and 3 places and add all three sets
#    of negative pairs. Is it as good as InfoNCE at the same number of steps? At the same wall-clock time?
