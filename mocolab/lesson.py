"""What every notebook does around its lesson: setup, its headline effects, and its metrics file.

A notebook starts with ``lesson = Lesson("05_momentum_encoder", OUTPUT_DIR, seed=SEED, device=DEVICE)``
(clock, output folder, device, seed), loads its data with :meth:`Lesson.load`, and ends with
``lesson.finish(metrics)``, which adds the sizes and run time, judges the notebook's headline effects
(:data:`EFFECTS`) against the test-set noise band, prints one line per effect and writes
``OUTPUT_DIR/metrics.json``. The tour page and the lesson-effect tests read the same verdicts.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .datasets import load_images
from .device import get_device, seed_everything
from .evaluate import accuracy_noise

__all__ = ["Lesson", "Effect", "EFFECTS", "AT_SCALE", "judge_effects", "check_parameters"]


@dataclass(frozen=True)
class Effect:
    """One headline claim of a notebook, checked on its metrics.

    ``check(metrics)`` returns ``(holds, detail, values)``: ``detail`` is one sentence that names the two
    quantities, their units and the margin the claim needs, e.g. ``"MoCo kNN 54.6 % vs random init 21.1 %:
    +33.5 points, beyond the noise band of ±4.4 points"``; ``values`` holds the same numbers by name.
    """

    claim: str
    check: Callable[[dict], tuple[bool, str, dict]]


def _get(metrics: dict, key):
    """``metrics[key]``, or ``metrics[k0][k1]`` for a tuple key (sweeps are stored as dicts)."""
    if isinstance(key, tuple):
        value = metrics
        for k in key:
            value = value[k]
        return value
    return metrics[key]


def _signed(value: float, spec: str) -> str:
    """``+3.5`` or ``−3.5`` (a true minus sign)."""
    return format(value, "+" + spec).replace("-", "−")


def _amount(value: float, unit: str) -> str:
    """A measured value with its unit: ``54.6 %`` (accuracies), ``2.56 MB`` (bytes), ``0.82``, ``5,000``."""
    if unit == "%":
        return f"{value:.1f} %"
    if unit == "bytes":
        return f"{value / 1e6:.3g} MB"
    text = f"{int(value):,}" if float(value).is_integer() else f"{value:.3g}"
    return f"{text} {unit}" if unit else text


def _change(value: float, unit: str, signed: bool = True) -> str:
    """A difference with its unit: ``+33.5 points`` (of accuracy), ``+2.04 MB``, ``+0.52``."""
    spec, suffix = ".3g", f" {unit}" if unit else ""
    if unit == "%":
        spec, suffix = ".1f", " points"
    elif unit == "bytes":
        value, suffix = value / 1e6, " MB"
    return (_signed(value, spec) if signed else format(value, spec)) + suffix


def _against_band(left: str, right: str, diff: float, band: float) -> tuple[bool, str]:
    """``"<left> vs <right>: +33.5 points, beyond the noise band of ±4.4 points"``; holds when diff > band."""
    where = "beyond" if diff > band else "inside" if diff >= -band else "the other way, beyond"
    return diff > band, f"{left} vs {right}: {_change(diff, '%')}, {where} the noise band of ±{band:.1f} points"


def beats(a, b, claim: str, *, names: tuple[str, str]) -> Effect:
    """Accuracy ``a`` (%) is above accuracy ``b`` by more than two standard errors of their difference.

    ``names`` are the two accuracies as the verdict names them, e.g. ``("MoCo kNN", "random init")``.
    """

    def check(m):
        va, vb = float(_get(m, a)), float(_get(m, b))
        band = accuracy_noise(vb, int(m["num_test"]))
        holds, detail = _against_band(f"{names[0]} {va:.1f} %", f"{names[1]} {vb:.1f} %", va - vb, band)
        return holds, detail, {names[0]: va, names[1]: vb, "noise band": band}

    return Effect(claim, check)


def _margin_words(holds: bool, strict: bool, need: float, unit: str) -> str:
    """How a difference stands against the margin a claim needs: ``"at least the 5.0 points required"``."""
    if need:
        needed = f"the {_change(need, unit, signed=False)} required"
        return f"{'more than' if strict else 'at least'} {needed}" if holds else f"short of {needed}"
    if strict:
        return "above zero, as required" if holds else "not above zero, which is required"
    return "zero or above, as required" if holds else "below zero, which is not allowed"


def at_least(a, b=None, *, offset: float = 0.0, claim: str, strict: bool = False, names: tuple[str, ...],
             unit: str = "") -> Effect:
    """``a >= b + offset`` (``b`` a key, or None for the constant ``offset``); ``>`` if strict.

    ``names`` name ``a`` (and ``b``); ``unit`` is ``"%"`` (accuracies, differences in points), ``"bytes"``,
    ``""`` or a word.
    """

    def check(m):
        va = float(_get(m, a))
        vb = float(_get(m, b)) if b is not None else 0.0
        holds = va > vb + offset if strict else va >= vb + offset
        if b is None:
            verdict = ("more than" if strict else "at least") if holds else ("not more than" if strict else "below")
            return holds, f"{names[0]} {_amount(va, unit)}, {verdict} the {_amount(offset, unit)} required", \
                {names[0]: va, "required": offset}
        sides = f"{names[0]} {_amount(va, unit)} vs {names[1]} {_amount(vb, unit)}"
        detail = f"{sides}: {_change(va - vb, unit)}, {_margin_words(holds, strict, offset, unit)}"
        return holds, detail, {names[0]: va, names[1]: vb, "required difference": offset}

    return Effect(claim, check)


def at_most(a, b, *, scale: float = 1.0, claim: str, names: tuple[str, str], unit: str = "") -> Effect:
    """``a <= scale * b``; the verdict gives ``a`` as a multiple of ``b``."""

    def check(m):
        va, vb = float(_get(m, a)), float(_get(m, b))
        holds = va <= scale * vb
        ratio = va / vb if vb else math.inf
        detail = (f"{names[0]} {_amount(va, unit)} vs {names[1]} {_amount(vb, unit)}: {ratio:.2g} times as much, "
                  f"{'within' if holds else 'above'} the {scale:g} times allowed")
        return holds, detail, {names[0]: va, names[1]: vb, "allowed ratio": scale}

    return Effect(claim, check)


def within(a, b, *, rel: float, claim: str, names: tuple[str, str], unit: str = "") -> Effect:
    """``|a − b| <= rel·|b|``."""

    def check(m):
        va, vb = float(_get(m, a)), float(_get(m, b))
        holds = abs(va - vb) <= rel * abs(vb)
        off = 100 * (va - vb) / vb if vb else math.inf
        detail = (f"{names[0]} {_amount(va, unit)} vs {names[1]} {_amount(vb, unit)}: {_signed(off, '.1f')} %, "
                  f"{'inside' if holds else 'outside'} the ±{100 * rel:g} % allowed")
        return holds, detail, {names[0]: va, names[1]: vb, "allowed relative difference": rel}

    return Effect(claim, check)


def _sorted_sweep(sweep: dict) -> list[tuple[float, float]]:
    return sorted((float(k), float(v)) for k, v in sweep.items())


def best_inside(key: str, claim: str, *, x: str) -> Effect:
    """The best value of a sweep ``{x: accuracy}`` lies strictly inside the swept range (``x`` names it)."""

    def check(m):
        pts = _sorted_sweep(m[key])
        best = max(range(len(pts)), key=lambda i: pts[i][1])
        holds = 0 < best < len(pts) - 1
        swept = ", ".join(f"{p[0]:g}" for p in pts)
        detail = (f"kNN best at {x} = {pts[best][0]:g} ({pts[best][1]:.1f} %) of {x} = {swept}: "
                  f"{'inside' if holds else 'at an end of'} the swept range")
        return holds, detail, {f"best {x}": pts[best][0], "best kNN": pts[best][1]}

    return Effect(claim, check)


def largest_beats_smallest(key: str, claim: str, *, x: str) -> Effect:
    """In a sweep ``{x: accuracy}``, the largest x beats the smallest beyond the band (``x`` names it)."""

    def check(m):
        pts = _sorted_sweep(m[key])
        (x0, v0), (x1, v1) = pts[0], pts[-1]
        band = accuracy_noise(v0, int(m["num_test"]))
        holds, detail = _against_band(f"kNN {v1:.1f} % at {x} = {x1:g}", f"{v0:.1f} % at {x} = {x0:g}", v1 - v0, band)
        return holds, detail, {f"kNN at {x} = {x1:g}": v1, f"kNN at {x} = {x0:g}": v0, "noise band": band}

    return Effect(claim, check)


def keys_below(key: str, limit: str, claim: str, *, x: str, limit_name: str) -> Effect:
    """Every swept value of ``metrics[key]`` is below ``metrics[limit]`` (``x`` and ``limit_name`` name them)."""

    def check(m):
        top, bound = max(float(k) for k in m[key]), float(m[limit])
        holds = top < bound
        detail = f"largest {x} = {top:g}, {'below' if holds else 'not below'} the {_amount(bound, '')} {limit_name}"
        return holds, detail, {f"largest {x}": top, limit_name: bound}

    return Effect(claim, check)


#: The headline effects of each notebook, keyed by its two-digit number.
EFFECTS: dict[str, tuple[Effect, ...]] = {
    "01": (beats("infonce_knn_acc", "margin_knn_acc", "InfoNCE beats the margin loss (kNN)",
                 names=("InfoNCE kNN", "margin-loss kNN")),),
    "02": (
        within("init_loss", "ln_k_plus_1", rel=0.05, claim="the loss starts at ln(K+1)",
               names=("loss at init", "ln(K+1)")),
        best_inside("temperature_sweep", "the best temperature lies inside the swept range", x="T"),
        largest_beats_smallest("negatives_sweep", "the largest K beats the smallest (kNN)", x="K"),
        keys_below("negatives_sweep", "num_train", "every K is below the number of training images", x="K",
                   limit_name="training images"),
    ),
    "03": (
        beats("softmax_knn_acc", "random_init_knn_acc", "the memory bank learns (softmax vs random init)",
              names=("memory-bank kNN", "random init")),
        beats("moco_knn_acc", "softmax_knn_acc", "MoCo beats the bank at the same budget (kNN)",
              names=("MoCo kNN", "memory bank")),
        at_least("bank_bytes", "queue_bytes", strict=True, claim="the bank takes more memory than the queue",
                 names=("memory bank", "queue"), unit="bytes"),
    ),
    "04": (
        beats("knn_acc_m099", "knn_acc_m0", "m = 0.99 beats m = 0 (kNN)", names=("kNN at m = 0.99", "at m = 0")),
        at_least("key_identification_m099", "key_identification_m0", strict=True,
                 claim="m = 0.99 identifies its keys better than m = 0",
                 names=("keys identified at m = 0.99", "at m = 0"), unit="%"),
    ),
    "05": (
        at_least("total_steps", offset=300, claim="at least three time constants of m = 0.99 (300 steps)",
                 names=("training steps",)),
        beats(("momentum_sweep", "0.99", "knn_acc"), ("momentum_sweep", "0", "knn_acc"), "m = 0.99 beats m = 0 (kNN)",
              names=("kNN at m = 0.99", "at m = 0")),
    ),
    "06": (
        at_least("pretext_acc_no_shuffle", "pretext_acc_shuffle", offset=5.0,
                 claim="without the shuffle the pretext task is cheated (≥ 5 points)",
                 names=("pretext accuracy without the shuffle", "with it"), unit="%"),
    ),
    "07": (beats("knn_acc", "random_init_knn_acc", "MoCo beats its random init (kNN)",
                 names=("MoCo kNN", "random init")),),
    "08": (
        beats("knn_acc", "random_init_knn_acc", "MoCo beats random init (kNN)", names=("MoCo kNN", "random init")),
        beats("linear_acc", "random_init_linear_acc", "MoCo beats random init (linear probe)",
              names=("MoCo linear probe", "random init")),
        beats("transfer_knn_acc", "transfer_random_init_knn_acc",
              "after transfer to a second domain, MoCo beats random init (kNN)",
              names=("MoCo kNN after transfer", "random init")),
    ),
    "09": (
        at_least("pos_sim_mean", "neg_sim_mean", offset=0.2, claim="positives are ≥ 0.2 more similar than negatives",
                 names=("mean positive cosine", "mean negative cosine")),
        at_most("collapse_std_no_negatives", "collapse_std", scale=0.5,
                claim="without negatives the features never spread (std below half of MoCo's)",
                names=("feature std without negatives", "with them")),
        beats("knn_acc", "knn_acc_no_negatives", "negatives matter (kNN)",
              names=("kNN with negatives", "without")),
    ),
    "10": (
        beats("cmc_knn_acc", "cmc_random_init_knn_acc", "CMC beats its random init (kNN)",
              names=("CMC kNN", "its random init")),
        beats("crd_student_knn_acc", "student_random_init_knn_acc", "the CRD student beats its random init (kNN)",
              names=("CRD student kNN", "its random init")),
        beats("debiased_knn_acc_at_debiased_t", "debiased_knn_acc",
              "the debiased loss learns more at its paper's T = 0.5 than at T = 0.1 (kNN)",
              names=("debiased kNN at T = 0.5", "at T = 0.1")),
    ),
}


#: Claims a notebook measures but says need more scale than a laptop (with the published figure and the command
#: that runs them at scale). They are judged and recorded (``at_scale_effects`` in ``metrics.json``) but are not
#: headline effects: the notebook does not claim them at its default size.
AT_SCALE: dict[str, tuple[Effect, ...]] = {
    "10": (
        at_most("false_negative_rate_after", "false_negative_rate_before", scale=0.75,
                claim="clustering removes a quarter of the false negatives",
                names=("false-negative rate after clustering", "before")),
        beats("debiased_knn_acc_at_debiased_t", "moco_knn_acc_at_debiased_t",
              "the debiased loss beats MoCo at the same temperature (kNN, T = 0.5)",
              names=("debiased kNN at T = 0.5", "MoCo at T = 0.5")),
    ),
}


def judge_effects(name: str, metrics: dict, table: dict[str, tuple[Effect, ...]] | None = None) -> list[dict]:
    """The verdicts on notebook ``name``'s headline effects: a list of ``{claim, holds, detail, values}``.

    ``name`` is the notebook's name or number ("05_momentum_encoder" or "05"). A key missing from
    ``metrics`` gives ``holds = False`` with the missing key as detail. ``table`` judges another table of
    claims instead (:data:`AT_SCALE`).
    """
    out = []
    for effect in (EFFECTS if table is None else table).get(str(name)[:2], ()):
        try:
            holds, detail, values = effect.check(metrics)
        except (KeyError, TypeError, ValueError) as err:
            holds, detail, values = False, f"not measured ({err!r})", {}
        values = {k: round(float(v), 4) for k, v in values.items()}
        out.append({"claim": effect.claim, "holds": bool(holds), "detail": detail, "values": values})
    return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int_or_none(value) -> bool:
    return value is None or (_is_int(value) and value >= 1)


def _rule(name: str):
    """``(check, what is allowed)`` for a notebook parameter, from its name."""
    from .augment import BatchAugment

    if name.startswith("NUM_") or "_NUM_" in name:
        return _positive_int_or_none, "a positive integer (a number of images), or None for all"
    if name == "IMAGE_SIZE":
        return (lambda v: v is None or (_is_int(v) and v >= 8)), "an integer >= 8 (pixels per side), or None"
    if name == "AUGMENTATION":
        return (lambda v: v in BatchAugment.PRESETS), f"one of {', '.join(map(repr, BatchAugment.PRESETS))}"
    if name in ("EPOCHS", "BATCH_SIZE", "K", "BN_SPLITS", "WIDTH", "DIM"):
        return (lambda v: _is_int(v) and v >= 1), "a positive integer"
    if name in ("KNN_EVERY", "SEED"):
        return (lambda v: _is_int(v) and v >= 0), "an integer >= 0"
    if name == "T":
        return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)), \
            "a finite number > 0"
    raise TypeError(f"check_parameters has no rule for a parameter called {name!r}")


def check_parameters(**params) -> None:
    """Check a notebook's parameters before anything runs; the error names the parameter the learner set.

    Rules follow the names: ``NUM_*`` a positive integer or None; ``IMAGE_SIZE`` an integer >= 8 or None;
    ``AUGMENTATION`` a :class:`~mocolab.augment.BatchAugment` preset; ``EPOCHS``, ``BATCH_SIZE``, ``K``,
    ``BN_SPLITS``, ``WIDTH``, ``DIM`` positive integers; ``KNN_EVERY``, ``SEED`` integers >= 0;
    ``T`` a finite number > 0.

    Example: ``check_parameters(NUM_IMAGES=NUM_IMAGES, AUGMENTATION=AUGMENTATION)``.

    Raises:
        ValueError: "notebook parameter NUM_IMAGES = 0: expected a positive integer ...".
    """
    for name, value in params.items():
        check, allowed = _rule(name)
        if not check(value):
            raise ValueError(f"notebook parameter {name} = {value!r}: expected {allowed}")


#: The notebook parameters behind the arguments of :meth:`Lesson.load` (a notebook may name them otherwise).
LOAD_PARAMETERS = {"dataset": "DATASET", "num_train": "NUM_TRAIN", "num_test": "NUM_TEST", "image_size": "IMAGE_SIZE"}


class Lesson:
    """Setup and bookkeeping of one notebook run.

    Args:
        name: the notebook's name, e.g. ``"05_momentum_encoder"`` (its first two characters pick
            its :data:`EFFECTS`).
        output_dir: where figures and ``metrics.json`` go (created).
        seed: seeds Python, NumPy and PyTorch.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ... (see :func:`~mocolab.device.get_device`).

    Attributes:
        out (Path), device (torch.device), seed (int), num_train / num_test (set by :meth:`load`).
    """

    def __init__(self, name: str, output_dir: str | Path, *, seed: int = 0, device: str = "auto"):
        self.name, self.seed = name, int(seed)
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()
        self.out = Path(output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = get_device(device)
        seed_everything(self.seed)
        self.num_train: int | None = None
        self.num_test: int | None = None

    @property
    def seconds(self) -> float:
        """Wall-clock seconds since the lesson started."""
        return time.perf_counter() - self._t0

    def load(self, dataset: str, num_train: int | None, num_test: int | None, image_size: int | None = None, *,
             names: dict[str, str] | None = None):
        """``x_train, y_train, x_test, y_test, classes`` (uint8 images) of ``dataset``; records the sizes.

        The arguments are checked first; an error names the notebook parameter behind the argument
        (``NUM_TRAIN``, ``NUM_TEST``, ``IMAGE_SIZE``, ``DATASET``, or what ``names`` maps the argument to,
        e.g. ``names={"num_train": "NUM_IMAGES"}``).

        Raises:
            ValueError / FileNotFoundError: a bad size, or a dataset that is unknown or missing.
        """
        names = {**LOAD_PARAMETERS, **(names or {})}
        check_parameters(**{names["num_train"]: num_train, names["num_test"]: num_test})
        if not (image_size is None or (_is_int(image_size) and image_size >= 8)):
            raise ValueError(f"notebook parameter {names['image_size']} = {image_size!r}: expected an integer >= 8 "
                             f"(pixels per side), or None")
        try:
            x_train, y_train, classes = load_images(dataset, "train", limit=num_train, seed=self.seed,
                                                    image_size=image_size)
            x_test, y_test, _ = load_images(dataset, "test", limit=num_test, seed=self.seed, image_size=image_size)
        except (ValueError, FileNotFoundError) as err:
            hint = f" (set {names['image_size']})" if "different sizes" in str(err) else ""
            raise type(err)(f"notebook parameter {names['dataset']} = {dataset!r}: {err}{hint}") from None
        self.num_train, self.num_test = len(x_train), len(x_test)
        print(f"{dataset}: {self.num_train} train / {self.num_test} test images of {tuple(x_train.shape[1:])}")
        return x_train, y_train, x_test, y_test, classes

    def finish(self, metrics: dict, verbose: bool = True) -> dict:
        """Add sizes, seed, device and run time to ``metrics``, judge the effects, write ``metrics.json``.

        Returns the completed metrics (``headline_effects`` holds the verdicts).

        Raises:
            ValueError: ``num_train`` / ``num_test`` neither in ``metrics`` nor set by :meth:`load`.
        """
        metrics = dict(metrics)
        for key in ("num_train", "num_test"):
            if key not in metrics:
                if getattr(self, key) is None:
                    raise ValueError(f"metrics need {key!r} (the sizes behind the accuracies); pass it or call load()")
                metrics[key] = getattr(self, key)
        metrics.setdefault("seed", self.seed)
        metrics.setdefault("device", str(self.device))
        metrics["seconds"] = round(self.seconds, 1)
        metrics["cpu_seconds"] = round(time.process_time() - self._cpu0, 1)
        metrics["headline_effects"] = judge_effects(self.name, metrics)
        at_scale = judge_effects(self.name, metrics, AT_SCALE)
        if at_scale:
            metrics["at_scale_effects"] = at_scale
        text = json.dumps(metrics, indent=2, default=_plain)
        (self.out / "metrics.json").write_text(text)
        if verbose:
            for e in metrics["headline_effects"]:
                print(f"[{'holds' if e['holds'] else 'does not hold'}] {e['claim']}: {e['detail']}")
            for e in metrics.get("at_scale_effects", []):
                print(f"[needs more scale; {'holds' if e['holds'] else 'does not hold'} here] {e['claim']}: "
                      f"{e['detail']}")
            print(f"wrote {self.out / 'metrics.json'}; notebook ran in {metrics['seconds']:.0f} s")
        return metrics


def _plain(x):
    """JSON for tensors and NumPy scalars."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
