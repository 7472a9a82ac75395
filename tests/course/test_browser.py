"""The temperature slider works in a real JupyterLab, driven by headless Chromium.

What it does
------------
1. Copies ``notebooks/02_npair_and_infonce.ipynb`` into a temporary
   directory, with the notebook's CI parameters injected after its
   ``parameters`` cell (as papermill does). Without that notebook (or
   without a cell calling ``temperature_explorer``) it writes a two-cell
   notebook with such a cell instead.
2. Starts JupyterLab from this interpreter on 127.0.0.1, a free port and a
   random token, with its own config/settings/runtime directories and a
   ``python3`` kernelspec pinned to this interpreter.
3. Opens the notebook in headless Chromium through playwright and runs
   the widget cell; when that fails (it needs earlier cells), runs every
   cell above it and then it again. Waits for the slider, moves it with the keyboard (arrow keys on the slider handle;
   a mouse drag if the keys do nothing) and checks that the text line
   ``T = ...  entropy = ...  loss = ...`` in the output changes.
4. Saves screenshots to ``runs/browser/`` (``screenshot.png``: the page;
   ``widget.png``: the widget cell).

It skips, saying why, only when ``/usr/bin/chromium`` or playwright is
missing. Browser logs, the server log and any cell error are in the failure
message.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = REPO / "notebooks" / "02_npair_and_infonce.ipynb"
ARTIFACTS = Path(os.environ.get("MOCOLAB_BROWSER_ARTIFACTS", REPO / "runs" / "browser"))
WIDGET_CALL = "temperature_explorer"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
SERVER_START_S = 90  # JupyterLab answering /api/status
PAGE_LOAD_S = 120  # Lab's front end loaded and the kernel idle
CELLS_RUN_S = 240  # cells above the widget (CI size) plus the widget cell
TEXT_RE = re.compile(r"T = \d+\.\d+\s+entropy = [-\d.]+.*loss = [-\d.]+")

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


# --------------------------------------------------------------------------- notebook to open
def _ci_parameters(name: str) -> dict:
    """The notebook's CI sizes from tests/course/test_notebooks.py (empty when absent)."""
    path = REPO / "tests" / "course" / "test_notebooks.py"
    if not path.exists():
        return {}
    spec = importlib.util.spec_from_file_location("_mocolab_nb_tests", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception:  # a broken sibling test module must not hide this test's own result
        return {}
    return dict(getattr(module, "CI_PARAMETERS", {}).get(name, {}))


def _widget_cell_index(nb) -> int | None:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and WIDGET_CALL in cell.source:
            return i
    return None


def _fallback_notebook():
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import mocolab.widgets", id="imports"),
        nbformat.v4.new_code_cell("mocolab.widgets.temperature_explorer(T=0.1)", id="widget"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def prepare_notebook(root: Path) -> tuple[Path, int, str]:
    """Write the notebook to open into ``root``: (path, widget cell index, which one)."""
    import nbformat

    if NOTEBOOK.exists():
        nb = nbformat.read(NOTEBOOK, as_version=4)
        index = _widget_cell_index(nb)
        if index is not None:
            params = _ci_parameters(NOTEBOOK.stem)
            params["OUTPUT_DIR"] = str(root / "runs" / NOTEBOOK.stem)
            tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
            if tagged and tagged[0] < index:
                src = "# Parameters injected by tests/course/test_browser.py (CI sizes)\n" + "\n".join(
                    f"{k} = {v!r}" for k, v in params.items()
                )
                cell = nbformat.v4.new_code_cell(src, id="injected-parameters")
                cell.metadata["tags"] = ["injected-parameters"]
                nb.cells.insert(tagged[0] + 1, cell)
                index += 1
            nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
            path = root / NOTEBOOK.name
            nbformat.write(nb, path)
            return path, index, f"notebooks/{NOTEBOOK.name}"
    path = root / "temperature_widget.ipynb"
    nbformat.write(_fallback_notebook(), path)
    return path, 1, "generated two-cell notebook (notebooks/02 has no temperature_explorer cell yet)"


# --------------------------------------------------------------------------- JupyterLab server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """JupyterLab in a subprocess (own process group), isolated directories."""

    def __init__(self, root: Path, home: Path):
        self.root, self.home = root, home
        self.port = _free_port()
        self.token = secrets.token_hex(24)
        self.log_path = home / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict:
        cfg, data, runtime = self.home / "config", self.home / "data", self.home / "runtime"
        settings, workspaces = self.home / "lab-settings", self.home / "lab-workspaces"
        kernel_dir = data / "kernels" / "python3"
        for d in (cfg, runtime, settings, workspaces, kernel_dir):
            d.mkdir(parents=True, exist_ok=True)
        # kernel "python3" = this interpreter (JUPYTER_PATH is searched first)
        (kernel_dir / "kernel.json").write_text(
            json.dumps(
                {
                    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    "display_name": "Python 3 (ipykernel)",
                    "language": "python",
                }
            )
        )
        # no news / update checks, no pop-ups over the notebook
        notif = settings / "@jupyterlab" / "apputils-extension"
        notif.mkdir(parents=True, exist_ok=True)
        (notif / "notification.jupyterlab-settings").write_text(
            json.dumps({"checkForUpdates": False, "fetchNews": "false"})
        )
        env = dict(os.environ)
        for key in ("MPLBACKEND", "JUPYTER_PATH", "JUPYTER_CONFIG_PATH"):
            env.pop(key, None)
        env.update(
            JUPYTER_CONFIG_DIR=str(cfg),
            JUPYTER_DATA_DIR=str(data),
            JUPYTER_PATH=str(data),
            JUPYTER_RUNTIME_DIR=str(runtime),
            JUPYTERLAB_SETTINGS_DIR=str(settings),
            JUPYTERLAB_WORKSPACES_DIR=str(workspaces),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            MOCOLAB_QUIET="1",
            PYDEVD_DISABLE_FILE_VALIDATION="1",
        )
        return env

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.news_url=",
            "--ServerApp.shutdown_no_activity_timeout=900",
            "--MappingKernelManager.cull_idle_timeout=0",
            "--LabApp.extension_manager=readonly",  # no PyPI look-ups
        ]  # fmt: skip
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers often run as root
            cmd.append("--allow-root")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, cwd=self.root, env=self._env(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.base}/api/status?token={self.token}", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"JupyterLab did not answer within {SERVER_START_S} s:\n{self.log()}")

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return "<no log>"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:  # graceful: shuts the kernels down too
            req = urllib.request.Request(f"{self.base}/api/shutdown?token={self.token}", method="POST")
            urllib.request.urlopen(req, timeout=10).close()
            self.proc.wait(timeout=20)
        except Exception:
            pass
        if self.proc.poll() is None:  # our own process group: the server and its kernels
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()


# --------------------------------------------------------------------------- the test
JS_READY = """() => {
  const app = window.jupyterapp;
  if (!app || !app.shell) return false;
  const w = app.shell.currentWidget;
  if (!w || !w.content || !w.sessionContext || !w.context || !w.context.isReady) return false;
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle' && w.content.widgets.length > 0;
}"""

JS_RUN = """([index, above]) => {
  const app = window.jupyterapp;
  const panel = app.shell.currentWidget;
  panel.content.activeCellIndex = index;
  panel.content.deselectAll();
  app.commands.execute('notebook:clear-cell-output');  // synchronous part clears a stale error now
  const run = async () => {
    if (above && index > 0) await app.commands.execute('notebook:run-all-above');
    await app.commands.execute('notebook:run-cell');
  };
  run();
  return panel.content.widgets.length;
}"""

JS_ERRORS = """() => {
  const out = [];
  document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    .forEach(e => { if (/Traceback|Error/.test(e.innerText)) out.push(e.innerText.slice(-3000)); });
  return out;
}"""


def _output_text(cell) -> str:
    texts = cell.locator(".jp-OutputArea-output").all_inner_texts()
    lines = [ln for t in texts for ln in t.splitlines() if TEXT_RE.search(ln)]
    return lines[-1] if lines else ""


def test_temperature_slider_changes_output_in_jupyterlab(tmp_path):
    if not (CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium chromium-driver)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright, or '.[dev]')"
    )
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed")
    pytest.importorskip("ipywidgets", reason="ipywidgets is not installed")

    t0 = time.monotonic()
    root, home = tmp_path / "lab", tmp_path / "home"
    root.mkdir()
    home.mkdir()
    nb_path, index, which = prepare_notebook(root)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = LabServer(root, home)
    console: list[str] = []
    timings: dict[str, float] = {}
    try:
        server.start()
        timings["server"] = time.monotonic() - t0
        # the notebook's kernel "python3" is this interpreter (the project's environment)
        with urllib.request.urlopen(f"{server.base}/api/kernelspecs?token={server.token}", timeout=10) as r:
            argv = json.load(r)["kernelspecs"]["python3"]["spec"]["argv"]
        assert argv[0] == sys.executable, f"kernel python3 runs {argv[0]}, not {sys.executable}"
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
                page.set_default_timeout(60_000)
                page.goto(
                    f"{server.base}/lab/tree/{nb_path.name}?reset&token={server.token}",
                    wait_until="domcontentloaded",
                    timeout=PAGE_LOAD_S * 1000,
                )
                page.wait_for_function(JS_READY, timeout=PAGE_LOAD_S * 1000, polling=500)
                timings["lab loaded"] = time.monotonic() - t0

                cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
                handle = cell.locator(".widget-slider .noUi-handle").first

                def run_until_slider(above: bool, timeout_s: float) -> list:
                    """Run the widget cell (and every cell above it); [] once the slider shows, else errors."""
                    page.evaluate(JS_RUN, [index, above])
                    deadline = time.monotonic() + timeout_s
                    while not (handle.count() and handle.is_visible()):
                        errors = page.evaluate(JS_ERRORS)
                        if errors:
                            return errors
                        if time.monotonic() > deadline:
                            page.screenshot(path=str(ARTIFACTS / "screenshot.png"))
                            pytest.fail(f"no slider after {timeout_s} s in {which}; console: {console[-10:]}")
                        page.wait_for_timeout(500)
                    return []

                # a self-contained widget cell runs alone (fast); otherwise run the notebook up to it
                page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
                errors = run_until_slider(above=False, timeout_s=60 if index else CELLS_RUN_S)
                ran = "the widget cell alone"
                if errors and index > 0:
                    timings["widget cell alone failed"] = time.monotonic() - t0
                    ran = "every cell above the widget cell, then it"
                    errors = run_until_slider(above=True, timeout_s=CELLS_RUN_S)
                if errors:
                    pytest.fail(f"a cell failed in {which}:\n" + "\n---\n".join(errors))
                page.wait_for_function(
                    "([el, re]) => new RegExp(re).test(el.innerText)",
                    arg=[cell.element_handle(), TEXT_RE.pattern],
                    timeout=60_000,
                )
                timings["widget shown"] = time.monotonic() - t0
                cell.scroll_into_view_if_needed()
                before = _output_text(cell)
                readout_before = cell.locator(".widget-readout").first.inner_text()

                # move the slider: keyboard first (noUiSlider handles arrow keys)
                handle.focus()
                for _ in range(6):
                    handle.press("ArrowRight")
                    page.wait_for_timeout(100)
                try:
                    page.wait_for_function(
                        "([el, re, before]) => { const m = el.innerText.match(new RegExp(re, 'g'));"
                        " return !!m && m[m.length - 1] !== before; }",
                        arg=[cell.element_handle(), TEXT_RE.pattern, before],
                        timeout=30_000,
                    )
                    how = "arrow keys"
                except sync_api.TimeoutError:  # fall back to dragging the handle
                    box = handle.bounding_box()
                    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
                    page.mouse.down()
                    page.mouse.move(box["x"] + 80, box["y"] + box["height"] / 2, steps=8)
                    page.mouse.up()
                    how = "mouse drag"
                    page.wait_for_function(
                        "([el, re, before]) => { const m = el.innerText.match(new RegExp(re, 'g'));"
                        " return !!m && m[m.length - 1] !== before; }",
                        arg=[cell.element_handle(), TEXT_RE.pattern, before],
                        timeout=30_000,
                    )
                page.wait_for_timeout(1000)  # let the new figure arrive before the screenshot
                after = _output_text(cell)
                readout_after = cell.locator(".widget-readout").first.inner_text()
                timings["slider moved"] = time.monotonic() - t0
                cell.screenshot(path=str(ARTIFACTS / "widget.png"))
                page.screenshot(path=str(ARTIFACTS / "screenshot.png"))
                assert page.evaluate(JS_ERRORS) == []
            finally:
                browser.close()
    except Exception:
        print(f"--- JupyterLab log ---\n{server.log()}\n--- browser console errors ---\n" + "\n".join(console[-20:]))
        raise
    finally:
        server.stop()

    # the slider moved right: T grew, and the printed line follows it
    t_before = float(re.search(r"T = (\d+\.\d+)", before).group(1))
    t_after = float(re.search(r"T = (\d+\.\d+)", after).group(1))
    assert t_after > t_before, (before, after)
    assert readout_after != readout_before
    assert f"{t_after:.3f}" == readout_after.strip() or readout_after.strip() in after
    print(f"{which}: ran {ran}; moved T with {how}: {before!r} -> {after!r}; timings (s): {timings}")
    print(f"screenshots: {ARTIFACTS / 'screenshot.png'}, {ARTIFACTS / 'widget.png'}")
