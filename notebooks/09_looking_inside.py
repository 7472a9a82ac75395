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
# **Run time.** About 1 min 30 s at the default size on a quiet CPU with one thread, most of it two
# trainings of 640 steps on 2,048 images with a measurement after every epoch, the rest the UMAP fits
# (the first one compiles code); less with two threads, several times longer on a machine shared with
# other jobs. The metrics cell prints this run's wall-clock time.

# %% tags=["parameters"]
SEED = 0                  # seeds the weights, the data order, the augmentations and the fixed views
DEVICE = "auto"           # "auto" (CUDA > MPS > CPU), "cpu", "cuda", "mps"
DATASET = "shapes"        # "shapes" (bundled), "cifar10-small", "cifar10", "stl10" or an ImageFolder path
NUM_IMAGES = 2048         # training images
NUM_EVAL = 1000           # fixed test images: the embedding, uniformity, the collapse indicator, kNN queries
PROBE_BATCH = 256         # fixed training images whose two views give the positive/negative similarities
WIDTH = 16                # ConvNet width w (channels w, 2w, 4w, 8w)
DIM = 128                 # feature dimension C of the embedding
K = 512                   # queue size (below NUM_IMAGES, so no image is its own negative)
MOMENTUM = 0.99           # m of the key encoder
T = 0.1                   # InfoNCE temperature
EPOCHS = 20               # training epochs of each of the two runs (MoCo, no negatives): 640 steps each
BATCH_SIZE = 64           # images per step
LR = 0.06                 # SGD learning rate (cosine decay)
EMBEDDING_METHOD = "umap"  # "umap" (compiles on first use, ~20 s) or "pca" (instant, linear)
GALLERY_QUERIES = 3       # test images shown with their nearest keys and hardest negatives
GALLERY_K = 5             # keys per row of the gallery
OUTPUT_DIR = "runs/09_looking_inside"  # figures and metrics.json go here

# %% [markdown]
# ## Setup
#
# Labels are never used for training, only to colour plots, to score the kNN classifier and to
# say which keys share the query's class.

# %%
import math
from functools import partial

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from mocolab import (BatchAugment, ConvNet, Lesson, MoCo, alignment, collapse_std, compare_accuracies,
                     evaluate_knn, extract_features, similarity_stats, uniformity)
from mocolab.embedding import embed_2d
from mocolab.gallery import plot_embedding, plot_neighbours
from mocolab.metrics import nearest_and_hardest
from mocolab.plotting import save_figure
from mocolab.plotting import plot_similarity_histograms
from mocolab.train import TrainConfig, fit

lesson = Lesson("09_looking_inside", OUTPUT_DIR, seed=SEED, device=DEVICE)
out, device = lesson.out, lesson.device
train_x, train_y, eval_x, eval_y, classes = lesson.load(DATASET, NUM_IMAGES, NUM_EVAL,
                                                        names={"num_train": "NUM_IMAGES", "num_test": "NUM_EVAL"})
steps = EPOCHS * (len(train_x) // BATCH_SIZE)
print(f"{steps} steps per run, {steps * (1 - MOMENTUM):.1f} time constants 1/(1 − m) of the key encoder")

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
knn_random_init = evaluate_knn(moco.encoder_q, train_x, train_y, eval_x, eval_y)  # the untrained starting point
snaps, history = train_and_watch(moco, "MoCo")
epochs = sorted(snaps)
mid = epochs[len(epochs) // 2]
print(f"trained in {history['train_seconds']:.0f} s; loss {history['loss'][0]:.2f} → {history['loss'][-1]:.2f} "
      f"(ln(K+1) = {math.log(K + 1):.2f})")
print(compare_accuracies("kNN after training", history["knn_acc"][-1], "at initialisation", knn_random_init,
                         len(eval_y)))

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
# is the **gap** between the two, not either mean alone. The red histogram mixes two kinds of
# negatives: keys of other classes and keys of the query's own class; the gallery at the end counts how
# often the most similar key of all is one of the latter.

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
save_figure(fig, out / "alignment_uniformity.png", axes)
print(f"alignment {align_hist[0]:.3f} → {align_hist[-1]:.3f} ({align_hist[-1] - align_hist[0]:+.3f}), "
      f"uniformity {unif_hist[0]:.3f} → {unif_hist[-1]:.3f} ({unif_hist[-1] - unif_hist[0]:+.3f})")

# %% [markdown]
# Notice where a random network starts: almost perfectly "aligned" (every feature is nearly the
# same vector, so any two views agree) and with uniformity near 0 (nothing is spread out). The
# printed changes show the trade this run made: how much alignment it gave up for how much
# uniformity. The right-hand panel is the path through the plane; good representations end up low
# in both.
#
# ## A run with no negatives
#
# Why does MoCo need negatives at all? Remove them: keep the momentum key encoder and the queue
# (only to measure against), but let the loss pull q towards k and nothing else,
# L = E‖q − k‖² = 2 − 2·E[q·k]: BYOL without its predictor. Mapping every image to the same point
# makes this loss 0, and nothing in it pushes features apart.
#
# The collapse indicator is the std of the normalised features over the images, averaged over
# dimensions (`mocolab.metrics.collapse_std`): 0 when all features are one vector, about 1/√C when
# they spread over the sphere. We write the broken model as a 6-line subclass of `MoCo` that only
# changes the logits (no negatives: the positive column alone) and the loss:

# %%
class NoNegatives(MoCo):
    """MoCo without negatives: the loss only pulls q towards k (BYOL without its predictor)."""

    def contrast(self, q, k, negatives, index=None):
        return super().contrast(q, k, negatives[:, :0], index)  # (N, 1): the positive logit only

    def loss(self, logits, labels):
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
save_figure(fig, out / "collapse.png", axes)
print(f"collapse_std: at init {collapse_moco[0]:.4f}; after {EPOCHS} epochs MoCo {collapse_moco[-1]:.4f}, "
      f"no negatives {collapse_nn[-1]:.4f} (1/√C = {1 / math.sqrt(DIM):.4f})")
print(f"at initialisation the features spread {collapse_moco[0] * math.sqrt(DIM):.2f}× as much as 1/√C; "
      f"after training MoCo's spread {collapse_moco[-1] / max(collapse_nn[-1], 1e-12):.1f}× as much as "
      f"the no-negatives run's")
print(f"no-negatives loss {history_nn['loss'][0]:.3f} → {history_nn['loss'][-1]:.3f}")
print(compare_accuracies("kNN, MoCo", history["knn_acc"][-1], "no negatives", history_nn["knn_acc"][-1], len(eval_y)))
print(compare_accuracies("kNN, no negatives", history_nn["knn_acc"][-1], "initialisation", knn_random_init,
                         len(eval_y)))

# %% [markdown]
# Notice where the two runs start: at the same point (the same initial weights), far below 1/√C.
# A randomly initialised network maps all images into a narrow cone (its features share a large
# common component), so bunched-together features are where training *starts*; this run did not
# collapse from a spread state, it never left the bunch. MoCo's negatives push the features apart,
# towards 1/√C (the blue curve); without negatives nothing does: the no-negatives loss falls towards
# 0 while its collapse indicator stays near, or below, its value at initialisation, and its
# uniformity stays near 0. Its kNN accuracy is far below MoCo's (the first comparison printed); the
# second says how it compares with the untrained network. BYOL and SimSiam do without negatives, but
# they add a predictor network on the query side (with a stop-gradient on the key side), and their
# papers report that without the predictor the features collapse; MoCo gets the push apart from the
# queue.
#
# ## The embedding through training
#
# UMAP (McInnes et al. 2018) places the fixed test images in 2-D so that neighbours in the 128-d
# embedding of the MoCo run stay neighbours; colours are the classes, which MoCo never saw. One
# embedding is fitted per snapshot (the first fit compiles code; `EMBEDDING_METHOD = "pca"` skips that
# for a quick look). The pictures come after both trainings on purpose: once UMAP's compiled code has
# run in a process, PyTorch's CPU training in that process was measured to run several times slower
# on a 2-core CPU. For the exercises, which train again, restart the kernel or set
# `EMBEDDING_METHOD = "pca"`.

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
    "knn_acc_random_init": round(knn_random_init, 2),
    "knn_acc_no_negatives": round(history_nn["knn_acc"][-1], 2),
    "final_loss": round(history["loss"][-1], 4),
    "queue_top1_same_class": round(top1_same, 4),
    "queue_same_class_share": round(same_class_share, 4),
    "embedding_method": embed_methods[-1],
    "steps": steps,
}
metrics = lesson.finish(metrics)

# %% [markdown]
# ## Summary
#
# * At initialisation every pair of views is similar (a random network maps all images near one
#   direction), so a high q·k means nothing yet; once the queue holds real keys the negatives are
#   similar too, and training opens the **gap** between positive and negative similarities that the
#   InfoNCE loss rewards (its size at the end is the first verdict above).
# * **Alignment** and **uniformity** make the two halves of the loss measurable: training gives up some
#   of the random network's alignment for uniformity (the printed changes say how much of each).
# * The **embedding** pictures (UMAP) show classes gathering without labels, but read them beside an
#   accuracy, not instead of one.
# * Without negatives the loss is minimised by features that stay bunched together: the **collapse
#   indicator** stays below half of MoCo's, and the kNN accuracy far below (the second and third
#   verdicts). Negatives (or BYOL/SimSiam's predictor) are what spread the features.
# * The queue's **hardest negatives** show what the model still confuses, and same-class keys in the
#   queue are negatives too.
#
# ## Exercises
#
# 1. Set `T = 0.5` and rerun. How do the similarity histograms and uniformity change? (Notebook 02
#    explains why a higher temperature weighs hard negatives less.)
# 2. Build the `NoNegatives` model with `m=0` (the key encoder is the query encoder, without gradient).
#    Does its collapse indicator end lower or higher than with m = 0.99?
# 3. Compute alignment and uniformity for a run with `K = 16`. Which of the two suffers from a small
#    queue?
