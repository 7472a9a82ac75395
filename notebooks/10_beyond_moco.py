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
# # 10 · Beyond MoCo
#
# **Goals.** MoCo fixed *how* keys are produced (a momentum encoder) and *where* negatives are
# kept (a queue). The methods that followed change what is contrasted with what. This notebook
# trains five of them with the same queue, momentum encoder and training loop, each against
# plain MoCo at the same budget (same images, epochs, batch size and learning rate):
#
# 1. **CMC** (contrastive multiview coding): two *channels* of an image, luminance L and colour ab,
#    as the two views, one encoder each (on colour photos, with its own MoCo reference on them);
# 2. **MoCHi**: harder negatives synthesized by mixing the hardest keys of the queue;
# 3. **the debiased contrastive loss**: correcting for negatives that secretly share the query's class;
# 4. **clustering-aware negatives**: k-means on the queue, and no pushing away of the query's cluster mates;
# 5. **CRD** (contrastive representation distillation): a small student learns the MoCo encoder's
#    representation by contrast rather than by regression.
#
# Each section says where the method comes from and when it helps, then measures it here. At
# this notebook's scale (a few thousand small images, a few epochs on a CPU) most of them
# **do not measurably beat MoCo**; the printed statements say what this run found, with the
# noise level of the test set, rather than what the papers found.
#
# **Prerequisites.** Notebooks 02 (InfoNCE), 05 (the momentum encoder) and 07 (MoCo), and the
# kNN monitor of notebook 08.
#
# **Run time.** About 2 minutes at the default size on a quiet two-core CPU (eight training runs of
# 138 steps each; 2 min 15 s measured); no download. CMC reads the CIFAR-10 subset from disk if it is there.

# %% tags=["parameters"]
SEED = 0                   # seeds the weights, the data order and the augmentations
DEVICE = "auto"            # "auto" (CUDA > MPS > CPU), "cpu", "cuda", "mps"
DATASET = "shapes"         # "shapes" (bundled), "cifar10-small", "cifar10", "stl10" or an ImageFolder path
NUM_IMAGES = 3000          # training images (also the kNN bank)
NUM_TEST = 1000            # test images (the kNN queries)
WIDTH = 32                 # ConvNet width of MoCo (the teacher), MoCHi, debiased and clustering runs
CMC_DATASET = "cifar10-small"  # CMC needs colour: real photos (the grey shapes have an empty ab view); if it
                           # is missing, CMC runs on DATASET and says so
CMC_WIDTH = 16             # ConvNet width of each of CMC's two encoders (half: together about one MoCo encoder)
STUDENT_WIDTH = 8          # ConvNet width of the distilled students
DIM = 128                  # feature dimension C
K = 2048                   # queue size (below NUM_IMAGES: an image is rarely its own negative)
MOMENTUM = 0.99            # m of the key encoders
T = 0.1                    # InfoNCE temperature
EPOCHS = 6                 # training epochs of every run (the equal budget)
BATCH_SIZE = 128           # images per step
LR = 0.06                  # SGD learning rate (cosine decay)
MOCHI_N_HARD = 64          # MoCHi: the hardest queue keys that are mixed (N in the paper)
MOCHI_S = 64               # MoCHi: pair mixes per query (s)
MOCHI_S_PRIME = 16         # MoCHi: query mixes per query (s'), query weight beta < 0.5
MOCHI_WARMUP_EPOCHS = 2    # MoCHi: epochs of plain MoCo before mixing starts
TAU_PLUS = 0.1             # debiased loss: class prior tau+ (1 / number of classes for balanced data)
NUM_CLUSTERS = 10          # clustering-aware negatives: k of k-means on the queue
RECLUSTER_EVERY = 5        # clustering-aware negatives: run k-means every this many steps
SAME_CLUSTER_WEIGHT = 0.0  # weight of a negative from the query's own cluster (0 drops it, 1 is MoCo)
KNN_K = 200                # neighbours of the weighted kNN classifier
OUTPUT_DIR = "runs/10_beyond_moco"  # figures and metrics.json go here

# %% [markdown]
# ## Setup
#
# Every method below is a model with the course's training interface
# (`logits, labels = model(im_q, im_k, index=index)`, `loss = model.criterion(logits, labels)`),
# so the same `mocolab.train.fit` trains all of them, with the same augmentations, optimiser and
# kNN monitor. `train` below runs one method and keeps its kNN accuracy and training time.
#
# The default sizes keep each run to a minute or so on a laptop CPU, which is far too short for
# these methods to differ much. On a GPU, raise `NUM_IMAGES`, `EPOCHS` and `K` (for example 5000,
# 50 and 4096): the comparisons only become informative once MoCo itself is well above chance.

# %%
import copy
import functools
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import mocolab
from mocolab.data import BatchAugment, load_images, normalize
from mocolab.distill import ContrastiveDistill
from mocolab.encoders import ConvNet
from mocolab.evaluate import accuracy_noise, compare_accuracies, evaluate_knn
from mocolab.hard_negatives import ClusterMoCo, DebiasedMoCo, MoCHi, false_negative_rate, mix_hard_negatives
from mocolab.losses import debiased_infonce_loss, debiased_negative_term, infonce_logits
from mocolab.moco import MoCo
from mocolab.multiview import CMC, lab_views, rgb_to_lab
from mocolab.plotting import plot_similarity_histograms
from mocolab.train import TrainConfig, fit

t_start = time.perf_counter()
out = Path(OUTPUT_DIR)
out.mkdir(parents=True, exist_ok=True)
device = mocolab.get_device(DEVICE)
mocolab.seed_everything(SEED)

x_train, y_train, classes = load_images(DATASET, split="train", limit=NUM_IMAGES, seed=SEED)
x_test, y_test, _ = load_images(DATASET, split="test", limit=NUM_TEST, seed=SEED)
num_classes = len(classes)
eval_data = (x_train, y_train, x_test, y_test)
steps_per_epoch = len(x_train) // BATCH_SIZE
print(f"{DATASET}: {len(x_train)} training and {len(x_test)} test images, {num_classes} classes; "
      f"{EPOCHS} epochs of {steps_per_epoch} steps per run")

augment = BatchAugment(32, preset="v2")
config = TrainConfig(epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, knn_every=0, knn_k=KNN_K, seed=SEED)
encoder = functools.partial(ConvNet, width=WIDTH)
results, seconds = {}, {}


def train(name, model, augmentation=augment, data=None):
    """Train one method with the shared loop; keep its final kNN accuracy (%) and its training time.

    ``data``: ``(train images, train labels, test images, test labels)``, default the notebook's dataset.
    """
    torch.manual_seed(SEED)
    data = eval_data if data is None else data
    hist = fit(model, data[0], augmentation, config, eval_data=data, device=device, desc=name, verbose=False)
    results[name], seconds[name] = hist["knn_acc"][-1], hist["train_seconds"]
    print(f"{name}: kNN {results[name]:.1f} %, loss {hist['loss'][0]:.2f} -> {hist['loss'][-1]:.2f}, "
          f"{hist['train_seconds']:.0f} s")
    return hist


def noise(acc):
    """The test-set noise band of an accuracy (%): two standard errors of a difference (mocolab.accuracy_noise)."""
    return accuracy_noise(acc, len(x_test))


def compare(name, acc, ref_name, ref):
    """Higher, lower or within the noise, with the numbers (mocolab.compare_accuracies); one seed."""
    return compare_accuracies(name, acc, ref_name, ref, len(x_test)) + " (one seed)"


# %% [markdown]
# ## The baseline: MoCo
#
# Plain MoCo with a ConvNet of width `WIDTH`. It is the reference for every comparison, and
# its query encoder is the teacher of the distillation section at the end.

# %%
random_init_knn_acc = evaluate_knn(ConvNet(num_classes=DIM, width=WIDTH).to(device), *eval_data, k=KNN_K)
print(f"random-init encoder: kNN {random_init_knn_acc:.1f} % (chance {100 / num_classes:.0f} %)")
torch.manual_seed(SEED)
moco = MoCo(encoder, dim=DIM, K=K, m=MOMENTUM, T=T)
moco_hist = train("MoCo", moco)
if abs(results["MoCo"] - random_init_knn_acc) < noise(random_init_knn_acc):
    print(f"MoCo has not moved beyond a random encoder at this budget ({results['MoCo']:.1f} % vs "
          f"{random_init_knn_acc:.1f} %, within the test-set noise), so the comparisons below are unlikely to "
          f"show more than noise. Raise EPOCHS and NUM_IMAGES to see the methods differ.")
else:
    print(f"MoCo is {results['MoCo'] - random_init_knn_acc:+.1f} points from a random encoder.")

# %% [markdown]
# ## 1. Multiview: CMC
#
# **Where it comes from.** Tian, Krishnan & Isola (2019), *Contrastive Multiview Coding*. Instead
# of two augmentations of one image, CMC contrasts two **views** of it that carry different
# information: here the luminance channel L and the two colour channels ab of the CIE Lab colour
# space. One encoder per view; the positive of an L query is the ab key of the same image, and
# vice versa (a symmetric loss). What the two encoders can agree on is what both channels share
# (object outlines, layout), not what only one of them has (the exact colours, fine texture).
# CMC evaluates the **concatenation** of both views' features. **When it helps:** when the views
# are genuinely complementary (colour and depth, image and sound, several sensors); the paper
# found that adding more views of a scene improved the representation.
#
# Here both encoders have width `CMC_WIDTH` (half of MoCo's, as CMC halves its networks so that
# the pair costs about as much as one), each has a momentum key encoder and a queue. **The two views
# come from two different crops**: L from the query crop and ab from the key crop (`views="two_crops"`),
# which adds MoCo's augmentation invariance to CMC's channel split (`views="same_crop"` is the
# paper's Lab setting). CMC's augmentation has no grayscale step, which would leave an ab view empty.
#
# **The data.** The bundled shapes are grey: their ab view is empty, and CMC would have nothing to
# contrast. So this section runs on colour photos, `CMC_DATASET` (the 6,000-image CIFAR-10 subset, same
# number of images as above), and trains its own MoCo reference on them with the same budget. If that
# dataset is not on this machine, it falls back to `DATASET` and says so.
#
# First, a check of the colour conversion and a look at the two views.

# %%
try:
    cmc_x_train, cmc_y_train, _ = load_images(CMC_DATASET, split="train", limit=NUM_IMAGES, seed=SEED)
    cmc_x_test, cmc_y_test, _ = load_images(CMC_DATASET, split="test", limit=NUM_TEST, seed=SEED)
    cmc_dataset = CMC_DATASET
except FileNotFoundError as err:
    print(f"{CMC_DATASET} is not available ({err}).\nCMC runs on {DATASET} instead; if it has no colour, "
          f"the ab view is empty and CMC has nothing to learn from it.")
    cmc_x_train, cmc_y_train, cmc_x_test, cmc_y_test = eval_data
    cmc_dataset = DATASET
cmc_data = (cmc_x_train, cmc_y_train, cmc_x_test, cmc_y_test)
print(f"CMC data: {cmc_dataset}, {len(cmc_x_train)} training and {len(cmc_x_test)} test images")

red = rgb_to_lab(torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)).view(3)
torch.testing.assert_close(red, torch.tensor([53.24, 80.09, 67.20]), atol=0.02, rtol=0)  # the CIE value of sRGB red
l_view, ab_view = lab_views(normalize(cmc_x_train[:6]))
fig, axes = plt.subplots(4, 6, figsize=(8, 5.6))
for j in range(6):
    axes[0, j].imshow(cmc_x_train[j].permute(1, 2, 0).numpy())
    axes[1, j].imshow(l_view[j, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
    axes[2, j].imshow(ab_view[j, 0].numpy(), cmap="RdYlGn_r", vmin=-0.8, vmax=0.8)
    axes[3, j].imshow(ab_view[j, 1].numpy(), cmap="YlGnBu_r", vmin=-0.8, vmax=0.8)
for i, name in enumerate(["RGB", "L (view 1)", "a (view 2)", "b (view 2)"]):
    axes[i, 0].set_ylabel(name)
for ax in axes.ravel():
    ax.set_xticks([]), ax.set_yticks([])
fig.tight_layout()
fig.savefig(out / "lab_views.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# Notice that an object's outline is visible in L *and* in ab wherever its colour differs from its
# surroundings: that shared structure is what CMC's two encoders can agree on.
#
# Besides the kNN accuracy, the cell measures whether the two encoders learned to **agree**: the mean
# cosine between the L and ab features of the *same* image, against that of *different* images. At
# random init the two are equal (two unrelated networks); CMC's loss asks for a gap between them.

# %%
@torch.no_grad()
def view_agreement(model, images):
    """Mean cosine of L and ab features: same image, different images (unit features, eval mode)."""
    f_l = mocolab.extract_features(model.encoder_for_eval("L"), images)  # (N, C)
    f_ab = mocolab.extract_features(model.encoder_for_eval("ab"), images)  # (N, C)
    sim = f_l @ f_ab.T  # (N, N)
    n = sim.shape[0]
    return float(sim.diagonal().mean()), float((sim.sum() - sim.diagonal().sum()) / (n * n - n))


if cmc_dataset == DATASET:
    cmc_moco_knn_acc, cmc_moco_name = results["MoCo"], "MoCo"
else:
    torch.manual_seed(SEED)
    train(f"MoCo ({cmc_dataset})", MoCo(encoder, dim=DIM, K=K, m=MOMENTUM, T=T), data=cmc_data)
    cmc_moco_name = f"MoCo ({cmc_dataset})"
    cmc_moco_knn_acc = results[cmc_moco_name]
cmc_augment = BatchAugment(32, preset="v2", p_gray=0.0)
torch.manual_seed(SEED)
cmc = CMC(functools.partial(ConvNet, width=CMC_WIDTH), dim=DIM, K=K, m=MOMENTUM, T=T, views="two_crops").to(device)
agreement_idx = torch.randperm(len(cmc_x_test), generator=torch.Generator().manual_seed(SEED))[:500]
cmc_random_init_knn_acc = evaluate_knn(cmc.encoder_for_eval("both"), *cmc_data, k=KNN_K)
cmc_agreement_before = view_agreement(cmc, cmc_x_test[agreement_idx])
cmc_hist = train("CMC", cmc, cmc_augment, data=cmc_data)
cmc_agreement_after = view_agreement(cmc, cmc_x_test[agreement_idx])
cmc_l_knn_acc = evaluate_knn(cmc.encoder_for_eval("L"), *cmc_data, k=KNN_K)
cmc_ab_knn_acc = evaluate_knn(cmc.encoder_for_eval("ab"), *cmc_data, k=KNN_K)
print(f"CMC features on {cmc_dataset}: L only {cmc_l_knn_acc:.1f} %, ab only {cmc_ab_knn_acc:.1f} %, "
      f"both (concatenated) {results['CMC']:.1f} % (at random init {cmc_random_init_knn_acc:.1f} %)")
for when, (same, other) in (("random init", cmc_agreement_before), ("trained", cmc_agreement_after)):
    print(f"L·ab cosine, {when:11s}: same image {same:+.3f}, different images {other:+.3f}, gap {same - other:+.3f}")
print(compare("CMC", results["CMC"], cmc_moco_name, cmc_moco_knn_acc))
print(f"Per step CMC ran {seconds['CMC'] / seconds[cmc_moco_name]:.2f}x MoCo's time.")

# %% [markdown]
# Read the gap first: it says whether the two encoders came to agree on the images. MoCo's query and key
# encoders start as copies of one network, so they agree from the first step; CMC's two encoders start
# unrelated and must first find their common ground, which takes longer (the paper trained for hundreds of
# epochs; exercise 1 trains longer). Each encoder here ends in a `BatchNorm1d` (`CMC(..., out_bn=True)`,
# the default): a freshly initialised small ConvNet maps every image to nearly the same direction, and
# without the BN the two encoders simply align on that direction, which makes the same-image and
# different-image cosines equal and near 1 (exercise 2).

# %% [markdown]
# ## 2. Hard negatives: MoCHi
#
# **Where it comes from.** Kalantidis et al. (2020), *Hard Negative Mixing for Contrastive
# Learning*. Most of the queue's keys are easy negatives: far from the query, they contribute almost
# nothing to the softmax's gradient. MoCHi adds, per query, negatives *synthesized* from the hardest
# ones: it takes the `MOCHI_N_HARD` queue keys most similar to the query, mixes random pairs of them
# (`MOCHI_S` points `normalize(α·nᵢ + (1−α)·nⱼ)`), and mixes the query itself into some of them
# (`MOCHI_S_PRIME` points `normalize(β·q + (1−β)·nⱼ)` with β < 0.5, harder still, yet closer to the
# negative than to the query). They are appended to the logits, with no gradient through them, and
# never enter the queue. **When it helps:** its motivation is that, as training proceeds, most queue
# negatives become easy; the paper reports gains in linear classification (ImageNet-100, ImageNet)
# and in transfer to object detection. It starts mixing after a warm-up, as we do here
# (`MOCHI_WARMUP_EPOCHS`).

# %%
torch.manual_seed(SEED)
mochi = MoCHi(encoder, dim=DIM, K=K, m=MOMENTUM, T=T, n_hard=MOCHI_N_HARD, s=MOCHI_S, s_prime=MOCHI_S_PRIME,
              warmup_steps=MOCHI_WARMUP_EPOCHS * steps_per_epoch)
mochi_hist = train("MoCHi", mochi)
print(compare("MoCHi", results["MoCHi"], "MoCo", results["MoCo"]))


# %% [markdown]
# How hard are the synthesized negatives? On one batch of training images, compare each query's
# similarity to its positive key, to the queue's keys, and to the negatives MoCHi synthesizes from
# that queue (with the trained MoCHi model; the left panel shows plain MoCo's queue for reference).

# %%
@torch.no_grad()
def similarity_snapshot(model, n=256):
    """Positive, queue-negative and synthesized-negative cosine similarities for n training images."""
    g = torch.Generator(device=device).manual_seed(SEED + 7)
    x = x_train[:n].to(device)
    im_q, im_k = augment(x, generator=g), augment(x, generator=g)
    model.eval()
    q = F.normalize(model.encoder_q(im_q), dim=1)  # (n, C)
    k = model._keys(im_k)  # (n, C)
    negatives = model.negatives()  # (C, K)
    mix = mix_hard_negatives(q, negatives, MOCHI_N_HARD, MOCHI_S, MOCHI_S_PRIME,
                             generator=torch.Generator(device=device).manual_seed(SEED))
    model.train()
    return {"pos": (q * k).sum(1).cpu(), "neg": (q @ negatives).flatten().cpu(),
            "synthetic": torch.einsum("nc,nsc->ns", q, mix.h).flatten().cpu()}


snap_moco, snap_mochi = similarity_snapshot(moco), similarity_snapshot(mochi)
fig = plot_similarity_histograms([
    {"pos": snap_moco["pos"], "neg": snap_moco["neg"], "title": "MoCo: queue negatives"},
    {"pos": snap_mochi["pos"], "neg": snap_mochi["neg"], "title": "MoCHi: queue negatives"},
    {"pos": snap_mochi["pos"], "neg": snap_mochi["synthetic"], "title": "MoCHi: synthesized negatives"},
])
fig.savefig(out / "mochi_similarities.png", dpi=100, bbox_inches="tight")
mochi_queue_sim_mean = float(snap_mochi["neg"].mean())
mochi_synthetic_sim_mean = float(snap_mochi["synthetic"].mean())
print(f"mean cosine similarity of a query to its negatives: queue {mochi_queue_sim_mean:+.2f}, "
      f"synthesized {mochi_synthetic_sim_mean:+.2f}; to its positive {float(snap_mochi['pos'].mean()):+.2f}")

# %% [markdown]
# Notice where the synthesized negatives (right panel) sit compared with the queue's: mixing the
# *hardest* keys, and the query itself, moves them towards the positive, which is the point of MoCHi.
# The printed means say how far they moved in this run.

# %% [markdown]
# ## 3. The debiased contrastive loss
#
# **Where it comes from.** Chuang et al. (2020), *Debiased Contrastive Learning*. A queue of random
# images contains images of the query's own class: with C balanced classes, a fraction τ⁺ ≈ 1/C of
# the "negatives" are really positives (false negatives), and InfoNCE pushes them away. The
# debiased loss subtracts their expected share from the negative term, estimated with the positive:
#
# `Ng = max((−τ⁺·K·pos + Σ neg) / (1 − τ⁺), K·e^{−1/T})`, `L = −log(pos / (pos + Ng))`,
#
# with `pos = exp(q·k/T)` and `neg = exp(q·n/T)`; the clamp keeps `Ng` at least its smallest possible
# value. With τ⁺ = 0 it is InfoNCE, which the next cell checks. **When it helps:** the paper reports
# gains on CIFAR-10, STL-10 and ImageNet-100. The bias it corrects is largest when there are few
# classes (τ⁺ large: many negatives are really positives).

# %%
check_logits = torch.randn(8, 1 + 32) * 0.5
torch.testing.assert_close(debiased_infonce_loss(check_logits, 0.0, T=1.0),
                           F.cross_entropy(check_logits, torch.zeros(8, dtype=torch.long)))
torch.manual_seed(SEED)
debiased = DebiasedMoCo(encoder, dim=DIM, K=K, m=MOMENTUM, T=T, tau_plus=TAU_PLUS)
debiased_hist = train("debiased", debiased)
print(compare("Debiased MoCo", results["debiased"], "MoCo", results["MoCo"]))

# %% [markdown]
# How strong is the correction? It assumes that the positive looks like a typical same-class negative,
# but two views of one image are usually far more alike than two images of one class, and at a low T the
# exponential enlarges that difference: `τ⁺·K·pos` removes a share of the sum over the negatives, which
# weakens their push on the query; if it exceeded the whole sum, `Ng` would sit at its floor and the
# negatives would stop pushing. The cell measures both on one batch of training images (two fresh views,
# eval-mode BN, the model's own queue), for the trained MoCo and the trained debiased model: the share of
# `Σ neg` that `Ng` keeps (median over the queries) and the share of queries at the floor. These numbers
# describe the loss, they do not by themselves explain the kNN result above; exercise 4 varies τ⁺ and T.


# %%
@torch.no_grad()
def debiased_correction(model, n=BATCH_SIZE):
    """On one batch: median of Ng / Σ neg, and the share of queries with Ng at its floor K·e^(−1/T)."""
    g = torch.Generator(device=device).manual_seed(SEED + 5)
    x = x_train[:n].to(device)
    was_training = model.training
    model.eval()
    q = F.normalize(model.encoder_q(augment(x, generator=g)), dim=1)  # (n, C)
    k = F.normalize(model.encoder_k(augment(x, generator=g)), dim=1)  # (n, C)
    model.train(was_training)
    logits, _ = infonce_logits(q, k, model.queue.clone(), T)  # (n, 1+K), divided by T
    z, _, ng, clamped = debiased_negative_term(logits, TAU_PLUS, T)  # shifted space
    kept = ng / z[:, 1:].exp().sum(dim=1)  # (n,)
    return float(kept.median()), float(clamped.float().mean())


debiased_kept_moco, debiased_clamped_moco = debiased_correction(moco)
debiased_kept, debiased_clamped = debiased_correction(debiased)
for name, kept, clamped in (("trained MoCo", debiased_kept_moco, debiased_clamped_moco),
                            ("trained debiased model", debiased_kept, debiased_clamped)):
    print(f"τ⁺ = {TAU_PLUS}, T = {T}, {name}: Ng keeps {100 * kept:.0f} % of Σ neg (median); "
          f"at its floor for {100 * clamped:.0f} % of the queries")

# %% [markdown]
# ## 4. Clustering-aware negatives
#
# **Where it comes from.** Local Aggregation (Zhuang, Zhai & Yamins 2019) pulls an image's embedding
# towards its cluster mates and only pushes it from images outside its neighbourhood. The simple
# form here: every `RECLUSTER_EVERY` steps, spherical k-means (k-means++ seeding) groups the queue's
# keys into `NUM_CLUSTERS` clusters; at every step the query and the keys are assigned to the nearest
# centroid, and negatives **in the query's own cluster** get weight `SAME_CLUSTER_WEIGHT` in the
# softmax (0: they are dropped). If the clusters follow the classes, this removes false negatives
# without labels. **When it helps:** only once the representation already groups classes; early on
# the clusters follow colour or background, and dropping cluster mates removes *hard* negatives instead.
#
# To see which of the two happened, the model is given the training labels for **measurement only**
# (they never enter the loss): it counts how often a negative shares the query's true class, over the
# last epoch, before and after the weighting. First the baseline: plain MoCo's queue, which records the
# dataset index of every key (`queue_index`), against the classes of a batch of queries.

# %%
queue_labels = torch.where(moco.queue_index.cpu() >= 0, y_train[moco.queue_index.cpu().clamp_min(0)], -1)  # (K,)
moco_false_negative_rate = false_negative_rate(y_train[:BATCH_SIZE], queue_labels)
print(f"plain MoCo: {100 * moco_false_negative_rate:.1f} % of the queue's negatives share the query's class "
      f"(for balanced classes, about 1/{num_classes} = {100 / num_classes:.0f} %)")

torch.manual_seed(SEED)
cluster = ClusterMoCo(encoder, dim=DIM, K=K, m=MOMENTUM, T=T, num_clusters=NUM_CLUSTERS,
                      recluster_every=RECLUSTER_EVERY, same_cluster_weight=SAME_CLUSTER_WEIGHT)
cluster.set_class_labels(y_train)


def reset_before_last_epoch(epoch, hist):
    if epoch == EPOCHS - 1:
        cluster.reset_false_negative_stats()


torch.manual_seed(SEED)
hist = fit(cluster, x_train, augment, config, eval_data=eval_data, device=device, desc="clusters", verbose=False,
           on_epoch=reset_before_last_epoch)
results["clusters"], seconds["clusters"] = hist["knn_acc"][-1], hist["train_seconds"]
rates = cluster.false_negative_rates()
false_negative_rate_before, false_negative_rate_after = rates["before"], rates["after"]
print(f"clustering-aware negatives: kNN {results['clusters']:.1f} %, {hist['train_seconds']:.0f} s")
print(f"share of negatives with the query's class: {100 * false_negative_rate_before:.1f} % in the queue, "
      f"{100 * false_negative_rate_after:.1f} % of the negatives kept (chance: {100 / num_classes:.0f} %)")
if false_negative_rate_after < false_negative_rate_before - 0.01:
    print("The clusters removed more false negatives than true ones: they partly follow the classes.")
elif false_negative_rate_after > false_negative_rate_before + 0.01:
    print("The filtering kept a *higher* share of false negatives: the clusters follow something other "
          "than the class (colours, backgrounds), so it dropped mostly true negatives, the hardest ones.")
else:
    print("The filtering left the share of false negatives unchanged (within 1 point): at this stage the "
          "clusters are unrelated to the classes.")
print(compare("Clustering-aware MoCo", results["clusters"], "MoCo", results["MoCo"]))

# %% [markdown]
# ## 5. Contrastive distillation: CRD
#
# **Where it comes from.** Tian, Krishnan & Isola (2020), *Contrastive Representation
# Distillation*. To compress a trained **teacher** into a small **student**, the usual recipe
# regresses the student's feature of an image onto the teacher's feature of the same image. CRD
# makes it a contrastive task: the student's feature (the query) must pick the teacher's feature
# of the same image (the positive key) out of the teacher's features of other images (a queue of
# negatives), so the student also learns which images the teacher keeps *apart*. The teacher is
# frozen: it is a key encoder with momentum m = 1, and its queued keys never go stale.
# **When it helps:** the paper found CRD better than feature regression and than logit distillation
# for most of the teacher–student pairs it tried on CIFAR-100, and on ImageNet.
#
# The teacher is the MoCo encoder trained above (width `WIDTH`); two students of width
# `STUDENT_WIDTH` train for the same budget, one with CRD and one with L2 regression between the
# normalised outputs (`‖q − k‖²`).

# %%
teacher = copy.deepcopy(moco.encoder_q)
teacher_knn_acc = results["MoCo"]
student_random_knn_acc = evaluate_knn(ConvNet(num_classes=DIM, width=STUDENT_WIDTH).to(device), *eval_data, k=KNN_K)
for loss in ("crd", "l2"):
    torch.manual_seed(SEED)
    student = ConvNet(num_classes=DIM, width=STUDENT_WIDTH)
    train(f"student ({loss})", ContrastiveDistill(student, copy.deepcopy(teacher), dim=DIM, K=K, T=T, loss=loss))
crd_student_knn_acc, l2_student_knn_acc = results["student (crd)"], results["student (l2)"]
print(f"teacher (width {WIDTH}) {teacher_knn_acc:.1f} %, random-init student (width {STUDENT_WIDTH}) "
      f"{student_random_knn_acc:.1f} %")
print(compare("CRD student", crd_student_knn_acc, "L2 student", l2_student_knn_acc))
if abs(teacher_knn_acc - random_init_knn_acc) < noise(random_init_knn_acc):
    print("The teacher is no better than a random encoder here, so there is little to distil: "
          "read this comparison only after training the teacher longer.")
print(f"The CRD student is {crd_student_knn_acc - teacher_knn_acc:+.1f} points from its teacher, "
      f"the L2 student {l2_student_knn_acc - teacher_knn_acc:+.1f}.")

# %% [markdown]
# ## All methods side by side

# %%
# CMC is in this chart only when it ran on the same data as the others.
names = ["MoCo"] + (["CMC"] if cmc_dataset == DATASET else []) + ["MoCHi", "debiased", "clusters",
                                                                 "student (crd)", "student (l2)"]
fig, ax = plt.subplots(figsize=(8, 3.4))
colors = ["tab:grey"] + ["tab:blue"] * (len(names) - 3) + ["tab:green"] * 2
ax.bar(names, [results[n] for n in names], color=colors)
tol = noise(results["MoCo"])
ax.axhspan(results["MoCo"] - tol, results["MoCo"] + tol, color="tab:grey", alpha=0.15,
           label=f"MoCo ± test-set noise ({tol:.1f} points)")
ax.axhline(random_init_knn_acc, color="black", linestyle=":", label="random-init encoder")
ax.set_ylabel("kNN accuracy (%)"), ax.legend(fontsize="small", loc="lower right")
ax.set_title(f"{DATASET}, {EPOCHS} epochs of {steps_per_epoch} steps each (students: width {STUDENT_WIDTH})")
plt.setp(ax.get_xticklabels(), rotation=20)
fig.tight_layout()
fig.savefig(out / "knn_summary.png", dpi=100, bbox_inches="tight")
for n in names:
    print(f"{n:15s} kNN {results[n]:5.1f} %   {seconds[n]:5.0f} s")

# %% [markdown]
# Notice how many bars sit inside the grey band around MoCo: at this budget most of these ideas are
# not distinguishable from MoCo on one seed. The students are much smaller networks and are compared
# with each other, not with the band.

# %%
total_seconds = time.perf_counter() - t_start
metrics = {
    "moco_knn_acc": results["MoCo"],
    "cmc_knn_acc": results["CMC"],
    "cmc_l_knn_acc": cmc_l_knn_acc,
    "cmc_ab_knn_acc": cmc_ab_knn_acc,
    "cmc_dataset": cmc_dataset,
    "cmc_moco_knn_acc": cmc_moco_knn_acc,
    "cmc_random_init_knn_acc": cmc_random_init_knn_acc,
    "cmc_agreement_same_before": cmc_agreement_before[0],
    "cmc_agreement_other_before": cmc_agreement_before[1],
    "cmc_agreement_same_after": cmc_agreement_after[0],
    "cmc_agreement_other_after": cmc_agreement_after[1],
    "mochi_knn_acc": results["MoCHi"],
    "mochi_queue_sim_mean": mochi_queue_sim_mean,
    "mochi_synthetic_sim_mean": mochi_synthetic_sim_mean,
    "debiased_knn_acc": results["debiased"],
    "debiased_kept_moco": debiased_kept_moco,
    "debiased_kept": debiased_kept,
    "debiased_clamped_share_moco": debiased_clamped_moco,
    "debiased_clamped_share": debiased_clamped,
    "cluster_knn_acc": results["clusters"],
    "false_negative_rate_before": false_negative_rate_before,
    "false_negative_rate_after": false_negative_rate_after,
    "moco_false_negative_rate": moco_false_negative_rate,
    "teacher_knn_acc": teacher_knn_acc,
    "crd_student_knn_acc": crd_student_knn_acc,
    "l2_student_knn_acc": l2_student_knn_acc,
    "student_random_init_knn_acc": student_random_knn_acc,
    "random_init_knn_acc": random_init_knn_acc,
    "test_noise_points": noise(results["MoCo"]),
    "train_seconds": seconds,
    "epochs": EPOCHS,
    "steps_per_run": EPOCHS * steps_per_epoch,
    "seconds": total_seconds,
    "device": str(device),
}
(out / "metrics.json").write_text(json.dumps(metrics, indent=2))
print(f"wrote {out / 'metrics.json'}; notebook ran in {total_seconds:.0f} s")

# %% [markdown]
# ## Summary
#
# - **CMC** replaces "two augmentations" by "two channels": the L and ab encoders learn what the
#   luminance and the colour of an image agree on; CMC's feature is the concatenation of both views.
# - **MoCHi** keeps MoCo and appends harder, synthetic negatives mixed from the hardest queue keys
#   (and from the query), without gradients through them.
# - **The debiased loss** removes the expected share of same-class negatives from the softmax's
#   denominator, with a single number, the class prior τ⁺.
# - **Clustering-aware negatives** use the representation's own clusters to guess which negatives are
#   false; the measured false-negative rates above show whether the guess followed the classes yet.
# - **CRD** turns distillation into a contrastive task with a frozen teacher as the key encoder.
# - The printed comparisons above are what this run measured, on one seed and a small test set. The
#   papers report gains on full datasets after hundreds of epochs; at a few minutes on a CPU, expect
#   most differences to be within the noise, and check before believing any of them.
#
# ## Exercises
#
# 1. Run CMC with `views="same_crop"` (the paper's Lab setting, no second crop), then with more `EPOCHS`.
#    When does the L·ab gap open? Does the kNN accuracy of the concatenated features follow? Which of the
#    two views carries more of the class (`L only` vs `ab only`)?
# 2. Build CMC with `out_bn=False` and compare the two printed L·ab cosines after training with those of
#    the default. What does a gap of zero with both cosines near 1 mean?
# 3. MoCHi: set `MOCHI_S = 0` (only query mixes) and then `MOCHI_S_PRIME = 0`. Which kind of synthetic
#    negative is harder, according to the histogram?
# 4. The debiased loss: try `TAU_PLUS = 0.02` and `0.3`, and `T = 0.5` (the temperature of the paper's
#    CIFAR-10 runs). How do the printed share of queries with `Ng` at its floor and the kNN accuracy move?
# 5. Clustering: set `SAME_CLUSTER_WEIGHT = 0.5` (down-weight instead of drop), and try `NUM_CLUSTERS = 50`.
#    How do the two false-negative rates move? Train for more epochs: do the clusters come to follow the classes?
# 6. Distillation: train a width-`STUDENT_WIDTH` encoder with plain MoCo for the same budget. Does either
#    distilled student beat learning from scratch?
