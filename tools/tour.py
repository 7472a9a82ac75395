#!/usr/bin/env python
"""Run every notebook with its default parameters and build ``runs/tour/index.html``.

For each ``notebooks/NN_name.ipynb`` the tour

1. executes it with papermill on a fresh kernel (cwd ``notebooks/``), with
   ``OUTPUT_DIR`` set to ``runs/tour/NN_name`` and every other parameter at
   its default (``-p NAME VALUE`` overrides one for all notebooks, e.g.
   ``-p DEVICE cuda``);
2. saves the executed notebook there and renders it to HTML;
3. collects the notebook's title (its first markdown heading), run time,
   its headline effects (the verdicts ``Lesson.finish`` stored in
   ``metrics.json`` under ``headline_effects``, else
   :func:`mocolab.lesson.judge_effects` on its metrics), the scalar entries of
   ``metrics.json`` and its figures (``*.png`` that the notebook saved in
   OUTPUT_DIR; if it saved none, the images of its outputs).

The terminal shows one line per notebook (name, ok / FAILED, run time and how
many of its headline effects hold); ``runs/tour/index.html`` shows one card per
notebook that opens with its effects. A notebook that fails is shown as
failed, with its error, and the tour exits with status 1 after running the
others.

Two details keep the log clean without hiding errors. The parameters are
injected here rather than by papermill, whose parameter inspection cannot read
a line with ``=`` in its trailing comment (``M = 0.5  # new = m·old``) and
warns about it; the names a ``-p`` override may set are read from the
``parameters`` cell with :mod:`ast`. And the kernel is reached over local IPC
sockets (POSIX) or CurveZMQ-encrypted TCP, not plain TCP, which ipykernel
warns about.

Usage::

    python tools/tour.py                      # everything (make tour)
    python tools/tour.py --only 00_setup_and_data --only 05_momentum_encoder
    python tools/tour.py -p DEVICE cuda -p DATASET cifar10
    python tools/tour.py --readme             # also record it in docs/tour_results.json and
                                              # write README.md's notebook table from it
    python tools/tour.py --readme-from docs/tour_results.json   # the table again, no notebook run
"""

from __future__ import annotations

import argparse
import ast
import base64
import html
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
DEFAULT_OUT = REPO / "runs" / "tour"

MAX_DICT_ITEMS = 12  # larger dicts in metrics.json are not shown in the index
MAX_LIST_ITEMS = 6
MAX_FIGURES = 8

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PAPERMILL_TAGS = {"injected-parameters", "papermill-error-cell-tag"}


@dataclass
class NotebookResult:
    """What the index shows for one notebook. Paths are relative to the tour directory."""

    name: str
    title: str
    ok: bool
    seconds: float
    metrics: dict = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    html: str | None = None
    error: str | None = None
    effects: list[dict] = field(default_factory=list)  # {claim, holds, detail, values} per headline effect
    at_scale: list[dict] = field(default_factory=list)  # the claims the notebook says need more scale, as measured
    notes: list[str] = field(default_factory=list)  # e.g. an override the notebook has no parameter for

    @property
    def effects_held(self) -> int:
        """How many of the headline effects hold."""
        return sum(bool(e.get("holds")) for e in self.effects)


# --------------------------------------------------------------------------
# Collecting results
# --------------------------------------------------------------------------


def notebook_title(nb) -> str:
    """The text of the first markdown heading of ``nb`` (or "")."""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            m = re.match(r"^\s*#{1,6}\s+(.+?)\s*#*\s*$", line)
            if m:
                return m.group(1)
    return ""


def _format_scalar(value) -> str | None:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, str):
        return value if len(value) <= 80 else value[:77] + "..."
    return None


def key_metrics(metrics: dict) -> dict[str, str]:
    """Flatten the small, readable part of ``metrics.json`` to ``{"key": "value"}``.

    Scalars are kept; dicts of at most MAX_DICT_ITEMS scalars become
    ``parent.child`` entries (one level deep); short lists of scalars are
    shown inline. Anything larger (curves, histories) is left to the figures.
    """
    shown: dict[str, str] = {}
    for key, value in metrics.items():
        text = _format_scalar(value)
        if text is not None:
            shown[str(key)] = text
        elif isinstance(value, dict) and 0 < len(value) <= MAX_DICT_ITEMS:
            inner = {k: _format_scalar(v) for k, v in value.items()}
            if all(v is not None for v in inner.values()):
                shown.update({f"{key}.{k}": v for k, v in inner.items()})
        elif isinstance(value, list) and 0 < len(value) <= MAX_LIST_ITEMS:
            items = [_format_scalar(v) for v in value]
            if all(v is not None for v in items):
                shown[str(key)] = "[" + ", ".join(items) + "]"
    return shown


def output_images(nb, dest: Path) -> list[Path]:
    """Write the PNG outputs of the executed notebook ``nb`` to ``dest``; returns the files."""
    files = []
    for index, cell in enumerate(nb.cells):
        for k, out in enumerate(cell.get("outputs", [])):
            data = out.get("data", {}).get("image/png")
            if data:
                dest.mkdir(parents=True, exist_ok=True)
                path = dest / f"cell{index:03d}_{k}.png"
                path.write_bytes(base64.b64decode(data))
                files.append(path)
    return files


def collect_figures(output_dir: Path, nb) -> list[Path]:
    """The notebook's saved figures (``OUTPUT_DIR/**/*.png``), else the images in its outputs."""
    saved = sorted(p for p in output_dir.rglob("*.png") if "_outputs" not in p.parts)
    return saved or output_images(nb, output_dir / "_outputs")


def render_html(executed: Path) -> Path:
    """Render an executed notebook to HTML beside it."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    target = executed.with_suffix(".html")
    target.write_text(body, encoding="utf-8")
    return target


def describe_error(exc, nb) -> str:
    """One short paragraph: failing cell, exception and traceback, without colour codes."""
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    where = ""
    if nb is not None:
        cells = [c for c in nb.cells if not _PAPERMILL_TAGS & set(c.metadata.get("tags", []))]
        for index, cell in enumerate(cells):
            if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
                first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
                where = f"cell {index} ({first!r}): "
                break
    tb = "\n".join(getattr(exc, "traceback", []) or [])
    return _ANSI.sub("", f"{where}{ename}: {evalue}\n\n{tb}".strip())


def _repo_on_path() -> None:
    """Make ``import mocolab`` find this repository's package when the tour runs as a script."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def headline_effects(name: str, metrics: dict) -> list[dict]:
    """The verdicts on the notebook's headline effects: those stored in ``metrics``, else judged now.

    ``Lesson.finish`` stores them under ``headline_effects``; for metrics written without it,
    :func:`mocolab.lesson.judge_effects` judges them. Empty metrics have no verdicts.
    """
    stored = metrics.get("headline_effects")
    if isinstance(stored, list):
        return [e for e in stored if isinstance(e, dict) and "claim" in e]
    if not metrics:
        return []
    _repo_on_path()
    from mocolab.lesson import judge_effects

    return judge_effects(name, metrics)


def notebook_parameters(nb) -> set[str] | None:
    """The names assigned in the cell tagged ``parameters`` (None if it has no such cell or no valid code)."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            try:
                tree = ast.parse(cell.source)
            except SyntaxError:
                return None
            names = set()
            for node in tree.body:
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
            return names
    return None


def kernel_config():
    """Kernel-manager settings: local IPC sockets on POSIX, else CurveZMQ-encrypted TCP where available.

    ipykernel warns when a kernel is reached over plain TCP; the tour's kernel is always local. IPC
    sockets live beside the kernel's connection file, ``<runtime dir>/kernel-<uuid>-ipc-<n>``, whose
    path must fit a Unix socket address (104 bytes on macOS), so a long runtime directory falls back.
    """
    import zmq
    from jupyter_client import KernelManager
    from jupyter_core.paths import jupyter_runtime_dir
    from traitlets.config import Config

    config = Config()
    socket_path = len(os.path.join(jupyter_runtime_dir(), "kernel-")) + 36 + len("-ipc-99999")
    if os.name == "posix" and socket_path < 100:
        config.KernelManager.transport = "ipc"
    elif "transport_encryption" in KernelManager.class_trait_names() and zmq.has("curve"):
        config.KernelManager.transport_encryption = "required"
    return config


def prepare_notebook(notebook: Path, parameters: dict, kernel_name: str):
    """The notebook with ``parameters`` injected after its ``parameters`` cell, and the names it lacks."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = load_notebook_node(str(notebook))
    declared = notebook_parameters(nb)
    unknown = [] if declared is None else [name for name in parameters if name not in declared]
    nb = parameterize_notebook(nb, parameters, kernel_name=kernel_name, language="python")
    return nb, unknown


def run_notebook(notebook: Path, out_root: Path, parameters: dict, kernel_name: str = "python3",
                 timeout_s: int | None = None) -> NotebookResult:
    """Execute one notebook with papermill and collect what the index shows."""
    import nbformat
    import papermill

    name = notebook.stem
    output_dir = out_root / name
    if output_dir.exists():  # no stale metrics or figures from an earlier tour
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    executed = output_dir / f"{name}.ipynb"
    start = time.perf_counter()
    error, title, unknown = None, name, []
    try:
        prepared, unknown = prepare_notebook(
            notebook, {**parameters, "OUTPUT_DIR": str(output_dir.resolve())}, kernel_name)
        title = notebook_title(prepared) or name
        nbformat.write(prepared, executed)
        papermill.execute_notebook(
            str(executed), str(executed), kernel_name=kernel_name, cwd=str(notebook.parent),
            progress_bar=False, log_output=False, execution_timeout=timeout_s, config=kernel_config(),
        )
    except Exception as exc:  # report and carry on with the next notebook
        error = exc
    seconds = time.perf_counter() - start

    nb = nbformat.read(executed, as_version=4) if executed.exists() else None
    result = NotebookResult(name=name, title=title, ok=error is None, seconds=seconds,
                            notes=[f"no parameter {', '.join(unknown)} (set anyway)"] if unknown else [])
    if error is not None:
        result.error = describe_error(error, nb)
    metrics_path = output_dir / "metrics.json"
    if metrics_path.exists():
        try:
            result.metrics = json.loads(metrics_path.read_text())
        except json.JSONDecodeError as exc:
            result.metrics = {}
            result.ok = False
            result.error = (result.error or "") + f"\nmetrics.json is not valid JSON: {exc}"
    elif result.ok:
        result.ok = False
        result.error = "the notebook ran but did not write OUTPUT_DIR/metrics.json"
    result.effects = headline_effects(name, result.metrics)
    result.at_scale = list(result.metrics.get("at_scale_effects", []))
    if nb is not None:
        result.figures = [str(p.relative_to(out_root)) for p in collect_figures(output_dir, nb)]
        try:
            result.html = str(render_html(executed).relative_to(out_root))
        except Exception as exc:  # an HTML render failure should not hide the results
            result.notes.append(f"could not render {executed.name} to HTML: {exc}")
    return result


# --------------------------------------------------------------------------
# The index page
# --------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; }
.summary { color: #555; margin-bottom: 1.5rem; }
.card { border: 1px solid #ddd; border-left: 6px solid #2e7d32; border-radius: 6px; padding: 0.8rem 1rem;
        margin: 1rem 0; }
.card.short { border-left-color: #ef6c00; }
.card.failed { border-left-color: #c62828; background: #fff6f6; }
.card h2 { font-size: 1.15rem; margin: 0 0 0.3rem 0; }
.meta { color: #555; font-size: 0.9rem; }
.status { font-weight: bold; }
.ok .status { color: #2e7d32; }
.failed .status { color: #c62828; }
ul.effects { list-style: none; padding: 0; margin: 0.5rem 0; }
ul.effects li { margin: 0.25rem 0; padding: 0.25rem 0.5rem; border-radius: 4px; }
ul.effects li.holds { background: #edf7ee; }
ul.effects li.fails { background: #fdecea; }
ul.effects li.scale { background: #f3f3f3; color: #444; }
.verdict { display: inline-block; min-width: 7.5em; font-weight: bold; font-size: 0.85rem; text-transform: uppercase; }
.holds .verdict { color: #2e7d32; }
.fails .verdict { color: #c62828; }
.detail { color: #444; font-family: monospace; font-size: 0.85rem; }
.no-effects { color: #777; font-size: 0.9rem; margin: 0.5rem 0; }
.notes { color: #8a5300; font-size: 0.9rem; }
h3.metrics { font-size: 0.85rem; color: #777; font-weight: normal; margin: 0.8rem 0 0 0; text-transform: uppercase; }
dl.metrics { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 0 1.5rem;
             margin: 0.3rem 0 0.6rem 0; font-size: 0.9rem; }
dl.metrics div { display: flex; justify-content: space-between; border-bottom: 1px solid #eee; padding: 0.1rem 0; }
dl.metrics dt { font-family: monospace; color: #333; }
dl.metrics dd { margin: 0 0 0 1rem; text-align: right; }
.figures { display: flex; flex-wrap: wrap; gap: 0.5rem; }
.figures img { height: 140px; border: 1px solid #eee; }
ol.toc { columns: 2; margin: 0 0 1.5rem 0; }
ol.toc li.failed a { color: #c62828; }
ol.toc .count { color: #777; font-size: 0.85rem; }
pre.error { white-space: pre-wrap; background: #fff; border: 1px solid #f1c0c0; padding: 0.5rem; font-size: 0.8rem;
            max-height: 20rem; overflow: auto; }
"""


def _fmt_seconds(seconds: float, whole: bool = False) -> str:
    """``"42.3 s"`` (``"42 s"`` if ``whole``) under a minute, else ``"1 min 05 s"``.

    The seconds are rounded before they are split into minutes, so 119.6 s is "2 min 00 s", never "1 min 60 s".
    """
    if round(seconds, 0 if whole else 1) < 60:
        return f"{seconds:.0f} s" if whole else f"{seconds:.1f} s"
    total = round(seconds)
    return f"{total // 60} min {total % 60:02d} s"


def effects_summary(result: NotebookResult) -> str:
    """``"3/3 effects hold"``, ``"1/2 effects hold"`` or ``"no headline effects"``."""
    if not result.effects:
        return "no headline effects"
    return f"{result.effects_held}/{len(result.effects)} effects hold"


def _card_state(result: NotebookResult) -> str:
    """``failed`` (did not run), ``short`` (ran, an effect does not hold) or ``ok``."""
    if not result.ok:
        return "failed"
    return "short" if result.effects_held < len(result.effects) else "ok"


def render_effects(effects: list[dict]) -> str:
    """The headline effects as a list: verdict, claim, then the measured detail (A vs B, band)."""
    esc = html.escape
    if not effects:
        return '<p class="no-effects">No headline effects to judge in this notebook.</p>'
    items = []
    for e in effects:
        holds = bool(e.get("holds"))
        verdict = "holds" if holds else "not measured" if str(e.get("detail", "")).startswith("not measured") \
            else "does not hold"
        items.append(
            f'<li class="{"holds" if holds else "fails"}"><span class="verdict">{verdict}</span> '
            f'{esc(str(e.get("claim", "")))}: <span class="detail">{esc(str(e.get("detail", "")))}</span></li>'
        )
    return f'<ul class="effects">{"".join(items)}</ul>'


def render_at_scale(claims: list[dict]) -> str:
    """The claims a notebook says need more scale than its default run: what this run measured, not judged."""
    esc = html.escape
    if not claims:
        return ""
    items = "".join(f'<li class="scale"><span class="verdict">needs more scale</span> {esc(str(e.get("claim", "")))}'
                    f' — measured here: <span class="detail">{esc(str(e.get("detail", "")))}</span></li>'
                    for e in claims)
    return f'<ul class="effects at-scale">{items}</ul>'


def render_index(results: list[NotebookResult], heading: str = "mocolab tour") -> str:
    """The HTML text of the tour index for ``results`` (links relative to the tour directory)."""
    esc = html.escape
    n_ok = sum(r.ok for r in results)
    total = sum(r.seconds for r in results)
    n_effects = sum(len(r.effects) for r in results)
    n_held = sum(r.effects_held for r in results)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(heading)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(heading)}</h1>",
        f'<p class="summary" id="summary">{n_ok} of {len(results)} notebooks ran'
        f" ({_fmt_seconds(total)} in all), each with its default parameters;"
        f" {n_held} of {n_effects} headline effects hold beyond the test-set noise band.</p>",
    ]
    if len(results) > 1:
        links = ""
        for r in results:
            count = f' <span class="count">{r.effects_held}/{len(r.effects)}</span>' if r.effects else ""
            state = "ok" if r.ok else "failed"
            links += (f'<li class="{state}"><a href="#nb-{esc(r.name)}">{esc(r.title or r.name)}</a>'
                      f'{"" if r.ok else " — failed"}{count}</li>')
        parts.append(f'<ol class="toc">{links}</ol>')
    for r in results:
        state = "ok" if r.ok else "failed"
        parts.append(f'<section class="card {_card_state(r)}" id="nb-{esc(r.name)}" data-status="{state}"'
                     f' data-effects="{r.effects_held}/{len(r.effects)}">')
        title = esc(r.title or r.name)
        if r.html:
            title = f'<a href="{esc(r.html, quote=True)}">{title}</a>'
        parts.append(f"<h2>{title}</h2>")
        parts.append(render_effects(r.effects))
        parts.append(render_at_scale(r.at_scale))
        parts.append(
            f'<div class="meta"><span class="status">{"ran" if r.ok else "FAILED"}</span>'
            f" · <code>{esc(r.name)}</code> · {_fmt_seconds(r.seconds)} · {esc(effects_summary(r))}"
            + (f' · <a href="{esc(r.html, quote=True)}">executed notebook</a>' if r.html else "")
            + "</div>"
        )
        if r.notes:
            parts.append(f'<p class="notes">{esc("; ".join(r.notes))}</p>')
        if r.error:
            parts.append(f'<pre class="error">{esc(r.error)}</pre>')
        shown = key_metrics(r.metrics)
        if shown:
            rows = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in shown.items())
            parts.append(f'<h3 class="metrics">metrics.json</h3><dl class="metrics">{rows}</dl>')
        if r.figures:
            imgs = "".join(
                f'<a href="{esc(f, quote=True)}"><img src="{esc(f, quote=True)}" alt="{esc(Path(f).name)}" '
                f'loading="lazy"></a>'
                for f in r.figures[:MAX_FIGURES]
            )
            more = f"<span>+{len(r.figures) - MAX_FIGURES} more</span>" if len(r.figures) > MAX_FIGURES else ""
            parts.append(f'<div class="figures">{imgs}{more}</div>')
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_index(results: list[NotebookResult], out_root: Path) -> Path:
    """Write ``index.html`` (and ``results.json``) into ``out_root``."""
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "index.html").write_text(render_index(results), encoding="utf-8")
    summary = [{**r.__dict__, "metrics": key_metrics(r.metrics)} for r in results]
    (out_root / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return out_root / "index.html"


# --------------------------------------------------------------------------
# The recorded tour and the README's notebook table
# --------------------------------------------------------------------------

README = REPO / "README.md"
RESULTS = REPO / "docs" / "tour_results.json"
TABLE_START, TABLE_END = "<!-- tour-table:start -->", "<!-- tour-table:end -->"

#: The README row of each notebook: (lesson, exercise, what the run measured). The last is a template whose
#: placeholders read the recorded run (see :func:`render_measured`); its words hold whatever the numbers are.
README_ROWS: dict[str, tuple[str, str, str]] = {
    "00_setup_and_data": (
        "setup and data", "",
        "the device, the bundled shapes, two augmented views of one image; raw pixels reach {raw_pixel_knn_acc} % kNN "
        "(chance {chance_acc:.0f} %)"),
    "01_margin_contrastive_loss": (
        "margin contrastive loss", "✎ the margin loss, batched",
        "two runs that differ only in the loss: InfoNCE {infonce_knn_acc} % kNN vs the margin loss {margin_knn_acc} % "
        "({cmp(infonce_knn_acc, margin_knn_acc)})"),
    "02_npair_and_infonce": (
        "N-pair and InfoNCE", "✎ InfoNCE logits and loss; the chance loss; predict-then-slide: T for half the mass",
        "the loss starts at {init_loss:.2f} vs ln(K+1) = {ln_k_plus_1:.2f}; kNN at T = {keys(temperature_sweep)}: "
        "{values(temperature_sweep)} %; at K = {keys(negatives_sweep)}: {values(negatives_sweep)} %; the hardest of "
        "the K negatives shares the query's class {values(hardest_negative_same_class):.0f} % of the time"),
    "03_memory_bank": (
        "memory bank (instance discrimination)", "✎ the memory-bank update",
        "the bank (softmax) {softmax_knn_acc} % kNN vs random init {random_init_knn_acc} % "
        "({cmp(softmax_knn_acc, random_init_knn_acc)}); NCE {nce_knn_acc} %; MoCo at the same budget {moco_knn_acc} % "
        "(against the bank: {cmp(moco_knn_acc, softmax_knn_acc)}); the bank's O(N) memory: {bank_bytes:MB} vs the "
        "queue's {queue_bytes:MB}"),
    "04_queue_without_momentum": (
        "a queue without a momentum encoder", "✎ enqueue on a ring buffer",
        "m = {m_slow:g}: {knn_acc_m099} % kNN vs m = 0: {knn_acc_m0} % ({cmp(knn_acc_m099, knn_acc_m0)}); recomputed "
        "keys find their own stored key {key_identification_m099} % vs {key_identification_m0} % of the time"),
    "05_momentum_encoder": (
        "the momentum encoder", "✎ the momentum update, in place",
        "{total_steps} steps ({time_constants_m099:.1f} time constants of m = 0.99); kNN for m = "
        "{keys(momentum_sweep)}: {values(momentum_sweep, knn_acc)} % (band {band(momentum_sweep/0/knn_acc)}); key "
        "identification {values(momentum_sweep, key_identification):.0f} %"),
    "06_shuffle_bn": (
        "shuffle BN", "✎ batch shuffle and unshuffle of the keys",
        "pretext accuracy without the key shuffle {pretext_acc_no_shuffle} % vs {pretext_acc_shuffle} % with it; "
        "kNN, measured beside it: {knn_acc_no_shuffle} % without vs {knn_acc_shuffle} % with the shuffle "
        "({cmp(knn_acc_no_shuffle, knn_acc_shuffle)}); the paper's kNN cost is measured at scale (the notebook "
        "gives the command)"),
    "07_moco_full": (
        "MoCo at full size", "✎ the whole MoCo step",
        "the CIFAR-10 recipe at CPU size ({config/arch}, {num_train:,} {config/data} images, {total_steps:,} steps, "
        "K {config/K}): {knn_acc} % kNN vs {random_init_knn_acc} % at random init "
        "({cmp(knn_acc, random_init_knn_acc)}); the GPU switch (ResNet-18, K 4096, 200 epochs), checkpoints, "
        "multi-GPU launch"),
    "08_evaluating_representations": (
        "evaluating representations", "",
        "MoCo vs random init: kNN {knn_acc} vs {random_init_knn_acc} %, linear probe {linear_acc} vs "
        "{random_init_linear_acc} %, transfer to `{transfer_dataset}` {transfer_knn_acc} vs "
        "{transfer_random_init_knn_acc} % kNN; supervised {supervised_knn_acc} % kNN"),
    "09_looking_inside": (
        "looking inside", "",
        "positive / negative cosine {pos_sim_mean:.2f} / {neg_sim_mean:.2f}; with negatives vs without: feature std "
        "{collapse_std:.3f} vs {collapse_std_no_negatives:.3f}, kNN {knn_acc} vs {knn_acc_no_negatives} % "
        "({cmp(knn_acc, knn_acc_no_negatives)}); a 2-D map of the embeddings ({embedding_method})"),
    "10_beyond_moco": (
        "beyond MoCo", "",
        "CMC on `{cmc_dataset}` {cmc_knn_acc} % vs its init {cmc_random_init_knn_acc} %; CRD student "
        "{crd_student_knn_acc} % vs its init {student_random_init_knn_acc} %; against MoCo's {moco_knn_acc} %: MoCHi "
        "{mochi_knn_acc} %, debiased {debiased_knn_acc} %, clustering-aware {cluster_knn_acc} %, whose clusters take "
        "the false-negative rate from {false_negative_rate_before:.3f} to {false_negative_rate_after:.3f}; at T = "
        "{debiased_t:g} the debiased loss {debiased_knn_acc_at_debiased_t} % vs MoCo {moco_knn_acc_at_debiased_t} %"),
}

_PLACEHOLDER = re.compile(r"\{(?:(\w+)\(([^(){}]*)\)|([^(){}:]+))(?::([^{}]*))?\}")


def flat_metrics(metrics: dict, prefix: str = "") -> dict:
    """The scalars of ``metrics``, nested dicts flattened to ``"parent/child"`` keys (lists and verdicts left out)."""
    flat = {}
    for key, value in metrics.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_metrics(value, path + "/"))
        elif isinstance(value, float):
            flat[path] = float(f"{value:.6g}") if math.isfinite(value) else None
        elif value is None or isinstance(value, (bool, int, str)):
            flat[path] = value
    return flat


def _format_value(value, spec: str | None) -> str:
    """A recorded value as the README shows it: floats with one decimal unless ``spec`` says otherwise."""
    if value is None:
        return "not measured"
    if spec == "MB":
        return f"{value / 1e6:.2f} MB"
    if spec:
        return format(value, spec)
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _sweep(metrics: dict, path: str, sub: str = "") -> list[tuple[str, object]]:
    """``[(x, value)]`` of the sweep recorded under ``path`` (``path/x``, or ``path/x/sub``), by numeric x.

    With no ``sub`` and nested entries (``path/x/...``), the values are None: only the x values are asked for.
    """
    points = {}
    for key, value in metrics.items():
        if key.startswith(path + "/"):
            x, _, rest = key[len(path) + 1:].partition("/")
            if rest == sub or not sub:
                points[x] = value if rest == sub else None
    if not points:
        raise KeyError(f"{path}/{sub}" if sub else path)
    return sorted(points.items(), key=lambda p: float(p[0]))


def render_measured(template: str, entry: dict) -> str:
    """Fill a README_ROWS template from one notebook's recorded run.

    ``{key}`` or ``{key:spec}`` is a recorded metric (``a/b`` for nested ones; spec ``MB`` for bytes);
    ``{band(key)}`` the noise band of that accuracy, ``±4.1``; ``{cmp(a, b)}`` the difference of two accuracies
    against the band, ``+20.0 points, beyond the band ±4.1``; ``{keys(sweep)}`` and ``{values(sweep[, sub])}``
    a sweep's x values and results, ``4 / 64 / 1024``.

    Raises:
        KeyError: the template reads a metric the recorded run does not have (named in the message).
    """
    _repo_on_path()
    from mocolab.evaluate import accuracy_noise

    metrics = entry["metrics"]

    def get(path):
        if path not in metrics:
            raise KeyError(f"{entry['name']}: README_ROWS reads {path!r}, which its recorded run does not have")
        return metrics[path]

    def fill(match):
        func, args, path, spec = match.groups()
        if path:
            return _format_value(get(path.strip()), spec)
        args = [a.strip() for a in args.split(",")]
        if func in ("keys", "values"):
            try:
                points = _sweep(metrics, *args)
            except KeyError:
                raise KeyError(f"{entry['name']}: README_ROWS reads the sweep {args}, which its run does not have") \
                    from None
            return " / ".join(x if func == "keys" else _format_value(v, spec) for x, v in points)
        if func not in ("band", "cmp"):
            raise ValueError(f"README_ROWS: unknown placeholder {match.group(0)!r}")
        if any(get(a) is None for a in args):
            return "not measured"
        band = accuracy_noise(get(args[-1]), int(get("num_test")))
        if func == "band":
            return f"±{band:.1f}"
        diff = get(args[0]) - get(args[1])
        where = "beyond" if abs(diff) > band else "inside"
        return f"{diff:+.1f}".replace("-", "−") + f" points, {where} the band ±{band:.1f}"

    return _PLACEHOLDER.sub(fill, template)


def tour_record(results: list[NotebookResult], parameters: dict, command: str) -> dict:
    """What ``--readme`` records of a tour: per notebook its run time, seed, device, verdicts and scalar metrics."""
    import platform
    from datetime import date
    from importlib.metadata import version

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    notebooks = [{"name": r.name, "ok": r.ok, "seconds": round(r.seconds, 1), "seed": r.metrics.get("seed"),
                  "device": r.metrics.get("device"), "effects": r.effects, "at_scale_effects": r.at_scale,
                  "metrics": flat_metrics({k: v for k, v in r.metrics.items()
                                           if k not in ("headline_effects", "at_scale_effects")})}
                 for r in results]
    return {"about": "A tour of the notebooks, recorded by tools/tour.py --readme; README.md's notebook table is "
                     "written from it (python tools/tour.py --readme-from docs/tour_results.json).",
            "command": command, "date": date.today().isoformat(), "parameters": parameters,
            "python": platform.python_version(), "torch": version("torch"), "cpu_cores": cores,
            "seconds": round(sum(r.seconds for r in results), 1), "notebooks": notebooks}


def _measured_cell(template: str, entry: dict | None) -> str:
    """The "what the run measured" cell of one notebook, closed by how many of its headline effects hold."""
    if entry is None:
        return "not in the recorded tour"
    if not entry["ok"]:
        return "**failed** in the recorded tour"
    text = render_measured(template, entry)
    effects = entry.get("effects") or []
    if effects:
        held = [e for e in effects if e.get("holds")]
        noun = "headline effects hold" if len(effects) > 1 else "headline effect holds"
        text += f"; {len(held)} of {len(effects)} {noun}"
        if len(held) < len(effects):
            text += " (not: " + "; ".join(e["claim"] for e in effects if not e.get("holds")) + ")"
    for e in entry.get("at_scale_effects") or []:
        text += f"; needs more scale: {e['claim']} ({'holds' if e.get('holds') else 'does not hold'} here)"
    return text.replace("|", "\\|")


def render_table(record: dict) -> str:
    """The README's notebook table (and the sentence under it) for a recorded tour."""
    entries = {e["name"]: e for e in record.get("notebooks", [])}
    seeds = sorted({str(e["seed"]) for e in entries.values() if e.get("seed") is not None})
    changed = {k: v for k, v in record.get("parameters", {}).items() if k != "SEED"}
    run = "no tour recorded yet" if not entries else \
        ", ".join([*(f"{k} = {v!r}" for k, v in changed.items()), f"seed {', '.join(seeds) or '?'}",
                   f"tour of {record['date']}"])
    what = f"what the {'' if changed else 'default '}run measured ({run}; band = two standard errors of the difference)"
    lines = [f"| notebook | lesson | exercise | {what} | time |", "|---|---|---|---|---|"]
    for name, (lesson, exercise, template) in README_ROWS.items():
        entry = entries.get(name)
        time_cell = _fmt_seconds(entry["seconds"], whole=True) if entry else "—"
        measured = _measured_cell(template, entry) if entries else "no tour recorded yet"
        lines.append(f"| [`{name}`](notebooks/{name}.py) | {lesson} | {exercise} | {measured} | {time_cell} |")
    results = "[docs/tour_results.json](docs/tour_results.json)"
    if not entries:
        lines += ["", f"No tour is recorded yet: `python tools/tour.py --readme` runs one, records it in {results} and "
                      "writes this table from it."]
        return "\n".join(lines)
    ran = sum(e["ok"] for e in entries.values())
    devices = ", ".join(sorted({str(e.get("device")) for e in entries.values() if e.get("device")})) or "?"
    lines += ["", f"Written from the tour that `{record['command']}` recorded on {record['date']} in {results}: "
                  f"{ran} of {len(entries)} notebooks ran in {_fmt_seconds(record['seconds'], whole=True)} in all "
                  f"(device {devices}, {record['cpu_cores']} CPU cores, PyTorch {record['torch']})."]
    return "\n".join(lines)


def readme_table(text: str) -> str:
    """The part of README text between the tour-table markers (without them)."""
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"README.md has no {TABLE_START} ... {TABLE_END} markers around its notebook table")
    return text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip("\n")


def write_readme_table(record: dict, readme: Path | None = None) -> None:
    """Replace the notebook table of ``readme`` (default README.md), between its markers, by ``record``'s."""
    readme = readme or README
    text = readme.read_text(encoding="utf-8")
    readme_table(text)  # the markers are there
    before, after = text.split(TABLE_START, 1)[0], text.split(TABLE_END, 1)[1]
    readme.write_text(f"{before}{TABLE_START}\n{render_table(record)}\n{TABLE_END}{after}", encoding="utf-8")


def save_record(record: dict, path: Path | None = None) -> None:
    """Write ``record`` as JSON to ``path`` (default docs/tour_results.json), the file the README's table is from."""
    path = path or RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def log_line(result: NotebookResult) -> str:
    """The tour's terminal line for a notebook, after its name: ``ok  1 min 02 s  2/2 effects hold``.

    A failed notebook adds the first line of its error (failing cell and exception); notes follow
    in brackets.
    """
    text = f"{'ok' if result.ok else 'FAILED':<6} {_fmt_seconds(result.seconds):>10}  {effects_summary(result)}"
    if result.error:
        first = result.error.strip().splitlines()[0]
        text += f"  {first if len(first) <= 160 else first[:157] + '...'}"
    if result.notes:
        text += f"  ({'; '.join(result.notes)})"
    return text


def _parse_value(text: str):
    """`-p NAME VALUE`: JSON when it parses (numbers, true, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run every notebook with default parameters; write runs/tour/index.html.")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this notebook (name without .ipynb); repeatable")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="override a parameter in every notebook, e.g. -p DEVICE cuda")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: runs/tour)")
    parser.add_argument("--notebook-dir", type=Path, default=NOTEBOOK_DIR,
                        help="where the notebooks are (default: notebooks/)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds allowed per cell (default: none)")
    parser.add_argument("--readme", action="store_true",
                        help="record the tour in docs/tour_results.json and write README.md's notebook table from it")
    parser.add_argument("--readme-from", type=Path, metavar="RESULTS",
                        help="write README.md's notebook table from a recorded tour (docs/tour_results.json); "
                             "runs no notebook")
    return parser


def run_tour(notebooks: list[Path], out_root: Path, parameters: dict, timeout_s: int | None) -> list[NotebookResult]:
    """Run the notebooks one after another, printing a line for each and rewriting the index after each."""
    # Headless: no progress bars in the saved notebooks; exercise stubs fall back to the library (mocolab.exercises).
    os.environ.setdefault("MOCOLAB_QUIET", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MOCOLAB_HEADLESS", "1")
    width = max(len(nb.stem) for nb in notebooks)
    overrides = "".join(f" {k}={v!r}" for k, v in parameters.items())
    print(f"[tour] {len(notebooks)} notebook(s), default parameters{overrides and ' except' + overrides}"
          f" -> {out_root / 'index.html'}", flush=True)
    results = []
    for nb in notebooks:
        print(f"[tour] {nb.stem:<{width}}  ", end="", flush=True)  # completed when the notebook is done
        result = run_notebook(nb, out_root, parameters, timeout_s=timeout_s)
        results.append(result)
        print(log_line(result), flush=True)
        write_index(results, out_root)  # usable while the tour is still running
    return results


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.readme_from:
        write_readme_table(json.loads(args.readme_from.read_text(encoding="utf-8")))
        print(f"[tour] wrote the notebook table of {README.name} from {args.readme_from}")
        return 0
    notebooks = sorted(args.notebook_dir.resolve().glob("*.ipynb"))
    if args.only:
        if args.readme:
            parser.error("--readme records a whole tour; leave out --only")
        unknown = sorted(set(args.only) - {nb.stem for nb in notebooks})
        if unknown:
            parser.error(f"no notebook named {unknown}; choose from {[nb.stem for nb in notebooks]}")
        notebooks = [nb for nb in notebooks if nb.stem in args.only]
    if not notebooks:
        print(f"no notebooks found in {args.notebook_dir}", file=sys.stderr)
        return 1
    parameters = {name: _parse_value(value) for name, value in args.parameter}
    results = run_tour(notebooks, args.out.resolve(), parameters, args.timeout)
    index = write_index(results, args.out.resolve())
    failed = [r.name for r in results if not r.ok]
    held, judged = sum(r.effects_held for r in results), sum(len(r.effects) for r in results)
    seconds = _fmt_seconds(sum(r.seconds for r in results))
    print(f"[tour] {len(results) - len(failed)} of {len(results)} ran in {seconds};"
          f" {f'{held}/{judged} headline effects hold' if judged else 'no headline effects'}; wrote {index}",
          flush=True)
    if args.readme:
        command = "python tools/tour.py --readme" + "".join(f" -p {k} {v}" for k, v in args.parameter)
        save_record(tour_record(results, parameters, command))
        try:
            write_readme_table(json.loads(RESULTS.read_text(encoding="utf-8")))  # exactly what the file holds
        except KeyError as err:  # a notebook no longer writes a metric its README row reads
            print(f"[tour] recorded the tour in {RESULTS.name}, but its README table needs {err}; fix README_ROWS "
                  f"in tools/tour.py, then run it with --readme-from {os.path.relpath(RESULTS, REPO)}", file=sys.stderr)
            return 1
        print(f"[tour] recorded the tour in {RESULTS.name} and wrote the notebook table of {README.name}")
    if failed:
        print(f"[tour] failed: {', '.join(failed)} (the error of each is on its card in {index.name})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
