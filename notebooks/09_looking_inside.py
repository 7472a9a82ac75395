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
# # 09 · Looking inside
#
# **Goals.** Accuracy numbers (notebook 08) say *whether* a representation is good; this notebook
# looks at *what happens to it* while MoCo trains. We train one MoCo ConvNet and, after every epoch,
# measure on fixed images:
#
# 1. the **embedding** itself, drawn in 2-D with UMAP at initialisation, midway and at the end;
# 2. the **similarities** q·k of positive pairs and q·queue of negatives, as histograms that move
#    apart during training;
# 3. **alignment** and **uniformity** (Wang & Isola 2020): positives close, features spread out;
# 4. the **collapse indicator** (the std of normalised features), beside a deliberately broken run
#    that has **no negatives** and whose features never spread out;
# 5. a **gallery**: a query's nearest keys in the queue and its hardest negatives.
#
# **Prerequisites.** Notebooks 02 (InfoNCE), 05 (the momentum encoder) and 08 (evaluation).
#
# **Run time.** About 2 minutes at the default size on a quiet 2-core CPU (1 min 41 s measured: two
# trainings of 150 steps on 4,000 images, and the first UMAP fit, which compiles code); several times
# longer on a machine shared with other jobs. The last cell prints this run's wall-clock and CPU time.

# %% tags=["parameters"]
SEED = 0                  # seeds the weights, the data order, the augmentations and the fixed views
DEVICE = "auto"           # "auto" (CUDA > MPS > CPU), "cpu", "cuda", "mps"
DATASET = "shapes"        # "shapes" (bundled), "cifar10-small", "cifar10", "stl10" or an ImageFolder path
NUM_IMAGES = 4000         # training images
NUM_EVAL = 500            # fixed test images for the embedding, uniformity and the collapse indicator
PROBE_BATCH = 256         # fixed training images whose two views give the positive/negative similarities
WIDTH = 32                # ConvNet width w (channels w, 2w, 4w, 8w)
DIM = 128                 # feature dimension C of the embedding
K = 1024                  # queue size (below NUM_IMAGES)
MOMENTUM = 0.99           # m of the key encoder
T = 0.1                   # InfoNCE temperature
EPOCHS = 10               # training epochs of each of the two runs (MoCo, no negatives)
BATCH_SIZE = 256          # images per step
LR = 0.06                 # SGD learning rate (cosine decay)
EMBEDDING_METHOD = "umap"  # "umap" (compiles on first use, ~30 s) or "pca" (instant, linear)
GALLERY_QUERIES = 3       # test images shown with their nearest keys and hardest negatives
GALLERY_K = 5             # keys per row of the gallery
OUTPUT_DIR = "runs/09_looking_inside"  # figures and metrics.json go here

# %% [markdown]
# ## Setup
#
# Imports, device, seed and data. Labels are never used for training, only to colour plots and to
# say which keys share the query's class.

# %%
import json
import math
import time
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from mocolab import (BatchAugment, ConvNet, MoCo, alignment, collapse_std, extract_features, get_device,
                     load_images, seed_everything, similarity_stats, uniformity)
from mocolab.plotting import embed_2d, nearest_and_hardest, plot_embedding, plot_neighbours, plot_similarity_histograms
from mocolab.train import TrainConfig, fit

t_start = time.perf_counter()
torch.set_num_threads(min(2, torch.get_num_threads()))  # a laptop-sized run; raise on a bigger machine
out = Path(OUTPUT_DIR)
out.mkdir(parents=True, exist_ok=True)
device = get_device(DEVICE)
seed_everything(SEED)

train_x, train_y, classes = load_images(DATASET, "train", limit=NUM_IMAGES, seed=SEED)
eval_x, eval_y, _ = load_images(DATASET, "test", limit=NUM_EVAL, seed=SEED)
print(f"{DATASET}: {len(train_x)} training images, {len(eval_x)} fixed evaluation images, {len(classes)} classes")

# %% [markdown]
# ## Fixed probes
#
# To watch the same things change, we fix what we measure on:
#
# * `eval_x`: test images, encoded by the query encoder into the normalised embedding z (128-d):
#   the UMAP pictures, uniformity and the collapse indicator;
# * two augmented **views** of `PROBE_BATCH` training images, made once: view 1 goes through the
#   query encoder (q), view 2 through the key encoder (k). q·k are positive similarities, q·queue
#   negative ones, and alignment is the mean ‖q − k‖².
#
# All measurements run in eval mode (BatchNorm uses its running statistics) and without gradients.

# %%
augment = BatchAugment(train_x.shape[-1]).to(device)
g = torch.Generator(device=device).manual_seed(SEED + 100)
probe_images = train_x[:PROBE_BATCH].to(device)
view_q, view_k = augment(probe_images, generator=g), augment(probe_images, generator=g)  # (B, 3, H, W) each


@torch.no_grad()
def measure(model) -> dict:
    """Similarities, alignment, uniformity and collapse of ``model`` on the fixed probes."""
    was_training = model.training
    model.eval()
    q = F.normalize(model.encoder_q(view_q), dim=1)  # (B, C)
    k = F.normalize(model.encoder_k(view_k), dim=1)  # (B, C)
    z = extract_features(model.encoder_q, eval_x)  # (NUM_EVAL, C), normalised
    sims = similarity_stats(q, k, model.negatives())  # negatives: the queue (C, K)
    model.train(was_training)
    return {"sims": sims, "z": z, "alignment": alignment(q, k), "uniformity": uniformity(z),
            "collapse_std": collapse_std(z)}


# %% [markdown]
# ## Training MoCo, measuring after every epoch
#
# `fit` calls `on_epoch(epoch, history)` after each epoch; ours measures the model and keeps the
# results. We also measure once before training (epoch 0). The queue starts as random unit vectors
# (the official initialisation), so the "negatives" of epoch 0 are random directions.

# %%
def train_and_watch(model, desc):
    model.to(device)
    snaps = {0: measure(model)}

    def on_epoch(epoch, history):
        snaps[epoch] = measure(model)

    config = TrainConfig(epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, knn_every=0, seed=SEED)
    history = fit(model, train_x, augment, config, eval_data=(train_x, train_y, eval_x, eval_y), device=device,
                  on_epoch=on_epoch, desc=desc)
    return snaps, history


torch.manual_seed(SEED)
moco = MoCo(partial(ConvNet, width=WIDTH), dim=DIM, K=K, m=MOMENTUM, T=T)
snaps, history = train_and_watch(moco, "MoCo")
epochs = sorted(snaps)
mid = epochs[len(epochs) // 2]
print(f"trained in {history['train_seconds']:.0f} s; loss {history['loss'][0]:.2f} → {history['loss'][-1]:.2f} "
      f"(ln(K+1) = {math.log(K + 1):.2f}); kNN accuracy at the end {history['knn_acc'][-1]:.1f} %")

# %% [markdown]
# ## Positive and negative similarities
#
# For each snapshot: the histogram of q·k over the fixed positive pairs (green) and of q·queue
# over all pairs of a query and a queued key (red), with their means dashed.

# %%
shown = [0, mid, epochs[-1]]
fig = plot_similarity_histograms([{**snaps[e]["sims"], "title": f"epoch {e}"} for e in shown])
fig.savefig(out / "similarity_histograms.png", dpi=100, bbox_inches="tight")
pos_mean = [snaps[e]["sims"]["pos_mean"] for e in epochs]
neg_mean = [snaps[e]["sims"]["neg_mean"] for e in epochs]
for e in shown:
    s = snaps[e]["sims"]
    print(f"epoch {e:2d}: mean q·k = {s['pos_mean']:+.3f}, mean q·queue = {s['neg_mean']:+.3f}, "
          f"gap = {s['pos_mean'] - s['neg_mean']:.3f}")
fig

# %% [markdown]
# Notice how the two means move. At epoch 0 the queue holds random directions, so q·queue is
# centred on 0, while q·k is high for *every* pair: a random network maps all images to nearly the
# same direction, so positives are similar only because everything is. Once the queue holds real
# keys, negatives look similar to q as well. From then on, training pulls the two views of an image
# together and pushes each query away from the queued keys of other images: what the loss rewards
# is the **gap** between the two, not either mean alone. The width of the red histogram matters too:
# negatives of the query's own class stay more similar than the rest.

# %%
first_real = 1 if len(epochs) > 1 else 0  # the first snapshot whose queue holds real keys
gap = [p - n for p, n in zip(pos_mean, neg_mean)]
trend = "grew" if gap[-1] > gap[first_real] else "did not grow"
print(f"in this run the gap {trend} from {gap[first_real]:.3f} (epoch {epochs[first_real]}) "
      f"to {gap[-1]:.3f} (epoch {epochs[-1]})")

# %% [markdown]
# ## Alignment and uniformity
#
# Wang & Isola (2020) split what the contrastive loss asks for into two measurable parts:
#
# * **alignment** L_align = E‖q − k‖² over positive pairs (lower: the two views agree);
# * **uniformity** L_unif = log E exp(−2‖zᵢ − zⱼ‖²) over pairs of different images (lower: the
#   features spread over the sphere; the minimum for many points on a high-dimensional sphere is
#   close to −4).
#
# A collapsed encoder has perfect alignment (0) and the worst uniformity (0). Watch both:

# %%
align_hist = [snaps[e]["alignment"] for e in epochs]
unif_hist = [snaps[e]["uniformity"] for e in epochs]
fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
axes[0].plot(epochs, align_hist, marker="o")
axes[0].set_title("alignment (lower = views agree)")
axes[1].plot(epochs, unif_hist, marker="o", color="tab:orange")
axes[1].set_title("uniformity (lower = spread out)")
axes[2].plot(unif_hist, align_hist, marker="o", color="tab:purple")
for e, u, a in zip(epochs, unif_hist, align_hist):
    axes[2].annotate(str(e), (u, a), textcoords="offset points", xytext=(4, 4), fontsize="small")
axes[2].set_xlabel("uniformity")
axes[2].set_ylabel("alignment")
axes[2].set_title("the path through the plane (epoch labels)")
for ax in axes[:2]:
    ax.set_xlabel("epoch")
for ax in axes:
    ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(out / "alignment_uniformity.png", dpi=100, bbox_inches="tight")
print(f"alignment {align_hist[0]:.3f} → {align_hist[-1]:.3f} ({align_hist[-1] - align_hist[0]:+.3f}), "
      f"uniformity {unif_hist[0]:.3f} → {unif_hist[-1]:.3f} ({unif_hist[-1] - unif_hist[0]:+.3f})")

# %% [markdown]
# Notice where a random network starts: almost perfectly "aligned" (every feature is nearly the
# same vector, so any two views agree) and with uniformity near 0 (nothing is spread out). The
# printed changes show the trade this run made: how much alignment it gave up for how much
# uniformity. The right-hand panel is the path through the plane; good representations end up low
# in both, which takes far longer training than this.
#
# ## The embedding through training
#
# UMAP (McInnes et al. 2018) places the fixed test images in 2-D so that neighbours in the 128-d
# embedding stay neighbours; colours are the classes, which MoCo never saw. One embedding is fitted
# per snapshot (the first fit compiles code; `EMBEDDING_METHOD = "pca"` skips that for a quick look).

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
embed_methods = []
for ax, e in zip(axes, shown):
    xy, used = embed_2d(snaps[e]["z"], method=EMBEDDING_METHOD, seed=SEED, return_method=True)  # (NUM_EVAL, 2)
    embed_methods.append(used)
    plot_embedding(xy, eval_y, classes, ax=ax, method=used, title=f"epoch {e}", legend=(e == shown[-1]))
fig.savefig(out / "embedding_through_training.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# Notice how the picture at epoch 0 already has some structure (a random ConvNet is not a random
# function of the image) and how the clusters form, or fail to form, by class as training goes on.
# UMAP exaggerates clusters and its distances between clusters mean little; compare the pictures
# with the kNN accuracy printed above rather than reading accuracy off them.
#
# ## Collapse: a run with no negatives
#
# Why does MoCo need negatives at all? Remove them: keep the momentum key encoder and the queue
# (only to measure against), but let the loss pull q towards k and nothing else,
# L = E‖q − k‖² = 2 − 2·E[q·k]: BYOL without its predictor. Mapping every image to the same point
# makes this loss 0, and nothing in it prevents that.
#
# The collapse indicator is the std of the normalised features over the images, averaged over
# dimensions (`mocolab.metrics.collapse_std`): 0 when all features are one vector, about 1/√C when
# they spread over the sphere. We write the broken model as a 6-line subclass of `MoCo` that only
# changes the logits (positive only) and the loss:

# %%
class NoNegatives(MoCo):
    """MoCo without negatives: the loss only pulls q towards k (BYOL without predictor). Collapses."""

    def _contrast(self, im_q, k, negatives):
        q = F.normalize(self.encoder_q(im_q), dim=1)  # (N, C)
        return (q * k).sum(dim=1, keepdim=True) / self.T  # (N, 1): the positive logit only

    def criterion(self, logits, labels):
        return (2 - 2 * self.T * logits).mean()  # E‖q − k‖² on the unit sphere


torch.manual_seed(SEED)  # the same initial weights as the MoCo run
no_neg = NoNegatives(partial(ConvNet, width=WIDTH), dim=DIM, K=K, m=MOMENTUM, T=T)
snaps_nn, history_nn = train_and_watch(no_neg, "no negatives")
collapse_moco = [snaps[e]["collapse_std"] for e in epochs]
collapse_nn = [snaps_nn[e]["collapse_std"] for e in epochs]

fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
axes[0].plot(epochs, collapse_moco, marker="o", label="MoCo")
axes[0].plot(epochs, collapse_nn, marker="s", label="no negatives")
axes[0].axhline(1 / math.sqrt(DIM), color="gray", linestyle="--", label="1/√C (spread)")
axes[0].axhline(0, color="black", linewidth=0.8)
axes[0].set_xlabel("epoch")
axes[0].set_title("collapse_std of the embedding")
axes[0].legend(frameon=False, fontsize="small")
axes[1].plot(epochs, [snaps[e]["uniformity"] for e in epochs], marker="o", label="MoCo")
axes[1].plot(epochs, [snaps_nn[e]["uniformity"] for e in epochs], marker="s", label="no negatives")
axes[1].set_xlabel("epoch")
axes[1].set_title("uniformity")
axes[1].legend(frameon=False, fontsize="small")
for ax in axes:
    ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(out / "collapse.png", dpi=100, bbox_inches="tight")
print(f"collapse_std: at init {collapse_moco[0]:.4f}; after {EPOCHS} epochs MoCo {collapse_moco[-1]:.4f}, "
      f"no negatives {collapse_nn[-1]:.4f} (1/√C = {1 / math.sqrt(DIM):.4f})")
print(f"at initialisation the features spread {collapse_moco[0] * math.sqrt(DIM):.2f}× as much as 1/√C; "
      f"after training MoCo's spread {collapse_moco[-1] / max(collapse_nn[-1], 1e-12):.1f}× as much as "
      f"the no-negatives run's")
print(f"no-negatives loss {history_nn['loss'][0]:.3f} → {history_nn['loss'][-1]:.3f}; its kNN accuracy "
      f"{history_nn['knn_acc'][-1]:.1f} % vs MoCo's {history['knn_acc'][-1]:.1f} %")

# %% [markdown]
# Notice where the two runs start: at the same point (the same initial weights), and well below
# 1/√C. A randomly initialised network maps all images into a narrow cone (its features share a
# large common component), so a collapsed-looking representation is where training *starts*.
# MoCo's negatives push the features apart, towards 1/√C; without negatives nothing does, and the
# loss (printed) is minimised while the features stay bunched together. BYOL and SimSiam do without
# negatives, but they add a predictor network on the query side (with a stop-gradient on the key
# side), and without that predictor both collapse; MoCo gets the push apart from the queue.
#
# ## A query's nearest keys and hardest negatives
#
# Finally, what does the trained MoCo compare a query with? The queue holds the keys of the last K
# training images (and their dataset indices, so we can show them). For a few test queries we
# show the keys of the **same class** with the highest similarity to q, and the **hardest
# negatives**: the most similar keys of *another* class. To MoCo, every key in the queue is a
# negative, same class or not.

# %%

valid = moco.queue_index >= 0  # (K,) keys whose image we know
key_feats = moco.queue[:, valid].t().cpu()  # (K_valid, C), unit norm
key_index = moco.queue_index[valid].cpu()  # (K_valid,)
key_labels = train_y[key_index]  # (K_valid,)
z_final = snaps[epochs[-1]]["z"]  # (NUM_EVAL, C)
queries = [int((eval_y == c).nonzero()[0]) for c in eval_y.unique()[:GALLERY_QUERIES]]
fig, axes = plt.subplots(2 * len(queries), 1 + GALLERY_K, figsize=(1.6 * (1 + GALLERY_K), 3.4 * len(queries)))
axes = np.asarray(axes).reshape(2 * len(queries), 1 + GALLERY_K)
for i, qi in enumerate(queries):
    nb = nearest_and_hardest(z_final[qi], key_feats, key_labels, eval_y[qi], k=GALLERY_K)
    plot_neighbours(eval_x[qi], train_x[key_index[nb.nearest]], nb.nearest_sims,
                    train_x[key_index[nb.hardest]], nb.hardest_sims,
                    neighbour_titles=[classes[int(key_labels[j])] for j in nb.nearest],
                    hardest_titles=[classes[int(key_labels[j])] for j in nb.hardest],
                    query_title=f"query: {classes[int(eval_y[qi])]}", axes=axes[2 * i:2 * i + 2])
fig.savefig(out / "nearest_and_hardest.png", dpi=100, bbox_inches="tight")

sims_all = z_final @ key_feats.t()  # (NUM_EVAL, K_valid)
top1_same = float((key_labels[sims_all.argmax(1)] == eval_y).float().mean())
same_class_share = float((key_labels[None, :] == eval_y[:, None]).float().mean())
print(f"for {100 * top1_same:.1f} % of the {len(eval_x)} test queries, the most similar key in the queue "
      f"has the query's class; {100 * same_class_share:.1f} % of all queued keys share a query's class")

# %% [markdown]
# Notice the similarity values (under each image): when the hardest negatives are about as similar
# to the query as its nearest same-class keys, the classes are not yet separated in the embedding.
# Notice also the second printed number: about 1/L of the queued keys (L classes) have the query's
# class. MoCo pushes those away too; these *false negatives* are what notebook 10's clustering-aware and
# debiased losses try to handle.

# %%
metrics = {
    "dataset": DATASET,
    "epochs": EPOCHS,
    "snapshot_epochs": epochs,
    "alignment_history": [round(v, 4) for v in align_hist],
    "uniformity_history": [round(v, 4) for v in unif_hist],
    "pos_sim_history": [round(v, 4) for v in pos_mean],
    "neg_sim_history": [round(v, 4) for v in neg_mean],
    "pos_sim_mean": round(pos_mean[-1], 4),
    "neg_sim_mean": round(neg_mean[-1], 4),
    "collapse_std": round(collapse_moco[-1], 5),
    "collapse_std_history": [round(v, 5) for v in collapse_moco],
    "collapse_std_no_negatives": round(collapse_nn[-1], 5),
    "collapse_std_no_negatives_history": [round(v, 5) for v in collapse_nn],
    "uniformity_no_negatives": round(snaps_nn[epochs[-1]]["uniformity"], 4),
    "collapse_std_spread_reference": round(1 / math.sqrt(DIM), 5),
    "knn_acc": round(history["knn_acc"][-1], 2),
    "knn_acc_no_negatives": round(history_nn["knn_acc"][-1], 2),
    "final_loss": round(history["loss"][-1], 4),
    "queue_top1_same_class": round(top1_same, 4),
    "queue_same_class_share": round(same_class_share, 4),
    "embedding_method": embed_methods[-1],
    "device": str(device),
    "seconds": round(time.perf_counter() - t_start, 1),
    "cpu_seconds": round(time.process_time(), 1),
}
(out / "metrics.json").write_text(json.dumps(metrics, indent=2))
print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=1))
print(f"notebook ran in {metrics['seconds']:.0f} s wall-clock, {metrics['cpu_seconds']:.0f} s of CPU time "
      f"over {torch.get_num_threads()} threads (wall ≈ CPU / threads on an otherwise idle machine)")

# %% [markdown]
# ## Summary
#
# * Positive and negative **similarities** start together (a random network maps everything close
#   together) and move apart as MoCo trains; their gap is what the InfoNCE loss rewards.
# * **Alignment** and **uniformity** make the two halves of the loss measurable: training gives up a
#   little alignment for a lot of uniformity.
# * The **embedding** pictures (UMAP) show classes gathering without labels, but read them beside an
#   accuracy, not instead of one.
# * Without negatives the loss is minimised by features that stay bunched together: the **collapse
#   indicator** stays far below MoCo's. Negatives (or BYOL/SimSiam's predictor) are what prevent it.
# * The queue's **hardest negatives** show what the model still confuses, and same-class keys in the
#   queue are negatives too.
#
# ## Exercises
#
# 1. Set `T = 0.5` and rerun. How do the similarity histograms and uniformity change? (Notebook 02
#    explains why a higher temperature weighs hard negatives less.)
# 2. Build the `NoNegatives` model with `m=0` (the key encoder is the query encoder, without gradient).
#    Does it collapse faster or slower than with m = 0.99?
# 3. Compute alignment and uniformity for a run with `K = 16`. Which of the two suffers from a small
#    queue?
