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
# # 05 · The momentum encoder
#
# **Goals.** Notebook 04 showed that a queue filled by a fast-changing encoder
# (m = 0) holds keys that disagree with each other. MoCo's fix is one line: the
# key encoder follows the query encoder as an exponential moving average,
#
# θk ← m·θk + (1 − m)·θq,
#
# with m close to 1. In this notebook you will
#
# 1. play with an EMA following a moving target (the momentum explorer);
# 2. sweep m ∈ {0, 0.9, 0.99, 0.999} at the same training budget and measure,
#    for each m, the key consistency of the queue and the kNN accuracy;
# 3. set the result beside the MoCo paper's ablation, and relate the momentum
#    encoder to the target networks of deep Q-learning and to Polyak averaging.
#
# On the way you write the momentum update yourself; once it passes its check,
# the sweep runs on it.
#
# **Prerequisites.** 04 (the queue, key consistency and `KeyConsistencyProbe`).
#
# **Run time.** About 75 seconds on a quiet 2-core CPU at the default size
# (four trainings of 496 steps, five time constants of m = 0.99); several times
# longer on a busy machine. No download.

# %% tags=["parameters"]
SEED = 0  # seeds the weights, the batch order and the augmentations
DEVICE = "auto"  # "auto" (CUDA > MPS > CPU), "cpu", "cuda", "mps"
DATASET = "shapes"  # the bundled synthetic dataset; "cifar10", "stl10" or an ImageFolder path also work
NUM_TRAIN = 2000  # training images (also the bank of the kNN monitor)
NUM_TEST = 1000  # test images (the queries of the kNN monitor)
WIDTH = 16  # ConvNet width w (channels w, 2w, 4w, 8w)
DIM = 128  # C, the dimension of q and k
K = 512  # queue size
T = 0.1  # softmax temperature
MOMENTA = [0.0, 0.9, 0.99, 0.999]  # the values of m swept (the MoCo paper's ablation, without 0.9999)
EPOCHS = 16  # passes over the training images for each m (31 steps per epoch; the same budget for every m)
BATCH_SIZE = 64  # N, images per step
LR = 0.06  # SGD learning rate
LR_SCHEDULE = "constant"  # "constant": θq moves at the same pace to the end; "cosine" decays the rate to 0
OUTPUT_DIR = "runs/05_momentum_encoder"  # figures and metrics.json go here

# %% [markdown]
# ## Setup

# %%
import math
from functools import partial

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

import mocolab
from mocolab import (BatchAugment, ConvNet, KeyConsistencyProbe, Lesson, MoCo, accuracy_noise, compare_accuracies,
                     evaluate_knn)
from mocolab.momentum import ema_track
from mocolab.plotting import plot_sweep
from mocolab.train import TrainConfig, fit
from mocolab.widgets import momentum_explorer

lesson = Lesson("05_momentum_encoder", OUTPUT_DIR, seed=SEED, device=DEVICE)
out, device = lesson.out, lesson.device
x_train, y_train, x_test, y_test, classes = lesson.load(DATASET, NUM_TRAIN, NUM_TEST)
augment = BatchAugment(image_size=x_train.shape[-1]).to(device)
steps_per_epoch = len(x_train) // BATCH_SIZE
total_steps = steps_per_epoch * EPOCHS
print(f"{total_steps} steps per run ({steps_per_epoch} per epoch); the queue holds the keys of the last "
      f"K / N = {K / BATCH_SIZE:g} steps")

# %% [markdown]
# ## An exponential moving average
#
# Write the update as θk(t) = m·θk(t−1) + (1 − m)·θq(t). Unrolled, θk is a
# weighted average of past query encoders with weights (1 − m)·mᵃ for the
# encoder of `a` steps ago: the key encoder remembers about the last
# 1 / (1 − m) steps (its *time constant*) and moves (1 − m) of the way towards
# θq at every step. Two consequences pull in opposite directions:
#
# - **consistency**: the keys written over the last K / N steps come from
#   nearly the same encoder when 1 / (1 − m) is much longer than K / N;
# - **lag**: the key encoder trails the query encoder by about 1 / (1 − m)
#   steps, so with a very large m, and a short training, it hardly learns at all.
#
# Move the slider: m = 0 copies the target, m = 1 never moves, and in between the
# EMA smooths the target's random walk and lags behind it. (The explorer needs a
# live kernel; the numbers below are printed for a few m.)

# %%
momentum_explorer(m=0.99)

# %% [markdown]
# The same simulation without the slider, for the values of m swept below: the
# time constant, the mean distance between the EMA and its target (lag) and the
# mean distance the EMA moves per step (drift). Then, for the runs below, how each
# time constant compares with the span of the queue and with the whole run, and
# how much of the key encoder at the end of a run comes from the query encoders
# of the run rather than from its initial weights: 1 − mⁿ after n steps (the
# initial weights keep the share mⁿ of the average).

# %%
print(f"{'m':>6} {'time constant':>14} {'mean lag':>9} {'mean drift/step':>16}")
for m in MOMENTA:
    r = ema_track(m, steps=300, target="random_walk", seed=SEED)
    tau = "inf" if math.isinf(r["time_constant"]) else f"{r['time_constant']:.0f}"
    print(f"{m:>6g} {tau:>14} {r['lag']:>9.3f} {r['mean_drift']:>16.4f}")
span = K / BATCH_SIZE
print(f"\nthe runs below: n = {total_steps} steps each; the queue spans K / N = {span:g} steps")
print(f"{'m':>6} {'1 / (1 - m)':>12} {'x queue span':>13} {'x run length':>13} {'from θq: 1 - m^n':>17}")
for m in MOMENTA:
    tau = math.inf if m == 1 else 1 / (1 - m)
    print(f"{m:>6g} {tau:>12,.0f} {tau / span:>13.3g} {tau / total_steps:>13.3g} {1 - m ** total_steps:>16.0%}")

# %% [markdown]
# ### Your turn: the momentum update, in place
#
# Write `momentum_update(encoder_k, encoder_q, m)`: θk ← m·θk + (1 − m)·θq for every parameter, **in
# place** (update the existing tensors of `encoder_k`: no new tensor per parameter, and no gradient
# history), leaving `encoder_q` untouched. The checker compares the key encoder with
# `mocolab.momentum_update` for m = 0 (a copy), m = 1 (frozen) and values between, and names the usual
# slips: the momentum the wrong way round, θq updated instead of θk, a new tensor per parameter. Until it
# passes, the notebook uses the library's update (reference solution: `notebooks/solutions/solutions.py`).

# %%
from mocolab import exercises


def momentum_update(encoder_k, encoder_q, m):
    """In place, without gradients: θk ← m·θk + (1 − m)·θq over the parameters of the two encoders."""
    raise NotImplementedError  # your code here


momentum_update = exercises.check("momentum_update", momentum_update)

# %% [markdown]
# The drift per step is what makes the queue inconsistent; the lag is what the
# key encoder pays for it. Keep the second table in mind: a time constant
# comparable to the whole training means the key encoder stays close to its
# random initialisation for much of the run.
#
# ## Target networks and Polyak averaging
#
# MoCo is not the first to compute targets with a slowly moving copy of the
# network being trained:
#
# - **DQN** (Mnih et al., 2015) computes its regression targets
#   r + γ·maxₐ Q(s′, a; θ⁻) with a *target network* θ⁻ that is copied from the
#   online network only every C steps. A target that moves with every gradient
#   step chases itself and diverges; a frozen target makes each stretch of
#   training an ordinary regression. MoCo's queue plays the role of the targets,
#   and m = 0 is DQN without a target network.
# - **Polyak averaging** (Polyak & Juditsky, 1992) takes the *uniform* average
#   of the SGD iterates to reduce their noise. Its exponential version, an
#   average that forgets old iterates at rate 1 − m, is the soft update of DDPG
#   (Lillicrap et al., 2016), θ⁻ ← τ·θ + (1 − τ)·θ⁻ with τ = 0.001 (m = 0.999),
#   for its target networks. MoCo's key encoder is this exponential average of
#   the query encoder, and BYOL and DINO later kept it as their "teacher".
#
# ## The sweep
#
# One MoCo run per m, identical in everything else: initial weights, queue,
# batches, augmentations, learning rate (constant, as in notebook 04, so that
# the query encoder still moves when the queue is measured at the end) and
# number of steps. After every epoch
# `KeyConsistencyProbe` recomputes the keys of the whole queue with the current
# key encoder (the definition is in notebook 04: cosine between stored and
# recomputed keys, BN in training mode on each step's batch; plus the
# collapse-proof *identification* rate), and `fit` runs the kNN monitor. The
# encoder before training, the same for every m, is measured first.
#
# **Predict before you run it.** Rank the four values of m by the kNN accuracy
# they will reach, and by the key identification. Which m, if any, will end
# below the encoder it started from?

# %%
from mocolab.exercises.wrap_moco import your_moco


def make_moco(m: float) -> MoCo:
    """MoCo with key-encoder momentum m; its key encoder follows your momentum_update once that passes."""
    mocolab.seed_everything(SEED)  # every m starts from the same weights and queue
    return your_moco(partial(ConvNet, width=WIDTH), dim=DIM, K=K, m=m, T=T, momentum_update=momentum_update)


config = TrainConfig(epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, schedule=LR_SCHEDULE, seed=SEED)
eval_data = (x_train, y_train, x_test, y_test)
random_init_knn_acc = evaluate_knn(make_moco(MOMENTA[0]).encoder_q.to(device), *eval_data)
print(f"kNN of the encoder before training (every run starts from it): {random_init_knn_acc:.1f} %")
exercises.announce("momentum_update", momentum_update, "the sweep")
runs, last_by_age = {}, {}
for m in MOMENTA:
    model = make_moco(m)
    probe = KeyConsistencyProbe()
    runs[m] = h = fit(model, x_train, augment, config, eval_data=eval_data, device=device,
                      on_step=probe, on_epoch=probe.on_epoch, desc=f"m={m:g}", verbose=False)
    last_by_age[m] = probe.last["by_age"]
    assert not any(p.requires_grad for p in model.encoder_k.parameters())  # the key encoder only moves by EMA
    print(f"m = {m:<6g} loss {h['loss'][-1]:.2f}  pretext acc {h['pretext_acc'][-1]:5.1f}%  "
          f"kNN {h['knn_acc'][-1]:5.1f}%  consistency {h['key_consistency'][-1]:.4f}  "
          f"identification {h['key_identification'][-1]:5.1f}%  ({h['train_seconds']:.0f} s)")

# %% [markdown]
# ## kNN accuracy and key consistency against m
#
# The left panel shows the kNN accuracy measured here, with error bars of
# ± the noise band (two standard errors of a difference of two accuracies on
# `NUM_TEST` images). The MoCo paper's ablation (ImageNet, ResNet-50, K = 4096,
# linear top-1 after 200 epochs; `docs/published_figures.md`) is printed below
# the figure rather than drawn on the same axis: it measures something else.

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
knn_by_m = {m: runs[m]["knn_acc"][-1] for m in MOMENTA}
plot_sweep(knn_by_m, "momentum m", "kNN accuracy (%)", ax=axes[0], categorical=True,
           label=f"this notebook (kNN, {DATASET})", title="kNN accuracy after training")
axes[0].axhline(random_init_knn_acc, color="grey", linestyle=":", label="before training")
axes[0].legend(fontsize="small", frameon=False)
axes[0].errorbar(range(len(MOMENTA)), list(knn_by_m.values()), fmt="none", ecolor="grey", capsize=3,
                 yerr=[accuracy_noise(v, len(x_test)) for v in knn_by_m.values()])
plot_sweep({m: runs[m]["key_consistency"][-1] for m in MOMENTA}, "momentum m", "cos(stored k, recomputed k)",
           ax=axes[1], categorical=True, label="mean over the queue", title="key consistency")
plot_sweep({m: runs[m]["key_identification"][-1] for m in MOMENTA}, "momentum m", "identified (%)",
           ax=axes[2], categorical=True, label=f"own key is the nearest (chance {100 / K:.2g} %)",
           title="key identification")
fig.tight_layout()
fig.savefig(out / "momentum_sweep.png", dpi=100, bbox_inches="tight")
print("MoCo paper (ImageNet, ResNet-50, K = 4096, linear top-1): m = 0 fails, 0.9: 55.2 %, 0.99: 57.8 %, "
      "0.999: 59.0 %, 0.9999: 58.9 %")
for m, acc in knn_by_m.items():
    print(compare_accuracies(f"kNN, m = {m:g}", acc, "the encoder before training", random_init_knn_acc,
                             len(x_test)))

# %% [markdown]
# Notice the kNN panel first, against the dotted line: the encoder every run
# started from (the verdicts under the figure compare each m with it, against the
# noise band). m = 0 ends at or below its starting point: without averaging,
# training does not improve the features. m = 0.9 ends above it, m = 0.99 and
# 0.999 far above it. m = 0.999 has a time constant longer than this whole run (the second table
# near the top) and still learns: by the end of the run part of its key encoder
# comes from the run's query encoders (the table's last column), and a slowly
# moving target is enough to learn from.
# Then the identification panel: with m = 0 and m = 0.9, whose time constants
# are at most a little longer than the K / N steps the queue spans (the table's
# "x queue span" column), part of the recomputed keys no longer find their own
# stored key among the K, more of them with m = 0; with m ≥ 0.99 they do. The
# mean cosine in the middle stays close to 1 for every m: it is the weakest of
# the three measures (notebook 04 explains why).
#
# ## Consistency by age, for each m

# %%
fig, ax = plt.subplots(figsize=(6, 3.6))
for m in MOMENTA:
    ax.plot(range(len(last_by_age[m])), last_by_age[m], marker="o", label=f"m = {m:g}")
ax.set_xlabel("age of the key in the queue (steps)")
ax.set_ylabel("cos(stored k, recomputed k)")
ax.legend(fontsize="small", frameon=False)
ax.grid(alpha=0.3)
fig.savefig(out / "consistency_by_age.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# Notice the slopes: with m = 0.99 and 0.999 the keys age far more slowly than
# with m = 0 and 0.9, whose curves lie close together (their time constants are
# both about as long as the queue). For m close to 1 the curve is nearly flat
# over the whole queue, because K / N steps are a small fraction of the time
# constant 1 / (1 − m).
#
# ## Curves per m

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for m in MOMENTA:
    h = runs[m]
    axes[0].plot(h["epoch"], h["loss"], marker="o", label=f"m = {m:g}")
    axes[1].plot([0, *h["knn_epoch"]], [random_init_knn_acc, *h["knn_acc"]], marker="o", label=f"m = {m:g}")
    axes[2].plot(h["epoch"], h["key_identification"], marker="o", label=f"m = {m:g}")
axes[0].axhline(math.log(K + 1), color="grey", linestyle="--", linewidth=1, label="ln(K + 1)")
for ax, title in zip(axes, ["loss", "kNN accuracy (%)", "key identification (%)"]):
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", frameon=False)
fig.tight_layout()
fig.savefig(out / "curves_per_m.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# Notice whether the ranking of the m values is settled or still changing at the
# last epoch: with a longer training, larger m usually catch up.

# %%
sweep = {
    f"{m:g}": {
        "knn_acc": runs[m]["knn_acc"][-1],
        "key_consistency": runs[m]["key_consistency"][-1],
        "key_identification": runs[m]["key_identification"][-1],
        "key_margin": runs[m]["key_margin"][-1],
        "loss": runs[m]["loss"][-1],
        "pretext_acc": runs[m]["pretext_acc"][-1],
        "knn_curve": runs[m]["knn_acc"],
        "consistency_by_age": last_by_age[m],
    }
    for m in MOMENTA
}
metrics = {
    "momentum_sweep": sweep,
    "total_steps": total_steps,
    "time_constants_m099": total_steps * (1 - 0.99),
    "epochs": EPOCHS,
    "random_init_knn_acc": random_init_knn_acc,
    "your_momentum_update": exercises.is_yours("momentum_update", momentum_update),  # whether the sweep ran on it
}
metrics = lesson.finish(metrics)

# %% [markdown]
# ## Summary
#
# The headline effects are judged above. Each m against m = 0, with the noise band:

# %%
ms = [f"{m:g}" for m in MOMENTA]
for m in ms[1:]:
    print(mocolab.compare_accuracies(f"kNN, m = {m}", sweep[m]["knn_acc"], "m = 0", sweep["0"]["knn_acc"], len(x_test)))
for key in ("key_identification", "key_consistency"):
    print(f"{key} for m = {', '.join(ms)}: {', '.join(f'{sweep[m][key]:.4g}' for m in ms)}")
print(f"{total_steps} steps per run: {total_steps * (1 - 0.99):.1f} time constants of m = 0.99, "
      f"{total_steps * (1 - 0.999):.2f} of m = 0.999")

# %% [markdown]
# - The momentum encoder is an exponential moving average of the query encoder.
#   Its time constant 1 / (1 − m) trades consistency of the queue (large m)
#   against how quickly the keys follow what the query encoder learns (small m).
# - m = 0 (no averaging) is the failure of notebook 04, measured again here:
#   it does not improve on its random initialisation, while m = 0.99 gains far
#   more than the noise band (the verdicts above).
#   A larger m averages over more steps, so the key encoder drifts less per step.
# - The time constant 1 / (1 − m) only means something against the length of
#   training and against the span of the queue, K / N steps (the table near the
#   top sets them side by side): at the defaults m = 0.9 barely outlasts the
#   queue, m = 0.99 and 0.999 outlast it many times over. The MoCo paper's 0.999
#   (1,000 steps) is short against its million or so steps; here it is longer
#   than the run, and the key encoder still moves far enough for the queries to
#   learn.
# - The same idea stabilises the targets of DQN (a periodically copied target
#   network) and DDPG (Polyak averaging), and reappears in BYOL and DINO.
#
# **Exercises.**
#
# 1. Add m = 0.9999 to `MOMENTA` (the paper: 58.9 %, `docs/published_figures.md`).
#    How many time constants of it does this notebook's run last?
# 2. Triple `EPOCHS` (three time constants of m = 0.999). Does m = 0.999 catch
#    up with m = 0.99?
# 3. Replace the constant m by MoCo v3 / BYOL's cosine schedule
#    (`MoCo(..., momentum_schedule="cosine")`, m rising to 1 over training) and
#    compare the consistency-by-age curves.
