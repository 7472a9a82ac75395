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
# # 02 · From the N-pair loss to InfoNCE: many negatives, one softmax, a temperature
#
# **Goals.** By the end of this notebook you can
#
# - lay out the InfoNCE logits as MoCo does, positive in column 0, and answer *why the labels are all zeros*;
# - show that Sohn's N-pair loss (2016) **is** a cross-entropy over `[l_pos, l_neg]` (temperature 1);
# - predict the loss of a model that has learnt nothing yet, and measure it;
# - feel the temperature `T` with a slider, and read a lower bound on the mutual information of the two views
#   off a training run, knowing when it holds and how loose it is;
# - measure how the temperature and the number of negatives K change what a MoCo run of a few hundred
#   steps learns.
#
# **Prerequisites.** Notebook 01 (pairs and the margin, InfoNCE with in-batch negatives).
#
# **Run time.** About a minute and a half at the default size on a quiet 2-core CPU (no GPU, no download);
# several times longer on a machine shared with other jobs. The wall-clock time of your run is printed at
# the end.

# %% tags=["parameters"]
SEED = 0                # seeds the data order, the augmentations and the weights
DEVICE = "auto"         # "auto" (CUDA > MPS > CPU), "cpu", "cuda"
DATASET = "shapes"      # the bundled synthetic dataset; "cifar10", "stl10" or an ImageFolder path also work
NUM_TRAIN = 2048        # training images (also the kNN bank); every queue size K stays below it
NUM_TEST = 1000         # test images (the kNN queries)
WIDTH = 16              # ConvNet width w (channels w, 2w, 4w, 8w)
DIM = 128               # C, the feature dimension of q and k
K = 1024                # queue size (number of negatives) of the main run
T = 0.2                 # temperature of the main run
M = 0.99                # momentum of the key encoder: a time constant 1/(1 − M) of 100 steps
EPOCHS = 20             # epochs of the main run: 20 × 2048 / 64, or 640 steps, 6.4 time constants
BATCH_SIZE = 64         # N, images per step
LR = 0.06               # SGD learning rate (constant)
SWEEP_EPOCHS = 20       # epochs of each run in the two sweeps (the main run is reused when equal)
TEMPERATURES = [0.05, 0.2, 0.5]  # T values of the temperature sweep (at queue size K)
QUEUE_SIZES = [4, 64, 1024]      # K values of the negatives sweep (at temperature T); each from 1 to NUM_TRAIN − 1
OUTPUT_DIR = "runs/02_npair_and_infonce"  # figures and metrics.json go here

# %% [markdown]
# ## Setup
#
# `mocolab.Lesson` starts the clock, makes the output folder, picks the device and seeds everything;
# `lesson.load` returns the images. Labels are used only by the kNN evaluation.

# %%
from functools import partial

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import mocolab
from mocolab.exercises import wrap_losses
from mocolab.train import TrainConfig, fit

lesson = mocolab.Lesson("02_npair_and_infonce", OUTPUT_DIR, seed=SEED, device=DEVICE)
out, device = lesson.out, lesson.device
x_train, y_train, x_test, y_test, classes = lesson.load(DATASET, NUM_TRAIN, NUM_TEST)
augment = mocolab.BatchAugment(image_size=x_train.shape[-1], preset="v2")
encoder_fn = partial(mocolab.ConvNet, width=WIDTH)
for K_run in {K, *QUEUE_SIZES}:
    if not 1 <= K_run < len(x_train):
        raise ValueError(f"queue size {K_run} must be at least 1 and below the {len(x_train)} training images "
                         f"(a larger queue holds each image's own older key)")

# %% [markdown]
# ## The logits, and why the labels are all zeros
#
# A query `q` (N, C), its positive key `k` (N, C) (the other view of the same image) and K negatives, the
# columns of `queue` (C, K). All unit vectors, so a dot product is a cosine similarity. Each query n gets one
# row of 1 + K scores, divided by the temperature T:
#
# - column 0: its **positive** logit, `q_n · k_n`;
# - columns 1 … K: its **negative** logits, `q_n · queue[:, j]` for each of the K keys in the queue;
#
# so the logits are (N, 1+K). The loss is a (1+K)-way classification, "which of the 1+K candidates is my
# positive?", scored by the cross-entropy of a softmax over the row. Because we **put** the positive in
# column 0 for every row, the correct class is 0 for every query: the labels are all zeros. (In notebook 01
# the positives sat on the diagonal of an N × N matrix, so the labels were `arange(N)`.)

# %% [markdown]
# ### Your turn: the chance loss
#
# Before anything is trained, predict the loss. If the features carry no information, no candidate of a row
# looks more like the positive than any other. Write `chance_loss(K)`: the loss above, in nats, for one
# positive and K negatives that all look alike. This is your prediction for a model that has learnt nothing
# yet; the notebook measures such a model further down and sets the measurement beside it.

# %%
from mocolab import exercises


def chance_loss(K):
    """The InfoNCE loss when the positive and the K negatives are indistinguishable."""
    raise NotImplementedError  # your code here


chance_loss = exercises.check("chance_loss", chance_loss)
print(f"chance loss for the queue of this notebook, K = {K}: {chance_loss(K):.3f} nats")

# %% [markdown]
# ### Your turn: InfoNCE from the encoder outputs
#
# Write `infonce(q, k, queue, T)` returning `(logits, labels, loss)`: the logits laid out as above, the
# labels, and the loss averaged over the N queries. Here `q` and `k` (N, C) come straight from the encoders
# and are **not yet unit length**; `queue` (C, K) holds unit keys as its columns. The logits must be cosine
# similarities divided by T exactly once, and the loss must carry gradients back into `q`: it is what
# training minimises.
#
# The checker compares your function with `mocolab.infonce_logits` on several N, C, K and T, and on
# uninformative features, where the loss must equal the chance loss. Once it passes, your `infonce` computes
# the logits of every MoCo model in this notebook: the loss at initialisation, the training run and the two
# sweeps. Until then the notebook uses the library's version (reference solution:
# `notebooks/solutions/solutions.py`).

# %%
def infonce(q, k, queue, T):
    """(logits (N, 1+K), labels (N,), loss) with the positive at index 0; q and k are not yet normalised."""
    raise NotImplementedError  # your code here


infonce = exercises.check("infonce", infonce)

# %% [markdown]
# Your `infonce` on a small batch: four queries, each with a positive key close to it, and a queue of six
# random unit keys.

# %%
exercises.announce("infonce", infonce, "this cell")
g = torch.Generator().manual_seed(SEED)
N, C, K_demo = 4, 8, 6
q = F.normalize(torch.randn(N, C, generator=g), dim=1)  # (N, C)
k = F.normalize(q + 0.5 * torch.randn(N, C, generator=g), dim=1)  # (N, C): close to q
queue = F.normalize(torch.randn(C, K_demo, generator=g), dim=0)  # (C, K)

logits, labels, loss = infonce(q, k, queue, T)
print("logits (N, 1+K) =", tuple(logits.shape), " labels =", labels.tolist())
print("positive logit of each row:", [round(v, 2) for v in logits[:, 0].tolist()],
      " largest negative logit:", [round(v, 2) for v in logits[:, 1:].max(dim=1).values.tolist()])
print(f"InfoNCE loss: {loss.item():.4f}")

# %% [markdown]
# ## The N-pair loss is a softmax cross-entropy
#
# Sohn (2016) writes the loss of an anchor `f` with positive `f⁺` and negatives `fᵢ` as
#
# `log(1 + Σᵢ exp(fᵀfᵢ − fᵀf⁺))`
#
# Multiply inside the log by `exp(fᵀf⁺)` and it becomes `−log[exp(fᵀf⁺) / (exp(fᵀf⁺) + Σᵢ exp(fᵀfᵢ))]`:
# a cross-entropy over `[l_pos, l_neg]` with the positive at index 0 and **T = 1**. Sohn's embeddings are
# **not** normalised (the paper keeps their norms small with an L2 penalty instead); the identity holds for
# any vectors, and we check it on the unit vectors above.
#
# Where the other pieces come from: van den Oord et al. (2018, CPC) named the loss InfoNCE, with a
# *bilinear* score `zᵀ W c` between the two sides; the form MoCo uses, **cosine similarity of unit vectors
# divided by a temperature T**, comes from Wu et al. (2018, instance discrimination with a memory bank,
# notebook 03). We check the identity numerically on the small batch above: `mocolab.npair_loss` with
# per-query negatives `(N, K, C)`, Sohn's form written out one anchor at a time, and your `infonce` at T = 1.

# %%
negatives = queue.t().unsqueeze(0).expand(N, K_demo, C)  # (N, K, C): the same K negatives for every query
npair = mocolab.npair_loss(q, k, negatives)
logits_t1, _, loss_t1 = infonce(q, k, queue, 1.0)  # your InfoNCE at T = 1
l_pos, l_neg = logits_t1[:, :1], logits_t1[:, 1:]  # (N, 1), (N, K)
naive = torch.stack([torch.log1p(torch.exp(l_neg[i] - l_pos[i]).sum()) for i in range(N)]).mean()  # Sohn's form
torch.testing.assert_close(npair, naive)
torch.testing.assert_close(npair, loss_t1)
print(f"N-pair loss = Sohn's form = infonce at T = 1: {npair.item():.4f}")

# %% [markdown]
# ## The temperature, interactively
#
# `p = softmax(logits)` with `logits = [l_pos, l_neg] / T`. A small T sharpens the softmax: the loss then
# concentrates on the few negatives most similar to the query (the *hard* ones); a large T spreads the
# probability and every negative counts about equally. Move the slider: the bars are the probabilities
# of one query's 1 + K candidates (the positive in green), below them the entropy and the loss.

# %%
import mocolab.widgets

mocolab.widgets.temperature_explorer(T=0.1, K=16)

# %% [markdown]
# Notice that at a very large T the loss tends to `ln(K+1)` whatever the similarities are (all candidates
# look alike), and at a very small T it is decided by the single largest negative.

# %% [markdown]
# ### Your turn: predict, then check with a slider
#
# The explorer above shows one query's 1 + 16 similarities: the positive at 0.6, the negatives between
# −0.58 and 0.33. **Before you move a slider**, guess the temperature at which the softmax puts exactly half
# of its mass on the positive, and write it into `my_prediction`. Then run the cell and move the slider
# until the line under it says ✓: it compares the value you found with your guess. (Without a live kernel,
# as in the tour, the cell prints the answer instead.)

# %%
my_prediction = None  # your guess for T, e.g. 0.3

exercises.half_mass_temperature(my_prediction, K=16, seed=0)

# %% [markdown]
# ## The loss at initialisation, measured
#
# If the features carry no information about which candidate is the positive, every one of the 1 + K
# candidates gets probability `1/(K+1)` and `L = −log(1/(K+1)) = ln(K+1)`: the chance loss. For **identical**
# features (all similarities equal) your `infonce` must give exactly your `chance_loss`; we check that first.
# Then we measure the loss of a random-init MoCo model (`mocolab.MoCo`, ConvNet encoder, its logits made by
# your `infonce` once it passes) whose queue we fill with real keys from its own random key encoder, as it
# would hold after the first K/N steps, and set it beside your prediction.
#
# One detail about the queue: the official MoCo starts it with *random unit vectors*, which are far from
# every real feature, so the loss at step 0 is much lower than ln(K+1) and rises while the queue fills with
# real keys (the MoCo CIFAR-10 demo's log shows this rise; see `docs/published_figures.md`). Filling it first
# makes `ln(K+1) − L` meaningful from the first step.

# %%
same = F.normalize(torch.ones(N, C), dim=1)
_, _, same_loss = infonce(same, same, same[:1].t().expand(C, K_demo).contiguous(), T)
torch.testing.assert_close(same_loss, torch.tensor(chance_loss(K_demo), dtype=same_loss.dtype))
print(f"identical features, K = {K_demo}: infonce loss {same_loss.item():.4f} = chance_loss {chance_loss(K_demo):.4f}")


@torch.no_grad()
def fill_queue(model, generator, view_generator):
    """Fill the whole queue with keys of augmented training images from the current key encoder."""
    was_training = model.training
    model.train()
    for _ in range(0, model.queue.shape[1], BATCH_SIZE):
        idx = torch.randint(0, len(x_train), (BATCH_SIZE,), generator=generator)
        model.enqueue(model._keys(augment(x_train[idx].to(device), generator=view_generator)))
    model.train(was_training)


def make_moco(T, K, seed=SEED):
    """A MoCo model whose logits come from `infonce`, with its queue filled (`wrap_losses.moco`)."""
    mocolab.seed_everything(seed)
    model = wrap_losses.moco(infonce, encoder_fn, dim=DIM, K=K, m=M, T=T).to(device)
    fill_queue(model, torch.Generator().manual_seed(seed), torch.Generator(device=device).manual_seed(seed))
    return model


exercises.announce("infonce", infonce, "every MoCo model of this notebook")
model = make_moco(T, K)
with torch.no_grad():
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(SEED))[:BATCH_SIZE]
    views_gen = torch.Generator(device=device).manual_seed(SEED + 1)
    batch = x_train[idx].to(device)
    im_q, im_k = augment(batch, generator=views_gen), augment(batch, generator=views_gen)
    k_init = model._keys(im_k)  # (N, C), unit length
    q_raw = model.encoder_q(im_q)  # (N, C), as the encoder returns it
    init_loss = infonce(q_raw, k_init, model.negatives(), T)[2].item()
    q_init = F.normalize(q_raw, dim=1)  # (N, C)
    stats = mocolab.similarity_stats(q_init, k_init, model.negatives())
ln_k_plus_1 = chance_loss(K)
print(f"K = {K}, T = {T}: your prediction, the chance loss ln(K+1) = {ln_k_plus_1:.3f}; "
      f"loss of the random-init model = {init_loss:.3f} ({100 * (init_loss - ln_k_plus_1) / ln_k_plus_1:+.1f} %)")
print(f"mean cosine with the positive {stats['pos_mean']:.3f}, with the negatives {stats['neg_mean']:.3f}")
assert abs(init_loss - ln_k_plus_1) < 1.0, "the loss at initialisation should be within 1 nat of ln(K+1)"

# %% [markdown]
# The printed deviation from `ln(K+1)` is the measurement; the printed similarities say where a deviation
# comes from: even a random ConvNet maps two views of one image to somewhat closer features than two
# different images (they share most pixels), which lowers the loss a little below `ln(K+1)`.

# %% [markdown]
# ## Training, and the bound on the mutual information
#
# For InfoNCE with K negatives, van den Oord et al. (2018) show `I(q; k) ≥ ln(K+1) − L`: the lower the
# loss, the more information the two views' features share. Two conditions come with it:
#
# - it holds when the K negatives are drawn **independently from the marginal** distribution of keys, that
#   is, unrelated to the query. A queue of recent keys of random images comes close to that, but not exactly
#   (its keys come from older versions of the key encoder, and some show the query's own class);
# - it is **loose**: since `L ≥ 0`, it can certify at most `ln(K+1)` nats whatever the encoder, so whenever
#   the views share more information than that, the bound says little about how much more.
#
# Below we train the MoCo model above for `EPOCHS` epochs with `fit` and plot `ln(K+1) − L` for every step
# (`step_loss`), with the kNN accuracy during training.

# %%
config = TrainConfig(epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, seed=SEED, schedule="constant",
                     knn_every=max(1, EPOCHS // 5))
eval_data = (x_train, y_train, x_test, y_test)
init_knn_acc = mocolab.evaluate_knn(model.encoder_q, *eval_data)  # the same model before training
hist = fit(model, x_train, augment, config, eval_data=eval_data, device=device, desc=f"MoCo T={T} K={K}")
bound = [ln_k_plus_1 - loss for loss in hist["step_loss"]]
knn_main = hist["knn_acc"][-1]
print(f"loss {hist['step_loss'][0]:.3f} -> {hist['step_loss'][-1]:.3f}; bound {bound[0]:.3f} -> {bound[-1]:.3f} nats "
      f"(ceiling ln(K+1) = {ln_k_plus_1:.3f}); kNN {hist['knn_acc']} %")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
axes[0].plot(bound, label="ln(K+1) − L (per step)")
axes[0].axhline(ln_k_plus_1, color="grey", linestyle=":", label="ceiling ln(K+1)")
axes[0].axhline(0, color="black", linewidth=0.5)
axes[0].set_xlabel("step"), axes[0].set_ylabel("nats"), axes[0].legend(fontsize="small")
axes[0].set_title("InfoNCE lower bound on I(q; k)")
axes[1].plot([0] + hist["knn_epoch"], [init_knn_acc] + hist["knn_acc"], marker="o")
axes[1].xaxis.get_major_locator().set_params(integer=True)
axes[1].axhline(100 / len(classes), color="grey", linestyle=":", label="chance")
axes[1].set_xlabel("epoch (0: before training)"), axes[1].set_ylabel("kNN accuracy (%)"), axes[1].legend()
for ax in axes:
    ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(out / "bound.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# Notice where the bound starts (near 0, since the loss starts close to ln(K+1)) and how much of the
# dotted ceiling it reaches in the printed last value: the views' features share at least that many nats
# under the conditions above. The bound is a statement about the pretext task; the kNN panel shows what the
# same training bought for recognising shapes.

# %% [markdown]
# ## Sweeping the temperature
#
# Runs of `SWEEP_EPOCHS` epochs each that differ only in T, at queue size K, each starting from the same
# initial weights. The measure is the kNN accuracy after the run.
#
# For comparison, MoCo v2 (Chen et al. 2020; `docs/published_figures.md`) reports ImageNet linear-probe
# top-1 of a ResNet-50 after 200 epochs for several T. Their *linear head* row (like our encoder's single
# `fc`) is drawn in its own panel; it comes from a different dataset, network, training length and
# evaluation (linear probe vs kNN), so compare the **shape** of the curves, not the levels.

# %%
runs = {(T, K): knn_main} if SWEEP_EPOCHS == EPOCHS else {}


def sweep_run(T_run, K_run):
    if (T_run, K_run) not in runs:
        m_run = make_moco(T_run, K_run)
        h = fit(m_run, x_train, augment, TrainConfig(epochs=SWEEP_EPOCHS, batch_size=BATCH_SIZE, lr=LR, knn_every=0,
                                                      seed=SEED, schedule="constant"), eval_data=eval_data, device=device,
                desc=f"T={T_run} K={K_run}", verbose=False)
        runs[(T_run, K_run)] = h["knn_acc"][-1]
    return runs[(T_run, K_run)]


temperature_sweep = {t: sweep_run(t, K) for t in TEMPERATURES}
print("kNN accuracy (%) by temperature:", temperature_sweep)

moco_v2_linear_head = {0.07: 60.6, 0.1: 60.7, 0.2: 59.0, 0.3: 58.2, 0.4: 57.2, 0.5: 56.4}
fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
mocolab.plot_sweep(temperature_sweep, "temperature T", "kNN accuracy (%)", ax=ax[0], categorical=True,
                   label=f"this notebook ({DATASET}, ConvNet, {SWEEP_EPOCHS} ep, kNN)",
                   title=f"measured, K = {K}")
ax[0].axhline(init_knn_acc, color="grey", linestyle=":", label="before training")
ax[0].legend(fontsize="small", frameon=False)
mocolab.plot_sweep(moco_v2_linear_head, "temperature T", "ImageNet linear top-1 (%)", ax=ax[1], categorical=True,
                   label="MoCo v2 paper, linear head (R50, 200 ep)", title="published (not measured here)")
fig.tight_layout()
fig.savefig(out / "temperature_sweep.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# The two panels have different y-axes on purpose: kNN accuracy on `shapes` and ImageNet linear-probe
# accuracy are not on one scale. Notice that both curves fall on either side of a best temperature: too
# small a T lets the few most similar negatives decide the loss, too large a T treats all negatives alike.
# In the paper the linear-head model is best at small T (0.07 to 0.1); below, each temperature is compared
# with the best one against the test-set noise band.

# %%
best_T = max(temperature_sweep, key=temperature_sweep.get)
print(f"best T in this run: {best_T} ({temperature_sweep[best_T]:.1f} %); "
      f"the same encoder before training: {init_knn_acc:.1f} %")
for t, acc in temperature_sweep.items():
    if t != best_T:
        print(mocolab.compare_accuracies(f"T = {t}", acc, f"T = {best_T}", temperature_sweep[best_T], len(y_test)))

# %% [markdown]
# ## Sweeping the number of negatives K
#
# Now T is fixed and the queue size changes. A larger K means more negatives in every softmax (a higher
# ceiling `ln(K+1)` and a finer-grained task), at the cost of older keys in the queue. Here the queue is
# filled before training, so every K starts with real keys. A queue smaller than a batch keeps the last K
# keys of each batch, so the sweep can start from a handful of negatives, close to Sohn's N-pair setting;
# and every K stays below the number of training images, because a longer queue would hold an older key of
# the query's own image among its negatives.
#
# Before you run it, predict the shape of the curve: does every additional negative help?

# %%
negatives_sweep = {K_run: sweep_run(T, K_run) for K_run in QUEUE_SIZES}
print("kNN accuracy (%) by queue size K:", negatives_sweep)
fig = mocolab.plot_sweep(negatives_sweep, "queue size K (negatives per query)", "kNN accuracy (%)", xscale="log",
                         label=f"this notebook ({SWEEP_EPOCHS} ep, T = {T})", title="number of negatives")
fig.axes[0].axhline(init_knn_acc, color="grey", linestyle=":", label="before training")
fig.axes[0].legend(fontsize="small", frameon=False)
fig.savefig(out / "negatives_sweep.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# Notice the shape of the curve. From a handful of negatives to a few dozen, the accuracy climbs steeply:
# with 4 negatives, telling the positive apart takes little more than the grey level or the background,
# so the encoder learns little else. Further up, on `shapes`, the curve can bend down again: the verdicts
# below set the largest queue against the smallest and, when it is not the best, against the best one, with
# the test-set noise band. One known reason is **class collisions** (Arora et al. 2019; Ash et al. 2022):
# `shapes` has only ten classes, so about a tenth of any queue shows the query's own shape, and the more
# negatives a softmax sees, the more surely its *hardest* negative, the one that dominates the gradient at
# a small T, is such an image. The cell after the verdicts measures this on the main run's encoder. The
# MoCo paper (ImageNet's 1000 classes, ResNet-50, linear probe; its Figure 3, summarised in
# `docs/published_figures.md`) finds accuracy rising with K for all three ways of getting negatives, up to
# 60.6 % for MoCo at K = 65536; that is a scale this lesson does not reach, and on a GPU the CIFAR-10 recipe
# compares two queue sizes with runs that differ only in K:
# `mocolab pretrain --preset cifar10-colab --download --K 256 --out runs/c10_k256` and
# `mocolab pretrain --preset cifar10-colab --download --K 4096 --out runs/c10_k4096`.

# %%
K_small, K_large = min(negatives_sweep), max(negatives_sweep)
K_best = max(negatives_sweep, key=negatives_sweep.get)
print(mocolab.compare_accuracies(f"K = {K_large}", negatives_sweep[K_large], f"K = {K_small}",
                                 negatives_sweep[K_small], len(y_test)))
if K_best != K_large:
    print(mocolab.compare_accuracies(f"K = {K_large}", negatives_sweep[K_large], f"K = {K_best}",
                                     negatives_sweep[K_best], len(y_test)))

# %% [markdown]
# **Class collisions, measured.** For every test image as a query, draw K training images at random as its
# negatives and look at the hardest one (the highest cosine similarity), with the features of the main
# run's encoder. The share of queries whose hardest negative has the query's own class:

# %%
features_train = mocolab.evaluate.extract_features(model.encoder_q, x_train, device=device)  # (M, C), unit
features_test = mocolab.evaluate.extract_features(model.encoder_q, x_test, device=device)  # (Q, C), unit
similarity = features_test @ features_train.t()  # (Q, M) cosine similarities
collision_generator = torch.Generator().manual_seed(SEED)
hardest_negative_same_class = {}
for K_run in QUEUE_SIZES:
    negatives_idx = torch.stack([torch.randperm(len(x_train), generator=collision_generator)[:K_run]
                                 for _ in range(len(x_test))])  # (Q, K): K distinct training images per query
    sims = similarity.gather(1, negatives_idx)  # (Q, K)
    hardest = negatives_idx.gather(1, sims.argmax(dim=1, keepdim=True)).squeeze(1)  # (Q,)
    hardest_negative_same_class[K_run] = 100 * (y_train[hardest] == y_test).float().mean().item()
print("hardest negative has the query's class (%), by K:",
      {k: round(v, 1) for k, v in hardest_negative_same_class.items()}, f"(one random negative: {100 / len(classes):.0f} %)")

# %% [markdown]
# Notice how the share grows with K, far above the share of a single random negative printed beside it.
# With a large queue on a ten-class dataset, the negative that the loss pushes hardest is often an image of
# the query's own shape: more negatives buy a finer task and, here, more false negatives too. Notebook 10 tries
# to remove them.

# %%
metrics = lesson.finish({
    "init_loss": init_loss,
    "ln_k_plus_1": ln_k_plus_1,
    "K": K,
    "init_pos_mean": stats["pos_mean"],
    "init_neg_mean": stats["neg_mean"],
    "init_knn_acc": init_knn_acc,
    "main_knn_acc": knn_main,
    "main_knn_curve": hist["knn_acc"],
    "bound_first": bound[0],
    "bound_last": bound[-1],
    "bound_max": max(bound),
    "temperature_sweep": {str(t): v for t, v in temperature_sweep.items()},
    "negatives_sweep": {str(k): v for k, v in negatives_sweep.items()},
    "hardest_negative_same_class": hardest_negative_same_class,
    "sweep_epochs": SWEEP_EPOCHS,
    "sweep_steps": SWEEP_EPOCHS * (len(x_train) // BATCH_SIZE),
})

# %% [markdown]
# ## Summary
#
# - InfoNCE is a (1+K)-way cross-entropy; with the positive placed in column 0 the labels are all zeros.
# - The N-pair loss is the same cross-entropy with T = 1 on unnormalised embeddings; MoCo's form, cosine
#   similarities of unit vectors divided by a temperature T, comes from Wu et al. (2018).
# - With uninformative features the loss is the chance loss `ln(K+1)`; the random-init model measured here
#   starts close to it (the first verdict printed above gives the gap and the tolerance).
# - `ln(K+1) − L` lower-bounds the mutual information between the views' features when the negatives are
#   drawn from the marginal; it is loose, and can never certify more than `ln(K+1)` nats.
# - The temperature decides how much the hardest negatives dominate: at the default size the best of the
#   swept temperatures lies inside the range.
# - More negatives help, up to a point: the largest K beats the smallest beyond the noise band, but in the
#   default run the accuracy rose from the smallest K to the middle one and fell again at the largest, where
#   the hardest negative more often shares the query's class (the verdicts printed above, `headline_effects`
#   in `metrics.json`). The MoCo paper's ImageNet runs, with a thousand classes, keep rising with K.
# - The next notebook asks where the K negatives should come from when they cannot all be computed fresh: a
#   memory bank.
#
# ## Exercises
#
# 1. Start the queue with random unit vectors (skip `fill_queue`) and train for one epoch. Plot the loss per
#    step: why does it rise at first? (Compare with the MoCo CIFAR-10 log in `docs/published_figures.md`.)
# 2. Run the temperature sweep with `mlp=True` in `make_moco` (MoCo v2's MLP head). Does the best T move
#    towards 0.2, as in the paper's MLP-head row?
# 3. Show that `∂L/∂l_neg[j] = p_j / T`: compute the gradient of `F.cross_entropy(logits, labels)` with
#    respect to `l_neg` with autograd and compare. Which negatives get the largest gradient at small T?
