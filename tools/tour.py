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
    effects: list[dict] = field(default_factory=list)  # {claim, holds, detail} per headline effect
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
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
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


def _fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


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


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)

    notebooks = sorted(args.notebook_dir.resolve().glob("*.ipynb"))
    if args.only:
        unknown = sorted(set(args.only) - {nb.stem for nb in notebooks})
        if unknown:
            parser.error(f"no notebook named {unknown}; choose from {[nb.stem for nb in notebooks]}")
        notebooks = [nb for nb in notebooks if nb.stem in args.only]
    if not notebooks:
        print(f"no notebooks found in {args.notebook_dir}", file=sys.stderr)
        return 1
    parameters = {name: _parse_value(value) for name, value in args.parameter}
    # Headless: no progress bars in the saved notebooks; exercise stubs fall back to the library (mocolab.exercises).
    os.environ.setdefault("MOCOLAB_QUIET", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MOCOLAB_HEADLESS", "1")

    out_root = args.out.resolve()
    width = max(len(nb.stem) for nb in notebooks)
    overrides = "".join(f" {k}={v!r}" for k, v in parameters.items())
    print(f"[tour] {len(notebooks)} notebook(s), default parameters{overrides and ' except' + overrides}"
          f" -> {out_root / 'index.html'}", flush=True)
    results = []
    for nb in notebooks:
        print(f"[tour] {nb.stem:<{width}}  ", end="", flush=True)  # completed when the notebook is done
        result = run_notebook(nb, out_root, parameters, timeout_s=args.timeout)
        results.append(result)
        print(log_line(result), flush=True)
        write_index(results, out_root)  # usable while the tour is still running
    index = write_index(results, out_root)
    failed = [r.name for r in results if not r.ok]
    held, judged = sum(r.effects_held for r in results), sum(len(r.effects) for r in results)
    seconds = _fmt_seconds(sum(r.seconds for r in results))
    print(f"[tour] {len(results) - len(failed)} of {len(results)} ran in {seconds};"
          f" {f'{held}/{judged} headline effects hold' if judged else 'no headline effects'}; wrote {index}",
          flush=True)
    if failed:
        print(f"[tour] failed: {', '.join(failed)} (the error of each is on its card in {index.name})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
