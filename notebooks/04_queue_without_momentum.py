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
# # 04 · A queue without a momentum encoder
#
# **Goals.** Notebook 03 kept one stale feature per image in a memory bank. MoCo
# replaces the bank by a *queue*: the keys of the last few batches, used as the
# negatives of the current batch. Those keys were computed by the key encoders of
# the last `K / N` steps. Here we remove MoCo's second ingredient, the slowly
# moving key encoder, and watch what goes wrong:
#
# 1. with `m = 0` the key encoder is a copy of the query encoder at every step, so
#    the queue holds keys from `K / N` *different* encoders;
# 2. we measure how much those keys disagree with the current key encoder (the
#    *key consistency* of the queue), and
# 3. we train the same model with `m = 0` and with `m = 0.99` at the same budget
#    and compare the loss, the pretext accuracy and the kNN accuracy.
#
# On the way you write the queue's `enqueue` yourself; once it passes its check,
# both trainings run on it.
#
# **Prerequisites.** 02 (InfoNCE, the chance loss ln(K+1)) and 03 (a memory bank
# of stale features).
#
# **Run time.** About 45 seconds on a quiet 2-core CPU at the default size
# (two trainings of 620 steps, six time constants of m = 0.99); several times
# longer on a busy machine. No download.

# %% tags=["parameters"]
SEED = 0  # seeds the weights, the batch order and the augmentations
DEVICE = "auto"  # "auto" (CUDA > MPS > CPU), "cpu", "cuda", "mps"
DATASET = "shapes"  # the bundled synthetic dataset; "cifar10", "stl10" or an ImageFolder path also work
NUM_TRAIN = 2000  # training images (also the bank of the kNN monitor)
NUM_TEST = 1000  # test images (the queries of the kNN monitor)
WIDTH = 16  # ConvNet width w (channels w, 2w, 4w, 8w)
DIM = 128  # C, the dimension of q and k
K = 512  # queue size: the keys of the last K / BATCH_SIZE batches
T = 0.1  # softmax temperature
M_SLOW = 0.99  # the momentum compared with m = 0 (MoCo's CIFAR-10 demo uses 0.99)
EPOCHS = 20  # passes over the training images, for each of the two trainings (31 steps per epoch)
BATCH_SIZE = 64  # N, images per step
LR = 0.06  # SGD learning rate
LR_SCHEDULE = "constant"  # "constant": θq moves at the same pace to the end; "cosine" decays the rate to 0
OUTPUT_DIR = "runs/04_queue_without_momentum"  # figures and metrics.json go here

# %% [markdown]
# ## Setup
#
# The library provides everything: the encoder, MoCo, the batched augmentation,
# the training loop `fit` (with the kNN monitor of the MoCo CIFAR-10 demo) and
# `KeyConsistencyProbe`, which measures the queue while it trains.

# %%
import math
from functools import partial

import matplotlib.pyplot as plt
import torch

import mocolab
from mocolab import BatchAugment, ConvNet, KeyConsistencyProbe, Lesson, MoCo, compare_accuracies, evaluate_knn
from mocolab.plotting import plot_curves
from mocolab.train import TrainConfig, fit

lesson = Lesson("04_queue_without_momentum", OUTPUT_DIR, seed=SEED, device=DEVICE)
out, device = lesson.out, lesson.device
x_train, y_train, x_test, y_test, classes = lesson.load(DATASET, NUM_TRAIN, NUM_TEST)
augment = BatchAugment(image_size=x_train.shape[-1]).to(device)
total_steps = len(x_train) // BATCH_SIZE * EPOCHS
print(f"queue K = {K} keys = the keys of the last K / N = {K / BATCH_SIZE:g} batches of N = {BATCH_SIZE}; "
      f"chance loss ln(K + 1) = {math.log(K + 1):.2f}")
print(f"{total_steps} steps per run ({len(x_train) // BATCH_SIZE} per epoch); m = {M_SLOW:g} has a time constant "
      f"1 / (1 - m) = {1 / (1 - M_SLOW):.0f} steps, {total_steps * (1 - M_SLOW):.1f} of them per run")

# %% [markdown]
# ## The queue is a ring buffer
#
# MoCo's queue is a tensor of K columns, one key per column, and a pointer to the oldest one. Every step
# writes the N new keys over the N oldest, from the pointer on, and moves the pointer by N. When the batch
# runs past column K − 1 it continues at column 0: the columns are taken modulo K, so any K works, also
# one that N does not divide.
#
# ### Your turn: enqueue
#
# Write `enqueue(queue, ptr, keys)`: put key i (the rows of `keys`, (N, C)) into column `(ptr + i) % K` of
# `queue` (C, K), in place, and return the new pointer. The checker runs sequences of calls against
# `mocolab.KeyQueue` (K not divisible by N, N = K, N = 1, varying N) and names the usual slips: a pointer
# that does not wrap, is off by one, or jumps back to 0. Until it passes, the notebook uses the library's
# version (reference solution: `notebooks/solutions/solutions.py`).

# %%
from mocolab import exercises


def enqueue(queue, ptr, keys):
    """Write keys (N, C) into the columns of queue (C, K) from ptr on, wrapping around; return the new ptr."""
    raise NotImplementedError  # your code here


enqueue = exercises.check("enqueue", enqueue)

# %% [markdown]
# A queue of K = 5 one-number keys, filled by batches of N = 2, each batch's keys all equal to its number.
# Before you run the cell, predict: after the third batch, which columns hold a 3, and where is the pointer?

# %%
ring, ptr = torch.zeros(1, 5), 0
for batch in range(1, 5):
    ptr = enqueue(ring, ptr, torch.full((2, 1), float(batch)))
    print(f"after batch {batch}: queue {ring[0].int().tolist()}, pointer {ptr}")

# %% [markdown]
# ## m = 0: the key encoder is the query encoder
#
# MoCo updates the key encoder before it computes the keys of a batch:
#
# θk ← m·θk + (1 − m)·θq.
#
# With m = 0 this is a plain copy, θk = θq: the keys `k` come from the query
# encoder as it is now (without gradients). The queue, however, still holds the
# keys of the previous `K / N` batches, and each of those was written by the
# query encoder *of its own step*. SGD changes θq a little at every step, so the
# negatives in the queue are measured with `K / N` slightly different rulers.
#
# A cheap fact to check: after one forward pass of an `m = 0` model, the key
# encoder's weights equal the query encoder's, and the key encoder never gets
# gradients.

# %%
from mocolab.exercises.wrap_moco import your_moco


def make_moco(m: float) -> MoCo:
    """MoCo with key-encoder momentum m; its queue is written by your enqueue once that passes."""
    mocolab.seed_everything(SEED)  # both models start from the same weights and queue
    return your_moco(partial(ConvNet, width=WIDTH), dim=DIM, K=K, m=m, T=T, enqueue=enqueue)


demo = make_moco(0.0)
with torch.no_grad():
    demo.encoder_q.fc.weight.add_(0.01)  # pretend an SGD step moved θq
im = augment(x_train[:BATCH_SIZE].to(device))
demo.to(device)(im, im)
assert all(torch.equal(pk, pq) for pk, pq in zip(demo.encoder_k.parameters(), demo.encoder_q.parameters()))
assert not any(p.requires_grad for p in demo.encoder_k.parameters())
print("m = 0: after the update θk equals θq, and θk has no gradients")
del demo

# %% [markdown]
# ## Measuring key consistency
#
# For a key `k` written to the queue `a` steps ago from the view `x`, its
# consistency is the cosine between `k` and the key that the key encoder *now*
# computes for the same view `x`. `KeyConsistencyProbe` keeps the key views and
# their stored keys of the last `K / N` steps (the whole queue) and, at the end
# of every epoch, recomputes them. BatchNorm is part of the definition: each
# step's views are recomputed as one batch in training mode, exactly as when the
# keys were made, so a key encoder that did not move scores exactly 1.
#
# The mean cosine has a blind spot: if training *collapses* (every image gets
# the same key), stored and recomputed keys agree perfectly. So the probe also
# reports two measures relative to the other keys in the queue:
#
# - **identification**: the % of recomputed keys whose most similar stored key
#   is their own (chance: 100 / K);
# - **margin**: cos(own stored key) − mean cos(other stored keys), about 0 when
#   everything collapsed.

# %% [markdown]
# ## Training with m = 0 and with m = 0.99
#
# Both runs use the same initial weights, batches, augmentations, learning rate
# and number of steps; only m differs. `fit` records the loss, the pretext
# accuracy (how often the positive key gets the largest logit among the 1 + K
# candidates) and the kNN accuracy of the query encoder after every epoch.
#
# The learning rate is constant here (`LR_SCHEDULE`). With the usual cosine
# decay the rate reaches 0 at the end, the query encoder stops moving, and every
# queue looks consistent in the last epoch whatever m is: the measurement at the
# end would then say more about the schedule than about the momentum.
#
# The kNN accuracy of the encoder before training (the initial weights of both
# runs) is measured first: it is the starting point of the kNN curves.
#
# **Predict before you run it.** Which run ends with the higher kNN accuracy?
# Does the m = 0 run end above or below its starting point? And does its loss end
# above or below the chance loss ln(K + 1)?

# %%
config = TrainConfig(epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, schedule=LR_SCHEDULE, seed=SEED)
eval_data = (x_train, y_train, x_test, y_test)
random_init_knn_acc = evaluate_knn(make_moco(0.0).encoder_q.to(device), *eval_data)
print(f"kNN of the encoder before training (both runs start from it): {random_init_knn_acc:.1f} %")
exercises.announce("enqueue", enqueue, "each training")
runs, probes = {}, {}
for m in (0.0, M_SLOW):
    model = make_moco(m)
    probe = KeyConsistencyProbe()  # keeps ceil(K / N) steps: the whole queue
    runs[m] = fit(model, x_train, augment, config, eval_data=eval_data, device=device,
                  on_step=probe, on_epoch=probe.on_epoch, desc=f"m={m:g}", verbose=False)
    probes[m] = probe
    h = runs[m]
    print(f"m = {m:<5g} loss {h['loss'][-1]:.2f}  pretext acc {h['pretext_acc'][-1]:5.1f}%  "
          f"kNN {h['knn_acc'][-1]:5.1f}%  key consistency {h['key_consistency'][-1]:.3f}  "
          f"identification {h['key_identification'][-1]:5.1f}%  ({h['train_seconds']:.0f} s)")

# %% [markdown]
# ## Curves
#
# Each panel shows both runs per epoch; the kNN panel starts at epoch 0, the
# encoder before training. The dashed line in the loss panel is the
# chance loss ln(K + 1): the value of InfoNCE when the positive is no more
# similar to the query than the K negatives are.

# %%
keys = ["loss", "pretext_acc", "knn_acc", "key_consistency", "key_identification", "key_margin"]
fig, axes = plt.subplots(2, 3, figsize=(12, 6.2))
for h in runs.values():
    plot_curves({**h, "knn_epoch": [0, *h["knn_epoch"]], "knn_acc": [random_init_knn_acc, *h["knn_acc"]]}, keys,
                axes=axes.ravel())
axes[0, 0].axhline(math.log(K + 1), color="grey", linestyle="--", linewidth=1)
for ax in axes.ravel():
    ax.legend([f"m = {m:g}" for m in runs], fontsize="small", frameon=False)
fig.suptitle(f"MoCo with a queue of K = {K}: m = 0 against m = {M_SLOW:g}")
fig.tight_layout()
fig.savefig(out / "curves_m0_vs_momentum.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# Notice the kNN panel, against its epoch-0 point (the encoder before
# training): with m = 0.99 the accuracy climbs over the run, far above that
# point; with m = 0 it never climbs far above it and ends at or below it (the
# summary prints both against the noise band). Then look at the identification
# panel: with m = 0.99 a recomputed key still finds its own stored key among the
# K in the queue; with m = 0 it finds it far less often, because the stored keys
# were written by encoders that have since moved.
#
# ## The loss step by step
#
# The MoCo paper reports that with m = 0 "the training loss oscillates and fails
# to converge". Here is the loss of every step of both runs.

# %%
fig, ax = plt.subplots(figsize=(7, 3.4))
for m, h in runs.items():
    ax.plot(h["step_loss"], linewidth=0.8, label=f"m = {m:g}")
ax.axhline(math.log(K + 1), color="grey", linestyle="--", linewidth=1, label="ln(K + 1)")
ax.set_xlabel("step")
ax.set_ylabel("InfoNCE loss")
ax.legend(fontsize="small", frameon=False)
ax.grid(alpha=0.3)
fig.savefig(out / "step_loss.png", dpi=100, bbox_inches="tight")


def wiggle(losses, last=0.5):
    """Mean absolute change of the loss from one step to the next, over the last part of training."""
    tail = torch.tensor(losses[int(len(losses) * (1 - last)):])
    return float(tail.diff().abs().mean())


for m, h in runs.items():
    print(f"m = {m:<5g} step-to-step loss change (second half of training): {wiggle(h['step_loss']):.3f}")

# %% [markdown]
# Notice where each curve ends relative to ln(K + 1), and how much it jumps from
# one step to the next (the numbers printed under the plot).
#
# ## Consistency by age
#
# At the end of training, the probe compares every key in the queue with its
# recomputation, grouped by age: age 0 is the latest batch (written by the key
# encoder as it is now, so its cosine is 1), age `K / N − 1` the oldest.

# %%
fig, ax = plt.subplots(figsize=(6, 3.4))
for m, p in probes.items():
    ax.plot(range(len(p.last["by_age"])), p.last["by_age"], marker="o", label=f"m = {m:g}")
ax.set_xlabel("age of the key in the queue (steps)")
ax.set_ylabel("cos(stored k, recomputed k)")
ax.legend(fontsize="small", frameon=False)
ax.grid(alpha=0.3)
fig.savefig(out / "consistency_by_age.png", dpi=100, bbox_inches="tight")
for m, p in probes.items():
    ages = p.last["by_age"]
    print(f"m = {m:<5g} cosine at age 1: {ages[1]:.4f}, at the oldest age {len(ages) - 1}: {ages[-1]:.4f}")

# %% [markdown]
# Notice how fast each curve falls with age: the slope is how far the key encoder
# moves per step. With m = 0 it moves exactly as SGD moves the query encoder,
# noise of every single step included; with m = 0.99 it is an average of the
# query encoders of roughly the last 1 / (1 − m) = 100 steps, which smooths the
# step-to-step noise out (notebook 05 looks at this average closely). Where a
# curve stays at 1 for every age, check the identification panel above before
# calling the queue consistent: a collapsed encoder is perfectly "consistent".
#
# ## Against the published numbers
#
# | setting | m = 0 | m = 0.99 |
# |---|---|---|
# | MoCo paper, ImageNet, ResNet-50, K = 4096, linear top-1 | fails (loss oscillates) | 57.8 % |
#
# (He et al., *Momentum Contrast*, arXiv 1911.05722; `docs/published_figures.md`.)
# The paper's number is a linear probe after 200 epochs on ImageNet; this
# notebook measures kNN on the synthetic shapes after a few epochs, with a
# smaller queue (K and its chance loss are printed at the top) and a smaller
# encoder. Compare directions, not levels. The same
# comparison on real photos, with a queue well below the number of training
# images (`mocolab pretrain` refuses a queue that holds a stale key of each
# query's own image), is two commands:
#
# ```
# mocolab pretrain --data cifar10 --download --limit 5000 --K 1024 --m 0 --schedule constant --out runs/c10-m0
# mocolab pretrain --data cifar10 --download --limit 5000 --K 1024 --m 0.99 --schedule constant --out runs/c10-m099
# ```
#
# Each writes its kNN curve to `metrics.json` in its `--out` folder.

# %%
m0, m1 = runs[0.0], runs[M_SLOW]
metrics = {
    "key_consistency_m0": m0["key_consistency"][-1],
    "key_consistency_m099": m1["key_consistency"][-1],
    "key_identification_m0": m0["key_identification"][-1],
    "key_identification_m099": m1["key_identification"][-1],
    "key_margin_m0": m0["key_margin"][-1],
    "key_margin_m099": m1["key_margin"][-1],
    "knn_acc_m0": m0["knn_acc"][-1],
    "knn_acc_m099": m1["knn_acc"][-1],
    "loss_m0": m0["loss"],
    "loss_m099": m1["loss"],
    "pretext_acc_m0": m0["pretext_acc"][-1],
    "pretext_acc_m099": m1["pretext_acc"][-1],
    "random_init_knn_acc": random_init_knn_acc,
    "your_enqueue": exercises.is_yours("enqueue", enqueue),  # whether the trainings ran on your enqueue
    "knn_curve_m0": m0["knn_acc"],
    "knn_curve_m099": m1["knn_acc"],
    "consistency_by_age_m0": probes[0.0].last["by_age"],
    "consistency_by_age_m099": probes[M_SLOW].last["by_age"],
    "step_loss_wiggle_m0": wiggle(m0["step_loss"]),
    "step_loss_wiggle_m099": wiggle(m1["step_loss"]),
    "chance_loss": math.log(K + 1),
    "m_slow": M_SLOW,
    "epochs": EPOCHS,
    "total_steps": total_steps,
}
metrics = lesson.finish(metrics)

# %% [markdown]
# ## Summary
#
# The headline effects are judged above, against the test-set noise band. The
# other measurements of this run:

# %%
print(compare_accuracies(f"kNN, m = {M_SLOW:g}", metrics["knn_acc_m099"], "m = 0", metrics["knn_acc_m0"], len(x_test)))
for name, key in ((f"m = {M_SLOW:g}", "knn_acc_m099"), ("m = 0", "knn_acc_m0")):
    print(compare_accuracies(f"kNN, {name}", metrics[key], "the encoder before training", random_init_knn_acc,
                             len(x_test)))
print(f"pretext accuracy: {metrics['pretext_acc_m0']:.1f} % with m = 0, {metrics['pretext_acc_m099']:.1f} % with m = {M_SLOW:g}")
print(f"key identification: {metrics['key_identification_m0']:.1f} % with m = 0, "
      f"{metrics['key_identification_m099']:.1f} % with m = {M_SLOW:g} (chance {100 / K:.2g} %)")
print(f"key consistency (mean cosine): {metrics['key_consistency_m0']:.3f} with m = 0, "
      f"{metrics['key_consistency_m099']:.3f} with m = {M_SLOW:g}")
chance = math.log(K + 1)
for m, h in runs.items():
    gap = h["loss"][-1] - chance
    where = "within 0.3 of" if abs(gap) < 0.3 else ("below" if gap < 0 else "above")
    print(f"m = {m:g}: final loss {h['loss'][-1]:.2f}, {where} the chance loss ln(K+1) = {chance:.2f}")

# %% [markdown]
# - A queue decouples the number of negatives K from the batch size N, but its
#   keys come from the encoders of the last K / N steps. With m = 0 those
#   encoders are the query encoder at each of those steps, and every SGD step
#   moves it.
# - Key consistency measures the damage directly: recompute the stored keys with
#   today's key encoder and compare. Use a measure relative to the other keys
#   (identification, margin) as well as the raw cosine, which a collapsed
#   encoder fools.
# - The next notebook keeps the queue and slows the key encoder down with a
#   momentum m close to 1, and sweeps m.
#
# **Exercises.**
#
# 1. Make the queue smaller, `K = BATCH_SIZE` (one batch of keys, all written by
#    the previous step's encoder). Does m = 0 still fail? What does that say
#    about *which* keys cause the trouble?
# 2. Raise `LR` to 0.2 and lower it to 0.02 with m = 0. How do the consistency
#    by age and the kNN accuracy change? (The key encoder moves as fast as SGD
#    moves the query encoder.)
# 3. Set `M_SLOW = 0.9` (time constant 1 / (1 − m) = 10 steps, about as long as
#    the K / N steps that the queue spans: both are printed at the top) and
#    compare its consistency-by-age curve with m = 0.99.
